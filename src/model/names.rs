//! The one table of tensor names: every weight of a decoder under its Hugging Face name (and
//! llama.cpp's GGUF name), with its shape, in file order. Loading, LoRA injection, adapter files
//! and export all name tensors through it, so a name is written once.

use super::config::{Family, ModelConfig};

/// A linear of a decoder block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockLinear {
    /// `self_attn.q_proj`
    Q,
    /// `self_attn.k_proj`
    K,
    /// `self_attn.v_proj`
    V,
    /// `self_attn.o_proj`
    O,
    /// `mlp.gate_proj`
    Gate,
    /// `mlp.up_proj`
    Up,
    /// `mlp.down_proj`
    Down,
    /// Phi-3's `self_attn.qkv_proj`: q's rows, then k's, then v's.
    Qkv,
    /// Phi-3's `mlp.gate_up_proj`: gate's rows, then up's.
    GateUp,
}

impl BlockLinear {
    /// A block's linears in a family with separate projections, in the order adapters are listed
    /// everywhere.
    pub const SPLIT: [BlockLinear; 7] = [
        BlockLinear::Q,
        BlockLinear::K,
        BlockLinear::V,
        BlockLinear::O,
        BlockLinear::Gate,
        BlockLinear::Up,
        BlockLinear::Down,
    ];

    /// A block's linears where the family fuses q, k, v and gate, up (Phi-3).
    pub const FUSED: [BlockLinear; 4] = [
        BlockLinear::Qkv,
        BlockLinear::O,
        BlockLinear::GateUp,
        BlockLinear::Down,
    ];

    /// The linears of a block of `family`, in the order adapters are listed everywhere.
    pub fn of(family: Family) -> &'static [BlockLinear] {
        if family.fuses_projections() {
            &Self::FUSED
        } else {
            &Self::SPLIT
        }
    }

    /// Every linear any family has.
    pub fn all() -> impl Iterator<Item = Self> {
        Self::SPLIT.into_iter().chain(Self::FUSED)
    }

    /// The linear whose key is `key`.
    pub fn from_key(key: &str) -> Option<Self> {
        Self::all().find(|l| l.key() == key)
    }

    /// The linears a fused one (Phi-3's) holds, its rows in their order; none for the others.
    pub fn parts(self) -> &'static [Self] {
        match self {
            BlockLinear::Qkv => &[BlockLinear::Q, BlockLinear::K, BlockLinear::V],
            BlockLinear::GateUp => &[BlockLinear::Gate, BlockLinear::Up],
            _ => &[],
        }
    }

    /// The fused linear (Phi-3's) that holds this one's rows, where it is one of q, k, v, gate or
    /// up.
    pub fn fused_into(self) -> Option<Self> {
        [BlockLinear::Qkv, BlockLinear::GateUp]
            .into_iter()
            .find(|fused| fused.parts().contains(&self))
    }

    /// How a block of `family` stores the projections of this fused linear: itself where the
    /// family fuses them, else its parts.
    pub fn stored(self, family: Family) -> Vec<Self> {
        match family.fuses_projections() {
            true => vec![self],
            false => self.parts().to_vec(),
        }
    }

    /// `[out, in]` of its weight.
    pub fn shape(self, c: &ModelConfig) -> [usize; 2] {
        let (h, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        match self {
            BlockLinear::Q => [q, h],
            BlockLinear::K | BlockLinear::V => [kv, h],
            BlockLinear::O => [h, q],
            BlockLinear::Gate | BlockLinear::Up => [c.intermediate_size, h],
            BlockLinear::Down => [h, c.intermediate_size],
            BlockLinear::Qkv => [q + 2 * kv, h],
            BlockLinear::GateUp => [2 * c.intermediate_size, h],
        }
    }

    /// Whether it belongs to the MLP (gate, up, down) rather than attention.
    pub fn in_mlp(self) -> bool {
        matches!(
            self,
            BlockLinear::Gate | BlockLinear::Up | BlockLinear::Down | BlockLinear::GateUp
        )
    }

    /// Whether the family stores a bias for it (Qwen2's q, k and v).
    pub fn has_bias(self, c: &ModelConfig) -> bool {
        c.attention_bias && matches!(self, BlockLinear::Q | BlockLinear::K | BlockLinear::V)
    }

    /// The heads over which llama.cpp permutes its rows (q and k, for its RoPE kernel).
    pub fn permuted_heads(self, c: &ModelConfig) -> Option<usize> {
        match self {
            BlockLinear::Q => Some(c.num_heads),
            BlockLinear::K => Some(c.num_kv_heads),
            _ => None,
        }
    }
}

