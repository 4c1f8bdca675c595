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
use super::stored::HostAdapters;
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

/// The adapters in mlx-lm's naming and layout.
pub fn mlx_tensors<B: ModelBackend>(decoder: &Decoder<B>) -> NamedTensors {
    let mut out = NamedTensors::new();
    for (path, adapter) in decoder.adapters() {
        out.insert(
            format!("{path}.lora_a"),
            (adapter.a.dims().to_vec(), to_vec(&adapter.a)),
        );
        out.insert(
            format!("{path}.lora_b"),
            (adapter.b.dims().to_vec(), to_vec(&adapter.b)),
        );
        if let Some(m) = &adapter.magnitude {
            out.insert(format!("{path}.m"), (m.dims().to_vec(), to_vec(m)));
        }
    }
    out
}

/// The adapters in peft's naming and layout (transposed).
pub fn peft_tensors<B: ModelBackend>(decoder: &Decoder<B>) -> NamedTensors {
    let mut out = NamedTensors::new();
    for (path, adapter) in decoder.adapters() {
        let [inp, r] = adapter.a.dims();
        let [_, outf] = adapter.b.dims();
        out.insert(
            format!("base_model.model.{path}.lora_A.weight"),
            (vec![r, inp], to_vec(&adapter.a.clone().transpose())),
        );
        out.insert(
            format!("base_model.model.{path}.lora_B.weight"),
            (vec![outf, r], to_vec(&adapter.b.clone().transpose())),
        );
        if let Some(m) = &adapter.magnitude {
            out.insert(
                format!("base_model.model.{path}.lora_magnitude_vector"),
                (vec![outf], to_vec(m)),
            );
        }
    }
    out
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
    let bytes = safetensors_bytes(&mlx_tensors(decoder), &[])?;
    if let Some(step) = step {
        atomic::write(&dir.join(format!("{step:07}_adapters.safetensors")), &bytes)?;
    }
    atomic::write(&dir.join("adapters.safetensors"), &bytes)?;
    let config = json!({
        "fine_tune_type": if spec.dora { "dora" } else { "lora" },
        "model": base_model,
        "num_layers": spec.num_layers,
        "lora_parameters": {
            "rank": spec.rank,
            "scale": spec.scale,
            "dropout": spec.dropout,
            "keys": spec.keys,
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
    let bytes = safetensors_bytes(&peft_tensors(decoder), &[("format", "pt")])?;
    atomic::write(&dir.join("adapter_model.safetensors"), &bytes)?;
    let config = peft_config(&PeftConfig {
        rank: spec.rank,
        scale: spec.scale,
        dropout: spec.dropout,
        rslora: spec.rslora,
        dora: spec.dora,
        modules: spec
            .keys
            .iter()
            .map(|k| k.rsplit('.').next().unwrap_or(k).to_string())
            .collect(),
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
    /// The decoder blocks adapted, as peft's `layers_to_transform`.
    pub layers: Vec<usize>,
    /// `base_model_name_or_path`: the base model's path as the run or export was given it.
    pub base_model: String,
}

/// `adapter_config.json` for peft: `lora_alpha` = scale·r, or scale·√r with rsLoRA.
pub fn peft_config(c: &PeftConfig) -> serde_json::Value {
    let r = c.rank as f64;
    let alpha = if c.rslora {
        c.scale * r.sqrt()
    } else {
        c.scale * r
    };
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
    let modules = super::stored::read_file(file)?;
    for (path, linear) in decoder.linears_mut() {
        let Some(adapter) = linear.adapter.as_mut() else {
            continue;
        };
        let h = modules.get(&path).ok_or_else(|| {
            anyhow!(
                "{}: no adapter for `{path}`, which the model has",
                file.display()
            )
        })?;
        let (a, b) = (adapter.a.dims(), adapter.b.dims());
        if [h.in_features, h.rank] != a || [h.rank, h.out_features] != b {
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
        .map(|(path, linear)| (path, linear.weight.dims()))
        .collect();
    host.check_against(&shapes)?;
    for (path, linear) in decoder.linears_mut() {
        let Some(h) = host.modules.get(&path) else {
            continue;
        };
        linear.adapter = Some(LoraAdapter {
            a: from_vec(h.a.clone(), [h.in_features, h.rank], device),
            b: from_vec(h.b.clone(), [h.rank, h.out_features], device),
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
