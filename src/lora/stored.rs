//! Adapter folders read onto the host, whoever wrote them: loraforge, `mlx_lm.lora` (mlx-lm
//! layout) or peft. Where the adapters sit is read from the tensor names, not from the config's
//! `keys` / `num_layers` (mlx-lm leaves `keys` out when it used its defaults); the config gives
//! the scale and the adapter kind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::io::safetensors::SafetensorsStore;

/// Which tool's layout a folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterLayout {
    /// `adapters.safetensors` (`<module>.lora_a` `[in, r]`, `.lora_b` `[r, out]`, `.m`).
    Mlx,
    /// `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight` `[r, in]`, ...).
    Peft,
}

/// One linear's adapter in mlx-lm's orientation (an experts' stack: one per expert, stacked).
#[derive(Debug, Clone)]
pub struct HostAdapter {
    /// `[in, r]`, row-major (`[experts, in, r]` for an experts' stack).
    pub a: Vec<f32>,
    /// `[r, out]`, row-major (`[experts, r, out]`).
    pub b: Vec<f32>,
    /// DoRA magnitude `[out]`.
    pub magnitude: Option<Vec<f32>>,
    /// Columns of the adapted linear's `[out, in]` weight.
    pub in_features: usize,
    /// Rows of the adapted linear's `[out, in]` weight.
    pub out_features: usize,
    /// The rank `r`.
    pub rank: usize,
    /// The factor the adapter's output is multiplied by, from the folder's config.
    pub scale: f64,
    /// 1, or the experts of the stack it adapts (each with its own `A`, `B`).
    pub experts: usize,
}

impl HostAdapter {
    /// `ΔW = s · (A B)ᵀ` as a row-major `[out, in]` matrix. Each element is a plain f64 sum
    /// rounded once to f32, so an export is the same bytes on every machine (a SIMD GEMM would
    /// pick FMA or not by CPU, and the files would differ in their last bits).
    /// An experts' stack's is `[experts · out, in]`, each expert's block from its own `A`, `B`.
    pub fn delta(&self) -> Vec<f32> {
        use rayon::prelude::*;
        let (inp, out, r) = (self.in_features, self.out_features, self.rank);
        let mut delta = vec![0f32; self.experts * out * inp];
        delta
            .par_chunks_mut(inp)
            .enumerate()
            .for_each(|(row_index, row)| {
                let (e, o) = (row_index / out, row_index % out);
                let (a, b) = (&self.a[e * inp * r..], &self.b[e * r * out..]);
                let b_col: Vec<f64> = (0..r).map(|k| f64::from(b[k * out + o])).collect();
                for (i, value) in row.iter_mut().enumerate() {
                    let a_row = &a[i * r..(i + 1) * r];
                    let sum: f64 = a_row
                        .iter()
                        .zip(&b_col)
                        .map(|(a, b)| f64::from(*a) * b)
                        .sum();
                    *value = (self.scale * sum) as f32;
                }
            });
        delta
    }

    /// The same update at rank `rank` ≥ its own: `A` gains zero columns and `B` zero rows, which
    /// add nothing (mlx-lm gives every adapter one rank; see `fused_parts`). At its own rank it
    /// comes back as it is.
    pub fn padded(self, rank: usize) -> HostAdapter {
        let (e, inp, out, r) = (self.experts, self.in_features, self.out_features, self.rank);
        if rank == r {
            return self;
        }
        let mut a = vec![0f32; e * inp * rank];
        for (dst, src) in a.chunks_exact_mut(rank).zip(self.a.chunks_exact(r)) {
            dst[..r].copy_from_slice(src);
        }
        let mut b = vec![0f32; e * rank * out];
        for (dst, src) in b
            .chunks_exact_mut(rank * out)
            .zip(self.b.chunks_exact(r * out))
        {
            dst[..r * out].copy_from_slice(src);
        }
        HostAdapter { a, b, rank, ..self }
    }

