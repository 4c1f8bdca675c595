//! Architecture hyper-parameters, read from `config.json` or from GGUF metadata.

use std::path::Path;

use serde_json::Value;

use crate::io::gguf::GgufFile;
use crate::ops::elementwise::Activation;
use crate::ops::rope::RopeScaling;

/// The decoder families we implement. SmolLM is Llama.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama and SmolLM (`model_type` `llama` or `smollm`).
    Llama,
    /// Mistral (`mistral`), built as Llama is.
    Mistral,
    /// Qwen2 (`qwen2`): Llama with a bias on the q, k and v projections.
    Qwen2,
    /// Qwen3 (`qwen3`): Llama with an RMSNorm over each head of q and k before RoPE.
    Qwen3,
    /// Gemma 2 (`gemma2`): see [`Quirks`]: norms of `1 + w` around attention and the MLP, GeGLU,
    /// a scaled embedding, soft-capped scores and logits, sliding and global layers alternating.
    Gemma2,
    /// Gemma 3's text model (`gemma3_text`): Gemma 2 without the soft-caps, with q/k norms, and
    /// five sliding layers (with their own RoPE base) to each global one.
    Gemma3,
    /// Phi-3, 3.5 and 4 (`phi3`): Llama with q, k and v in one projection (`qkv_proj`), gate and
    /// up in one (`gate_up_proj`), LongRoPE, and Mistral's sliding window where set.
    Phi3,
    /// Mixtral (`mixtral`): Mistral whose MLP is a mixture of experts (see [`MoeConfig`]).
    Mixtral,
    /// Qwen2-MoE (`qwen2_moe`): Qwen2 whose MLPs are experts plus a sigmoid-gated shared expert.
    Qwen2Moe,
    /// Qwen3-MoE (`qwen3_moe`): Qwen3 whose MLPs are experts.
    Qwen3Moe,
}

/// The `model_type` values that errors list as supported (`smollm` is read too, as Llama).
pub const SUPPORTED_MODEL_TYPES: &str =
    "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, mixtral, qwen2_moe, qwen3_moe";

impl Family {
    /// The family for a `config.json` `model_type` or a GGUF `general.architecture`; `None`
    /// when unsupported.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "llama" | "smollm" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3_text" | "gemma3" => Family::Gemma3,
            "phi3" => Family::Phi3,
            "mixtral" => Family::Mixtral,
            "qwen2_moe" | "qwen2moe" => Family::Qwen2Moe,
            "qwen3_moe" | "qwen3moe" => Family::Qwen3Moe,
            _ => return None,
        })
    }

    /// The family of a GGUF file's `general.architecture` (Mixtral: `llama` with experts).
    pub fn of_gguf(gguf: &GgufFile) -> Option<Self> {
        let arch = gguf.architecture()?;
        match Family::from_model_type(arch)? {
            Family::Llama if gguf.get_u64("llama.expert_count").is_some_and(|n| n > 0) => {
                Some(Family::Mixtral)
            }
            family => Some(family),
        }
    }

    /// The family's `model_type`, as `config.json` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
            Family::Phi3 => "phi3",
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
        }
    }

    /// llama.cpp's `general.architecture` for the family (Mixtral is `llama` with experts).
    pub fn gguf_arch(self) -> &'static str {
        match self {
            Family::Llama | Family::Mistral | Family::Mixtral => "llama",
            Family::Gemma3 => "gemma3",
            Family::Qwen2Moe => "qwen2moe",
            Family::Qwen3Moe => "qwen3moe",
            other => other.name(),
        }
    }

    /// The transformers class that loads the family (`architectures` in `config.json`).
    pub fn hf_class(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
            Family::Mixtral => "MixtralForCausalLM",
            Family::Qwen2Moe => "Qwen2MoeForCausalLM",
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
        }
    }

    /// Whether its MLPs are mixtures of experts ([`MoeConfig`]).
    pub fn has_experts(self) -> bool {
        matches!(self, Family::Mixtral | Family::Qwen2Moe | Family::Qwen3Moe)
    }

    /// The module a block's MLP sits under: Mixtral's `block_sparse_moe`, else `mlp`.
    pub fn mlp_module(self) -> &'static str {
        match self {
            Family::Mixtral => "block_sparse_moe",
            _ => "mlp",
        }
    }

    /// Gemma's block: `1 + w` norms, GeGLU, the embedding scaled by √hidden, norms after
    /// attention and after the MLP as well as before.
    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }

    /// Phi-3: q, k and v are one linear (`qkv_proj`, rows q then k then v), gate and up another
    /// (`gate_up_proj`, gate's rows first), as every format stores them.
    pub fn fuses_projections(self) -> bool {
        self == Family::Phi3
    }

    /// Whether `sliding_window` applies to every layer (Mistral, Phi-3; Gemma picks layers).
    fn slides_everywhere(self) -> bool {
        matches!(self, Family::Mistral | Family::Phi3 | Family::Mixtral)
    }

    /// Gemma's layer pattern when a file does not list `layer_types`: every 2nd layer global in
    /// Gemma 2, every 6th in Gemma 3 (`sliding_window_pattern`, llama.cpp's hard-coded value).
    fn default_sliding_period(self) -> usize {
        if self == Family::Gemma2 { 2 } else { 6 }
    }

    /// llama.cpp permutes the rows of q and k for its interleaved RoPE (the Llama family);
    /// others run NeoX's rotate-half RoPE, as Hugging Face stores them.
    pub fn gguf_permutes_qk(self) -> bool {
        matches!(self, Family::Llama | Family::Mistral | Family::Mixtral)
    }
}

