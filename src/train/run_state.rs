//! Checkpoints: everything needed to continue a run exactly, written so that a crash at any
//! moment leaves either the previous checkpoint or the new one, never a mix.
//!
//! `<run>/checkpoint/` holds `adapters.safetensors` (mlx-lm layout), `optimizer.safetensors`
//! (AdamW moments, in adapter order) and `state.json` (step, data cursor, the resolved recipe).
//! It is written to `<run>/.checkpoint-new/` and swapped in by renames.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::{Deserialize, Serialize};

use crate::io::atomic;
use crate::io::safetensors::SafetensorsStore;
use crate::lora::files::{NamedTensors, mlx_tensors, safetensors_bytes};
use crate::model::Decoder;
use crate::model::adapter::{from_vec, to_vec};
use crate::ops::ModelBackend;
use crate::train::optimizer::Optimizer;

/// A run's progress as `state.json` records it, to resume from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Micro-batches consumed (the data cursor: epoch = consumed / batches per epoch).
    pub consumed: usize,
    /// Target tokens that counted in the loss so far, over every consumed micro-batch.
    pub trained_tokens: usize,
    /// The resolved recipe the run was started with (TOML), to refuse resuming another run.
    pub recipe: String,
}

/// Where a run keeps its checkpoint: `<run>/checkpoint/`.
pub fn checkpoint_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint")
}

/// Finishes a swap that a crash interrupted: with no `<run>/checkpoint/` but a complete
/// `.checkpoint-new/` (its `state.json` is written last) or `.checkpoint-old/` (complete until the
/// swap removes it), renames the newer of them into place and removes what is left of the other
/// (older, or unfinished). Returns what it recovered.
pub fn recover(run_dir: &Path) -> Result<Option<PathBuf>> {
    let dir = checkpoint_dir(run_dir);
    if dir.exists() {
        return Ok(None);
    }
    let new = run_dir.join(".checkpoint-new");
    let old = run_dir.join(".checkpoint-old");
    for (candidate, other) in [(&new, &old), (&old, &new)] {
        if candidate.join("state.json").is_file() {
            atomic::rename(candidate, &dir).context("recovering an interrupted checkpoint")?;
            let _ = std::fs::remove_dir_all(other);
            return Ok(Some(candidate.clone()));
        }
    }
    Ok(None)
}

/// Writes a checkpoint (adapters, optimizer moments, state) beside the old one, then swaps it
/// into `<run>/checkpoint/`; returns that folder.
pub fn save<B: ModelBackend + AutodiffBackend>(
    run_dir: &Path,
    decoder: &Decoder<B>,
    optimizer: &Optimizer<B::InnerBackend>,
    state: &TrainState,
) -> Result<PathBuf> {
    let new = run_dir.join(".checkpoint-new");
    let old = run_dir.join(".checkpoint-old");
    let dir = checkpoint_dir(run_dir);
    // A swap a crash interrupted is finished first, so the folders below hold no finished work.
    recover(run_dir)?;
    let _ = std::fs::remove_dir_all(&new);
    std::fs::create_dir_all(&new).with_context(|| format!("creating {}", new.display()))?;
    atomic::write(
        &new.join("adapters.safetensors"),
        &safetensors_bytes(&mlx_tensors(decoder)?.0, &[])?,
    )?;
    let mut moments = NamedTensors::new();
    for (i, (m, v)) in optimizer.first.iter().zip(&optimizer.second).enumerate() {
        moments.insert(format!("first.{i:05}"), (m.dims().to_vec(), to_vec(m)));
        moments.insert(format!("second.{i:05}"), (v.dims().to_vec(), to_vec(v)));
    }
    let step = optimizer.step.to_string();
    atomic::write(
        &new.join("optimizer.safetensors"),
        &safetensors_bytes(&moments, &[("step", &step)])?,
    )?;
    atomic::write(
        &new.join("state.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    // Swap: the old checkpoint stays complete until the new one is in place.
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        atomic::rename(&dir, &old).context("moving the previous checkpoint aside")?;
    }
    atomic::rename(&new, &dir).context("moving the new checkpoint into place")?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(dir)
}

/// Reads `state.json` from a checkpoint folder.
pub fn load_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} is not a loraforge checkpoint (no readable state.json)",
            dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
}

/// Restores the optimizer's moments and step.
pub fn load_optimizer<B: Backend>(
    dir: &Path,
    optimizer: &mut Optimizer<B>,
    device: &B::Device,
) -> Result<()> {
    let path = dir.join("optimizer.safetensors");
    let store = SafetensorsStore::open_files(std::slice::from_ref(&path))?;
    let step = store
        .file_metadata()
        .get("step")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{}: no step in metadata", path.display()))?;
    for i in 0..optimizer.first.len() {
        for (prefix, slot) in [
            ("first", &mut optimizer.first[i]),
            ("second", &mut optimizer.second[i]),
        ] {
            let name = format!("{prefix}.{i:05}");
            let raw = store
                .get(&name)
                .with_context(|| format!("{}: `{name}` is missing", path.display()))?;
            if raw.shape != slot.dims() {
                bail!(
                    "{}: `{name}` has shape {:?}, expected {:?}",
                    path.display(),
                    raw.shape,
                    slot.dims()
                );
            }
            *slot = from_vec(
                raw.to_f32().map_err(anyhow::Error::msg)?,
                [raw.numel()],
                device,
            );
        }
    }
    optimizer.step = step;
    Ok(())
}

