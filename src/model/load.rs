//! Opening a model (folder or `.gguf`) and building the decoder on a device.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{DType, FloatDType, Tensor, TensorCreationOptions, TensorData};

use super::config::ModelConfig;
use super::decoder::{Attention, Block, Decoder, FeedForward, Mlp, RmsNorm};
use super::experts::{SharedExpert, SparseMoe};
use super::linear::{FrozenLinear, FrozenWeight};
use super::names::{self, BlockLinear, BlockNorm};
use super::projections::Projections;
use super::weights::{HostWeight, MlxQuantization, WeightSource};
use crate::io::gguf::GgufFile;
use crate::io::safetensors::SafetensorsStore;
use crate::ops::ModelBackend;
use crate::ops::attention::Scores;
use crate::ops::primitive::inner;
use crate::ops::rope::Rope;
use crate::progress::Progress;
use crate::recipe::{DeviceKind, Dtype};

/// The kinds of model file this crate opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// A Hugging Face folder of float safetensors.
    HfSafetensors,
    /// An mlx-community folder with affine-quantized weights.
    MlxQuantized,
    /// A single `.gguf` file (its metadata gives the architecture).
    Gguf,
}

impl ModelFormat {
    /// The format in words, as `inspect` prints it.
    pub fn describe(self) -> &'static str {
        match self {
            ModelFormat::HfSafetensors => "Hugging Face safetensors folder",
            ModelFormat::MlxQuantized => "mlx-community quantized folder",
            ModelFormat::Gguf => "GGUF file",
        }
    }
}

/// A model on disk, opened but not yet loaded onto a device.
pub struct ModelFiles {
    /// The folder or `.gguf` file as given.
    pub path: PathBuf,
    /// What kind of model the path holds.
    pub format: ModelFormat,
    /// The architecture, from `config.json` or GGUF metadata.
    pub config: ModelConfig,
    /// Where each tensor is read from on demand.
    pub weights: WeightSource,
    /// `config.json` of a folder (None for GGUF).
    pub config_json: Option<serde_json::Value>,
}

