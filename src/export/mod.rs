//! `loraforge fuse`: fold adapters into their base and write a model other tools load:
//! an mlx-community folder (`mlx`), a Hugging Face folder with a PEFT adapter beside it (`hf`),
//! or a GGUF file (`gguf`). The output is written into a temporary sibling folder and renamed
//! into place at the end, so a failure (a full disk included) never leaves a partial folder.

mod card;
mod config_json;
pub mod fuse;
mod gguf;
mod hf;
mod mlx;
pub mod mlx_convert;
mod tokenizer_files;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::io::gguf::GgmlType;
use crate::io::{RawDtype, atomic};
use crate::lora::stored::{HostAdapters, canonical};
use crate::model::ModelFiles;
pub use crate::recipe::{ExportFormat, FloatDtype, GgufType};
use fuse::{FusedModel, Survival};
pub use mlx_convert::{MixedRecipe, Quantize};

impl FloatDtype {
    /// The base's own float type (`torch_dtype` of its config); f16 for GGUF and others.
    pub fn of_base(files: &ModelFiles) -> Self {
        match files.config.dtype.as_str() {
            "float32" => FloatDtype::F32,
            "bfloat16" => FloatDtype::Bf16,
            _ => FloatDtype::F16,
        }
    }

    /// The safetensors element type of this float type.
    pub fn raw(self) -> RawDtype {
        match self {
            FloatDtype::F32 => RawDtype::F32,
            FloatDtype::F16 => RawDtype::F16,
            FloatDtype::Bf16 => RawDtype::BF16,
        }
    }

    fn ggml(self) -> GgmlType {
        match self {
            FloatDtype::F32 => GgmlType::F32,
            FloatDtype::F16 => GgmlType::F16,
            FloatDtype::Bf16 => GgmlType::BF16,
        }
    }

    /// Little-endian bytes of `values` in this type (round to nearest even).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        crate::quant::ggml::encode(self.ggml(), values)
    }

    /// `values` as they read back after [`FloatDtype::encode`].
    pub fn round_trip(self, values: &[f32]) -> Vec<f32> {
        crate::quant::ggml::decode(self.ggml(), 1, values.len(), &self.encode(values))
    }

    /// The name transformers uses (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "float32",
            FloatDtype::F16 => "float16",
            FloatDtype::Bf16 => "bfloat16",
        }
    }
}

impl GgufType {
    /// The GGML tensor type written for this choice.
    pub fn ggml(self) -> GgmlType {
        match self {
            GgufType::F32 => GgmlType::F32,
            GgufType::F16 => GgmlType::F16,
            GgufType::Bf16 => GgmlType::BF16,
            GgufType::Q8_0 => GgmlType::Q8_0,
            GgufType::Q4_0 => GgmlType::Q4_0,
            GgufType::Q4_1 => GgmlType::Q4_1,
            GgufType::Q4K => GgmlType::Q4_K,
            GgufType::Q6K => GgmlType::Q6_K,
        }
    }
}

/// What to write, and where.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// mlx, hf or gguf.
    pub format: ExportFormat,
    /// The folder to write; for gguf it holds the one `.gguf` file.
    pub out: PathBuf,
    /// Write every weight in float, even where the base is quantized (mlx).
    pub dequantize: bool,
    /// Bits for the adapted matrices of a quantized base, requantized after fusing (mlx).
    pub requant_bits: u32,
    /// Float type of the float weights; the base's own when `None`.
    pub dtype: Option<FloatDtype>,
    /// Type of the GGUF's matrices (gguf).
    pub gguf_type: GgufType,
    /// Replace `out` if it exists.
    pub force: bool,
    /// Quantize the float matrices as `mlx_lm.convert -q` does (mlx).
    pub quantize: Option<Quantize>,
    /// Write `config.json`, the index and the card as `mlx_lm.convert` does (mlx):
    /// `loraforge convert`.
    pub convert: Option<Convert>,
}

/// What `loraforge convert` adds to an mlx export's options.
#[derive(Debug, Clone, Default)]
pub struct Convert {
    /// The hub repository converted, for the card's `base_model`; `None` for a local folder.
    pub base_model: Option<String>,
}