    /// The same update without the trailing rank columns that are zero in both `A` and `B`
    /// (what [`Self::padded`] adds; a trained column that is exactly zero in both goes too, and
    /// adds nothing either).
    pub fn unpadded(self) -> HostAdapter {
        let (inp, out, r) = (self.in_features, self.out_features, self.rank);
        if r == 0 || out == 0 || inp == 0 {
            return self;
        }
        let zero = |k: usize| {
            self.a.chunks_exact(r).all(|row| row[k] == 0.0)
                && self
                    .b
                    .chunks_exact(r * out)
                    .all(|m| m[k * out..(k + 1) * out].iter().all(|v| *v == 0.0))
        };
        let rank = (0..r).rev().find(|&k| !zero(k)).map_or(0, |k| k + 1);
        if rank == r || rank == 0 {
            return self;
        }
        let a = self
            .a
            .chunks_exact(r)
            .flat_map(|row| row[..rank].iter().copied())
            .collect();
        let b = self
            .b
            .chunks_exact(r * out)
            .flat_map(|m| m[..rank * out].iter().copied())
            .collect();
        debug_assert_eq!(self.a.len() / r, self.experts * inp);
        HostAdapter { a, b, rank, ..self }
    }
}

/// Every adapter of a folder, by module path (`model.layers.3.self_attn.q_proj`).
#[derive(Debug, Clone)]
pub struct HostAdapters {
    /// The folder read.
    pub dir: PathBuf,
    /// Which tool's layout the folder holds.
    pub layout: AdapterLayout,
    /// Whether any module carries a DoRA magnitude.
    pub dora: bool,
    /// The adapters, by module path.
    pub modules: BTreeMap<String, HostAdapter>,
    /// The base the config names (`model` / `base_model_name_or_path`), if any.
    pub base_model: Option<String>,
}

impl HostAdapters {
    /// Reads an mlx-lm or peft adapter folder.
    pub fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        if !dir.is_dir() {
            bail!(
                "{} is not an adapter folder (it should hold adapter_config.json and adapters.safetensors or adapter_model.safetensors)",
                dir.display()
            );
        }
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let config: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        let (layout, file) = if dir.join("adapters.safetensors").exists() {
            (AdapterLayout::Mlx, dir.join("adapters.safetensors"))
        } else if dir.join("adapter_model.safetensors").exists() {
            (AdapterLayout::Peft, dir.join("adapter_model.safetensors"))
        } else {
            bail!(
                "{} has neither adapters.safetensors (mlx-lm) nor adapter_model.safetensors (peft)",
                dir.display()
            );
        };
        let scale = match layout {
            AdapterLayout::Mlx => mlx_scale(&config, &config_path)?,
            AdapterLayout::Peft => peft_scale(&config, &config_path)?,
        };
        let mut modules = read_file(&file)?;
        for adapter in modules.values_mut() {
            adapter.scale = scale;
        }
        let dora = modules.values().any(|m| m.magnitude.is_some());
        let base_model = config
            .get("model")
            .or_else(|| config.get("base_model_name_or_path"))
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(HostAdapters {
            dir: dir.to_path_buf(),
            layout,
            dora,
            modules,
            base_model,
        })
    }

    /// Checks every adapter against the base's linears (`[out, in]` of the weight, and the
    /// experts it stacks, by [`canonical`] module path).
    pub fn check_against(&self, linears: &BTreeMap<String, ([usize; 2], usize)>) -> Result<()> {
        for (path, adapter) in &self.modules {
            let Some(&([rows, inp], experts)) = linears.get(path) else {
                bail!(
                    "{}: the adapters have a module `{path}` that the base model does not have (adapters for a different base?)",
                    self.dir.display()
                );
            };
            if experts != adapter.experts {
                bail!(
                    "{}: `{path}` is adapted as {} experts, but the base model's stacks {experts} (adapters for a different base?)",
                    self.dir.display(),
                    adapter.experts
                );
            }
            let out = rows / experts;
            if (out, inp) != (adapter.out_features, adapter.in_features) {
                bail!(
                    "{}: `{path}` is adapted as a [{}, {}] (out, in) linear, but the base model's is [{out}, {inp}] (adapters for a different base?)",
                    self.dir.display(),
                    adapter.out_features,
                    adapter.in_features
                );
            }
        }
        Ok(())
    }
}

