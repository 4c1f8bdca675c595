//! `loraforge convert`: a model to an mlx-community folder as `mlx_lm.convert` writes it,
//! optionally quantized (`-q`), or to GGUF or a Hugging Face folder as `fuse` writes them.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::export::{
    Convert, ExportFormat, ExportOptions, FloatDtype, GgufType, MixedRecipe, Quantize,
};
use crate::quant::affine::SUPPORTED_BITS;

/// `loraforge convert`'s flags: mlx_lm.convert's, under the same names.
#[derive(Args)]
pub struct ConvertArgs {
    /// The model: a Hugging Face folder or hub name, an mlx-community folder, or a .gguf file.
    #[arg(long, visible_alias = "hf-path")]
    model: PathBuf,
    /// Output folder (refused if it exists, unless --force).
    #[arg(long, visible_alias = "mlx-path")]
    out: PathBuf,
    /// Quantize the float matrices (MLX affine, as `mlx_lm.convert -q`).
    #[arg(short = 'q', long)]
    quantize: bool,
    /// Bits per weight: 2, 3, 4, 5, 6 or 8 [default: 4].
    #[arg(long, requires = "quantize")]
    q_bits: Option<u32>,
    /// Weights per scale and bias: 32, 64 or 128 [default: 64].
    #[arg(long, requires = "quantize")]
    q_group_size: Option<usize>,
    /// A mixed-bit recipe: more bits for the head and some v and down projections.
    #[arg(long, value_enum, requires = "quantize")]
    quant_predicate: Option<MixedRecipe>,
    /// Float type of the float weights, and of scales and biases (default: the model's own).
    #[arg(long, value_enum)]
    dtype: Option<FloatDtype>,
    /// Write a quantized model's weights in float.
    #[arg(short = 'd', long, conflicts_with = "quantize")]
    dequantize: bool,
    /// Output format: an mlx-community folder, a Hugging Face folder, or one GGUF file.
    #[arg(long, value_enum, default_value_t = ExportFormat::Mlx)]
    to: ExportFormat,
    /// Tensor type of a GGUF's matrices (--to gguf).
    #[arg(long, value_enum, default_value_t = GgufType::Q8_0)]
    gguf_type: GgufType,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

/// The group sizes MLX's affine quantization takes.
const GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// Runs `loraforge convert`.
pub fn run(args: ConvertArgs) -> Result<()> {
    let quantize = match args.quantize {
        false => None,
        true => Some(quantize_settings(&args)?),
    };
    // A name that is not a path here is a hub repository (resolved through the hub cache).
    let base_model = (!args.model.exists()).then(|| args.model.to_string_lossy().into_owned());
    let opts = ExportOptions {
        format: args.to,
        out: args.out,
        dequantize: args.dequantize,
        requant_bits: 8,
        dtype: args.dtype,
        gguf_type: args.gguf_type,
        force: args.force,
        quantize,
        convert: Some(Convert { base_model }),
    };
    let report = crate::export::export(&args.model, None, &opts)?;
    println!("{}", report.summary());
    Ok(())
}

fn quantize_settings(args: &ConvertArgs) -> Result<Quantize> {
    if args.to != ExportFormat::Mlx {
        bail!(
            "-q quantizes to MLX's affine format, so it needs --to mlx; a GGUF's matrices are chosen with --gguf-type (q8_0, q6_k, q4_k, ...)"
        );
    }
    let bits = args.q_bits.unwrap_or(4);
    if !SUPPORTED_BITS.contains(&bits) {
        bail!("--q-bits {bits} is not an MLX quantization; use one of {SUPPORTED_BITS:?}");
    }
    let group = args.q_group_size.unwrap_or(64);
    if !GROUP_SIZES.contains(&group) {
        bail!("--q-group-size {group} is not an MLX group size; use one of {GROUP_SIZES:?}");
    }
    Ok(Quantize {
        bits,
        group,
        recipe: args.quant_predicate,
    })
}
