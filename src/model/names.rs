//! The one table of tensor names: every weight of a decoder under its Hugging Face name (and
//! llama.cpp's GGUF name), with its shape, in file order. Loading, LoRA injection, adapter files
//! and export all name tensors through it, so a name is written once.

use super::config::ModelConfig;

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
}

impl BlockLinear {
    /// The seven, in the order adapters are listed everywhere.
    pub const ALL: [BlockLinear; 7] = [
        BlockLinear::Q,
        BlockLinear::K,
        BlockLinear::V,
        BlockLinear::O,
        BlockLinear::Gate,
        BlockLinear::Up,
        BlockLinear::Down,
    ];

    /// The linear whose key is `key`.
    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|l| l.key() == key)
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
        }
    }

    /// Whether it belongs to the MLP (gate, up, down) rather than attention.
    pub fn in_mlp(self) -> bool {
        matches!(
            self,
            BlockLinear::Gate | BlockLinear::Up | BlockLinear::Down
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

/// An RMSNorm of a decoder block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockNorm {
    /// Before attention.
    Input,
    /// Before the MLP.
    PostAttention,
    /// Qwen3's per-head norm of the queries.
    Q,
    /// Qwen3's per-head norm of the keys.
    K,
}

impl BlockNorm {
    /// The four; the q/k norms exist only where `qk_norm` is set.
    pub const ALL: [BlockNorm; 4] = [
        BlockNorm::Input,
        BlockNorm::PostAttention,
        BlockNorm::Q,
        BlockNorm::K,
    ];

    /// Its length.
    pub fn len(self, c: &ModelConfig) -> usize {
        match self {
            BlockNorm::Input | BlockNorm::PostAttention => c.hidden_size,
            BlockNorm::Q | BlockNorm::K => c.head_dim,
        }
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
        }
    }
}

impl BlockModule for BlockNorm {
    fn names(self) -> (&'static str, &'static str) {
        match self {
            BlockNorm::Input => ("input_layernorm", "attn_norm"),
            BlockNorm::PostAttention => ("post_attention_layernorm", "ffn_norm"),
            BlockNorm::Q => ("self_attn.q_norm", "attn_q_norm"),
            BlockNorm::K => ("self_attn.k_norm", "attn_k_norm"),
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
        let norm = |n: BlockNorm| {
            let name = format!("{p}.{}.weight", n.key());
            TensorSpec::new(name, &[n.len(c)], Role::Norm(n))
        };
        let qkv = [BlockLinear::Q, BlockLinear::K, BlockLinear::V];
        out.push(norm(BlockNorm::Input));
        out.extend(qkv.map(weight));
        out.extend(qkv.into_iter().filter(|w| w.has_bias(c)).map(bias));
        if c.qk_norm {
            out.extend([BlockNorm::Q, BlockNorm::K].map(norm));
        }
        out.push(weight(BlockLinear::O));
        out.push(norm(BlockNorm::PostAttention));
        out.extend([BlockLinear::Gate, BlockLinear::Up, BlockLinear::Down].map(weight));
    }
    out.push(TensorSpec::new(top(FINAL_NORM), &[h], Role::FinalNorm));
    if !c.tie_word_embeddings {
        out.push(TensorSpec::new(top(LM_HEAD), &[v, h], Role::Head));
    }
    out
}

/// What the tensor under a Hugging Face name is, and in which block.
pub fn role_of(hf: &str) -> Option<(Option<usize>, Role)> {
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
        (None, "weight") => Role::Norm(BlockNorm::ALL.into_iter().find(|n| n.key() == module)?),
        _ => return None,
    };
    Some((Some(layer), role))
}

/// The GGUF name of a Hugging Face tensor name (llama.cpp's naming).
pub fn gguf_name(hf: &str) -> Option<String> {
    let (layer, role) = role_of(hf)?;
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
    use crate::model::config::Family;
    use crate::ops::rope::RopeScaling;

    #[test]
    fn specs_count_every_parameter_once() {
        for (tied, bias, qk_norm) in [
            (true, false, false),
            (false, true, false),
            (false, false, true),
        ] {
            let config = ModelConfig {
                family: Family::Qwen3,
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
                dtype: "float32".into(),
            };
            let specs = tensor_specs(&config);
            let total: usize = specs
                .iter()
                .map(|s| s.shape.iter().product::<usize>())
                .sum();
            assert_eq!(total, config.parameter_count(), "{tied} {bias} {qk_norm}");
            assert_eq!(specs.iter().any(|s| s.name == "lm_head.weight"), !tied);
        }
    }
}
