//! Where a model's weights come from, under Hugging Face tensor names, whatever the file format:
//! float safetensors, mlx-community affine-quantized safetensors, or GGUF.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use super::config::{Family, ModelConfig};
use super::names::{Role, gguf_name, per_expert_names, role_of};
use crate::io::gguf::{GgmlType, GgufFile, TensorInfo};
use crate::io::raw::RawDtype;
use crate::io::safetensors::SafetensorsStore;
use crate::quant::QuantizedMatrix;
use crate::quant::ggml;

/// One weight on the host, before it goes to a device.
#[derive(Debug, Clone)]
pub enum HostWeight {
    /// Float values converted to f32.
    Dense {
        /// The tensor's dimensions.
        shape: Vec<usize>,
        /// The elements, row-major.
        values: Vec<f32>,
    },
    /// Packed in MLX's affine layout (an mlx-community or GGUF weight, or one quantized on
    /// load).
    Quantized(QuantizedMatrix),
}

impl HostWeight {
    /// The weight's dimensions (`[rows, cols]` when quantized).
    pub fn shape(&self) -> Vec<usize> {
        match self {
            HostWeight::Dense { shape, .. } => shape.clone(),
            HostWeight::Quantized(q) => vec![q.rows, q.cols],
        }
    }

    /// The weight seen as `shape` where that only regroups its rows (an experts' stack
    /// `[experts, out, in]` as the `[experts · out, in]` matrix, or back; a quantized weight
    /// stays `[rows, cols]`); unchanged otherwise, for the caller's shape check to name.
    fn regrouped(self, shape: &[usize]) -> Self {
        match self {
            HostWeight::Dense {
                values,
                shape: found,
            } if fits(&found, shape) => HostWeight::Dense {
                shape: shape.to_vec(),
                values,
            },
            other => other,
        }
    }
}

/// Whether a matrix of shape `a` is one of shape `b` with its rows grouped otherwise (an experts'
/// stack `[experts, out, in]` and `[experts · out, in]`).
fn regroups(a: &[usize], b: &[usize]) -> bool {
    let rows = |s: &[usize]| s[..s.len() - 1].iter().product::<usize>();
    a.len() >= 2 && b.len() >= 2 && a.last() == b.last() && rows(a) == rows(b)
}

/// Whether a stored matrix of shape `found` (a quantized one's unpacked columns) is the
/// `expected` one: equal where both are stacks (`[4, 64, in]` is not 8 experts of 32 rows),
/// regrouped only between a stack and its `[experts · out, in]` rows.
fn fits(found: &[usize], expected: &[usize]) -> bool {
    found == expected || (found.len() != expected.len() && regroups(found, expected))
}

/// Why a weight can't be read from its source.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// The source holds no tensor of that name.
    #[error("{file}: tensor `{name}` is missing")]
    Missing {
        /// The folder or `.gguf` file looked in.
        file: PathBuf,
        /// The tensor's Hugging Face name, or its GGUF name (with the Hugging Face one).
        name: String,
    },
    /// The tensor's shape is not the one the configuration implies.
    #[error(
        "{file}: tensor `{name}` has shape {found:?} but the model config implies {expected:?}; the weights do not belong to this config.json"
    )]
    Shape {
        /// The file holding the tensor (or its folder).
        file: PathBuf,
        /// The tensor's Hugging Face name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape the source holds.
        found: Vec<usize>,
    },
    /// The tensor is present but can't be read as a weight.
    #[error("{file}: tensor `{name}`: {reason}")]
    Invalid {
        /// The file holding the tensor (or its folder).
        file: PathBuf,
        /// The tensor's name (GGUF's, in a GGUF file).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Quantization settings of an mlx-community folder (`config.json` → `quantization`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MlxQuantization {
    /// Elements along a row that share one scale and bias, unless overridden.
    pub group_size: usize,
    /// Bits per code, unless overridden.
    pub bits: u32,
    /// Per-module overrides: `Some((group, bits))`, or `None` for a module left in float.
    pub overrides: BTreeMap<String, Option<(usize, u32)>>,
}