impl ModelFiles {
    /// Opens a model folder (`config.json` and safetensors) or a `.gguf` file, reading its
    /// configuration; no weights are loaded yet.
    /// A Hugging Face name (`org/name[@revision]`) that is not a path opens its copy in the hub
    /// cache (see [`crate::io::hub`]).
    pub fn open(path: &Path) -> Result<Self> {
        let resolved = match crate::io::hub::resolve_model_here(path) {
            Some(resolved) => resolved?,
            None => bail!(
                "{} does not exist: give a model folder (config.json + *.safetensors), a .gguf file, or a Hugging Face name (org/name) that is in the hub cache",
                path.display()
            ),
        };
        let path = resolved.as_path();
        if path.is_file() {
            let gguf = GgufFile::open(path)?;
            let config = ModelConfig::from_gguf(&gguf)?;
            return Ok(ModelFiles {
                path: path.to_path_buf(),
                format: ModelFormat::Gguf,
                config,
                weights: WeightSource::Gguf(gguf),
                config_json: None,
            });
        }
        let config_path = path.join("config.json");
        if !config_path.exists() {
            bail!(
                "{} has no config.json: a Hugging Face or mlx-community model folder needs one",
                path.display()
            );
        }
        let config = ModelConfig::from_config_json(&config_path)?;
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path)?)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let quantization = MlxQuantization::from_config(&json);
        if let Some(q) = &quantization {
            q.check(&config_path)?;
        }
        let store = SafetensorsStore::open_folder(path)?;
        let format = if quantization.is_some() {
            ModelFormat::MlxQuantized
        } else {
            ModelFormat::HfSafetensors
        };
        Ok(ModelFiles {
            path: path.to_path_buf(),
            format,
            config,
            weights: WeightSource::Safetensors {
                store,
                quantization,
                file: path.to_path_buf(),
            },
            config_json: Some(json),
        })
    }

    /// Builds the decoder on `device`. Quantized weights stay packed.
    pub fn build<B: ModelBackend>(&self, device: &B::Device) -> Result<Decoder<B>> {
        self.build_quantized(device, BaseStorage::default())
    }

    /// Builds the decoder, quantizing every float matrix (linears, embedding, head) whose row
    /// length divides by the group size to `(bits, group_size)` on the way, as
    /// `mlx_lm.convert -q` does; matrices that are already quantized stay as they are.
    pub fn build_quantized<B: ModelBackend>(
        &self,
        device: &B::Device,
        storage: BaseStorage,
    ) -> Result<Decoder<B>> {
        if let Some(half) = storage.half {
            B::check_half(half, device)?;
        }
        let c = &self.config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        // A bf16 matrix for a bf16 base goes to the device as it is stored.
        let as_stored = storage.quantize.is_none() && storage.half == Some(FloatDType::BF16);
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<FrozenWeight<B>> {
            if as_stored && let Some(bytes) = self.weights.stored_bf16(name, [rows, cols]) {
                let w = B::bf16_matrix(bytes, [rows, cols], device);
                self.weights.release(name);
                return Ok(FrozenWeight::Dense(inner::<B, 2>(w)));
            }
            let weight = match (self.weights.load(name, &[rows, cols], c)?, storage.quantize) {
                (HostWeight::Dense { values, .. }, Some((bits, group)))
                    if cols.is_multiple_of(group) =>
                {
                    HostWeight::Quantized(crate::quant::quantize::quantize(
                        &values, rows, cols, bits, group,
                    )?)
                }
                (weight, _) => weight,
            };
            Ok(to_device(weight, storage.half, device))
        };
        let vector = |name: &str, len: usize| -> Result<Tensor<B, 1>> {
            match self.weights.load(name, &[len], c)? {
                HostWeight::Dense { values, .. } => {
                    Ok(Tensor::from_data(TensorData::new(values, [len]), device))
                }
                HostWeight::Quantized(_) => {
                    bail!("{name} is quantized, but a vector must be stored in float")
                }
            }
        };
        let linear =
            |name: &str, [rows, cols]: [usize; 2], bias: bool| -> Result<FrozenLinear<B>> {
                Ok(FrozenLinear::new(
                    matrix(&format!("{name}.weight"), rows, cols)?,
                    if bias {
                        Some(vector(&format!("{name}.bias"), rows)?)
                    } else {
                        None
                    },
                ))
            };
        let norm = |name: &str, len: usize| -> Result<RmsNorm<B>> {
            let stored = vector(name, len)?;
            Ok(RmsNorm {
                // Gemma's files hold the `w` of a gain `1 + w`.
                weight: match c.quirks.norm_plus_one {
                    true => stored.add_scalar(1.0),
                    false => stored,
                },
                eps: c.rms_norm_eps,
            })
        };
        let scores = Scores {
            scale: 1.0 / c.quirks.query_pre_attn_scalar.unwrap_or(hd as f64).sqrt(),
            softcap: c.quirks.attn_softcap,
        };
        let what = match storage.quantize {
            Some((bits, _)) => format!(
                "loading {} (quantizing to {bits} bits)",
                self.path.display()
            ),
            None => format!("loading {}", self.path.display()),
        };
        let progress = Progress::new(what, c.num_layers as u64, "blocks");
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            progress.inc();
            let p = names::block(i);
            let linear = |w: BlockLinear| -> Result<FrozenLinear<B>> {
                let [out, inp] = w.shape(c);
                let experts = w.experts(c);
                let name = format!("{p}.{}", w.key(c.family));
                Ok(FrozenLinear {
                    experts,
                    ..linear(&name, [experts * out, inp], w.has_bias(c))?
                })
            };
            let norm = |n: BlockNorm| norm(&format!("{p}.{}.weight", n.key(c.family)), n.len(c));
            let optional = |n: BlockNorm| n.exists(c).then(|| norm(n)).transpose();
            let projections = |fused: BlockLinear| -> Result<_> {
                Ok(match c.family.fuses_projections() {
                    true => Projections::Fused {
                        name: fused,
                        linear: linear(fused)?,
                        widths: fused.parts().iter().map(|w| w.shape(c)[0]).collect(),
                    },
                    false => Projections::Split(
                        fused
                            .parts()
                            .iter()
                            .map(|&w| Ok((w, linear(w)?)))
                            .collect::<Result<_>>()?,
                    ),
                })
            };
            layers.push(Block {
                input_layernorm: norm(BlockNorm::Input)?,
                self_attn: Attention {
                    qkv: projections(BlockLinear::Qkv)?,
                    o_proj: linear(BlockLinear::O)?,
                    q_norm: optional(BlockNorm::Q)?,
                    k_norm: optional(BlockNorm::K)?,
                    num_heads: c.num_heads,
                    num_kv_heads: c.num_kv_heads,
                    head_dim: hd,
                    scores,
                },
                post_attention_norm: optional(BlockNorm::PostAttention)?,
                pre_mlp_norm: norm(BlockNorm::PreMlp)?,
                mlp: match &c.moe {
                    Some(moe) if moe.sparse(i) => FeedForward::Experts(Box::new(SparseMoe {
                        balance: None,
                        id: super::route_memo::new_router(),
                        router: linear(BlockLinear::Router)?,
                        gate: linear(BlockLinear::ExpertGate)?,
                        up: linear(BlockLinear::ExpertUp)?,
                        down: linear(BlockLinear::ExpertDown)?,
                        shared: match moe.shared_expert_intermediate_size {
                            Some(_) => Some(SharedExpert {
                                mlp: Mlp {
                                    activation: c.quirks.activation,
                                    gate_up: Projections::Split(vec![
                                        (BlockLinear::SharedGate, linear(BlockLinear::SharedGate)?),
                                        (BlockLinear::SharedUp, linear(BlockLinear::SharedUp)?),
                                    ]),
                                    down_proj: linear(BlockLinear::SharedDown)?,
                                },
                                gate: linear(BlockLinear::SharedExpertGate)?,
                            }),
                            None => None,
                        },
                        top_k: moe.top_k,
                        normalize_top_k: moe.normalize_top_k,
                        activation: c.quirks.activation,
                    })),
                    _ => FeedForward::Dense(Mlp {
                        activation: c.quirks.activation,
                        gate_up: projections(BlockLinear::GateUp)?,
                        down_proj: linear(BlockLinear::Down)?,
                    }),
                },
                post_mlp_norm: optional(BlockNorm::PostMlp)?,
                sliding: c.quirks.slides(i),
            });
        }
        let embed_tokens = matrix(
            &format!("{}.weight", names::EMBED_TOKENS.0),
            c.vocab_size,
            h,
        )?;
        let lm_head = if c.tie_word_embeddings {
            FrozenLinear::new(embed_tokens.clone(), None)
        } else {
            linear(names::LM_HEAD.0, [c.vocab_size, h], false)?
        };
        progress.finish();
        Ok(Decoder {
            config: c.clone(),
            embed_tokens,
            layers,
            norm: norm(&format!("{}.weight", names::FINAL_NORM.0), h)?,
            lm_head,
            rope: Rope::new(c.rotary_dim, c.rope_theta, &c.rope_scaling),
            local_rope: c
                .quirks
                .local_rope
                .as_ref()
                .map(|(theta, scaling)| Rope::new(c.rotary_dim, *theta, scaling)),
        })
    }
}

