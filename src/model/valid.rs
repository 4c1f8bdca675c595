//! The model on the inner backend of an autodiff backend, sharing the same tensors (Burn's
//! `Module::valid`): evaluation and generation during training run through it, so they record
//! no autodiff steps. (Burn registers a step for every op on an autodiff backend, tracked or
//! not, and only frees them in a backward pass; a validation pass would otherwise keep its
//! activations alive.)

use super::decoder::{Attention, Block, Decoder, RmsNorm};
use super::layout::{AttentionLayout, Layouts};
use super::linear::{FrozenLinear, FrozenWeight};
use crate::model::LoraAdapter;
use crate::ops::TrainBackend;

impl<B: TrainBackend> Decoder<B> {
    /// The decoder on the inner backend, sharing these tensors: it records no autodiff steps.
    pub fn valid(&self) -> Decoder<B::InnerBackend> {
        Decoder {
            config: self.config.clone(),
            embed_tokens: self.embed_tokens.valid(),
            layers: self.layers.iter().map(Block::valid).collect(),
            norm: self.norm.valid(),
            lm_head: self.lm_head.valid(),
            rope: self.rope.clone(),
            local_rope: self.local_rope.clone(),
        }
    }
}

impl<B: TrainBackend> Block<B> {
    /// The block on the inner backend, sharing these tensors.
    pub fn valid(&self) -> Block<B::InnerBackend> {
        let (a, m) = (&self.self_attn, &self.mlp);
        Block {
            input_layernorm: self.input_layernorm.valid(),
            self_attn: Attention {
                qkv: a.qkv.map(FrozenLinear::valid),
                o_proj: a.o_proj.valid(),
                q_norm: a.q_norm.as_ref().map(RmsNorm::valid),
                k_norm: a.k_norm.as_ref().map(RmsNorm::valid),
                num_heads: a.num_heads,
                num_kv_heads: a.num_kv_heads,
                head_dim: a.head_dim,
                scores: a.scores,
            },
            post_attention_norm: self.post_attention_norm.as_ref().map(RmsNorm::valid),
            pre_mlp_norm: self.pre_mlp_norm.valid(),
            mlp: m.map(FrozenLinear::valid),
            post_mlp_norm: self.post_mlp_norm.as_ref().map(RmsNorm::valid),
            sliding: self.sliding,
        }
    }

    /// [`Block::valid`] that still draws the adapters' dropout masks: checkpointing's forward
    /// pass, whose recomputation on the autodiff backend draws them.
    pub fn valid_training(&self) -> Block<B::InnerBackend> {
        let mut block = self.valid();
        for (_, linear) in block.linears_mut() {
            if let Some(adapter) = &mut linear.adapter {
                adapter.dropout_without_autodiff = true;
            }
        }
        block
    }
}

impl<B: TrainBackend> Layouts<B> {
    /// Both layouts on the inner backend.
    pub fn valid(&self) -> Layouts<B::InnerBackend> {
        Layouts {
            global: self.global.valid(),
            sliding: self.sliding.as_ref().map(AttentionLayout::valid),
        }
    }
}

impl<B: TrainBackend> AttentionLayout<B> {
    /// The tables and the attention rule on the inner backend.
    pub fn valid(&self) -> AttentionLayout<B::InnerBackend> {
        AttentionLayout {
            cos: self.cos.clone().inner(),
            sin: self.sin.clone().inner(),
            visibility: self.visibility.inner(),
        }
    }
}

impl<B: TrainBackend> RmsNorm<B> {
    fn valid(&self) -> RmsNorm<B::InnerBackend> {
        RmsNorm {
            weight: self.weight.clone().inner(),
            eps: self.eps,
        }
    }
}

impl<B: TrainBackend> FrozenLinear<B> {
    fn valid(&self) -> FrozenLinear<B::InnerBackend> {
        FrozenLinear {
            weight: self.weight.valid(),
            bias: self.bias.clone().map(|b| b.inner()),
            adapter: self.adapter.as_ref().map(LoraAdapter::valid),
            experts: self.experts,
        }
    }
}

impl<B: TrainBackend> FrozenWeight<B> {
    fn valid(&self) -> FrozenWeight<B::InnerBackend> {
        match self {
            FrozenWeight::Dense(t) => FrozenWeight::Dense(t.clone().inner()),
            FrozenWeight::Quantized(q) => FrozenWeight::Quantized(q.clone()),
            FrozenWeight::DeviceQuantized(w) => FrozenWeight::DeviceQuantized(w.inner()),
        }
    }
}

impl<B: TrainBackend> LoraAdapter<B> {
    fn valid(&self) -> LoraAdapter<B::InnerBackend> {
        LoraAdapter {
            a: self.a.clone().inner(),
            b: self.b.clone().inner(),
            magnitude: self.magnitude.clone().map(|m| m.inner()),
            scale: self.scale,
            dropout: self.dropout,
            dropout_without_autodiff: self.dropout_without_autodiff,
        }
    }
}