impl ExportOptions {
    /// A recipe's `[export]`: into `<run dir>/fused-<format>` unless it names a folder, which
    /// each run replaces.
    pub fn from_recipe(section: &crate::recipe::ExportSection, run_dir: &Path) -> Self {
        let name = match section.format {
            ExportFormat::Mlx => "fused-mlx",
            ExportFormat::Hf => "fused-hf",
            ExportFormat::Gguf => "fused-gguf",
        };
        ExportOptions {
            format: section.format,
            out: section.dir.clone().unwrap_or_else(|| run_dir.join(name)),
            dequantize: section.dequantize,
            requant_bits: section.requant_bits,
            dtype: section.dtype,
            gguf_type: section.gguf_type,
            force: true,
            quantize: None,
            convert: None,
        }
    }
}

impl ExportOptions {
    /// `--dtype`, or the base's own float type.
    pub fn float_dtype(&self, files: &ModelFiles) -> FloatDtype {
        self.dtype.unwrap_or_else(|| FloatDtype::of_base(files))
    }
}

/// What an export wrote and how much of the fine-tune its encoding kept.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// The folder written.
    pub out: PathBuf,
    /// How much of ΔW the written encoding kept, over the adapted matrices.
    pub survival: Survival,
    /// How the adapted matrices were stored, e.g. "8-bit affine, group 32" or "bf16".
    pub encoding: String,
}

impl ExportReport {
    /// The line printed after every export, with a warning when little of ΔW survived.
    pub fn summary(&self) -> String {
        let s = &self.survival;
        if s.layers == 0 {
            return format!("Wrote {} (no adapters fused)", self.out.display());
        }
        let mut line = format!(
            "Wrote {}: ΔW survival {:.1}% over {} adapted matrices stored as {} (norm ratio {:.1}%",
            self.out.display(),
            s.kept() * 100.0,
            s.layers,
            self.encoding,
            s.norm_ratio() * 100.0,
        );
        if let Some((module, worst)) = &s.worst {
            line += &format!("; lowest {:.1}% at {module}", worst * 100.0);
        }
        line += ")";
        if s.kept() < SURVIVAL_WARNING {
            line += "\nwarning: the encoding erased much of the fine-tune (ΔW is smaller than its rounding step); export with --dequantize, --requant-bits 8 or --dtype f32";
        }
        line
    }
}

/// Below this fraction of ΔW kept, an export warns.
pub const SURVIVAL_WARNING: f64 = 0.8;

/// Fuses `adapters` (mlx-lm or peft folder) into `base` and writes the result.
pub fn export(base: &Path, adapters: Option<&Path>, opts: &ExportOptions) -> Result<ExportReport> {
    clean_stale_siblings(&opts.out)?;
    check_replaceable(&opts.out, opts.force)?;
    let files = ModelFiles::open(base)?;
    let host = adapters.map(HostAdapters::read).transpose()?;
    let model = FusedModel::new(&files, host.as_ref());
    if let Some(host) = &host {
        // `[out, in]`, or an experts' stack `[experts, out, in]` as `[experts · out, in]`.
        let linears: BTreeMap<String, ([usize; 2], usize)> = model
            .specs
            .iter()
            .filter(|s| s.is_matrix() && s.name.starts_with("model.layers."))
            .map(|s| {
                let (&inp, leading) = s.shape.split_last().expect("a matrix");
                let experts = if leading.len() > 1 { leading[0] } else { 1 };
                let rows = leading.iter().product();
                (canonical(s.module()), ([rows, inp], experts))
            })
            .collect();
        host.check_against(&linears)?;
    }
    let tokenizer = crate::tokenizer::for_model(&files)?;
    let staging = staging_dir(&opts.out)?;
    let written = match opts.format {
        ExportFormat::Mlx => mlx::write(&model, &tokenizer, opts, &staging),
        ExportFormat::Hf => hf::write(&model, &tokenizer, opts, &staging),
        ExportFormat::Gguf => gguf::write(&model, &tokenizer, opts, &staging),
    };
    let (survival, encoding) = match written {
        Ok(done) => done,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e.context(format!(
                "exporting to {} failed; nothing was left there",
                opts.out.display()
            )));
        }
    };
    publish(&staging, &opts.out)?;
    Ok(ExportReport {
        out: opts.out.clone(),
        survival,
        encoding,
    })
}

