//! The decoder handed to a backend's decode session (`ops/decode.rs`), where its shape is one the
//! session runs: a Llama-shaped model (Llama, Mistral without a window, Qwen2) without unfused
//! adapters, every matrix dense (f32 or bf16) or packed (on the device, or on the host for
//! backends that hold it there: the CPU's session reads it, CUDA's declines it). Anything else
//! (Gemma's norms and caps, Phi-3's fused linears, experts, q/k norms, sliding layers,
//! LongRoPE, RoPE over part of a head, adapters) stays op by op.

use burn::tensor::{DType, FloatDType, Tensor};

use super::decoder::{Block, Decoder, FeedForward};
use super::linear::{FrozenLinear, FrozenWeight};
use super::projections::Projections;
use crate::ops::decode::{DecodeBlock, DecodeLinear, DecodeMatrix, DecodeModel};
use crate::ops::elementwise::Activation;
use crate::ops::frozen_linear::ModelBackend;
use crate::ops::primitive::primitive;
use crate::ops::quantized_linear::DEVICE_BITS;

impl<B: ModelBackend> Decoder<B> {
    /// The model as a decode session reads it; `None` where its shape is not one a session runs.
    pub fn decode_model(&self) -> Option<DecodeModel<B>> {
        let c = &self.config;
        let q = &c.quirks;
        let plain = c.moe.is_none()
            && !c.qk_norm
            && !q.norm_plus_one
            && !q.scale_embedding
            && !q.sandwich_norms
            && q.attn_softcap.is_none()
            && q.final_softcap.is_none()
            && q.activation == Activation::Silu
            && self.local_rope.is_none()
            && self.rope.plain()
            && self.rope.inv_freq().len() * 2 == c.head_dim
            && c.head_dim <= 256
            && c.num_kv_heads > 0
            && c.num_heads.is_multiple_of(c.num_kv_heads)
            && self.lm_head.adapter.is_none();
        if !plain {
            return None;
        }
        let scale = self.layers.first()?.self_attn.scores.scale as f32;
        let blocks = self
            .layers
            .iter()
            .map(|b| block(b, scale))
            .collect::<Option<Vec<_>>>()?;
        Some(DecodeModel {
            embed: matrix(&self.embed_tokens)?,
            blocks,
            norm: gain(&self.norm.weight),
            head: linear(&self.lm_head)?,
            hidden: c.hidden_size,
            heads: [c.num_heads, c.num_kv_heads, c.head_dim],
            eps: c.rms_norm_eps as f32,
            inv_freq: self.rope.inv_freq().to_vec(),
            scale,
        })
    }
}

/// A block the session runs: no sliding window, three split projections, a dense SwiGLU MLP,
/// the same score scale as the first block and no soft-cap.
fn block<B: ModelBackend>(b: &Block<B>, scale: f32) -> Option<DecodeBlock<B>> {
    let a = &b.self_attn;
    let FeedForward::Dense(mlp) = &b.mlp else {
        return None;
    };
    let plain = !b.sliding
        && a.q_norm.is_none()
        && b.post_attention_norm.is_none()
        && b.post_mlp_norm.is_none()
        && a.scores.softcap.is_none()
        && a.scores.scale as f32 == scale;
    if !plain {
        return None;
    }
    // The gate and up kernel adds no bias (no family we load has one there).
    if mlp.gate_up.linears().iter().any(|(_, l)| l.bias.is_some()) {
        return None;
    }
    Some(DecodeBlock {
        attn_norm: gain(&b.input_layernorm.weight),
        qkv: split::<B, 3>(&a.qkv)?,
        o: linear(&a.o_proj)?,
        mlp_norm: gain(&b.pre_mlp_norm.weight),
        gate_up: split::<B, 2>(&mlp.gate_up)?,
        down: linear(&mlp.down_proj)?,
    })
}

/// `N` separate projections (not a fused linear).
fn split<B: ModelBackend, const N: usize>(p: &Projections<B>) -> Option<[DecodeLinear<B>; N]> {
    let Projections::Split(parts) = p else {
        return None;
    };
    let linears = parts
        .iter()
        .map(|(_, l)| linear(l))
        .collect::<Option<Vec<_>>>()?;
    linears.try_into().ok()
}

/// A plain linear without an adapter, its bias in f32.
fn linear<B: ModelBackend>(l: &FrozenLinear<B>) -> Option<DecodeLinear<B>> {
    if l.adapter.is_some() || l.experts != 1 {
        return None;
    }
    Some(DecodeLinear {
        matrix: matrix(&l.weight)?,
        bias: l.bias.as_ref().map(gain),
        out: l.weight.dims()[0],
    })
}

/// A dense f32 or bf16 matrix, or a packed one (on the device or the host), whose rows the
/// session's kernels read 16 bytes at a time (a multiple of 8 columns).
fn matrix<B: ModelBackend>(w: &FrozenWeight<B>) -> Option<DecodeMatrix<B>> {
    if !w.dims()[1].is_multiple_of(8) {
        return None;
    }
    match w {
        FrozenWeight::Dense(t) if matches!(t.dtype(), DType::F32 | DType::BF16) => {
            Some(DecodeMatrix::Dense(primitive(t.clone())))
        }
        FrozenWeight::DeviceQuantized(q)
            if DEVICE_BITS.contains(&q.bits)
                && matches!(q.scales.dtype(), DType::F32 | DType::BF16) =>
        {
            Some(DecodeMatrix::Packed {
                words: q.words.clone().into_primitive(),
                scales: primitive(q.scales.clone()),
                biases: primitive(q.biases.clone()),
                bits: q.bits,
                group: q.group,
            })
        }
        FrozenWeight::Quantized(q) => Some(DecodeMatrix::Host(q.clone())),
        _ => None,
    }
}

/// A gain or bias vector in f32.
fn gain<B: ModelBackend>(t: &Tensor<B, 1>) -> burn::tensor::ops::FloatTensor<B> {
    primitive(t.clone().cast(FloatDType::F32))
}