/// What a family changes in the Llama block; Llama's values by default.
#[derive(Debug, Clone, PartialEq)]
pub struct Quirks {
    /// The MLP gate's activation (SiLU; Gemma's gelu with the tanh approximation).
    pub activation: Activation,
    /// Gemma: every RMSNorm multiplies by `1 + w`; files store `w` (llama.cpp's GGUF stores
    /// `1 + w`, which the reader turns back into `w`).
    pub norm_plus_one: bool,
    /// Gemma: the embedding's rows are multiplied by √hidden (rounded to the weights' dtype).
    pub scale_embedding: bool,
    /// Gemma: an RMSNorm after attention and one after the MLP, each before its residual add.
    pub sandwich_norms: bool,
    /// Scores are `q·k / √query_pre_attn_scalar` (Gemma); `/ √head_dim` when `None`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2: scores are soft-capped, `cap · tanh(s / cap)`, before the mask.
    pub attn_softcap: Option<f64>,
    /// Gemma 2: logits are soft-capped the same way.
    pub final_softcap: Option<f64>,
    /// A sliding layer's query sees itself and the `window − 1` positions before it.
    pub sliding_window: Option<usize>,
    /// Per layer, whether it slides (needs `sliding_window`); empty when none does.
    pub sliding_layers: Vec<bool>,
    /// Gemma 3: the sliding layers' RoPE `(theta, scaling)`, apart from the global layers'.
    pub local_rope: Option<(f64, RopeScaling)>,
}

impl Default for Quirks {
    fn default() -> Self {
        Quirks {
            activation: Activation::Silu,
            norm_plus_one: false,
            scale_embedding: false,
            sandwich_norms: false,
            query_pre_attn_scalar: None,
            attn_softcap: None,
            final_softcap: None,
            sliding_window: None,
            sliding_layers: Vec::new(),
            local_rope: None,
        }
    }
}

impl Quirks {
    /// Whether layer `i` slides.
    pub fn slides(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && self.sliding_layers.get(layer).copied().unwrap_or(false)
    }

    /// The family's default layer pattern: Gemma 2 alternates sliding and global from a sliding
    /// first layer, Gemma 3 puts a global layer after every five sliding ones (`pattern` = 6),
    /// Mistral slides everywhere.
    fn pattern(layers: usize, period: usize) -> Vec<bool> {
        (0..layers)
            .map(|i| !(i + 1).is_multiple_of(period))
            .collect()
    }

    /// `Some(p)` when layer `i` is global exactly where `(i + 1) % p == 0` (what GGUF stores as
    /// `sliding_window_pattern`).
    pub fn sliding_period(&self) -> Option<usize> {
        let n = self.sliding_layers.len();
        (1..=n.max(1) + 1).find(|&p| Self::pattern(n, p) == self.sliding_layers)
    }
}

/// A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks `top_k` of the
/// `experts` for each token, and the MLP's output is their outputs weighted by the router's
/// probabilities (renormalised over the chosen ones where `normalize_top_k`).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Experts per sparse layer (`num_local_experts`, `num_experts`; GGUF `expert_count`).
    pub experts: usize,
    /// Experts each token goes through (`num_experts_per_tok`; GGUF `expert_used_count`).
    pub top_k: usize,
    /// Width of one expert's gate and up projections (Mixtral: `intermediate_size`; Qwen:
    /// `moe_intermediate_size`; GGUF `expert_feed_forward_length`).
    pub expert_intermediate_size: usize,
    /// Whether the chosen experts' probabilities are rescaled to sum to 1 (Mixtral always,
    /// Qwen where `norm_topk_prob`).
    pub normalize_top_k: bool,
    /// Qwen2-MoE: the width of the shared expert every token also goes through, its output
    /// scaled by `sigmoid(x · shared_expert_gate)`.
    pub shared_expert_intermediate_size: Option<usize>,
    /// Per layer, whether its MLP is the experts (Qwen's `mlp_only_layers` and
    /// `decoder_sparse_step` make some dense, `intermediate_size` wide).
    pub sparse_layers: Vec<bool>,
}

impl MoeConfig {
    /// Whether layer `i`'s MLP is the experts.
    pub fn sparse(&self, layer: usize) -> bool {
        self.sparse_layers.get(layer).copied().unwrap_or(false)
    }
}