/// An RMSNorm of a decoder block, by what it normalises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockNorm {
    /// Before attention (`input_layernorm`).
    Input,
    /// Gemma: attention's output, before the residual add (`post_attention_layernorm`).
    PostAttention,
    /// Before the MLP: `post_attention_layernorm` in Llama, `pre_feedforward_layernorm` in Gemma.
    PreMlp,
    /// Gemma: the MLP's output, before the residual add (`post_feedforward_layernorm`).
    PostMlp,
    /// Qwen3's and Gemma 3's per-head norm of the queries.
    Q,
    /// Qwen3's and Gemma 3's per-head norm of the keys.
    K,
}

impl BlockNorm {
    /// The six; which a block has depends on its family ([`BlockNorm::exists`]).
    pub const ALL: [BlockNorm; 6] = [
        BlockNorm::Input,
        BlockNorm::PostAttention,
        BlockNorm::PreMlp,
        BlockNorm::PostMlp,
        BlockNorm::Q,
        BlockNorm::K,
    ];

    /// Whether blocks of this configuration have it.
    pub fn exists(self, c: &ModelConfig) -> bool {
        match self {
            BlockNorm::Input | BlockNorm::PreMlp => true,
            BlockNorm::PostAttention | BlockNorm::PostMlp => c.quirks.sandwich_norms,
            BlockNorm::Q | BlockNorm::K => c.qk_norm,
        }
    }

    /// Its length.
    pub fn len(self, c: &ModelConfig) -> usize {
        match self {
            BlockNorm::Q | BlockNorm::K => c.head_dim,
            _ => c.hidden_size,
        }
    }

    /// Its Hugging Face module path relative to the block (Llama names its pre-MLP norm
    /// `post_attention_layernorm`; Gemma uses that name for the norm after attention).
    pub fn key(self, family: Family) -> &'static str {
        match self {
            BlockNorm::Input => "input_layernorm",
            BlockNorm::PostAttention => "post_attention_layernorm",
            BlockNorm::PreMlp if family.is_gemma() => "pre_feedforward_layernorm",
            BlockNorm::PreMlp => "post_attention_layernorm",
            BlockNorm::PostMlp => "post_feedforward_layernorm",
            BlockNorm::Q => "self_attn.q_norm",
            BlockNorm::K => "self_attn.k_norm",
        }
    }

    /// llama.cpp's name for it inside a block.
    pub fn gguf(self) -> &'static str {
        match self {
            BlockNorm::Input => "attn_norm",
            BlockNorm::PostAttention => "post_attention_norm",
            BlockNorm::PreMlp => "ffn_norm",
            BlockNorm::PostMlp => "post_ffw_norm",
            BlockNorm::Q => "attn_q_norm",
            BlockNorm::K => "attn_k_norm",
        }
    }

    /// The norm whose Hugging Face key (relative to the block) is `key` in this family (Llama's
    /// `post_attention_layernorm` is its pre-MLP norm, Gemma's the norm after attention).
    fn from_key(key: &str, family: Family) -> Option<Self> {
        let sandwich = |n: &BlockNorm| matches!(n, BlockNorm::PostAttention | BlockNorm::PostMlp);
        Self::ALL
            .into_iter()
            .filter(|n| family.is_gemma() || !sandwich(n))
            .find(|n| n.key(family) == key)
    }
}

/// A named module of a decoder block: its Hugging Face module path relative to the block, and
/// llama.cpp's name for it.
pub trait BlockModule: Copy {
    /// `(module path relative to the block, GGUF name inside the block)`.
    fn names(self) -> (&'static str, &'static str);