impl MlxQuantization {
    /// The settings under `quantization` (or `quantization_config`) in `config.json`; `None`
    /// for a float model.
    pub fn from_config(json: &Value) -> Option<Self> {
        let q = json
            .get("quantization")
            .or_else(|| json.get("quantization_config"))?
            .as_object()?;
        // Missing, negative or out-of-range values become 0, which `check` refuses (a cast would
        // truncate 2³² + 4 to 4, and a negative group size had turned quantization off).
        let group_size = q
            .get("group_size")
            .and_then(Value::as_u64)
            .and_then(|g| usize::try_from(g).ok())
            .unwrap_or(0);
        let bits = q
            .get("bits")
            .and_then(Value::as_u64)
            .and_then(|b| u32::try_from(b).ok())
            .unwrap_or(0);
        let mut overrides = BTreeMap::new();
        for (key, v) in q {
            match v {
                Value::Bool(false) => {
                    overrides.insert(key.clone(), None);
                }
                Value::Object(o) => {
                    // `null` is the default: mlx-lm 0.32 writes it for every module of a mixed
                    // recipe converted without --q-group-size, and reads it as the default.
                    let g = o
                        .get("group_size")
                        .filter(|v| !v.is_null())
                        .map_or(Some(group_size), |v| {
                            v.as_u64().and_then(|g| g.try_into().ok())
                        })
                        .unwrap_or(0);
                    let b = o
                        .get("bits")
                        .map_or(Some(bits), |v| v.as_u64().and_then(|b| b.try_into().ok()))
                        .unwrap_or(0);
                    overrides.insert(key.clone(), Some((g, b)));
                }
                _ => {}
            }
        }
        Some(MlxQuantization {
            group_size,
            bits,
            overrides,
        })
    }

    /// Refuses settings no quantized matrix can have: bits outside MLX's set (0 divided by zero,
    /// 7 met a shape mismatch) and group sizes other than 32, 64 and 128, for the default and
    /// every override. `config` names the file in the error.
    pub fn check(&self, config: &std::path::Path) -> anyhow::Result<()> {
        let settings = std::iter::once(("quantization", Some((self.group_size, self.bits))))
            .chain(self.overrides.iter().map(|(k, v)| (k.as_str(), *v)));
        for (key, setting) in settings {
            let Some((group, bits)) = setting else {
                continue;
            };
            if !crate::quant::affine::SUPPORTED_BITS.contains(&bits) {
                anyhow::bail!(
                    "{}: `{key}` has bits = {bits}; MLX quantizes to {:?} bits",
                    config.display(),
                    crate::quant::affine::SUPPORTED_BITS
                );
            }
            if ![32, 64, 128].contains(&group) {
                anyhow::bail!(
                    "{}: `{key}` has group_size = {group}; MLX groups are 32, 64 or 128",
                    config.display()
                );
            }
        }
        Ok(())
    }
}

/// A model's weights addressed by Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).
pub enum WeightSource {
    /// The safetensors shards of a Hugging Face or mlx-community folder.
    Safetensors {
        /// The folder's tensors, memory-mapped.
        store: SafetensorsStore,
        /// The folder's MLX quantization; `None` for float weights.
        quantization: Option<MlxQuantization>,
        /// The folder, named in errors.
        file: PathBuf,
    },
    /// A `.gguf` file, its tensors found under GGUF's names for the Hugging Face ones.
    Gguf(GgufFile),
    /// Seeded random weights for benchmarks of a model shape (nothing read from disk): matrices
    /// uniform with standard deviation 0.02 (Hugging Face's init), norms the identity, biases 0.
    Random {
        /// Seeds every matrix's generator (with the tensor's name), so a seed fixes the weights.
        seed: u64,
    },
}