fn matrix(store: &SafetensorsStore, file: &Path, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let raw = store
        .get(name)
        .with_context(|| format!("{}: adapter tensor `{name}` is missing", file.display()))?;
    if !matches!(raw.shape.len(), 2 | 3) || raw.shape.contains(&0) {
        bail!(
            "{}: `{name}` must be 2-D (3-D for experts) with no empty dimension, found shape {:?}",
            file.display(),
            raw.shape
        );
    }
    let values = raw
        .to_f32()
        .map_err(|e| anyhow::anyhow!("{}: `{name}`: {e}", file.display()))?;
    Ok((raw.shape.to_vec(), values))
}

fn vector(store: &SafetensorsStore, file: &Path, name: &str, len: usize) -> Result<Vec<f32>> {
    let raw = store
        .get(name)
        .with_context(|| format!("{}: `{name}` is missing", file.display()))?;
    if raw.shape != [len] {
        bail!(
            "{}: `{name}` has shape {:?}, its adapter needs [{len}]",
            file.display(),
            raw.shape
        );
    }
    raw.to_f32()
        .map_err(|e| anyhow::anyhow!("{}: `{name}`: {e}", file.display()))
}

/// A row-major `[rows, cols]` matrix transposed.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// Each of the `[rows, cols]` matrices stacked in `values` transposed (mlx-lm's SwitchLinear
/// adapters hold `A_e` as `[r, in]` and `B_e` as `[out, r]`, the transposes of ours).
pub fn transpose_each(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    values
        .chunks_exact(rows * cols)
        .flat_map(|m| transpose(m, rows, cols))
        .collect()
}

/// A module path with Mixtral's `block_sparse_moe` spelled `mlp`, as transformers 5 names it in
/// memory (and so in peft's files) while checkpoints and mlx-lm keep `block_sparse_moe`: adapters
/// are matched to modules by this form.
pub fn canonical(path: &str) -> String {
    path.replace(".block_sparse_moe.", ".mlp.")
}

/// The tensors of an adapter file in either layout (told apart by name), with `scale` 1: the
/// scale lives in the folder's config, which [`HostAdapters::read`] applies.
pub fn read_file(file: &Path) -> Result<BTreeMap<String, HostAdapter>> {
    let store = SafetensorsStore::open_files(&[file.to_path_buf()])?;
    let peft = store.names().any(|n| n.starts_with("base_model.model."));
    let modules = if peft {
        read_peft(&store, file)?
    } else {
        read_mlx(&store, file)?
    };
    if modules.is_empty() {
        bail!("{}: no adapter tensors found", file.display());
    }
    Ok(modules)
}

/// mlx-lm's `lora_parameters.scale` (20 when left out).
fn mlx_scale(config: &Value, config_path: &Path) -> Result<f64> {
    if config["fine_tune_type"].as_str() == Some("full") {
        bail!(
            "{}: fine_tune_type \"full\" holds whole weights, not adapters",
            config_path.display()
        );
    }
    Ok(config["lora_parameters"]["scale"].as_f64().unwrap_or(20.0))
}

/// peft's `lora_alpha / r`, or `lora_alpha / √r` with rsLoRA.
fn peft_scale(config: &Value, config_path: &Path) -> Result<f64> {
    if let Some(kind) = config["peft_type"].as_str()
        && kind != "LORA"
    {
        bail!(
            "{}: peft_type \"{kind}\" is not LoRA; only LoRA and DoRA adapters can be loaded",
            config_path.display()
        );
    }
    let r = config["r"]
        .as_f64()
        .with_context(|| format!("{}: no `r`", config_path.display()))?;
    let alpha = config["lora_alpha"].as_f64().unwrap_or(8.0);
    Ok(if config["use_rslora"].as_bool() == Some(true) {
        alpha / r.sqrt()
    } else {
        alpha / r
    })
}