    /// The module path relative to its block (`self_attn.q_proj`): mlx-lm's adapter `keys`.
    fn key(self) -> &'static str {
        self.names().0
    }

    /// llama.cpp's name for it inside a block (`attn_q`).
    fn gguf(self) -> &'static str {
        self.names().1
    }
}

impl BlockModule for BlockLinear {
    fn names(self) -> (&'static str, &'static str) {
        match self {
            BlockLinear::Q => ("self_attn.q_proj", "attn_q"),
            BlockLinear::K => ("self_attn.k_proj", "attn_k"),
            BlockLinear::V => ("self_attn.v_proj", "attn_v"),
            BlockLinear::O => ("self_attn.o_proj", "attn_output"),
            BlockLinear::Gate => ("mlp.gate_proj", "ffn_gate"),
            BlockLinear::Up => ("mlp.up_proj", "ffn_up"),
            BlockLinear::Down => ("mlp.down_proj", "ffn_down"),
            BlockLinear::Qkv => ("self_attn.qkv_proj", "attn_qkv"),
            // llama.cpp's Phi-3 keeps gate and up fused under the up projection's name.
            BlockLinear::GateUp => ("mlp.gate_up_proj", "ffn_up"),
        }
    }
}

/// The modules outside the blocks: `(Hugging Face module path, GGUF name)`; each stores one
/// `.weight`. The token embedding:
pub const EMBED_TOKENS: (&str, &str) = ("model.embed_tokens", "token_embd");
/// The final norm.
pub const FINAL_NORM: (&str, &str) = ("model.norm", "output_norm");
/// The output projection (absent when tied to the embedding).
pub const LM_HEAD: (&str, &str) = ("lm_head", "output");

/// The module path of block `layer` (`model.layers.3`).
pub fn block(layer: usize) -> String {
    format!("model.layers.{layer}")
}

/// What a stored tensor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The token embedding.
    Embedding,
    /// The final norm.
    FinalNorm,
    /// The output projection.
    Head,
    /// A block linear's weight.
    Weight(BlockLinear),
    /// A block linear's bias.
    Bias(BlockLinear),
    /// A block norm's weight.
    Norm(BlockNorm),
}

/// One stored weight.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Its Hugging Face name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// What it is.
    pub role: Role,
}

impl TensorSpec {
    fn new(name: String, shape: &[usize], role: Role) -> Self {
        TensorSpec {
            name,
            shape: shape.to_vec(),
            role,
        }
    }

    /// The module path of a `.weight` (`model.layers.0.mlp.up_proj`).
    pub fn module(&self) -> &str {
        self.name.strip_suffix(".weight").unwrap_or(&self.name)
    }

    /// A 2-D matrix (linear, embedding or head), as opposed to a norm or bias vector.
    pub fn is_matrix(&self) -> bool {
        self.shape.len() == 2
    }
}

/// The weights of a model with this configuration, in file order (`lm_head.weight` absent when
/// tied).
pub fn tensor_specs(c: &ModelConfig) -> Vec<TensorSpec> {
    let (h, v) = (c.hidden_size, c.vocab_size);
    let top = |(module, _): (&str, &str)| format!("{module}.weight");
    let mut out = vec![TensorSpec::new(top(EMBED_TOKENS), &[v, h], Role::Embedding)];
    for l in 0..c.num_layers {
        let p = block(l);
        let weight = |w: BlockLinear| {
            let name = format!("{p}.{}.weight", w.key());
            TensorSpec::new(name, &w.shape(c), Role::Weight(w))
        };
        let bias = |w: BlockLinear| {
            let name = format!("{p}.{}.bias", w.key());
            TensorSpec::new(name, &[w.shape(c)[0]], Role::Bias(w))
        };
        let norms = |ns: &[BlockNorm]| -> Vec<TensorSpec> {
            ns.iter()
                .filter(|n| n.exists(c))
                .map(|&n| {
                    let name = format!("{p}.{}.weight", n.key(c.family));
                    TensorSpec::new(name, &[n.len(c)], Role::Norm(n))
                })
                .collect()
        };
        let qkv = BlockLinear::Qkv.stored(c.family);
        let gate_up = BlockLinear::GateUp.stored(c.family);
        out.extend(norms(&[BlockNorm::Input]));
        out.extend(qkv.iter().map(|&w| weight(w)));
        out.extend(qkv.iter().filter(|w| w.has_bias(c)).map(|&w| bias(w)));
        out.extend(norms(&[BlockNorm::Q, BlockNorm::K]));
        out.push(weight(BlockLinear::O));
        out.extend(norms(&[BlockNorm::PostAttention, BlockNorm::PreMlp]));
        out.extend(gate_up.iter().map(|&w| weight(w)));
        out.push(weight(BlockLinear::Down));
        out.extend(norms(&[BlockNorm::PostMlp]));
    }
    out.push(TensorSpec::new(top(FINAL_NORM), &[h], Role::FinalNorm));
    if !c.tie_word_embeddings {
        out.push(TensorSpec::new(top(LM_HEAD), &[v, h], Role::Head));
    }
    out
}