impl WeightSource {
    fn file(&self) -> PathBuf {
        match self {
            WeightSource::Safetensors { file, .. } => file.clone(),
            WeightSource::Gguf(g) => g.path.clone(),
            WeightSource::Random { .. } => PathBuf::from("<random weights>"),
        }
    }

    /// Whether the source holds weight `name` (always, for random weights).
    pub fn has(&self, name: &str) -> bool {
        match self {
            WeightSource::Safetensors { store, .. } => store.contains(name),
            WeightSource::Gguf(g) => gguf_tensor(g, name).is_some(),
            WeightSource::Random { .. } => true,
        }
    }

    /// `(bits, group_size)` when weight `name` is stored quantized, read from the file's layout
    /// without loading the weight.
    pub fn stored_quantization(&self, name: &str) -> Option<(u32, usize)> {
        match self {
            WeightSource::Safetensors {
                store,
                quantization,
                ..
            } => mlx_setting(store, quantization.as_ref(), name).map(|(g, b)| (b, g)),
            WeightSource::Gguf(g) => {
                let info = gguf_tensor(g, name)?;
                match info.kind {
                    GgmlType::Q4_0 | GgmlType::Q4_1 => Some((4, 32)),
                    GgmlType::Q5_0 | GgmlType::Q5_1 => Some((5, 32)),
                    GgmlType::Q8_0 => Some((8, 32)),
                    GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => None,
                    GgmlType::IQ4_NL | GgmlType::IQ4_XS => None,
                    k => crate::quant::ggml_k::layout(k),
                }
            }
            WeightSource::Random { .. } => None,
        }
    }

    /// Weight `name` as its stored bytes when it is a plain bf16 matrix of exactly `shape` in a
    /// safetensors file (for a device that holds it in bf16 as it is, without widening it to
    /// f32 and back); `None` for anything else, which [`WeightSource::load`] reads. Call
    /// [`WeightSource::release`] once the bytes are copied.
    pub fn stored_bf16(&self, name: &str, shape: [usize; 2]) -> Option<&[u8]> {
        let WeightSource::Safetensors {
            store,
            quantization,
            ..
        } = self
        else {
            return None;
        };
        let raw = store.get(name)?;
        let plain = raw.dtype == RawDtype::BF16
            && raw.shape == shape
            && raw.bytes.len() == shape[0] * shape[1] * 2
            && mlx_setting(store, quantization.as_ref(), name).is_none();
        plain.then_some(raw.bytes)
    }

    /// Once a weight is copied out, its file pages need not stay resident.
    pub fn release(&self, name: &str) {
        match self {
            WeightSource::Safetensors { store, .. } => {
                let module = name.strip_suffix(".weight").unwrap_or(name);
                store.release(name);
                store.release(&format!("{module}.scales"));
                store.release(&format!("{module}.biases"));
            }
            WeightSource::Gguf(g) => {
                if let Some(info) = gguf_tensor(g, name) {
                    g.release(info);
                }
            }
            WeightSource::Random { .. } => {}
        }
    }