/// A decoder's architecture hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which decoder family the model is.
    pub family: Family,
    /// Tokens in the vocabulary: rows of the embedding and of the head.
    pub vocab_size: usize,
    /// Width of the residual stream (`hidden`).
    pub hidden_size: usize,
    /// Width of the MLP's gate and up projections.
    pub intermediate_size: usize,
    /// Decoder blocks (`num_hidden_layers`).
    pub num_layers: usize,
    /// Query heads (`num_attention_heads`).
    pub num_heads: usize,
    /// Key/value heads, dividing `num_heads` (grouped-query attention); `num_heads` when absent.
    pub num_kv_heads: usize,
    /// Width of one attention head; `hidden_size / num_heads` when absent.
    pub head_dim: usize,
    /// The leading dimensions of each head RoPE rotates: `head_dim`, or `head_dim ·
    /// partial_rotary_factor` (Phi-4-mini: 0.75; GGUF: `rope.dimension_count`); the rest pass
    /// through unrotated.
    pub rotary_dim: usize,
    /// The `ε` added to the mean square in every RMSNorm (1e-6 when absent).
    pub rms_norm_eps: f64,
    /// RoPE's base `theta` (10000 when absent).
    pub rope_theta: f64,
    /// How RoPE's frequencies are rescaled for longer contexts.
    pub rope_scaling: RopeScaling,
    /// The context length the model is configured for, in tokens (4096 when absent).
    pub max_position_embeddings: usize,
    /// The head reuses the embedding matrix (no separate `lm_head` weight).
    pub tie_word_embeddings: bool,
    /// Qwen2: q/k/v projections carry a bias.
    pub attention_bias: bool,
    /// Qwen3 and Gemma 3: RMSNorm over each head of q and k before RoPE.
    pub qk_norm: bool,
    /// What the family changes beyond the fields above.
    pub quirks: Quirks,
    /// The experts of a mixture-of-experts family; `None` for dense MLPs.
    pub moe: Option<MoeConfig>,
    /// The dtype the weights were stored in (`torch_dtype` / `dtype`), for `inspect`.
    pub dtype: String,
}

/// Why a model's configuration can't be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file can't be read, or is not JSON.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file that could not be read or parsed.
        path: String,
        /// The I/O or JSON error.
        reason: String,
    },
    /// The `model_type` (or GGUF architecture) is not one of the [`Family`] variants.
    #[error(
        "{path}: `model_type` is \"{found}\", which loraforge does not support (supported: {SUPPORTED_MODEL_TYPES})"
    )]
    UnsupportedModelType {
        /// The file the configuration came from.
        path: String,
        /// The `model_type` (or GGUF architecture) the file gives.
        found: String,
    },
    /// A required key is absent or of the wrong type.
    #[error("{path}: missing or invalid `{key}`{hint}")]
    Missing {
        /// The file the configuration came from.
        path: String,
        /// The key as the source spells it (`vocab_size`, `llama.block_count`).
        key: String,
        /// Appended to the message: empty, or a note that starts with a space.
        hint: String,
    },
    /// The values read contradict each other or the decoder's needs.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file the configuration came from.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