/// What the tensor under a Hugging Face name is in a model of `family`, and in which block.
pub fn role_of(hf: &str, family: Family) -> Option<(Option<usize>, Role)> {
    for (module, role) in [
        (EMBED_TOKENS.0, Role::Embedding),
        (FINAL_NORM.0, Role::FinalNorm),
        (LM_HEAD.0, Role::Head),
    ] {
        if hf.strip_suffix(".weight") == Some(module) {
            return Some((None, role));
        }
    }
    let (layer, leaf) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = leaf.rsplit_once('.')?;
    let role = match (BlockLinear::from_key(module), suffix) {
        (Some(w), "weight") => Role::Weight(w),
        (Some(w), "bias") => Role::Bias(w),
        (None, "weight") => Role::Norm(BlockNorm::from_key(module, family)?),
        _ => return None,
    };
    Some((Some(layer), role))
}

/// The GGUF name of a Hugging Face tensor name in a model of `family` (llama.cpp's naming).
pub fn gguf_name(hf: &str, family: Family) -> Option<String> {
    let (layer, role) = role_of(hf, family)?;
    let leaf = match role {
        Role::Embedding => return Some(format!("{}.weight", EMBED_TOKENS.1)),
        Role::FinalNorm => return Some(format!("{}.weight", FINAL_NORM.1)),
        Role::Head => return Some(format!("{}.weight", LM_HEAD.1)),
        Role::Weight(w) => format!("{}.weight", w.gguf()),
        Role::Bias(w) => format!("{}.bias", w.gguf()),
        Role::Norm(n) => format!("{}.weight", n.gguf()),
    };
    Some(format!("blk.{}.{leaf}", layer?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rope::RopeScaling;

    #[test]
    fn specs_count_every_parameter_once() {
        for (tied, bias, qk_norm, family) in [
            (true, false, false, Family::Qwen3),
            (false, true, false, Family::Qwen3),
            (false, false, true, Family::Qwen3),
            (true, false, true, Family::Gemma3),
            (false, false, false, Family::Phi3),
        ] {
            let quirks = crate::model::config::Quirks {
                sandwich_norms: family.is_gemma(),
                ..Default::default()
            };
            let config = ModelConfig {
                family,
                vocab_size: 100,
                hidden_size: 32,
                intermediate_size: 48,
                num_layers: 3,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 8,
                rms_norm_eps: 1e-6,
                rope_theta: 1e4,
                rope_scaling: RopeScaling::None,
                max_position_embeddings: 64,
                tie_word_embeddings: tied,
                attention_bias: bias,
                qk_norm,
                quirks,
                dtype: "float32".into(),
            };
            let specs = tensor_specs(&config);
            let total: usize = specs
                .iter()
                .map(|s| s.shape.iter().product::<usize>())
                .sum();
            assert_eq!(total, config.parameter_count(), "{tied} {bias} {qk_norm}");
            assert_eq!(specs.iter().any(|s| s.name == "lm_head.weight"), !tied);
            // Every name reads back as its role, and has a GGUF name.
            for spec in &specs {
                let (_, role) = role_of(&spec.name, family).unwrap();
                assert_eq!(role, spec.role, "{}", spec.name);
                assert!(gguf_name(&spec.name, family).is_some(), "{}", spec.name);
            }
        }
    }
}
