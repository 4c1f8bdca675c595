//! The mlx-community folder: `model.safetensors` (shards past 5 GiB) with
//! `{"format": "mlx"}` metadata, the index always, `config.json` with `quantization` and
//! `quantization_config`, tokenizer files and a model card.
//!
//! A quantized base stays quantized: matrices no adapter touched are copied as they are stored
//! (no second rounding), adapted ones are fused into the dequantized weights and requantized at
//! `requant_bits` (8 by default), recorded as per-module overrides. `--dequantize` writes floats.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::fuse::{FusedModel, Survival};
use super::mlx_convert::{self, Setting};
use super::{ExportOptions, FloatDtype};
use crate::io::safetensors_write::{Group, PlannedTensor, index_json, write_shards};
use crate::io::{RawDtype, python_json};
use crate::model::names::TensorSpec;
use crate::model::weights::HostWeight;
use crate::quant::QuantizedMatrix;
use crate::quant::affine::SUPPORTED_BITS;
use crate::quant::quantize::quantize;
use crate::tokenizer::Tokenizer;

const MAX_SHARD_BYTES: usize = 5 << 30;

/// How one tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Storage {
    Float,
    /// Copied packed from the base.
    Keep {
        bits: u32,
        group: usize,
    },
    /// Fused, then quantized again.
    Requantize {
        bits: u32,
        group: usize,
    },
    /// A float matrix quantized as `mlx_lm.convert -q` does (in the written float type first).
    Quantize(Setting),
}

impl Storage {
    /// `(bits, group)` of a quantized storage; `None` for float.
    fn quantized(self) -> Option<(u32, usize)> {
        match self {
            Storage::Float => None,
            Storage::Keep { bits, group }
            | Storage::Requantize { bits, group }
            | Storage::Quantize(Setting { bits, group, .. }) => Some((bits, group)),
        }
    }
}

pub fn write(
    model: &FusedModel,
    tokenizer: &Tokenizer,
    opts: &ExportOptions,
    dir: &Path,
) -> Result<(Survival, String)> {
    let dtype = opts.float_dtype(model.files);
    if !SUPPORTED_BITS.contains(&opts.requant_bits) {
        bail!(
            "--requant-bits {} is not an MLX quantization (supported: {SUPPORTED_BITS:?})",
            opts.requant_bits
        );
    }
    let storages: Vec<Storage> = model
        .specs
        .iter()
        .map(|spec| storage(model, opts, spec))
        .collect();
    if opts.quantize.is_some() && storages.iter().any(|s| matches!(s, Storage::Keep { .. })) {
        bail!(
            "{} is already quantized; -q quantizes a float model: pass its float original, or write it in float first (-d)",
            model.files.path.display()
        );
    }
    let groups: Vec<Group> = model
        .specs
        .iter()
        .zip(&storages)
        .map(|(spec, s)| planned(spec, *s, dtype))
        .collect();

    let mut survival = Survival::default();
    let progress = model.progress();
    let produce = |i: usize| -> Result<Vec<Vec<u8>>> {
        progress.inc();
        let spec = &model.specs[i];
        let tensor = model.tensor(spec)?;
        Ok(match storages[i] {
            Storage::Float => vec![tensor.float_bytes(spec.module(), dtype, &mut survival)],
            Storage::Keep { .. } => match &tensor.base {
                HostWeight::Quantized(q) => packed_bytes(q, dtype),
                HostWeight::Dense { .. } => unreachable!("planned from the stored layout"),
            },
            Storage::Quantize(s) => {
                let values = dtype.round_trip(&tensor.values());
                packed_bytes(&quantized(&values, spec, s.bits, s.group, dtype)?, dtype)
            }
            Storage::Requantize { bits, group } => {
                let encode = |w: &[f32]| quantized(w, spec, bits, group, dtype);
                let (base, fused) = (tensor.base_values(), tensor.values());
                let (q_base, q_fused) = (encode(&base)?, encode(&fused)?);
                survival.add(
                    spec.module(),
                    &base,
                    &fused,
                    &q_base.dequantize(),
                    &q_fused.dequantize(),
                );
                packed_bytes(&q_fused, dtype)
            }
        })
    };
    let written = write_shards(dir, &groups, MAX_SHARD_BYTES, &[("format", "mlx")], produce)?;
    progress.finish();
    let index = index_json(&written, model.parameter_count());
    let quantization = match &opts.quantize {
        Some(q) => Some(q.config_json(&settings(model, &storages))),
        None => quantization_json(model, &storages),
    };
    match (&opts.convert, &model.files.config_json) {
        (Some(_), Some(source)) => {
            let config = mlx_convert::config(model.files, source, quantization);
            write_python_json(&dir.join("model.safetensors.index.json"), &index)?;
            write_python_json(&dir.join("config.json"), &config)?;
        }
        _ => {
            super::write_json(&dir.join("model.safetensors.index.json"), &index)?;
            let mut config = super::config_json::config_json(model.files, tokenizer, dtype);
            super::config_json::add_older_keys(&mut config, &model.files.config);
            if let Some(quantization) = quantization
                && let Some(map) = config.as_object_mut()
            {
                map.insert("quantization".into(), quantization.clone());
                map.insert("quantization_config".into(), quantization);
            }
            super::write_json(&dir.join("config.json"), &config)?;
        }
    }
    super::tokenizer_files::write(model.files, tokenizer, dir)?;

    // The encoding written anew (kept matrices are the base's).
    let encoding = match storages
        .iter()
        .filter(|s| !matches!(s, Storage::Keep { .. }))
        .find_map(|s| s.quantized())
    {
        Some((bits, group)) => format!("{bits}-bit MLX affine (group {group})"),
        None => dtype.torch_name().to_string(),
    };
    let card = match &opts.convert {
        Some(convert) => mlx_convert::model_card(convert.base_model.as_deref()),
        None => {
            let usage = format!(
                "mlx_lm.generate --model {} --prompt \"Hello\"",
                opts.out.display()
            );
            super::card::model_card(model, "mlx", &encoding, &survival, &usage)
        }
    };
    std::fs::write(dir.join("README.md"), card)?;
    Ok((survival, encoding))
}