impl ModelConfig {
    /// Reads and parses the `config.json` at `path`.
    pub fn from_config_json(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| ConfigError::Read {
            path: shown.clone(),
            reason: format!("invalid JSON: {e}"),
        })?;
        Self::from_json(&json, &shown)
    }

    /// The configuration from a parsed `config.json`; `path` only names the file in errors.
    pub fn from_json(json: &Value, path: &str) -> Result<Self, ConfigError> {
        let missing = |key: &str| ConfigError::Missing {
            path: path.to_string(),
            key: key.to_string(),
            hint: String::new(),
        };
        let model_type = json
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| ConfigError::Missing {
                path: path.to_string(),
                key: "model_type".into(),
                hint: format!(" (one of: {SUPPORTED_MODEL_TYPES})"),
            })?;
        let family = Family::from_model_type(model_type).ok_or_else(|| {
            ConfigError::UnsupportedModelType {
                path: path.to_string(),
                found: model_type.to_string(),
            }
        })?;
        let usize_key = |key: &str| -> Result<usize, ConfigError> {
            json.get(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| missing(key))
        };
        let hidden_size = usize_key("hidden_size")?;
        let num_heads = usize_key("num_attention_heads")?;
        let num_kv_heads = json
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .unwrap_or(num_heads);
        let head_dim = match json.get("head_dim").and_then(Value::as_u64) {
            Some(d) => d as usize,
            None => width_per_head(hidden_size, num_heads, path)?,
        };
        if model_type == "gemma3" {
            return Err(ConfigError::Invalid {
                path: path.to_string(),
                reason: "model_type \"gemma3\" is Gemma 3's vision-language checkpoint; loraforge trains the text model (model_type \"gemma3_text\", e.g. google/gemma-3-1b-it)".into(),
            });
        }
        // transformers >= 5 writes rope settings under `rope_parameters` (Gemma 3: one set per
        // layer type); older files use `rope_theta` and `rope_scaling`.
        let rope_sets = json.get("rope_parameters").filter(|v| v.is_object());
        let global_set = rope_sets
            .and_then(|p| p.get("full_attention"))
            .or(rope_sets);
        let rope_params = global_set.or_else(|| json.get("rope_scaling").filter(|v| v.is_object()));
        let rope_theta = json
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                rope_params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(if family == Family::Gemma3 {
                1e6
            } else {
                10000.0
            });
        // transformers: `int(head_dim * partial_rotary_factor)` dimensions rotate.
        let rotary_dim = match rope_params
            .and_then(|p| p.get("partial_rotary_factor"))
            .or_else(|| json.get("partial_rotary_factor"))
        {
            None => head_dim,
            Some(f) => match f.as_f64().filter(|f| *f > 0.0 && *f <= 1.0) {
                Some(f) => (head_dim as f64 * f) as usize,
                None => {
                    return Err(ConfigError::Invalid {
                        path: path.to_string(),
                        reason: format!(
                            "partial_rotary_factor is {f}; it must be a number in (0, 1] (the share of each head RoPE rotates)"
                        ),
                    });
                }
            },
        };
        let rope_scaling = match rope_params {
            None => RopeScaling::None,
            Some(p) => rope_scaling_from_json(p, json, rotary_dim, path)?,
        };
        // Checked before the per-layer quirks are laid out.
        let num_layers = within(
            LAYERS_KEY,
            usize_key("num_hidden_layers")?,
            MAX_LAYERS,
            path,
        )?;
        let quirks = quirks_from_json(json, family, num_layers, rope_sets, head_dim, path)?;
        let config = ModelConfig {
            family,
            vocab_size: usize_key("vocab_size")?,
            hidden_size,
            intermediate_size: usize_key("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rotary_dim,
            rms_norm_eps: json
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: json
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(4096) as usize,
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(family.is_gemma()),
            attention_bias: match family {
                Family::Qwen2 => true,
                Family::Qwen2Moe => json
                    .get("qkv_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
                _ => json
                    .get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            },
            qk_norm: matches!(family, Family::Qwen3 | Family::Qwen3Moe | Family::Gemma3),
            quirks,
            moe: moe_from_json(json, family, num_layers, path)?,
            dtype: json
                .get("dtype")
                .or_else(|| json.get("torch_dtype"))
                .and_then(Value::as_str)
                .unwrap_or("float32")
                .to_string(),
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Reads the architecture from GGUF metadata (`{arch}.embedding_length`, ...).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ConfigError> {
        let path = gguf.path.display().to_string();
        let arch = gguf.architecture().ok_or_else(|| ConfigError::Missing {
            path: path.clone(),
            key: "general.architecture".into(),
            hint: String::new(),
        })?;
        let family = Family::of_gguf(gguf).ok_or_else(|| ConfigError::UnsupportedModelType {
            path: path.clone(),
            found: arch.to_string(),
        })?;
        let key = |k: &str| format!("{arch}.{k}");
        let req = |k: &str| -> Result<usize, ConfigError> {
            gguf.get_u64(&key(k))
                .map(|v| v as usize)
                .ok_or_else(|| ConfigError::Missing {
                    path: path.clone(),
                    key: key(k),
                    hint: String::new(),
                })
        };
        let hidden_size = req("embedding_length")?;
        let num_heads = req("attention.head_count")?;
        let head_dim = match gguf.get_u64(&key("attention.key_length")) {
            Some(d) => d as usize,
            None => width_per_head(hidden_size, num_heads, &path)?,
        };
        let vocab_size = gguf
            .get_u64(&key("vocab_size"))
            .map(|v| v as usize)
            .or_else(|| {
                gguf.get("tokenizer.ggml.tokens")
                    .and_then(|v| v.as_array())
                    .map(<[_]>::len)
            })
            .ok_or_else(|| ConfigError::Missing {
                path: path.clone(),
                key: key("vocab_size"),
                hint: " (and no tokenizer.ggml.tokens to count)".into(),
            })?;
        let rotary_dim = gguf
            .get_u64(&key("rope.dimension_count"))
            .map_or(head_dim, |d| d as usize);
        let rope_scaling = match gguf.get_str(&key("rope.scaling.type")) {
            _ if gguf.tensor(LONG_ROPE_FACTORS[0]).is_some() => {
                long_rope_from_gguf(gguf, arch, rotary_dim)?
            }
            Some("linear") => RopeScaling::Linear {
                factor: gguf.get_f64(&key("rope.scaling.factor")).unwrap_or(1.0),
            },
            _ => RopeScaling::None,
        };
        let num_layers = within(LAYERS_KEY, req("block_count")?, MAX_LAYERS, &path)?;
        let quirks = quirks_from_gguf(gguf, family, hidden_size, num_heads, head_dim, num_layers);
        let feed_forward = req("feed_forward_length")?;
        let config = ModelConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: feed_forward,
            num_layers,
            num_heads,
            num_kv_heads: gguf
                .get_u64(&key("attention.head_count_kv"))
                .map(|v| v as usize)
                .unwrap_or(num_heads),
            head_dim,
            rotary_dim,
            rms_norm_eps: gguf
                .get_f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-6),
            rope_theta: gguf.get_f64(&key("rope.freq_base")).unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: gguf.get_u64(&key("context_length")).unwrap_or(4096) as usize,
            tie_word_embeddings: gguf.tensor("output.weight").is_none(),
            attention_bias: gguf.tensor("blk.0.attn_q.bias").is_some(),
            qk_norm: gguf.tensor("blk.0.attn_q_norm.weight").is_some(),
            quirks,
            moe: moe_from_gguf(gguf, family, num_layers, feed_forward)?,
            dtype: "gguf".into(),
        };
        config.validate(&path)?;
        Ok(config)
    }

    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_string(),
            reason,
        };
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return Err(invalid(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if self.quirks.sliding_window == Some(0) {
            return Err(invalid(
                "sliding_window is 0; a query must see at least itself".into(),
            ));
        }
        let q = &self.quirks;
        for (key, value) in [
            ("query_pre_attn_scalar", q.query_pre_attn_scalar),
            ("attn_logit_softcapping", q.attn_softcap),
            ("final_logit_softcapping", q.final_softcap),
        ] {
            if let Some(v) = value.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(invalid(format!(
                    "{key} is {v}; it must be a positive number (or null for none)"
                )));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim
            )));
        }
        if self.rotary_dim == 0
            || self.rotary_dim > self.head_dim
            || !self.rotary_dim.is_multiple_of(2)
        {
            return Err(invalid(format!(
                "RoPE would rotate {} of each head's {} dimensions (partial_rotary_factor; GGUF: rope.dimension_count); it must be an even number from 2 to head_dim",
                self.rotary_dim, self.head_dim
            )));
        }
        // Far past any real model, and small enough that the sizes below cannot overflow.
        let limits = [
            (LAYERS_KEY, self.num_layers, MAX_LAYERS),
            (
                "hidden_size (GGUF: embedding_length)",
                self.hidden_size,
                1 << 17,
            ),
            (
                "intermediate_size (GGUF: feed_forward_length)",
                self.intermediate_size,
                1 << 20,
            ),
            ("vocab_size", self.vocab_size, 1 << 24),
            (
                "num_attention_heads (GGUF: attention.head_count)",
                self.num_heads,
                1024,
            ),
            ("head_dim (GGUF: attention.key_length)", self.head_dim, 1024),
        ];
        for (key, value, max) in limits {
            within(key, value, max, path)?;
        }
        Ok(())
    }

    /// Frozen parameters: every weight [`crate::model::names::tensor_specs`] lists.
    pub fn parameter_count(&self) -> usize {
        crate::model::names::tensor_specs(self)
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    }
}

