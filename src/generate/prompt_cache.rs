//! Prompt caches (mlx-lm's `cache_prompt` and `--prompt-cache-file`): a prompt's KV cache saved
//! with its token ids and the identity of the model that made it, so that `generate` starts
//! after it and computes only the new tokens.
//!
//! The file is safetensors: `layers.{i}.keys` and `layers.{i}.values`, each
//! `[1, kv_heads, tokens, head_dim]` in f32, and in `__metadata__` the format, the token ids
//! (JSON), the model as it was given, and its fingerprint: a hash of the configuration, how each
//! weight is held (dtype or packing), two rows of the embedding and of the head, the first row and
//! the bias of every frozen linear, and every adapter (magnitudes included), so a cache made by
//! another model (a fine-tune of the same base too), other adapters or another dtype is refused
//! rather than silently misread. It reads a few rows, not every weight: two models that differ
//! only elsewhere would share it.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::Tensor;

use crate::io::atomic;
use crate::io::safetensors::SafetensorsStore;
use crate::lora::files::{NamedTensors, safetensors_bytes};
use crate::model::adapter::{from_vec, to_vec};
use crate::model::{Bound, Decoder, KvCache, ModelConfig};
use crate::ops::frozen_linear::ModelBackend;

/// The `format` this module writes and reads.
const FORMAT: &str = "loraforge-prompt-cache-1";

/// A saved prompt: its tokens, its keys and values, and who made them.
pub struct PromptCache {
    /// The prompt's token ids, in order.
    pub ids: Vec<u32>,
    /// The model as it was given when the cache was made (a path or a hub name).
    pub model: String,
    /// The model's identity (see the module docs).
    pub fingerprint: String,
    /// Each block's keys and values on the host, `[1, kv_heads, tokens, head_dim]` each.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    /// `[kv_heads, head_dim]` of every block.
    heads: [usize; 2],
}

/// The identity of `decoder` as prompt caches record it (see the module docs): FNV-1a over what
/// tells two models apart without reading every weight.
pub fn fingerprint<B: ModelBackend>(decoder: &Decoder<B>, device: &B::Device) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(format!("{:?}", decoder.config).as_bytes());
    let rows = |t: Tensor<B, 2>| to_vec(&t);
    for weight in [&decoder.embed_tokens, &decoder.lm_head.weight] {
        eat(weight_kind(weight).as_bytes());
        for v in rows(weight.rows(&[0, 1], device)) {
            eat(&v.to_le_bytes());
        }
    }
    for block in &decoder.layers {
        for (which, linear) in block.linears() {
            eat(format!("{which:?}{}", weight_kind(&linear.weight)).as_bytes());
            let bias = linear.bias.iter().map(|b| b.clone().unsqueeze::<2>());
            for t in std::iter::once(linear.weight.rows(&[0], device)).chain(bias) {
                for v in rows(t) {
                    eat(&v.to_le_bytes());
                }
            }
            let Some(adapter) = &linear.adapter else {
                continue;
            };
            let magnitude = adapter.magnitude.iter().map(|m| m.clone().unsqueeze::<2>());
            for t in [adapter.a.clone(), adapter.b.clone()]
                .into_iter()
                .chain(magnitude)
            {
                for v in rows(t) {
                    eat(&v.to_le_bytes());
                }
            }
            eat(&adapter.scale.to_le_bytes());
        }
    }
    format!("{hash:016x}")
}

/// How a base weight is held (its dtype, or packed), for the fingerprint.
fn weight_kind<B: ModelBackend>(w: &crate::model::linear::FrozenWeight<B>) -> String {
    use crate::model::linear::FrozenWeight;
    match w {
        FrozenWeight::Dense(t) => format!("{:?}", t.dtype()),
        FrozenWeight::Quantized(q) => format!("q{}g{}", q.bits, q.group_size),
        FrozenWeight::DeviceQuantized(q) => format!("q{}g{}{:?}", q.bits, q.group, q.half),
    }
}

impl PromptCache {
    /// The cache a model of fingerprint `fingerprint` filled for `ids`, taken to the host.
    pub fn capture<B: ModelBackend>(
        cache: &KvCache<B>,
        ids: &[u32],
        model: &str,
        fingerprint: String,
    ) -> Result<Self> {
        let mut heads = [0, 0];
        let mut layers = Vec::new();
        if !cache.holds_everything() {
            bail!(
                "the prompt is longer than the model's sliding window, whose blocks no longer hold its first keys; a prompt cache keeps every position, so cache a shorter prompt"
            );
        }
        for layer in cache.layers() {
            let Some((k, v)) = layer.kv() else {
                bail!("the prompt did not run through every block");
            };
            let [_, kv_heads, _, head_dim] = k.dims();
            heads = [kv_heads, head_dim];
            layers.push((to_vec(k), to_vec(v)));
        }
        Ok(PromptCache {
            ids: ids.to_vec(),
            model: model.to_string(),
            fingerprint,
            layers,
            heads,
        })
    }