/// How the frozen base is held on the device.
#[derive(Debug, Clone, Copy, Default)]
pub struct BaseStorage {
    /// Quantize float matrices on load (QLoRA): `(bits, group_size)`.
    pub quantize: Option<(u32, usize)>,
    /// Hold dense matrices in a 16-bit float (bf16 on CUDA; f16 or bf16 on the portable
    /// backend): half the memory, and their GEMMs run on tensor cores (cooperative matrices)
    /// with f32 accumulation. Activations, adapters and optimizer state stay f32.
    pub half: Option<FloatDType>,
}

impl BaseStorage {
    /// How `[model]` asks the base to be held. `dtype = "bf16"` runs the frozen GEMMs in bf16 on
    /// CUDA, Metal or Vulkan, `"f16"` in f16 on Metal or Vulkan (the trainer then scales the loss
    /// so that gradients stay in f16's range); the CPU computes in f32, and a 16-bit request
    /// there is refused rather than silently run in f32.
    pub fn for_device(
        dtype: Dtype,
        quantize: Option<(u32, usize)>,
        device: DeviceKind,
    ) -> Result<BaseStorage> {
        let portable = matches!(device, DeviceKind::Metal | DeviceKind::Vulkan);
        let half = match (dtype, device) {
            (Dtype::F32, _) => None,
            (Dtype::Bf16 | Dtype::Auto, DeviceKind::Cuda) => Some(FloatDType::BF16),
            (Dtype::Auto, _) => None,
            (Dtype::Bf16, _) if portable => Some(FloatDType::BF16),
            (Dtype::F16, _) if portable => Some(FloatDType::F16),
            (dtype, _) => bail!(
                "model.dtype = {dtype:?} on device = {device:?}: the CPU computes in f32 and CUDA in f32 or bf16; set model.dtype = \"f32\" (or remove it), or pick a GPU device"
            ),
        };
        Ok(BaseStorage { quantize, half })
    }
}