/// The experts of a mixture-of-experts family from `config.json`; `None` for other families.
fn moe_from_json(
    json: &Value,
    family: Family,
    layers: usize,
    path: &str,
) -> Result<Option<MoeConfig>, ConfigError> {
    if !family.has_experts() {
        return Ok(None);
    }
    let key = |keys: &[&str]| -> Result<usize, ConfigError> {
        keys.iter()
            .find_map(|k| json.get(*k).and_then(Value::as_u64))
            .map(|v| v as usize)
            .ok_or_else(|| ConfigError::Missing {
                path: path.to_string(),
                key: keys[0].to_string(),
                hint: format!(" ({} needs it)", family.name()),
            })
    };
    let experts = key(&["num_local_experts", "num_experts"])?;
    let (expert_width, shared) = match family {
        Family::Mixtral => (key(&["intermediate_size"])?, None),
        Family::Qwen2Moe => (
            key(&["moe_intermediate_size"])?,
            Some(key(&["shared_expert_intermediate_size"])?),
        ),
        _ => (key(&["moe_intermediate_size"])?, None),
    };
    let dense: Vec<usize> = match json.get("mlp_only_layers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_u64().map(|i| i as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| ConfigError::Invalid {
                path: path.to_string(),
                reason: "mlp_only_layers must be a list of layer indices".into(),
            })?,
        Some(other) => {
            return Err(ConfigError::Invalid {
                path: path.to_string(),
                reason: format!("mlp_only_layers is {other}; it must be a list of layer indices"),
            });
        }
    };
    let step = json
        .get("decoder_sparse_step")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .max(1) as usize;
    let sparse_layers = (0..layers)
        .map(|i| !dense.contains(&i) && (i + 1).is_multiple_of(step))
        .collect();
    let moe = MoeConfig {
        experts,
        top_k: key(&["num_experts_per_tok"])?,
        expert_intermediate_size: expert_width,
        normalize_top_k: match family {
            Family::Mixtral => true,
            _ => json
                .get("norm_topk_prob")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        },
        shared_expert_intermediate_size: shared,
        sparse_layers,
    };
    moe.validate(path)?;
    Ok(Some(moe))
}

