//! `loraforge fuse`: fold adapters into their base and export it.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::export::{ExportFormat, ExportOptions, FloatDtype, GgufType};

/// `loraforge fuse`'s flags.
#[derive(Args)]
pub struct FuseArgs {
    /// The base: a Hugging Face folder, an mlx-community folder, or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Adapter folder (loraforge's, mlx_lm.lora's or peft's); without it the base is converted.
    #[arg(long)]
    adapters: Option<PathBuf>,
    /// Output folder (refused if it exists, unless --force).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = ExportFormat::Mlx)]
    format: ExportFormat,
    /// Write every weight in float, even where the base is quantized.
    #[arg(long)]
    dequantize: bool,
    /// Bits for the adapted matrices when the result stays quantized (mlx).
    #[arg(long, default_value_t = 8)]
    requant_bits: u32,
    /// Float type of float weights (default: the base's own; f16 for GGUF bases).
    #[arg(long, value_enum)]
    dtype: Option<FloatDtype>,
    /// Tensor type of a GGUF export's matrices.
    #[arg(long, value_enum, default_value_t = GgufType::Q8_0)]
    gguf_type: GgufType,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
}

/// Runs `loraforge fuse`.
pub fn run(args: FuseArgs) -> Result<()> {
    let opts = ExportOptions {
        format: args.format,
        out: args.out,
        dequantize: args.dequantize,
        requant_bits: args.requant_bits,
        dtype: args.dtype,
        gguf_type: args.gguf_type,
        force: args.force,
        quantize: None,
        convert: None,
    };
    let report = crate::export::export(&args.model, args.adapters.as_deref(), &opts)?;
    println!("{}", report.summary());
    Ok(())
}