fn read_mlx(store: &SafetensorsStore, file: &Path) -> Result<BTreeMap<String, HostAdapter>> {
    let mut out = BTreeMap::new();
    for name in store.names() {
        let Some(path) = name.strip_suffix(".lora_a") else {
            continue;
        };
        let (a_shape, a) = matrix(store, file, name)?;
        let (b_shape, b) = matrix(store, file, &format!("{path}.lora_b"))?;
        if let [experts, r, inp] = a_shape[..] {
            // mlx-lm's SwitchLinear: lora_a (experts, r, in), lora_b (experts, out, r).
            let [e_b, out_f, r_b] = b_shape[..] else {
                bail!(
                    "{}: `{path}.lora_a` is 3-D but `.lora_b` is not",
                    file.display()
                );
            };
            if (e_b, r_b) != (experts, r) {
                bail!(
                    "{}: `{path}.lora_b` has shape {b_shape:?}, where `.lora_a`'s {a_shape:?} needs ({experts}, out, {r})",
                    file.display()
                );
            }
            out.insert(
                canonical(path),
                HostAdapter {
                    a: transpose_each(&a, r, inp),
                    b: transpose_each(&b, out_f, r),
                    magnitude: None,
                    in_features: inp,
                    out_features: out_f,
                    rank: r,
                    scale: 1.0,
                    experts,
                },
            );
            continue;
        }
        let (inp, r, out_f) = (a_shape[0], a_shape[1], b_shape[1]);
        if b_shape.len() != 2 || b_shape[0] != r {
            bail!(
                "{}: `{path}.lora_a` has rank {r} but `{path}.lora_b` has {} rows",
                file.display(),
                b_shape[0]
            );
        }
        let magnitude = store
            .contains(&format!("{path}.m"))
            .then(|| vector(store, file, &format!("{path}.m"), out_f))
            .transpose()?;
        out.insert(
            canonical(path),
            HostAdapter {
                a,
                b,
                magnitude,
                in_features: inp,
                out_features: out_f,
                rank: r,
                scale: 1.0,
                experts: 1,
            },
        );
    }
    // Zero-padded ranks (mlx-lm's one rank for all; see `fused_parts`) come back as written.
    Ok(out
        .into_iter()
        .map(|(path, adapter)| (path, adapter.unpadded()))
        .collect())
}

fn read_peft(store: &SafetensorsStore, file: &Path) -> Result<BTreeMap<String, HostAdapter>> {
    let mut out = BTreeMap::new();
    for name in store.names() {
        let Some(path) = name
            .strip_prefix("base_model.model.")
            .and_then(|n| n.strip_suffix(".lora_A.weight"))
        else {
            continue;
        };
        if let Some(block_mlp) = path
            .trim_end_matches(".base_layer")
            .strip_suffix(".experts")
        {
            let inner = path.ends_with(".base_layer");
            out.extend(read_peft_experts(store, file, path, block_mlp, inner)?);
            continue;
        }
        let (a_shape, a_t) = matrix(store, file, name)?;
        let (b_shape, b_t) = matrix(
            store,
            file,
            &format!("base_model.model.{path}.lora_B.weight"),
        )?;
        let (rank, inp, out_f) = (a_shape[0], a_shape[1], b_shape[0]);
        if b_shape[1] != rank {
            bail!(
                "{}: `{path}` lora_A has rank {rank} but lora_B has {} columns",
                file.display(),
                b_shape[1]
            );
        }
        let m_name = format!("base_model.model.{path}.lora_magnitude_vector");
        let magnitude = store
            .contains(&m_name)
            .then(|| vector(store, file, &m_name, out_f))
            .transpose()?;
        out.insert(
            canonical(path),
            HostAdapter {
                a: transpose(&a_t, rank, inp),
                b: transpose(&b_t, out_f, rank),
                magnitude,
                in_features: inp,
                out_features: out_f,
                rank,
                scale: 1.0,
                experts: 1,
            },
        );
    }
    Ok(out)
}

