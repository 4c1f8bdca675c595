//! Adapter files:
//! - mlx-lm: `adapters.safetensors` with `<module>.lora_a` `[in, r]`, `.lora_b` `[r, out]`,
//!   `.m` `[out]` (DoRA), and `adapter_config.json` (`fine_tune_type`, `num_layers`,
//!   `lora_parameters {rank, scale, dropout, keys}`).
//! - peft: `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` `[r, in]`,
//!   `.lora_B.weight` `[out, r]` (`lora_magnitude_vector` for DoRA), and `adapter_config.json`
//!   (`peft_type`, `r`, `lora_alpha` = scale·r, or scale·√r with rsLoRA).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

use super::AdapterSpec;
use super::fused_parts::{join_parts, split_parts};
use super::peft_layout::peft_layout;
use super::stored::{HostAdapter, HostAdapters, canonical, transpose_each};
use crate::io::atomic;
use crate::model::Decoder;
use crate::model::LoraAdapter;
use crate::model::adapter::{from_vec, to_vec};
use crate::ops::ModelBackend;

/// Named f32 tensors in row-major order, ready to be written.
pub type NamedTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Serialises f32 tensors to safetensors bytes, with optional `__metadata__`.
pub fn safetensors_bytes(tensors: &NamedTensors, metadata: &[(&str, &str)]) -> Result<Vec<u8>> {
    let bytes: BTreeMap<&String, Vec<u8>> = tensors
        .iter()
        .map(|(name, (_, values))| (name, values.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views = tensors
        .iter()
        .map(|(name, (shape, _))| {
            TensorView::new(Dtype::F32, shape.clone(), &bytes[name])
                .map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = (!metadata.is_empty()).then(|| {
        metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    });
    Ok(safetensors::serialize(views, metadata)?)
}

/// The adapters in mlx-lm's naming and layout, as files hold them (see [`file_adapters`]; an
/// experts' stack as its SwitchLinear holds them: `lora_a` `(experts, r, in)`, `lora_b`
/// `(experts, out, r)`), and the one rank mlx-lm gives them all: an adapter of a lower rank is
/// padded with zeros to it (the same update; reading drops the padding).
pub fn mlx_tensors<B: ModelBackend>(decoder: &Decoder<B>) -> Result<(NamedTensors, usize)> {
    let adapters = file_adapters(decoder)?;
    let rank = adapters.values().map(|h| h.rank).max().unwrap_or(0);
    let mut out = NamedTensors::new();
    for (path, h) in adapters {
        let h = h.padded(rank);
        let (inp, out_f) = (h.in_features, h.out_features);
        let (a, b) = match h.experts {
            1 => ((vec![inp, rank], h.a), (vec![rank, out_f], h.b)),
            e => (
                (vec![e, rank, inp], transpose_each(&h.a, inp, rank)),
                (vec![e, out_f, rank], transpose_each(&h.b, rank, out_f)),
            ),
        };
        out.insert(format!("{path}.lora_a"), a);
        out.insert(format!("{path}.lora_b"), b);
        if let Some(m) = h.magnitude {
            out.insert(format!("{path}.m"), (vec![out_f], m));
        }
    }
    Ok((out, rank))
}

/// The decoder's adapters on the host, by module path as the model names it (Mixtral's
/// `block_sparse_moe`), one per adapted linear (a part of a fused linear counts on its own).
fn adapters_on_host<B: ModelBackend>(decoder: &Decoder<B>) -> BTreeMap<String, HostAdapter> {
    decoder
        .adapters_with_experts()
        .into_iter()
        .map(|(path, adapter, experts)| {
            let ([rows, rank], [_, out]) = (adapter.a.dims(), adapter.b.dims());
            let host = HostAdapter {
                a: to_vec(&adapter.a),
                b: to_vec(&adapter.b),
                magnitude: adapter.magnitude.as_ref().map(to_vec),
                in_features: rows / experts,
                out_features: out,
                rank,
                scale: adapter.scale,
                experts,
            };
            (path, host)
        })
        .collect()
}

/// The decoder's adapters as files hold them, by module path: the adapters of a fused linear's
/// parts joined into one on the fused linear, which is all mlx-lm's and transformers' models
/// have (see [`join_parts`]).
pub fn file_adapters<B: ModelBackend>(
    decoder: &Decoder<B>,
) -> Result<BTreeMap<String, HostAdapter>> {
    join_parts(adapters_on_host(decoder), &decoder.config)
}

/// [`file_adapters`] by ([`canonical`]) module path, as peft names them.
pub fn host_adapters<B: ModelBackend>(
    decoder: &Decoder<B>,
) -> Result<BTreeMap<String, HostAdapter>> {
    Ok(file_adapters(decoder)?
        .into_iter()
        .map(|(path, h)| (canonical(&path), h))
        .collect())
}

/// The adapters in peft's naming and layout (see [`peft_layout`]).
pub fn peft_tensors<B: ModelBackend>(decoder: &Decoder<B>) -> Result<NamedTensors> {
    Ok(peft_layout(&host_adapters(decoder)?).tensors)
}

/// Writes `adapters.safetensors` (+ a `{step:07}_adapters.safetensors` snapshot) and
/// `adapter_config.json` as mlx-lm reads them.
pub fn save_mlx<B: ModelBackend>(
    dir: &Path,
    decoder: &Decoder<B>,
    spec: &AdapterSpec,
    base_model: &str,
    step: Option<usize>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (tensors, rank) = mlx_tensors(decoder)?;
    let bytes = safetensors_bytes(&tensors, &[])?;
    if let Some(step) = step {
        atomic::write(&dir.join(format!("{step:07}_adapters.safetensors")), &bytes)?;
    }
    atomic::write(&dir.join("adapters.safetensors"), &bytes)?;
    let config = json!({
        "fine_tune_type": if spec.dora { "dora" } else { "lora" },
        "model": base_model,
        "num_layers": spec.num_layers,
        "lora_parameters": {
            "rank": rank,
            "scale": spec.scale,
            "dropout": spec.dropout,
            "keys": spec.file_keys(decoder.config.family),
        },
    });
    atomic::write(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    Ok(())
}

/// Writes the peft folder (`adapter_model.safetensors` + `adapter_config.json`).
pub fn save_peft<B: ModelBackend>(
    dir: &Path,
    decoder: &Decoder<B>,
    spec: &AdapterSpec,
    base_model: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let layout = peft_layout(&host_adapters(decoder)?);
    let bytes = safetensors_bytes(&layout.tensors, &[("format", "pt")])?;
    atomic::write(&dir.join("adapter_model.safetensors"), &bytes)?;
    let config = peft_config(&PeftConfig {
        rank: spec.rank,
        scale: spec.scale,
        dropout: spec.dropout,
        rslora: spec.rslora,
        dora: spec.dora,
        modules: layout.modules,
        parameters: layout.parameters,
        ranks: layout.ranks,
        layers: spec.layers.clone(),
        base_model: base_model.to_string(),
    });
    atomic::write(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    Ok(())
}

/// What peft's `adapter_config.json` records.
pub struct PeftConfig {
    /// The adapters' rank `r`.
    pub rank: usize,
    /// The factor the adapter's output is multiplied by; `lora_alpha` is derived from it.
    pub scale: f64,
    /// Dropout probability on the adapter's input in training (`lora_dropout`).
    pub dropout: f64,
    /// rsLoRA: `lora_alpha` is scale·√r rather than scale·r (`use_rslora`).
    pub rslora: bool,
    /// DoRA adapters, with a magnitude vector per module (`use_dora`).
    pub dora: bool,
    /// Leaf names (`q_proj`), as peft's `target_modules`.
    pub modules: Vec<String>,
    /// Adapted experts' parameters (`mlp.experts.down_proj`), as peft's `target_parameters`.
    pub parameters: Vec<String>,
    /// The rank of each adapted module by peft's pattern key (its leaf name, `qkv_proj`); those
    /// that are not `rank` go in `rank_pattern`, with an `alpha_pattern` that keeps the scale.
    pub ranks: BTreeMap<String, usize>,
    /// The decoder blocks adapted, as peft's `layers_to_transform`.
    pub layers: Vec<usize>,
    /// `base_model_name_or_path`: the base model's path as the run or export was given it.
    pub base_model: String,
}

/// `adapter_config.json` for peft: `lora_alpha` = scale·r, or scale·√r with rsLoRA.
pub fn peft_config(c: &PeftConfig) -> serde_json::Value {
    let scaled = |r: usize| {
        if c.rslora {
            c.scale * (r as f64).sqrt()
        } else {
            c.scale * r as f64
        }
    };
    let (mut rank_pattern, mut alpha_pattern) = (serde_json::Map::new(), serde_json::Map::new());
    // A whole path names a block whose leaf has another rank elsewhere: always written.
    for (key, &r) in c
        .ranks
        .iter()
        .filter(|(k, r)| **r != c.rank || k.contains('.'))
    {
        rank_pattern.insert(key.clone(), json!(r));
        alpha_pattern.insert(key.clone(), json!(scaled(r)));
    }
    let alpha = scaled(c.rank);
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": c.base_model,
        "r": c.rank,
        "lora_alpha": alpha,
        "lora_dropout": c.dropout,
        "use_rslora": c.rslora,
        "use_dora": c.dora,
        "target_modules": c.modules,
        "target_parameters": c.parameters,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "layers_to_transform": c.layers,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
    })
}

/// Loads adapter weights (mlx-lm or peft layout, detected by name) into the decoder's existing
/// adapters, whose scale and dropout stay as they are; every adapter must be found with the
/// shape it has.
pub fn load_into<B: ModelBackend>(
    decoder: &mut Decoder<B>,
    file: &Path,
    device: &B::Device,
) -> Result<()> {
    let ranks = decoder
        .adapters()
        .into_iter()
        .map(|(path, adapter)| (path, adapter.a.dims()[1]))
        .collect();
    let modules = split_parts(
        super::stored::read_file(file)?,
        &decoder.config,
        &ranks,
        file,
    )?;
    for (path, linear) in decoder.linears_mut() {
        let Some(adapter) = linear.adapter.as_mut() else {
            continue;
        };
        let h = modules.get(&canonical(&path)).ok_or_else(|| {
            anyhow!(
                "{}: no adapter for `{path}`, which the model has",
                file.display()
            )
        })?;
        let (a, b) = (adapter.a.dims(), adapter.b.dims());
        // Zero rank columns read as padding come back (they add nothing, and stay zero).
        let h = match h.rank < a[1] {
            true => std::borrow::Cow::Owned(h.clone().padded(a[1])),
            false => std::borrow::Cow::Borrowed(h),
        };
        let e = h.experts;
        if [e * h.in_features, h.rank] != a || [e * h.rank, h.out_features] != b {
            bail!(
                "{}: `{path}` is adapted as [{}, {}] (in, out) at rank {}; the model needs [{}, {}] at rank {} (adapters for a different base?)",
                file.display(),
                h.in_features,
                h.out_features,
                h.rank,
                a[0],
                b[1],
                a[1]
            );
        }
        let magnitude = match (&adapter.magnitude, &h.magnitude) {
            (None, _) => None,
            (Some(_), Some(m)) => Some(from_vec(m.clone(), [h.out_features], device)),
            (Some(_), None) => bail!("{}: DoRA magnitude for `{path}` is missing", file.display()),
        };
        *adapter = LoraAdapter {
            a: from_vec(h.a.clone(), a, device),
            b: from_vec(h.b.clone(), b, device),
            magnitude,
            ..adapter.clone()
        };
    }
    Ok(())
}

/// Adds the adapters saved in `dir` to a loaded model: loraforge's and `mlx_lm.lora`'s folders
/// (mlx-lm layout) and peft's. Each adapter goes on the linear its tensor names say; a module the
/// model lacks or a shape that does not fit is an error naming it.
pub fn attach<B: ModelBackend>(
    decoder: &mut Decoder<B>,
    dir: &Path,
    device: &B::Device,
) -> Result<HostAdapters> {
    let host = HostAdapters::read(dir)?;
    let shapes = decoder
        .linears_mut()
        .into_iter()
        .map(|(path, linear)| (canonical(&path), (linear.weight.dims(), linear.experts)))
        .collect();
    host.check_against(&shapes)?;
    for (path, linear) in decoder.linears_mut() {
        let Some(h) = host.modules.get(&canonical(&path)) else {
            continue;
        };
        let e = h.experts;
        linear.adapter = Some(LoraAdapter {
            a: from_vec(h.a.clone(), [e * h.in_features, h.rank], device),
            b: from_vec(h.b.clone(), [e * h.rank, h.out_features], device),
            magnitude: h
                .magnitude
                .clone()
                .map(|m| from_vec(m, [h.out_features], device)),
            scale: h.scale,
            dropout: 0.0,
            dropout_without_autodiff: false,
        });
    }
    Ok(host)
}