/// The experts from GGUF metadata (`{arch}.expert_count`, ...): a sparse layer is one that has
/// a router (`blk.N.ffn_gate_inp.weight`). llama.cpp renormalises the chosen experts' weights in
/// Mixtral and Qwen3-MoE and not in Qwen2-MoE, unless `expert_weights_norm` says otherwise.
fn moe_from_gguf(
    gguf: &GgufFile,
    family: Family,
    layers: usize,
    feed_forward: usize,
) -> Result<Option<MoeConfig>, ConfigError> {
    if !family.has_experts() {
        return Ok(None);
    }
    let path = gguf.path.display().to_string();
    let arch = family.gguf_arch();
    let req = |k: &str| -> Result<usize, ConfigError> {
        gguf.get_u64(&format!("{arch}.{k}"))
            .map(|v| v as usize)
            .ok_or_else(|| ConfigError::Missing {
                path: path.clone(),
                key: format!("{arch}.{k}"),
                hint: format!(" ({} needs it)", family.name()),
            })
    };
    let moe = MoeConfig {
        experts: req("expert_count")?,
        top_k: req("expert_used_count")?,
        expert_intermediate_size: match family {
            Family::Mixtral => feed_forward,
            _ => req("expert_feed_forward_length")?,
        },
        normalize_top_k: gguf
            .get(&format!("{arch}.expert_weights_norm"))
            .and_then(|v| v.as_bool())
            .unwrap_or(family != Family::Qwen2Moe),
        shared_expert_intermediate_size: match family {
            Family::Qwen2Moe => Some(req("expert_shared_feed_forward_length")?),
            _ => None,
        },
        sparse_layers: (0..layers)
            .map(|i| {
                gguf.tensor(&format!("blk.{i}.ffn_gate_inp.weight"))
                    .is_some()
            })
            .collect(),
    };
    moe.validate(&path)?;
    Ok(Some(moe))
}

impl MoeConfig {
    /// Refuses counts no router can have, and sizes past any real model.
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        within(
            "num_local_experts (num_experts; GGUF: expert_count)",
            self.experts,
            1 << 12,
            path,
        )?;
        within(
            "num_experts_per_tok (GGUF: expert_used_count)",
            self.top_k,
            self.experts,
            path,
        )?;
        within(
            "moe_intermediate_size (GGUF: expert_feed_forward_length)",
            self.expert_intermediate_size,
            1 << 20,
            path,
        )?;
        if let Some(shared) = self.shared_expert_intermediate_size {
            within(
                "shared_expert_intermediate_size (GGUF: expert_shared_feed_forward_length)",
                shared,
                1 << 20,
                path,
            )?;
        }
        Ok(())
    }
}

/// The layer count's key in both formats, and its bound (far past any real model).
const LAYERS_KEY: &str = "num_hidden_layers (GGUF: block_count)";
const MAX_LAYERS: usize = 1024;

/// `value` when it is between 1 and `max`; else an error naming `key`.
fn within(key: &str, value: usize, max: usize, path: &str) -> Result<usize, ConfigError> {
    if value == 0 || value > max {
        return Err(ConfigError::Invalid {
            path: path.to_string(),
            reason: format!("{key} is {value}; it must be between 1 and {max}"),
        });
    }
    Ok(value)
}

/// `hidden / heads`, the head width when the file does not give it; an error when the heads do
/// not divide the width.
fn width_per_head(hidden: usize, heads: usize, path: &str) -> Result<usize, ConfigError> {
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(ConfigError::Invalid {
            path: path.to_string(),
            reason: format!(
                "the attention heads ({heads}) do not divide the hidden size ({hidden}), and no head_dim (GGUF: attention.key_length) says how wide a head is"
            ),
        });
    }
    Ok(hidden / heads)
}

/// The family's departures from Llama, from GGUF metadata. llama.cpp does not store Gemma's
/// `query_pre_attn_scalar`, nor Gemma 3's local RoPE base or layer pattern: where the keys
/// (`attention.scale`, `rope.freq_base_swa`, `attention.sliding_window_pattern`, which our
/// writer adds) are absent, its own rules apply: `head_dim`, or `hidden / heads` for the 27B
/// shapes (hidden 4608 or 5376); 10000; every 2nd (Gemma 2) or 6th (Gemma 3) layer global.
fn quirks_from_gguf(
    gguf: &GgufFile,
    family: Family,
    hidden: usize,
    heads: usize,
    head_dim: usize,
    layers: usize,
) -> Quirks {
    let arch = family.gguf_arch();
    if !family.is_gemma() {
        // llama.cpp's converter writes 0 for no window.
        let window = gguf
            .get_u64(&format!("{arch}.attention.sliding_window"))
            .filter(|&w| w > 0 && family.slides_everywhere());
        return Quirks {
            sliding_window: window.map(|w| w as usize),
            sliding_layers: window.map_or_else(Vec::new, |_| vec![true; layers]),
            ..Quirks::default()
        };
    }
    let get = |k: &str| gguf.get_f64(&format!("{arch}.{k}"));
    let query_pre_attn_scalar = match get("attention.scale") {
        Some(scale) if scale > 0.0 => 1.0 / (scale * scale),
        _ if matches!(hidden, 4608 | 5376) => (hidden / heads) as f64,
        _ => head_dim as f64,
    };
    let period = gguf
        .get_u64(&format!("{arch}.attention.sliding_window_pattern"))
        .map_or(family.default_sliding_period(), |p| p.max(1) as usize);
    Quirks {
        activation: Activation::GeluTanh,
        norm_plus_one: true,
        scale_embedding: true,
        sandwich_norms: true,
        query_pre_attn_scalar: Some(query_pre_attn_scalar),
        attn_softcap: get("attn_logit_softcapping"),
        final_softcap: get("final_logit_softcapping"),
        sliding_window: gguf
            .get_u64(&format!("{arch}.attention.sliding_window"))
            .map(|w| w as usize),
        sliding_layers: Quirks::pattern(layers, period),
        local_rope: (family == Family::Gemma3).then(|| {
            (
                get("rope.freq_base_swa").unwrap_or(10000.0),
                RopeScaling::None,
            )
        }),
    }
}