/// `value` as Python's `json.dump(indent=4)` writes it, as mlx-lm writes its JSON files.
fn write_python_json(path: &Path, value: &Value) -> Result<()> {
    std::fs::write(path, python_json::dump(value, 4))
        .with_context(|| format!("writing {}", path.display()))
}

/// Each quantized matrix's module and setting, for `convert`'s `quantization` object.
fn settings<'a>(model: &'a FusedModel, storages: &[Storage]) -> Vec<(&'a str, Setting)> {
    model
        .specs
        .iter()
        .zip(storages)
        .filter_map(|(spec, s)| match *s {
            Storage::Quantize(s) => Some((spec.module(), s)),
            _ => None,
        })
        .collect()
}

/// `w` (the matrix of `spec`) quantized, its scales and biases rounded to `dtype` as they are
/// stored, so that what the writer measures is what reads back.
fn quantized(
    w: &[f32],
    spec: &TensorSpec,
    bits: u32,
    group: usize,
    dtype: FloatDtype,
) -> Result<QuantizedMatrix> {
    let (rows, cols) = rows_cols(spec);
    let mut q = quantize(w, rows, cols, bits, group)?;
    q.scales = dtype.round_trip(&q.scales);
    q.biases = dtype.round_trip(&q.biases);
    Ok(q)
}

fn storage(model: &FusedModel, opts: &ExportOptions, spec: &TensorSpec) -> Storage {
    if !spec.is_matrix() || opts.dequantize {
        return Storage::Float;
    }
    match model.files.weights.stored_quantization(&spec.name) {
        None => match opts
            .quantize
            .and_then(|q| q.setting(spec, &model.files.config))
        {
            Some(setting) => Storage::Quantize(setting),
            None => Storage::Float,
        },
        Some((bits, group)) if model.adapter(spec).is_none() => Storage::Keep { bits, group },
        Some((_, group)) => Storage::Requantize {
            bits: opts.requant_bits,
            group,
        },
    }
}

fn planned(spec: &TensorSpec, storage: Storage, dtype: FloatDtype) -> Group {
    match storage.quantized() {
        None => vec![PlannedTensor::new(&spec.name, dtype.raw(), &spec.shape)],
        Some((bits, group)) => {
            // An experts' stack keeps its leading `[experts, out]`, as mlx-lm's SwitchLinear.
            let (&cols, leading) = spec.shape.split_last().expect("a matrix");
            let module = spec.module();
            let with_last = |last: usize| [leading, &[last]].concat();
            let groups = with_last(cols / group);
            vec![
                PlannedTensor::new(
                    &spec.name,
                    RawDtype::U32,
                    &with_last(cols * bits as usize / 32),
                ),
                PlannedTensor::new(format!("{module}.scales"), dtype.raw(), &groups),
                PlannedTensor::new(format!("{module}.biases"), dtype.raw(), &groups),
            ]
        }
    }
}

/// A matrix's rows (every leading dimension: an experts' stack's `experts · out`) and columns.
fn rows_cols(spec: &TensorSpec) -> (usize, usize) {
    let (&cols, leading) = spec.shape.split_last().expect("a matrix");
    (leading.iter().product(), cols)
}

fn packed_bytes(q: &QuantizedMatrix, dtype: FloatDtype) -> Vec<Vec<u8>> {
    vec![
        q.packed.iter().flat_map(|w| w.to_le_bytes()).collect(),
        dtype.encode(&q.scales),
        dtype.encode(&q.biases),
    ]
}

/// `{"group_size", "bits", "mode", <module>: {...}}`: the most common setting as the default and
/// every other quantized module as an override; `None` when nothing is quantized.
fn quantization_json(model: &FusedModel, storages: &[Storage]) -> Option<Value> {
    let settings: Vec<(&str, (u32, usize))> = model
        .specs
        .iter()
        .zip(storages)
        .filter_map(|(spec, s)| Some((spec.module(), s.quantized()?)))
        .collect();
    let mut counts: BTreeMap<(u32, usize), usize> = BTreeMap::new();
    for (_, setting) in &settings {
        *counts.entry(*setting).or_default() += 1;
    }
    let (&(bits, group), _) = counts.iter().max_by_key(|(_, n)| **n)?;
    let mut q = json!({"group_size": group, "bits": bits, "mode": "affine"});
    for (module, setting) in settings {
        if setting != (bits, group) {
            q[module] = json!({"group_size": setting.1, "bits": setting.0});
        }
    }
    Some(q)
}