/// The first key whose value differs between two resolved recipes, ignoring keys that may change
/// on resume (length of the run, reporting cadence, output and export settings).
pub fn recipe_difference(saved: &str, current: &str) -> Option<String> {
    const MAY_CHANGE: [&str; 11] = [
        "train.iters",
        // The same global batch on any number of GPUs.
        "distributed",
        // Where checkpoints wait and how the MLP is chunked: memory, not math (absent from
        // checkpoints saved before they existed).
        "train.offload_checkpoints",
        "train.mlp_chunk_tokens",
        "train.epochs",
        "train.steps_per_report",
        "train.steps_per_eval",
        "train.save_every",
        "output",
        "eval",
        "export",
    ];
    let saved: toml::Table = toml::from_str(saved).ok()?;
    let current: toml::Table = toml::from_str(current).ok()?;
    let mut keys = Vec::new();
    flatten("", &toml::Value::Table(saved.clone()), &mut keys);
    flatten("", &toml::Value::Table(current.clone()), &mut keys);
    keys.sort();
    keys.dedup();
    let lookup = |t: &toml::Table, key: &str| -> Option<toml::Value> {
        let mut v = toml::Value::Table(t.clone());
        for part in key.split('.') {
            v = v.get(part)?.clone();
        }
        Some(v)
    };
    keys.into_iter()
        .filter(|k| {
            !MAY_CHANGE
                .iter()
                .any(|m| k == m || k.starts_with(&format!("{m}.")))
        })
        .find(|k| lookup(&saved, k) != lookup(&current, k))
        .map(|k| {
            let show = |v: Option<toml::Value>| v.map_or("(absent)".to_string(), |v| v.to_string());
            format!(
                "`{k}` was {} and is now {}",
                show(lookup(&saved, &k)),
                show(lookup(&current, &k))
            )
        })
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint folder whose `state.json` says `step`.
    fn checkpoint(dir: &Path, step: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("state.json"), step).unwrap();
    }

    /// A crash between the swap's two renames leaves both copies and no `checkpoint/`; a crash
    /// while the new one is written leaves it without `state.json`.
    #[test]
    fn an_interrupted_swap_is_finished_from_the_newer_complete_copy() {
        let run = std::env::temp_dir().join(format!("lf-recover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        let read = || std::fs::read_to_string(checkpoint_dir(&run).join("state.json")).unwrap();
        // Between the renames: the new copy wins.
        checkpoint(&run.join(".checkpoint-old"), "old");
        checkpoint(&run.join(".checkpoint-new"), "new");
        assert_eq!(recover(&run).unwrap(), Some(run.join(".checkpoint-new")));
        assert_eq!(read(), "new");
        // Nothing to do while checkpoint/ exists.
        assert_eq!(recover(&run).unwrap(), None);
        // A new copy cut off before its state.json: the old one is taken.
        std::fs::rename(checkpoint_dir(&run), run.join(".checkpoint-old")).unwrap();
        std::fs::create_dir_all(run.join(".checkpoint-new")).unwrap();
        assert_eq!(recover(&run).unwrap(), Some(run.join(".checkpoint-old")));
        assert_eq!(read(), "new");
        // No copy at all: nothing recovered, and resume reports the missing checkpoint.
        std::fs::remove_dir_all(&run).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        assert_eq!(recover(&run).unwrap(), None);
        std::fs::remove_dir_all(&run).unwrap();
    }

    #[test]
    fn recipe_difference_names_the_key_and_ignores_run_length() {
        let a = "[train]\niters = 10\nlearning_rate = 1e-4\n[lora]\nrank = 8\n";
        let b = "[train]\niters = 20\nlearning_rate = 1e-4\n[lora]\nrank = 8\n";
        assert_eq!(recipe_difference(a, b), None);
        let c = "[train]\niters = 10\nlearning_rate = 1e-4\n[lora]\nrank = 16\n";
        assert_eq!(
            recipe_difference(a, c).unwrap(),
            "`lora.rank` was 8 and is now 16"
        );
        // A checkpoint saved before the long-context keys existed resumes with them, and
        // offloading may be switched on to resume a run that ran out of device memory.
        let d = "[train]\niters = 10\nlearning_rate = 1e-4\ngrad_checkpoint = true\n\
                 offload_checkpoints = true\nmlp_chunk_tokens = 16384\n[lora]\nrank = 8\n";
        let e =
            "[train]\niters = 10\nlearning_rate = 1e-4\ngrad_checkpoint = true\n[lora]\nrank = 8\n";
        assert_eq!(recipe_difference(e, d), None);
    }
}
