//! One-token decode steps run as a whole by a backend (`ModelBackend::decode_session`), for the
//! backends where running the model op by op costs more host time than the step's work (CUDA:
//! `backends/cuda/decode.rs`; the CPU: `backends/cpu/decode.rs`).
//!
//! The model is handed over as plain tensors: a Llama-shaped decoder (RMSNorm, grouped-query
//! attention with full-width RoPE, a SwiGLU MLP, optional q/k/v biases), every matrix dense or
//! MLX-packed. The step is the op-by-op path's math (`model/decoder.rs`):
//!
//! ```text
//! h = embed(id);  per block: h += attn(rmsnorm(h)) Woᵀ;  h += (silu(a Wgᵀ) ⊙ a Wuᵀ) Wdᵀ, a = rmsnorm(h)
//! logits = rmsnorm(h) W_headᵀ
//! ```

use std::sync::Arc;

use burn::tensor::TensorMetadata;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};

use crate::quant::QuantizedMatrix;

/// Positions a session's cache holds when it opens over `len` with `room` more to come: room
/// for up to 1,024 of them (the sessions double the cache whenever it fills) and one more.
pub fn first_capacity(len: usize, room: usize) -> usize {
    len + room.min(1024) + 1
}

/// Positions the keys and values `kv` that a session of `blocks` blocks opens over hold: 0 for
/// none (an empty cache), `None` where they are not one row (`[1, kv_heads, len, head_dim]`) for
/// every block.
pub fn cached_positions<B: Backend>(kv: &[[FloatTensor<B>; 2]], blocks: usize) -> Option<usize> {
    let Some(first) = kv.first() else {
        return Some(0);
    };
    let shape = first[0].shape();
    (kv.len() == blocks && shape.num_dims() == 4 && shape[0] == 1).then(|| shape[2])
}

/// A frozen `[out, in]` matrix as the step reads it.
pub enum DecodeMatrix<B: Backend> {
    /// f32 or bf16, row-major.
    Dense(FloatTensor<B>),
    /// MLX affine: `words` i32 `[out, in · bits / 32]`, `scales` and `biases` `[out, in / group]`.
    Packed {
        /// The packed codes.
        words: IntTensor<B>,
        /// Each group's scale.
        scales: FloatTensor<B>,
        /// Each group's offset.
        biases: FloatTensor<B>,
        /// Bits a code (2, 4 or 8).
        bits: u32,
        /// Codes sharing a scale.
        group: usize,
    },
    /// Packed on the host (MLX affine, any width), as backends without device quantization
    /// hold it.
    Host(Arc<QuantizedMatrix>),
}

/// A linear: its matrix and an optional f32 bias.
pub struct DecodeLinear<B: Backend> {
    /// `[out, in]`.
    pub matrix: DecodeMatrix<B>,
    /// `[out]`, f32.
    pub bias: Option<FloatTensor<B>>,
    /// Output features.
    pub out: usize,
}

/// One block's weights; the norms' gains are f32.
pub struct DecodeBlock<B: Backend> {
    /// The RMSNorm before attention.
    pub attn_norm: FloatTensor<B>,
    /// Query, key and value projections.
    pub qkv: [DecodeLinear<B>; 3],
    /// The heads' outputs back onto the residual stream.
    pub o: DecodeLinear<B>,
    /// The RMSNorm before the MLP.
    pub mlp_norm: FloatTensor<B>,
    /// The MLP's gate and up projections.
    pub gate_up: [DecodeLinear<B>; 2],
    /// The MLP's down projection.
    pub down: DecodeLinear<B>,
}

/// A block as a session holds it: its gains as `G`, its linears as `L`.
pub struct SessionBlock<G, L> {
    /// The RMSNorm's gain before attention.
    pub attn_norm: G,
    /// Query, key and value projections.
    pub qkv: [L; 3],
    /// The heads' outputs back onto the residual stream.
    pub o: L,
    /// The RMSNorm's gain before the MLP.
    pub mlp_norm: G,
    /// The MLP's gate and up projections.
    pub gate_up: [L; 2],
    /// The MLP's down projection.
    pub down: L,
}

impl<B: Backend> DecodeBlock<B> {
    /// The block with each gain taken by `gain` and each linear by `linear`; `None` where
    /// either declines one.
    pub fn take<G, L>(
        self,
        gain: impl Fn(FloatTensor<B>) -> Option<G>,
        linear: impl Fn(DecodeLinear<B>) -> Option<L>,
    ) -> Option<SessionBlock<G, L>> {
        let [q, k, v] = self.qkv;
        let [gate, up] = self.gate_up;
        Some(SessionBlock {
            attn_norm: gain(self.attn_norm)?,
            qkv: [linear(q)?, linear(k)?, linear(v)?],
            o: linear(self.o)?,
            mlp_norm: gain(self.mlp_norm)?,
            gate_up: [linear(gate)?, linear(up)?],
            down: linear(self.down)?,
        })
    }
}

/// A Llama-shaped decoder, as a decode session reads it.
pub struct DecodeModel<B: Backend> {
    /// `[vocab, hidden]`.
    pub embed: DecodeMatrix<B>,
    /// The blocks, first to last.
    pub blocks: Vec<DecodeBlock<B>>,
    /// The final RMSNorm's gain (f32).
    pub norm: FloatTensor<B>,
    /// `[vocab, hidden]`.
    pub head: DecodeLinear<B>,
    /// Width of the residual stream.
    pub hidden: usize,
    /// Query heads, key/value heads and their width.
    pub heads: [usize; 3],
    /// RMSNorm's ε.
    pub eps: f32,
    /// RoPE's frequency of each pair of dimensions (`head_dim / 2`).
    pub inv_freq: Vec<f32>,
    /// What `q · k` is multiplied by.
    pub scale: f32,
}

/// A decode session: the model's keys and values in buffers of their own with room to grow, and
/// a step that runs one token through every block.
pub trait DecodeSession<B: Backend> {
    /// Runs `ids` at the next positions and returns the logits after the last: one id is a
    /// decode step; more are a prompt (CUDA's session runs them in one pass).
    fn run(&mut self, ids: &[u32]) -> Vec<f32>;

    /// The keys and values of every position run so far, per block, `[1, kv_heads, len,
    /// head_dim]` each, in the dtype the session was handed them.
    fn into_kv(self: Box<Self>) -> Vec<[FloatTensor<B>; 2]>;
}