/// What a loader opens for an export folder: the `.gguf` file inside it, or the folder.
pub fn model_path(out: &Path) -> PathBuf {
    std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        .unwrap_or_else(|| out.to_path_buf())
}

/// Refuses an `out` that exists, unless `force` and it is an export this tool could have
/// written (a folder holding `config.json` or one `.gguf` file, or an empty folder): `--force`
/// never replaces a file or a folder of something else.
fn check_replaceable(out: &Path, force: bool) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(out) else {
        return Ok(());
    };
    if !meta.is_dir() {
        bail!(
            "{} exists and is not a folder; an export is a folder, so choose another --out (--force replaces only an earlier export)",
            out.display()
        );
    }
    if !force {
        bail!(
            "{} already exists; choose another --out or pass --force to replace it",
            out.display()
        );
    }
    let names: Vec<String> = std::fs::read_dir(out)
        .with_context(|| format!("reading {}", out.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    let is_export = names.is_empty()
        || names.iter().any(|n| n == "config.json")
        || (names.len() == 1 && names[0].ends_with(".gguf"));
    if !is_export {
        bail!(
            "{} is not an export (no config.json or .gguf file in it); --force replaces only an earlier export, so choose another --out",
            out.display()
        );
    }
    Ok(())
}

/// A fresh hidden folder next to `out`, on the same filesystem so the final rename is atomic.
fn staging_dir(out: &Path) -> Result<PathBuf> {
    let staging = sibling(out, "partial")?;
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    Ok(staging)
}

/// `.<out name>.<what>-<pid>` next to `out`.
fn sibling(out: &Path, what: &str) -> Result<PathBuf> {
    let name = out
        .file_name()
        .with_context(|| format!("{} is not a folder name", out.display()))?
        .to_string_lossy();
    Ok(crate::io::atomic::folder_of(out).join(format!(".{name}.{what}-{}", std::process::id())))
}

/// Cleans what killed exports left next to `out`: removes `.<name>.partial-<pid>` staging
/// folders of processes no longer running, and puts a `.<name>.old-<pid>` set-aside export back
/// when no new one arrived (removes it when one did).
fn clean_stale_siblings(out: &Path) -> Result<()> {
    let Some(name) = out.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(());
    };
    let Ok(entries) = std::fs::read_dir(crate::io::atomic::folder_of(out)) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&format!(".{name}.")) else {
            continue;
        };
        let Some((what, pid)) = rest.rsplit_once('-') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if process_is_alive(pid) {
            continue;
        }
        match what {
            "partial" => {
                let _ = std::fs::remove_dir_all(entry.path());
            }
            "old" if !out.exists() => atomic::rename(&entry.path(), out)
                .context("restoring an export that an interrupted --force had set aside")?,
            "old" => {
                let _ = std::fs::remove_dir_all(entry.path());
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether a process with this pid exists (on Unix; elsewhere every pid counts as alive, so
/// nothing is cleaned).
fn process_is_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        if pid == std::process::id() {
            return false;
        }
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Moves the finished `staging` folder to `out`. An earlier export there is renamed aside
/// first and deleted only once the new one is in place, so a kill at any point leaves one of
/// them whole (the next export puts a set-aside one back if the new one never arrived).
fn publish(staging: &Path, out: &Path) -> Result<()> {
    let aside = sibling(out, "old")?;
    let replacing = out.exists();
    if replacing {
        atomic::rename(out, &aside).context("setting the earlier export aside")?;
    }
    atomic::rename(staging, out).context("moving the export into place")?;
    if replacing {
        let _ = std::fs::remove_dir_all(&aside);
    }
    Ok(())
}

/// Where a model came from, for model cards and GGUF `general.name`.
fn base_name(files: &ModelFiles) -> String {
    files
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// Writes a JSON value with sorted keys (what mlx-lm and transformers write).
fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let sorted = sort_keys(value);
    std::fs::write(path, serde_json::to_string_pretty(&sorted)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

fn sort_keys(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let sorted: BTreeMap<&String, serde_json::Value> =
                map.iter().map(|(k, v)| (k, sort_keys(v))).collect();
            serde_json::Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(sort_keys).collect())
        }
        other => other.clone(),
    }
}