fn to_device<B: ModelBackend>(
    weight: HostWeight,
    half: Option<FloatDType>,
    device: &B::Device,
) -> FrozenWeight<B> {
    match weight {
        HostWeight::Dense { shape, values } => {
            let mut options = TensorCreationOptions::new(device.clone());
            if let Some(half) = half {
                options = options.with_dtype(DType::from(half));
            }
            FrozenWeight::Dense(Tensor::from_data(
                TensorData::new(values, [shape[0], shape[1]]),
                options,
            ))
        }
        HostWeight::Quantized(q) => FrozenWeight::quantized(q, half, device),
    }
}

/// A model ready to run, with what it was loaded from.
pub struct LoadedModel<B: ModelBackend> {
    /// The files the model was opened from.
    pub files: ModelFiles,
    /// The decoder built from them on the device.
    pub decoder: Decoder<B>,
}

/// Opens the model at `path` and builds it on `device` with the default [`BaseStorage`]: dense
/// weights in f32, quantized ones kept packed.
pub fn load_model<B: ModelBackend>(path: &Path, device: &B::Device) -> Result<LoadedModel<B>> {
    load_model_quantized(path, device, BaseStorage::default())
}

/// Loads a model held as `storage` says (quantized on the way for QLoRA, or in bf16). The
/// weights' device buffers are allocated at their exact sizes (Burn's persistent allocations):
/// CubeCL's pools give a buffer within 20% of a page size a whole page (an 8B model's 112 MiB
/// bf16 MLP matrices each took a 128 MiB page).
pub fn load_model_quantized<B: ModelBackend>(
    path: &Path,
    device: &B::Device,
    storage: BaseStorage,
) -> Result<LoadedModel<B>> {
    let files = ModelFiles::open(path)?;
    let decoder =
        B::memory_persistent_allocations(device, (), |()| files.build_quantized(device, storage))
            .with_context(|| format!("loading weights from {}", path.display()))?;
    Ok(LoadedModel { files, decoder })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_auto_is_bf16_on_cuda_only_and_half_off_the_gpus_is_refused() {
        let half = |dtype, device| BaseStorage::for_device(dtype, None, device).map(|s| s.half);
        let (bf16, f16) = (Some(FloatDType::BF16), Some(FloatDType::F16));
        assert_eq!(half(Dtype::Auto, DeviceKind::Cuda).unwrap(), bf16);
        for device in [DeviceKind::Cpu, DeviceKind::Metal, DeviceKind::Vulkan] {
            assert_eq!(half(Dtype::Auto, device).unwrap(), None);
        }
        for device in [DeviceKind::Metal, DeviceKind::Vulkan] {
            assert_eq!(half(Dtype::Bf16, device).unwrap(), bf16);
            assert_eq!(half(Dtype::F16, device).unwrap(), f16);
        }
        for (dtype, device) in [
            (Dtype::Bf16, DeviceKind::Cpu),
            (Dtype::F16, DeviceKind::Cpu),
            (Dtype::F16, DeviceKind::Cuda),
        ] {
            let err = half(dtype, device).unwrap_err().to_string();
            assert!(err.contains("the CPU computes in f32"), "{err}");
        }
    }
}