    /// Reads weight `name` (a `.weight`, `.bias` or norm vector), checking its shape.
    pub fn load(
        &self,
        name: &str,
        expected: &[usize],
        config: &ModelConfig,
    ) -> Result<HostWeight, WeightError> {
        let weight = match self {
            WeightSource::Safetensors {
                store,
                quantization,
                file,
            } => match per_expert_names(name, config).filter(|_| !store.contains(name)) {
                // A Hugging Face checkpoint's experts, one matrix each (mlx-lm's are stacked).
                Some(names) => stack_experts(store, quantization.as_ref(), file, &names)?,
                None => load_safetensors(store, quantization.as_ref(), file, name, expected)?,
            },
            WeightSource::Gguf(g) => load_gguf(g, name, config, expected)?,
            WeightSource::Random { seed } => {
                random_weight(*seed, name, expected, config.quirks.norm_plus_one)
            }
        };
        self.release(name);
        let weight = weight.regrouped(expected);
        let found = weight.shape();
        if !fits(&found, expected) {
            return Err(WeightError::Shape {
                file: self.file(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found,
            });
        }
        Ok(weight)
    }
}

/// The float matrices `names` (one per expert) stacked into one `[experts, out, in]` weight.
fn stack_experts(
    store: &SafetensorsStore,
    quantization: Option<&MlxQuantization>,
    file: &std::path::Path,
    names: &[String],
) -> Result<HostWeight, WeightError> {
    let mut values = Vec::new();
    let mut first: Option<Vec<usize>> = None;
    for name in names {
        let shape = match load_safetensors(store, quantization, file, name, &[])? {
            HostWeight::Dense { shape, values: v } => {
                values.extend(v);
                shape
            }
            HostWeight::Quantized(_) => {
                return Err(WeightError::Invalid {
                    file: file.to_path_buf(),
                    name: name.clone(),
                    reason: "an expert stored quantized on its own; loraforge reads quantized experts stacked, as mlx-lm writes them (`switch_mlp`)".into(),
                });
            }
        };
        store.release(name);
        match &first {
            None => first = Some(shape),
            Some(s) if *s == shape => {}
            Some(s) => {
                return Err(WeightError::Invalid {
                    file: file.to_path_buf(),
                    name: name.clone(),
                    reason: format!("shape {shape:?}, where the first expert's is {s:?}"),
                });
            }
        }
    }
    let shape = first.unwrap_or_default();
    Ok(HostWeight::Dense {
        shape: [vec![names.len()], shape].concat(),
        values,
    })
}

/// Norms are the identity: 1, or 0 where the model multiplies by `1 + w`.
fn random_weight(seed: u64, name: &str, shape: &[usize], norm_plus_one: bool) -> HostWeight {
    use rand::{Rng, SeedableRng};
    use rayon::prelude::*;
    let len: usize = shape.iter().product();
    let values = if name.ends_with("norm.weight") {
        vec![if norm_plus_one { 0.0 } else { 1.0 }; len]
    } else if name.ends_with(".bias") {
        vec![0.0; len]
    } else {
        // Uniform on ±a has standard deviation a/√3. Chunks are seeded by the name and their
        // index, so the values do not depend on the thread count.
        let a = 0.02 * 3f32.sqrt();
        let name_seed = name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let mut values = vec![0f32; len];
        values
            .par_chunks_mut(1 << 16)
            .enumerate()
            .for_each(|(i, chunk)| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(name_seed.wrapping_add(i as u64));
                chunk.iter_mut().for_each(|v| *v = rng.random_range(-a..a));
            });
        values
    };
    HostWeight::Dense {
        shape: shape.to_vec(),
        values,
    }
}

fn load_safetensors(
    store: &SafetensorsStore,
    quantization: Option<&MlxQuantization>,
    file: &std::path::Path,
    name: &str,
    expected: &[usize],
) -> Result<HostWeight, WeightError> {
    let invalid = |reason: String| WeightError::Invalid {
        file: store.path_of(name).unwrap_or(file).to_path_buf(),
        name: name.to_string(),
        reason,
    };
    let raw = store.get(name).ok_or_else(|| WeightError::Missing {
        file: file.to_path_buf(),
        name: name.to_string(),
    })?;
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let scales_name = format!("{module}.scales");
    let Some((group_size, bits)) = mlx_setting(store, quantization, name) else {
        return Ok(HostWeight::Dense {
            shape: raw.shape.to_vec(),
            values: raw.to_f32().map_err(invalid)?,
        });
    };
    let scales = store.get(&scales_name).ok_or_else(|| {
        invalid(format!(
            "quantized at {bits} bits but `{scales_name}` is missing"
        ))
    })?;
    let biases_name = format!("{module}.biases");
    let biases = store.get(&biases_name).ok_or_else(|| {
        invalid(format!(
            "quantized at {bits} bits but `{biases_name}` is missing"
        ))
    })?;
    let Some((&packed_cols, leading)) = raw.shape.split_last().filter(|(_, l)| !l.is_empty())
    else {
        return Err(invalid(format!(
            "packed weight must be 2-D (or 3-D for experts), found {:?}",
            raw.shape
        )));
    };
    let rows = leading.iter().product::<usize>();
    let cols = packed_cols * 32 / bits as usize;
    let found = [leading, &[cols]].concat();
    if expected.len() >= 2 && !fits(&found, expected) {
        return Err(WeightError::Shape {
            file: store.path_of(name).unwrap_or(file).to_path_buf(),
            name: name.to_string(),
            expected: expected.to_vec(),
            found,
        });
    }
    QuantizedMatrix::new(
        rows,
        cols,
        bits,
        group_size,
        raw.to_u32().map_err(invalid)?,
        scales.to_f32().map_err(invalid)?,
        biases.to_f32().map_err(invalid)?,
    )
    .map(HostWeight::Quantized)
    .map_err(|e| invalid(e.0))
}