/// The family's departures from Llama, from `config.json`. `rope_sets` is `rope_parameters`
/// when given (Gemma 3's holds one set per layer type).
fn quirks_from_json(
    json: &Value,
    family: Family,
    layers: usize,
    rope_sets: Option<&Value>,
    head_dim: usize,
    path: &str,
) -> Result<Quirks, ConfigError> {
    let f64_key = |key: &str| json.get(key).and_then(Value::as_f64);
    let activation = match json
        .get("hidden_activation")
        .or_else(|| json.get("hidden_act"))
        .and_then(Value::as_str)
    {
        None | Some("silu") if !family.is_gemma() => Activation::Silu,
        None | Some("gelu_pytorch_tanh") => Activation::GeluTanh,
        Some(other) => {
            return Err(ConfigError::Invalid {
                path: path.to_string(),
                reason: format!(
                    "hidden activation \"{other}\" is not supported for {} (supported: {})",
                    family.name(),
                    if family.is_gemma() {
                        "gelu_pytorch_tanh"
                    } else {
                        "silu"
                    }
                ),
            });
        }
    };
    let sliding_window = json
        .get("sliding_window")
        .and_then(Value::as_u64)
        .map(|w| w as usize)
        .filter(|_| family.is_gemma() || family.slides_everywhere());
    let sliding_layers = match json.get("layer_types").and_then(Value::as_array) {
        Some(types) if family.is_gemma() => {
            let mut out = Vec::with_capacity(types.len());
            for t in types {
                out.push(match t.as_str() {
                    Some("sliding_attention") => true,
                    Some("full_attention") => false,
                    _ => {
                        return Err(ConfigError::Invalid {
                            path: path.to_string(),
                            reason: format!(
                                "layer_types holds {t}; each must be \"sliding_attention\" or \"full_attention\""
                            ),
                        });
                    }
                });
            }
            out
        }
        _ => match family {
            Family::Gemma2 => Quirks::pattern(layers, family.default_sliding_period()),
            Family::Gemma3 => {
                let period = json
                    .get("sliding_window_pattern")
                    .or_else(|| json.get("_sliding_window_pattern"))
                    .and_then(Value::as_u64)
                    .map_or(family.default_sliding_period(), |p| p.max(1) as usize);
                Quirks::pattern(layers, period)
            }
            _ if family.slides_everywhere() && sliding_window.is_some() => vec![true; layers],
            _ => Vec::new(),
        },
    };
    if !sliding_layers.is_empty() && sliding_layers.len() != layers {
        return Err(ConfigError::Invalid {
            path: path.to_string(),
            reason: format!(
                "layer_types lists {} layers but num_hidden_layers is {layers}",
                sliding_layers.len()
            ),
        });
    }
    let local_rope = match family {
        Family::Gemma3 => {
            let local = rope_sets.and_then(|p| p.get("sliding_attention"));
            let theta = local
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
                .or_else(|| f64_key("rope_local_base_freq"))
                .unwrap_or(10000.0);
            let scaling = match local {
                Some(p) => rope_scaling_from_json(p, json, head_dim, path)?,
                None => RopeScaling::None,
            };
            Some((theta, scaling))
        }
        _ => None,
    };
    let softcap = |key: &str| f64_key(key).filter(|_| family.is_gemma());
    Ok(Quirks {
        activation,
        norm_plus_one: family.is_gemma(),
        scale_embedding: family.is_gemma(),
        sandwich_norms: family.is_gemma(),
        query_pre_attn_scalar: f64_key("query_pre_attn_scalar").filter(|_| family.is_gemma()),
        attn_softcap: softcap("attn_logit_softcapping"),
        final_softcap: softcap("final_logit_softcapping"),
        sliding_window,
        sliding_layers,
        local_rope,
    })
}

/// One set of RoPE parameters (`rope_parameters`, or the older `rope_scaling`); `config` is the
/// whole file, where Phi-3's older files keep `original_max_position_embeddings`.
fn rope_scaling_from_json(
    p: &Value,
    config: &Value,
    head_dim: usize,
    path: &str,
) -> Result<RopeScaling, ConfigError> {
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let f = |k: &str| p.get(k).and_then(Value::as_f64);
    let need = |k: &str| {
        f(k).ok_or_else(|| ConfigError::Missing {
            path: path.to_string(),
            key: format!("rope_scaling.{k}"),
            hint: format!(" (required by rope_type \"{kind}\")"),
        })
    };
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        },
        "longrope" | "su" => long_rope_from_json(p, config, head_dim, path)?,
        other => {
            return Err(ConfigError::Invalid {
                path: path.to_string(),
                reason: format!(
                    "rope scaling type \"{other}\" is not supported (supported: default, linear, llama3, longrope)"
                ),
            });
        }
    })
}

