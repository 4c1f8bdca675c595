//! The one table of tensor names: every weight of a decoder under its Hugging Face name (and
//! llama.cpp's GGUF name), with its shape, in file order. Loading, LoRA injection, adapter files
//! and export all name tensors through it, so a name is written once.

use super::config::{Family, ModelConfig};

/// A linear of a decoder block (a mixture of experts' stacked experts count as one).
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
    /// A mixture of experts' router, `mlp.gate` (Mixtral: `block_sparse_moe.gate`): one row
    /// per expert. Frozen: never adapted.
    Router,
    /// The experts' gate projections stacked, `[experts, width, hidden]`: mlx-lm's
    /// `mlp.switch_mlp.gate_proj` (files per expert: `mlp.experts.N.gate_proj`, Mixtral's `w1`).
    ExpertGate,
    /// The experts' up projections stacked (`switch_mlp.up_proj`; Mixtral's `w3`).
    ExpertUp,
    /// The experts' down projections stacked, `[experts, hidden, width]`
    /// (`switch_mlp.down_proj`; Mixtral's `w2`).
    ExpertDown,
    /// Qwen2-MoE's shared expert: `mlp.shared_expert.gate_proj`.
    SharedGate,
    /// `mlp.shared_expert.up_proj`
    SharedUp,
    /// `mlp.shared_expert.down_proj`
    SharedDown,
    /// Qwen2-MoE's `mlp.shared_expert_gate` (`[1, hidden]`): the shared expert's output is
    /// scaled by its sigmoid. Frozen: never adapted.
    SharedExpertGate,
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

    /// The adaptable linears of a mixture-of-experts block beyond [`Self::SPLIT`] (whose gate,
    /// up and down are its dense layers'), in order.
    pub const EXPERTS: [BlockLinear; 6] = [
        BlockLinear::ExpertGate,
        BlockLinear::ExpertUp,
        BlockLinear::ExpertDown,
        BlockLinear::SharedGate,
        BlockLinear::SharedUp,
        BlockLinear::SharedDown,
    ];

    /// The linears of a block of `family` an adapter may target, in the order adapters are
    /// listed everywhere (routers never train).
    pub fn of(family: Family) -> Vec<BlockLinear> {
        if family.fuses_projections() {
            Self::FUSED.to_vec()
        } else if family.has_experts() {
            let shared = family == Family::Qwen2Moe;
            Self::SPLIT
                .into_iter()
                .chain(
                    Self::EXPERTS
                        .into_iter()
                        .filter(|l| shared || !l.is_shared()),
                )
                .collect()
        } else {
            Self::SPLIT.to_vec()
        }
    }

    /// The linears a recipe's `lora.targets` may name in a block of `family`: [`Self::of`], and
    /// the parts of a fused linear (adapted on their own rows).
    pub fn targetable(family: Family) -> Vec<BlockLinear> {
        let fused = family.fuses_projections();
        Self::of(family)
            .into_iter()
            .flat_map(|l| {
                let parts = if fused { l.parts() } else { &[] };
                std::iter::once(l).chain(parts.iter().copied())
            })
            .collect()
    }

    /// Every linear any family has.
    pub fn all() -> impl Iterator<Item = Self> {
        Self::SPLIT
            .into_iter()
            .chain(Self::FUSED)
            .chain(Self::EXPERTS)
            .chain([BlockLinear::Router, BlockLinear::SharedExpertGate])
    }

    /// The linear whose key is `key` in a block of `family`.
    pub fn from_key(key: &str, family: Family) -> Option<Self> {
        Self::all().find(|l| l.key(family) == key)
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

    /// The fused linear that holds this one in a block of `family` (Phi-3's `qkv_proj` for
    /// `q_proj`); none where the family keeps projections apart.
    pub fn fused_in(self, family: Family) -> Option<Self> {
        self.fused_into().filter(|_| family.fuses_projections())
    }

    /// How a block of `family` stores the projections of this fused linear: itself where the
    /// family fuses them, else its parts.
    pub fn stored(self, family: Family) -> Vec<Self> {
        match family.fuses_projections() {
            true => vec![self],
            false => self.parts().to_vec(),
        }
    }

    /// Whether it is one of the experts' stacks (one matrix per expert).
    pub fn is_experts(self) -> bool {
        matches!(
            self,
            BlockLinear::ExpertGate | BlockLinear::ExpertUp | BlockLinear::ExpertDown
        )
    }

    /// Whether it belongs to Qwen2-MoE's shared expert.
    fn is_shared(self) -> bool {
        matches!(
            self,
            BlockLinear::SharedGate | BlockLinear::SharedUp | BlockLinear::SharedDown
        )
    }

    /// How many matrices it stacks: the expert count for the experts' stacks, else 1.
    pub fn experts(self, c: &ModelConfig) -> usize {
        match (self.is_experts(), &c.moe) {
            (true, Some(moe)) => moe.experts,
            _ => 1,
        }
    }

    /// `[out, in]` of its weight (of one expert's, for the experts' stacks).
    pub fn shape(self, c: &ModelConfig) -> [usize; 2] {
        let (h, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let moe = c.moe.as_ref();
        let expert = moe.map_or(0, |m| m.expert_intermediate_size);
        let shared = moe
            .and_then(|m| m.shared_expert_intermediate_size)
            .unwrap_or(0);
        match self {
            BlockLinear::Q => [q, h],
            BlockLinear::K | BlockLinear::V => [kv, h],
            BlockLinear::O => [h, q],
            BlockLinear::Gate | BlockLinear::Up => [c.intermediate_size, h],
            BlockLinear::Down => [h, c.intermediate_size],
            BlockLinear::Qkv => [q + 2 * kv, h],
            BlockLinear::GateUp => [2 * c.intermediate_size, h],
            BlockLinear::Router => [moe.map_or(0, |m| m.experts), h],
            BlockLinear::ExpertGate | BlockLinear::ExpertUp => [expert, h],
            BlockLinear::ExpertDown => [h, expert],
            BlockLinear::SharedGate | BlockLinear::SharedUp => [shared, h],
            BlockLinear::SharedDown => [h, shared],
            BlockLinear::SharedExpertGate => [1, h],
        }
    }

    /// The shape it is stored in: `[experts, out, in]` for the experts' stacks, else `[out, in]`.
    pub fn stored_shape(self, c: &ModelConfig) -> Vec<usize> {
        let [out, inp] = self.shape(c);
        match self.is_experts() {
            true => vec![self.experts(c), out, inp],
            false => vec![out, inp],
        }
    }

    /// Whether it belongs to the MLP (gate, up, down, the experts, the router) rather than
    /// attention.
    pub fn in_mlp(self) -> bool {
        !matches!(
            self,
            BlockLinear::Q | BlockLinear::K | BlockLinear::V | BlockLinear::O | BlockLinear::Qkv
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

    /// Its module path relative to the block in `family` (`self_attn.q_proj`): mlx-lm's adapter
    /// `keys`. The experts' stacks are mlx-lm's `switch_mlp` names.
    pub fn key(self, family: Family) -> &'static str {
        let mixtral = family == Family::Mixtral;
        match self {
            BlockLinear::Q => "self_attn.q_proj",
            BlockLinear::K => "self_attn.k_proj",
            BlockLinear::V => "self_attn.v_proj",
            BlockLinear::O => "self_attn.o_proj",
            BlockLinear::Gate => "mlp.gate_proj",
            BlockLinear::Up => "mlp.up_proj",
            BlockLinear::Down => "mlp.down_proj",
            BlockLinear::Qkv => "self_attn.qkv_proj",
            BlockLinear::GateUp => "mlp.gate_up_proj",
            BlockLinear::Router if mixtral => "block_sparse_moe.gate",
            BlockLinear::Router => "mlp.gate",
            BlockLinear::ExpertGate if mixtral => "block_sparse_moe.switch_mlp.gate_proj",
            BlockLinear::ExpertGate => "mlp.switch_mlp.gate_proj",
            BlockLinear::ExpertUp if mixtral => "block_sparse_moe.switch_mlp.up_proj",
            BlockLinear::ExpertUp => "mlp.switch_mlp.up_proj",
            BlockLinear::ExpertDown if mixtral => "block_sparse_moe.switch_mlp.down_proj",
            BlockLinear::ExpertDown => "mlp.switch_mlp.down_proj",
            BlockLinear::SharedGate => "mlp.shared_expert.gate_proj",
            BlockLinear::SharedUp => "mlp.shared_expert.up_proj",
            BlockLinear::SharedDown => "mlp.shared_expert.down_proj",
            BlockLinear::SharedExpertGate => "mlp.shared_expert_gate",
        }
    }

    /// The per-expert module of an experts' stack in Hugging Face checkpoints, relative to the
    /// block (`mlp.experts.3.gate_proj`; Mixtral's `block_sparse_moe.experts.3.w1`).
    pub fn expert_key(self, family: Family, expert: usize) -> Option<String> {
        let leaf = match (self, family) {
            (BlockLinear::ExpertGate, Family::Mixtral) => "w1",
            (BlockLinear::ExpertUp, Family::Mixtral) => "w3",
            (BlockLinear::ExpertDown, Family::Mixtral) => "w2",
            (BlockLinear::ExpertGate, _) => "gate_proj",
            (BlockLinear::ExpertUp, _) => "up_proj",
            (BlockLinear::ExpertDown, _) => "down_proj",
            _ => return None,
        };
        Some(format!("{}.experts.{expert}.{leaf}", family.mlp_module()))
    }

    /// llama.cpp's name for it inside a block (`attn_q`).
    pub fn gguf(self) -> &'static str {
        match self {
            BlockLinear::Q => "attn_q",
            BlockLinear::K => "attn_k",
            BlockLinear::V => "attn_v",
            BlockLinear::O => "attn_output",
            BlockLinear::Gate => "ffn_gate",
            BlockLinear::Up => "ffn_up",
            BlockLinear::Down => "ffn_down",
            BlockLinear::Qkv => "attn_qkv",
            // llama.cpp's Phi-3 keeps gate and up fused under the up projection's name.
            BlockLinear::GateUp => "ffn_up",
            BlockLinear::Router => "ffn_gate_inp",
            BlockLinear::ExpertGate => "ffn_gate_exps",
            BlockLinear::ExpertUp => "ffn_up_exps",
            BlockLinear::ExpertDown => "ffn_down_exps",
            BlockLinear::SharedGate => "ffn_gate_shexp",
            BlockLinear::SharedUp => "ffn_up_shexp",
            BlockLinear::SharedDown => "ffn_down_shexp",
            BlockLinear::SharedExpertGate => "ffn_gate_inp_shexp",
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

    /// A matrix (linear, embedding or head; a stack of experts' matrices), as opposed to a norm
    /// or bias vector.
    pub fn is_matrix(&self) -> bool {
        self.shape.len() >= 2
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
            let name = format!("{p}.{}.weight", w.key(c.family));
            TensorSpec::new(name, &w.stored_shape(c), Role::Weight(w))
        };
        let bias = |w: BlockLinear| {
            let name = format!("{p}.{}.bias", w.key(c.family));
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
        out.extend(norms(&[BlockNorm::Input]));
        out.extend(qkv.iter().map(|&w| weight(w)));
        out.extend(qkv.iter().filter(|w| w.has_bias(c)).map(|&w| bias(w)));
        out.extend(norms(&[BlockNorm::Q, BlockNorm::K]));
        out.push(weight(BlockLinear::O));
        out.extend(norms(&[BlockNorm::PostAttention, BlockNorm::PreMlp]));
        out.extend(mlp_linears(c, l).into_iter().map(weight));
        out.extend(norms(&[BlockNorm::PostMlp]));
    }
    out.push(TensorSpec::new(top(FINAL_NORM), &[h], Role::FinalNorm));
    if !c.tie_word_embeddings {
        out.push(TensorSpec::new(top(LM_HEAD), &[v, h], Role::Head));
    }
    out
}

/// The linears of block `layer`'s MLP, in file order: the dense MLP's (gate and up as the family
/// stores them, then down), or the router, the experts' stacks and Qwen2-MoE's shared expert.
pub fn mlp_linears(c: &ModelConfig, layer: usize) -> Vec<BlockLinear> {
    match &c.moe {
        Some(moe) if moe.sparse(layer) => {
            let mut out = vec![
                BlockLinear::Router,
                BlockLinear::ExpertGate,
                BlockLinear::ExpertUp,
                BlockLinear::ExpertDown,
            ];
            if moe.shared_expert_intermediate_size.is_some() {
                out.extend([
                    BlockLinear::SharedGate,
                    BlockLinear::SharedUp,
                    BlockLinear::SharedDown,
                    BlockLinear::SharedExpertGate,
                ]);
            }
            out
        }
        _ => BlockLinear::GateUp
            .stored(c.family)
            .into_iter()
            .chain([BlockLinear::Down])
            .collect(),
    }
}

/// The per-expert names under which Hugging Face checkpoints store the experts' stack `hf`
/// (`model.layers.0.mlp.experts.3.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.3.w1`),
/// in expert order; `None` for any other tensor.
pub fn per_expert_names(hf: &str, c: &ModelConfig) -> Option<Vec<String>> {
    let (Some(layer), Role::Weight(w)) = role_of(hf, c.family)? else {
        return None;
    };
    (0..w.experts(c))
        .map(|e| {
            Some(format!(
                "{}.{}.weight",
                block(layer),
                w.expert_key(c.family, e)?
            ))
        })
        .collect()
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
    let role = match (BlockLinear::from_key(module, family), suffix) {
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

    /// Parameters counted by hand from the architecture, apart from the specs.
    fn counted(c: &ModelConfig) -> usize {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let q = c.num_heads * c.head_dim;
        let kv = c.num_kv_heads * c.head_dim;
        let attn = h * q + 2 * h * kv + q * h + if c.attention_bias { q + 2 * kv } else { 0 };
        let sandwich = if c.quirks.sandwich_norms { 2 * h } else { 0 };
        let norms = 2 * h + sandwich + if c.qk_norm { 2 * c.head_dim } else { 0 };
        let mlp = |layer: usize| match &c.moe {
            Some(m) if m.sparse(layer) => {
                let shared = m
                    .shared_expert_intermediate_size
                    .map_or(0, |s| 3 * h * s + h);
                m.experts * h + m.experts * 3 * h * m.expert_intermediate_size + shared
            }
            _ => 3 * h * i,
        };
        let blocks: usize = (0..c.num_layers).map(|l| attn + norms + mlp(l)).sum();
        let embed = c.vocab_size * h;
        let head = if c.tie_word_embeddings { 0 } else { embed };
        blocks + embed + head + h
    }

    #[test]
    fn specs_count_every_parameter_once() {
        let moe = |shared| crate::model::config::MoeConfig {
            experts: 4,
            top_k: 2,
            expert_intermediate_size: 24,
            normalize_top_k: false,
            shared_expert_intermediate_size: shared,
            sparse_layers: vec![true, false, true],
        };
        for (tied, bias, qk_norm, family, experts) in [
            (true, false, false, Family::Qwen3, None),
            (false, true, false, Family::Qwen3, None),
            (false, false, true, Family::Qwen3, None),
            (true, false, true, Family::Gemma3, None),
            (false, false, false, Family::Phi3, None),
            (false, false, false, Family::Mixtral, Some(moe(None))),
            (false, true, false, Family::Qwen2Moe, Some(moe(Some(40)))),
            (true, false, true, Family::Qwen3Moe, Some(moe(None))),
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
                rotary_dim: 8,
                rms_norm_eps: 1e-6,
                rope_theta: 1e4,
                rope_scaling: RopeScaling::None,
                max_position_embeddings: 64,
                tie_word_embeddings: tied,
                attention_bias: bias,
                qk_norm,
                quirks,
                moe: experts,
                dtype: "float32".into(),
            };
            let specs = tensor_specs(&config);
            assert_eq!(config.parameter_count(), counted(&config), "{family:?}");
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