    /// Writes the cache to `path` (a temporary file renamed into place).
    pub fn save(&self, path: &Path) -> Result<()> {
        let [kv_heads, head_dim] = self.heads;
        let shape = vec![1, kv_heads, self.ids.len(), head_dim];
        let mut tensors = NamedTensors::new();
        for (i, (k, v)) in self.layers.iter().enumerate() {
            tensors.insert(format!("layers.{i:04}.keys"), (shape.clone(), k.clone()));
            tensors.insert(format!("layers.{i:04}.values"), (shape.clone(), v.clone()));
        }
        let ids = serde_json::to_string(&self.ids)?;
        let metadata = [
            ("format", FORMAT),
            ("token_ids", ids.as_str()),
            ("model", self.model.as_str()),
            ("fingerprint", self.fingerprint.as_str()),
        ];
        atomic::write(path, &safetensors_bytes(&tensors, &metadata)?)
            .with_context(|| format!("writing the prompt cache {}", path.display()))
    }

    /// Reads a cache written by [`Self::save`] for `decoder`, whose [`fingerprint`] is
    /// `fingerprint`: a file of another format, another model's cache (checked before its tensors
    /// are read), ids past the vocabulary and tensors that do not fit the model's blocks are
    /// errors naming the file.
    pub fn load<B: ModelBackend>(
        path: &Path,
        decoder: &Decoder<B>,
        fingerprint: &str,
    ) -> Result<Self> {
        let store = SafetensorsStore::open_files(&[path.to_path_buf()])
            .with_context(|| format!("reading the prompt cache {}", path.display()))?;
        let meta = store.file_metadata();
        let field = |key: &str| {
            meta.get(key).cloned().with_context(|| {
                format!(
                    "{} is not a loraforge prompt cache (no `{key}` in its metadata); make one with `loraforge cache-prompt`",
                    path.display()
                )
            })
        };
        let format = meta.get("format").map_or("", String::as_str);
        if !format.starts_with("loraforge-prompt-cache") {
            bail!(
                "{} is not a loraforge prompt cache (its format is `{format}`); make one with `loraforge cache-prompt`",
                path.display()
            );
        }
        if format != FORMAT {
            bail!(
                "{}: prompt cache format `{format}`, this build reads `{FORMAT}`; make it again with `loraforge cache-prompt`",
                path.display()
            );
        }
        let ids: Vec<u32> = serde_json::from_str(&field("token_ids")?)
            .with_context(|| format!("{}: `token_ids` is not a list of ids", path.display()))?;
        let c = &decoder.config;
        let (model, made_by) = (field("model")?, field("fingerprint")?);
        if made_by != fingerprint {
            bail!(
                "{} was made by another model ({model}, fingerprint {made_by}), or with other adapters or another dtype; this model's fingerprint is {fingerprint}: make the cache again with `loraforge cache-prompt` for it (a cache made on CUDA before `--dtype` existed held the weights in f32: `--dtype f32` reads it)",
                path.display()
            );
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= c.vocab_size) {
            bail!(
                "{}: token id {bad} is past the model's vocabulary ({} tokens)",
                path.display(),
                c.vocab_size
            );
        }
        let shape = [1, c.num_kv_heads, ids.len(), c.head_dim];
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let read = |what: &str| -> Result<Vec<f32>> {
                let name = format!("layers.{i:04}.{what}");
                let t = store.get(&name).with_context(|| {
                    format!(
                        "{}: `{name}` is missing (a cache for a model with fewer blocks?)",
                        path.display()
                    )
                })?;
                if t.shape != shape {
                    bail!(
                        "{}: `{name}` has shape {:?}; this model's cache of {} tokens needs {shape:?} (a cache made by another model)",
                        path.display(),
                        t.shape,
                        ids.len()
                    );
                }
                t.to_f32()
                    .map_err(|e| anyhow::anyhow!("{}: `{name}`: {e}", path.display()))
            };
            layers.push((read("keys")?, read("values")?));
        }
        Ok(PromptCache {
            ids,
            model,
            fingerprint: made_by,
            layers,
            heads: [c.num_kv_heads, c.head_dim],
        })
    }

    /// The cache on `device` for a model of `config`, bounded as `bound` says (see
    /// [`KvCache::new`]), to continue from.
    pub fn to_device<B: ModelBackend>(
        &self,
        config: &ModelConfig,
        bound: Option<Bound>,
        device: &B::Device,
    ) -> KvCache<B> {
        let [kv_heads, head_dim] = self.heads;
        let shape = [1, kv_heads, self.ids.len(), head_dim];
        let tensor = |v: &Vec<f32>| from_vec(v.clone(), shape, device);
        KvCache::new(config, bound).filled(
            self.layers
                .iter()
                .map(|(k, v)| (tensor(k), tensor(v)))
                .collect(),
        )
    }
}