/// Phi-3's LongRoPE, with transformers' defaults: `factor` is `max_position_embeddings /
/// original_max_position_embeddings` when absent, the attention factor
/// `√(1 + ln(factor) / ln(original))` (1 when `factor` ≤ 1).
fn long_rope_from_json(
    p: &Value,
    config: &Value,
    head_dim: usize,
    path: &str,
) -> Result<RopeScaling, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        path: path.to_string(),
        reason,
    };
    let factors = |key: &str| -> Result<Vec<f64>, ConfigError> {
        let list = p.get(key).and_then(Value::as_array).ok_or_else(|| ConfigError::Missing {
            path: path.to_string(),
            key: format!("rope_scaling.{key}"),
            hint: " (required by rope_type \"longrope\": one factor per pair of a head's dimensions)".into(),
        })?;
        let values: Vec<f64> = list.iter().filter_map(Value::as_f64).collect();
        if !long_rope_factors_fit(&values, head_dim) {
            return Err(invalid(format!(
                "rope_scaling.{key} must hold {} positive numbers (rotated dimensions {head_dim} / 2); it holds {}",
                head_dim / 2,
                serde_json::to_string(list).unwrap_or_default()
            )));
        }
        Ok(values)
    };
    let original = p
        .get("original_max_position_embeddings")
        .or_else(|| config.get("original_max_position_embeddings"))
        .and_then(Value::as_u64)
        .filter(|&n| n > 1)
        .ok_or_else(|| ConfigError::Missing {
            path: path.to_string(),
            key: "original_max_position_embeddings".into(),
            hint: " (LongRoPE's pretrained context length, above 1)".into(),
        })? as f64;
    let max = config
        .get("max_position_embeddings")
        .and_then(Value::as_f64)
        .unwrap_or(original);
    let factor = p
        .get("factor")
        .and_then(Value::as_f64)
        .unwrap_or(max / original);
    let attention_factor = match p.get("attention_factor").and_then(Value::as_f64) {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / original.ln()).sqrt(),
    };
    if !(attention_factor.is_finite() && attention_factor > 0.0) {
        return Err(invalid(format!(
            "rope_scaling.attention_factor is {attention_factor}; it must be a positive number"
        )));
    }
    Ok(RopeScaling::LongRope {
        short_factor: factors("short_factor")?,
        long_factor: factors("long_factor")?,
        original_max_position_embeddings: original as usize,
        attention_factor,
    })
}

/// Whether LongRoPE's factor list holds one positive number per pair of a head's dimensions.
fn long_rope_factors_fit(factors: &[f64], head_dim: usize) -> bool {
    factors.len() == head_dim / 2 && factors.iter().all(|f| f.is_finite() && *f > 0.0)
}

/// llama.cpp's names for LongRoPE's factor lists: the long ones, the short ones.
pub const LONG_ROPE_FACTORS: [&str; 2] = ["rope_factors_long.weight", "rope_factors_short.weight"];

/// Phi-3's LongRoPE from a GGUF file, as llama.cpp's converter stores it: the factor lists as
/// F32 tensors, `{arch}.rope.scaling.original_context_length` and `.attn_factor`.
fn long_rope_from_gguf(
    gguf: &GgufFile,
    arch: &str,
    head_dim: usize,
) -> Result<RopeScaling, ConfigError> {
    let path = gguf.path.display().to_string();
    let factors = |name: &str| -> Result<Vec<f64>, ConfigError> {
        let invalid = |what: String| ConfigError::Invalid {
            path: path.clone(),
            reason: format!(
                "tensor `{name}` {what}; LongRoPE needs {} positive F32 factors (head_dim / 2)",
                head_dim / 2
            ),
        };
        let info = gguf
            .tensor(name)
            .ok_or_else(|| invalid("is missing".into()))?;
        if info.kind != crate::io::gguf::GgmlType::F32 || info.numel() != head_dim / 2 {
            return Err(invalid(format!(
                "is {} with {} values",
                info.kind.name(),
                info.numel()
            )));
        }
        let values: Vec<f64> = crate::quant::ggml::float_values(info.kind, gguf.data(info))
            .unwrap_or_default()
            .into_iter()
            .map(f64::from)
            .collect();
        if !long_rope_factors_fit(&values, head_dim) {
            return Err(invalid(
                "holds a value that is not a positive number".into(),
            ));
        }
        Ok(values)
    };
    let key = |k: &str| format!("{arch}.rope.scaling.{k}");
    let original = gguf
        .get_u64(&key("original_context_length"))
        .filter(|&n| n > 1)
        .ok_or_else(|| ConfigError::Missing {
            path: path.clone(),
            key: key("original_context_length"),
            hint: " (LongRoPE's pretrained context length, above 1)".into(),
        })?;
    let attention_factor = gguf
        .get_f64(&key("attn_factor"))
        .filter(|a| a.is_finite() && *a > 0.0)
        .unwrap_or(1.0);
    Ok(RopeScaling::LongRope {
        long_factor: factors(LONG_ROPE_FACTORS[0])?,
        short_factor: factors(LONG_ROPE_FACTORS[1])?,
        original_max_position_embeddings: original as usize,
        attention_factor,
    })
}