/// `(group_size, bits)` of a quantized `.weight` in an mlx-community folder. docs/formats.md: a module
/// is quantized iff it has an override or a `.scales` tensor exists.
fn mlx_setting(
    store: &SafetensorsStore,
    quantization: Option<&MlxQuantization>,
    name: &str,
) -> Option<(usize, u32)> {
    let module = name.strip_suffix(".weight")?;
    let q = quantization?;
    match q.overrides.get(module) {
        Some(over) => *over,
        None if store.contains(&format!("{module}.scales")) => Some((q.group_size, q.bits)),
        None => None,
    }
}

/// The family a GGUF file's `general.architecture` names (Llama when it names none we read: the
/// config reader has refused those already).
fn gguf_family(g: &GgufFile) -> Family {
    Family::of_gguf(g).unwrap_or(Family::Llama)
}

/// The GGUF tensor holding the Hugging Face weight `hf`.
fn gguf_tensor<'a>(g: &'a GgufFile, hf: &str) -> Option<&'a TensorInfo> {
    gguf_name(hf, gguf_family(g)).and_then(|n| g.tensor(&n))
}

fn load_gguf(
    g: &GgufFile,
    hf: &str,
    config: &ModelConfig,
    expected: &[usize],
) -> Result<HostWeight, WeightError> {
    let name = gguf_name(hf, config.family).ok_or_else(|| WeightError::Missing {
        file: g.path.clone(),
        name: hf.to_string(),
    })?;
    let info = g.tensor(&name).ok_or_else(|| WeightError::Missing {
        file: g.path.clone(),
        name: format!("{name} (for {hf})"),
    })?;
    let data = g.data(info);
    let weight = if let Some(values) = ggml::float_values(info.kind, data) {
        HostWeight::Dense {
            shape: info.shape.clone(),
            values,
        }
    } else {
        let Some((&cols, leading)) = info.shape.split_last().filter(|(_, l)| !l.is_empty()) else {
            return Err(WeightError::Invalid {
                file: g.path.clone(),
                name,
                reason: format!(
                    "quantized tensor must be 2-D (or 3-D for experts), found {:?}",
                    info.shape
                ),
            });
        };
        if !fits(&info.shape, expected) {
            return Err(WeightError::Shape {
                file: g.path.clone(),
                name,
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        let rows = leading.iter().product::<usize>();
        HostWeight::Quantized(ggml::to_affine(info.kind, rows, cols, data).expect("quantized kind"))
    };
    // llama.cpp's converter permutes the rows of q and k for its RoPE kernel (Llama family
    // only), and stores Gemma's norms as `1 + w`; undo both so the rest of the code sees Hugging
    // Face's layout.
    match role_of(hf, config.family) {
        Some((_, Role::Weight(w))) if config.family.gguf_permutes_qk() => {
            match w.permuted_heads(config) {
                Some(h) => Ok(unpermute_qk(weight, h)),
                None => Ok(weight),
            }
        }
        Some((_, Role::Norm(_) | Role::FinalNorm)) if config.quirks.norm_plus_one => {
            Ok(minus_one(weight))
        }
        _ => Ok(weight),
    }
}

/// A Gemma norm as llama.cpp stores it (`1 + w`) back to `w`. Exact for stored values of at
/// least 0.5 (Sterbenz), so the forward's `1 + w` gives the stored value back.
fn minus_one(weight: HostWeight) -> HostWeight {
    match weight {
        HostWeight::Dense { shape, values } => HostWeight::Dense {
            shape,
            values: values.into_iter().map(|v| v - 1.0).collect(),
        },
        quantized => quantized,
    }
}

/// For each Hugging Face row of a q or k projection with `rows` rows over `heads` heads, the row
/// llama.cpp's `permute` moves it to in GGUF (`order[hf_row] = gguf_row`).
pub fn qk_row_order(rows: usize, heads: usize) -> Vec<usize> {
    let head_dim = rows / heads;
    let half = head_dim / 2;
    (0..rows)
        .map(|r| {
            let (h, i) = (r / head_dim, r % head_dim);
            let (t, j) = (i / half, i % half);
            h * head_dim + 2 * j + t
        })
        .collect()
}

/// Inverse of llama.cpp's `permute`: within each head, GGUF row `2j + t` is HF row `t*half + j`.
fn unpermute_qk(weight: HostWeight, heads: usize) -> HostWeight {
    let order = qk_row_order(weight.shape()[0], heads);
    let rows = order.len();
    match weight {
        HostWeight::Quantized(q) => HostWeight::Quantized(q.permute_rows(&order)),
        HostWeight::Dense { shape, values } => {
            let cols = values.len() / rows;
            let mut out = vec![0f32; values.len()];
            for (dst, &src) in order.iter().enumerate() {
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
            HostWeight::Dense { shape, values: out }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stack_fits_only_its_own_experts_or_their_rows() {
        // mlx-lm's `[4, 32, 64]` stack is not 2 experts of 64 rows, though the rows add up.
        assert!(!fits(&[4, 32, 64], &[2, 64, 64]));
        assert!(fits(&[4, 32, 64], &[4, 32, 64]));
        // A stack and its rows regroup either way; other rows do not.
        assert!(fits(&[128, 64], &[4, 32, 64]));
        assert!(fits(&[4, 32, 64], &[128, 64]));
        assert!(!fits(&[96, 64], &[4, 32, 64]));
        let dense = |shape: Vec<usize>| HostWeight::Dense {
            values: vec![0.0; shape.iter().product()],
            shape,
        };
        assert_eq!(
            dense(vec![4, 32, 64]).regrouped(&[2, 64, 64]).shape(),
            [4, 32, 64]
        );
        assert_eq!(
            dense(vec![128, 64]).regrouped(&[4, 32, 64]).shape(),
            [4, 32, 64]
        );
    }

    /// llama.cpp's permute, written the way convert_hf_to_gguf.py writes it:
    /// `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
    fn llama_cpp_permute(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
        let half = rows / heads / 2;
        let mut out = vec![0f32; values.len()];
        let mut dst = 0;
        for h in 0..heads {
            for j in 0..half {
                for t in 0..2 {
                    let src = h * 2 * half + t * half + j;
                    out[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&values[src * cols..(src + 1) * cols]);
                    dst += 1;
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (rows, cols, heads) = (16, 3, 2);
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let gguf = llama_cpp_permute(&hf, rows, cols, heads);
        let back = unpermute_qk(
            HostWeight::Dense {
                shape: vec![rows, cols],
                values: gguf,
            },
            heads,
        );
        let HostWeight::Dense { values, .. } = back else {
            unreachable!()
        };
        assert_eq!(values, hf);
    }
}