/// peft's adapter on a transformers-5 experts parameter (`target_parameters`, its
/// `ParamWrapper`): `lora_A` `[experts · r, in]` (expert-major rows), `lora_B` `[out, r · experts]`
/// (rank-major columns), `ΔW_e = s · B_e A_e`. The folder's `adapter_config.json` says which
/// parameter it is (the outer wrapper of two is `down_proj`, the inner `gate_up_proj`) and the
/// rank; a fused `gate_up_proj` adapter becomes one adapter on the gate stack and one on the up
/// stack, sharing `A`, each with its half of `B`'s rows (gate's first, as transformers fuses).
fn read_peft_experts(
    store: &SafetensorsStore,
    file: &Path,
    path: &str,
    block_mlp: &str,
    inner: bool,
) -> Result<Vec<(String, HostAdapter)>> {
    let config_path = file.with_file_name("adapter_config.json");
    let config: Value = std::fs::read_to_string(&config_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .with_context(|| {
            format!(
                "{}: `{path}` is peft's adapter on experts, whose layout needs {} (its `r` and `target_parameters`)",
                file.display(),
                config_path.display()
            )
        })?;
    let mut params: Vec<&str> = config["target_parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str()?.rsplit('.').next())
        .collect();
    params.dedup();
    let param = match params[..] {
        [one] => one,
        _ if inner => "gate_up_proj",
        _ => "down_proj",
    };
    let rank_of = |key: &str| -> Option<f64> {
        config[key]
            .as_object()?
            .iter()
            .find(|(pattern, _)| pattern.ends_with(param))
            .and_then(|(_, v)| v.as_f64())
    };
    let r = rank_of("rank_pattern")
        .or_else(|| config["r"].as_f64())
        .with_context(|| format!("{}: no `r`", config_path.display()))? as usize;
    // A module whose own `alpha_pattern` / `rank_pattern` scale differs from the folder's
    // carries the ratio in B (the folder applies one scale to every module).
    let global = config["lora_alpha"].as_f64().unwrap_or(8.0) / config["r"].as_f64().unwrap_or(1.0);
    let own = rank_of("alpha_pattern").unwrap_or(global * r as f64) / r as f64;
    let (a_shape, a) = matrix(
        store,
        file,
        &format!("base_model.model.{path}.lora_A.weight"),
    )?;
    let (b_shape, b) = matrix(
        store,
        file,
        &format!("base_model.model.{path}.lora_B.weight"),
    )?;
    let ([er, inp], [out_f, re]) = (
        <[usize; 2]>::try_from(&a_shape[..])?,
        <[usize; 2]>::try_from(&b_shape[..])?,
    );
    if r == 0 || er % r != 0 || er != re {
        bail!(
            "{}: `{path}` lora_A is {a_shape:?} and lora_B {b_shape:?}, which are not experts × rank {r}",
            file.display()
        );
    }
    let experts = er / r;
    // Ours: a_e = A_eᵀ `[in, r]`; b_e `[r, out]` with b_e[k, o] = B[o, k · experts + e].
    let a = transpose_each(&a, r, inp);
    let b_expert = |e: usize, rows: std::ops::Range<usize>| -> Vec<f32> {
        (0..r)
            .flat_map(|k| {
                rows.clone()
                    .map(move |o| (o, k))
                    .map(|(o, k)| (b[o * re + k * experts + e] as f64 * own / global) as f32)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let adapter = |rows: std::ops::Range<usize>| HostAdapter {
        a: a.clone(),
        b: (0..experts)
            .flat_map(|e| b_expert(e, rows.clone()))
            .collect(),
        magnitude: None,
        in_features: inp,
        out_features: rows.len(),
        rank: r,
        scale: 1.0,
        experts,
    };
    let module = |leaf: &str| canonical(&format!("{block_mlp}.switch_mlp.{leaf}"));
    Ok(match param {
        "down_proj" => vec![(module("down_proj"), adapter(0..out_f))],
        "gate_up_proj" => vec![
            (module("gate_proj"), adapter(0..out_f / 2)),
            (module("up_proj"), adapter(out_f / 2..out_f)),
        ],
        other => bail!(
            "{}: peft adapts the experts' `{other}`, which loraforge does not know (gate_up_proj, down_proj)",
            config_path.display()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_is_scale_times_a_b_transposed() {
        // in = 3, r = 2, out = 2
        let adapter = HostAdapter {
            a: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            b: vec![1.0, 0.5, -1.0, 2.0],
            magnitude: None,
            in_features: 3,
            out_features: 2,
            rank: 2,
            scale: 2.0,
            experts: 1,
        };
        let delta = adapter.delta();
        for o in 0..2 {
            for i in 0..3 {
                let want: f32 = (0..2)
                    .map(|k| adapter.a[i * 2 + k] * adapter.b[k * 2 + o])
                    .sum();
                assert_eq!(delta[o * 3 + i], 2.0 * want, "[{o}, {i}]");
            }
        }
    }
}
