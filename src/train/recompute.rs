//! Activation checkpointing per block (`train.grad_checkpoint`).
//!
//! ```text
//! forward, no autodiff: h₀ = embed(x) ; hₗ₊₁ = blockₗ(hₗ)  keeping only h₀ … h_L
//! head:                loss = CE(lm_head(norm(h_L)))        g_L = ∂loss/∂h_L  (head.rs)
//! l = L-1 … 0:         recompute y = blockₗ(hₗ) under a fresh graph and back-propagate
//!                      Σ y ⊙ gₗ₊₁ → gₗ = ∂/∂hₗ and the gradients of blockₗ's adapters
//! ```
//!
//! Peak activation memory drops from every block's to one block's, for one more forward pass of
//! compute: the trade peft's `gradient_checkpointing` and mlx-lm's `--grad-checkpoint` make.
//! With a bf16 base the kept hₗ are bf16 (half the bytes: 2.1 GB instead of 4.3 at llama3-8b's
//! batch 4 × 2048), as in peft's bf16 model. The recomputed block reads them back in f32; its
//! first use of hₗ is RMSNorm, whose output goes to a bf16 GEMM either way.
//! Burn's autodiff cannot run a backward pass inside another one (its graph lock is not
//! reentrant), so instead of a custom op the per-block backward passes are separate top-level
//! ones, chained here by hand. Dropout masks must be the same when a block is recomputed, so
//! each block draws them from a seed of its own, set before both of its forward passes.
//!
//! Long context adds two things (ALST's and unsloth's ideas):
//! - **MLP in chunks.** Past [`Checkpointing::mlp_chunk_tokens`] tokens a micro-batch, a block
//!   runs as its two halves, `m = h + attn(norm(h))` and `y = m + mlp(norm(m))`, and the MLP half
//!   (position by position) goes through `mlp_chunk_tokens` rows at a time in both passes, each
//!   chunk back-propagated on its own graph: `∂/∂m` is the chunks' gradients side by side, then
//!   attention's backward takes `Σ m ⊙ ∂/∂m`. The MLP's `[tokens, intermediate]` activations
//!   (the largest: 14 GiB each in f32 for llama3-8b at 256k) exist for one chunk at a time.
//! - **Offload.** The kept hₗ can wait in host memory (`Checkpointing::offload`): at 256k they are
//!   2 GiB a layer in bf16, 64 GiB for llama3-8b, which would otherwise stay on the card.

use burn::tensor::{Distribution, ElementConversion, Tensor, TensorData};

use super::trainer::{adapter_gradients, add_gradients};
use crate::data::Batch;
use crate::model::Decoder;
use crate::model::decoder::Block;
use crate::model::route_memo;
use crate::ops::elementwise::cast;
use crate::ops::{ModelBackend, TrainBackend};

/// How checkpointing keeps and recomputes the blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Checkpointing {
    /// A micro-batch of more tokens runs each block's MLP this many at a time (0: never).
    pub mlp_chunk_tokens: usize,
    /// Keep each block's input in host memory between the forward and backward passes.
    pub offload: bool,
}

impl Default for Checkpointing {
    fn default() -> Self {
        Checkpointing {
            mlp_chunk_tokens: crate::recipe::DEFAULT_MLP_CHUNK_TOKENS,
            offload: false,
        }
    }
}

/// A block input kept for the backward pass: on the device, or in host memory.
enum Kept<B: ModelBackend> {
    Device(Tensor<B, 3>),
    Host(TensorData),
}

impl<B: ModelBackend> Kept<B> {
    fn new(h: Tensor<B, 3>, offload: bool) -> Self {
        if offload {
            Kept::Host(h.into_data())
        } else {
            Kept::Device(h)
        }
    }

    fn restore(self, device: &B::Device) -> Tensor<B, 3> {
        match self {
            Kept::Device(h) => h,
            Kept::Host(data) => {
                let dtype = data.dtype;
                Tensor::from_data(data, (device, dtype))
            }
        }
    }
}

/// [`super::trainer::loss_and_gradients`] with `grad_checkpoint`: the same loss and adapter
/// gradients, keeping only each block's input and recomputing the block for its backward pass.
pub fn loss_and_gradients<B: TrainBackend>(
    decoder: &Decoder<B>,
    batch: &Batch,
    scale: f64,
    how: Checkpointing,
    device: &B::Device,
) -> (f64, Vec<Tensor<B::InnerBackend, 1>>) {
    let layout = decoder.layout(batch.segments.as_deref(), batch.batch, batch.seq, device);
    let seed: u64 = Tensor::<B, 1>::random([1], Distribution::Uniform(0.0, 1e9), device)
        .into_scalar()
        .elem::<f64>() as u64;
    let seeds = Seeds(seed);
    let tokens = batch.batch * batch.seq;
    let mlp_rows =
        (how.mlp_chunk_tokens > 0 && tokens > how.mlp_chunk_tokens).then_some(how.mlp_chunk_tokens);

    // The forward pass runs on the inner backend: on the autodiff one, Burn would record (and
    // keep) every op even without gradients.
    let inner_layout = layout.valid();
    let kept_dtype = decoder.layers[0].self_attn.qkv.first().input_dtype();
    let mut inputs = Vec::with_capacity(decoder.layers.len());
    // The routers' choices are made here once and replayed by the recomputed blocks.
    let routes = route_memo::record();
    let mut h = decoder.embed(&batch.inputs, batch.batch, device).inner();
    let activations_dtype = Some(h.dtype().into());
    for (l, block) in decoder.layers.iter().enumerate() {
        inputs.push(Kept::new(cast(h.clone(), kept_dtype), how.offload));
        let block = block.valid_training();
        B::seed(device, seeds.block(l));
        h = match mlp_rows {
            None => block.forward(h, &inner_layout, None),
            Some(rows) => {
                let m = block.attention_part(h, &inner_layout, None);
                let out = chunks(m.dims(), rows)
                    .map(|(c, start, len)| {
                        B::seed(device, seeds.chunk(l, c));
                        block.mlp_part(flat_rows(m.clone(), start, len))
                    })
                    .collect();
                Tensor::cat(out, 1).reshape(m.dims())
            }
        };
    }

    // Every router has counted its choices: the load-balancing term's gradient is known, and
    // the recomputed forward passes below add it without counting again.
    if let Some(balance) = decoder.router_balance() {
        balance.finish();
    }
    routes.replay();
    let (value, mut upstream) =
        super::head::loss_and_input_grad(decoder, h, &batch.targets, &batch.mask, scale);

    let mut per_block = Vec::with_capacity(decoder.layers.len());
    for (l, block) in decoder.layers.iter().enumerate().rev() {
        let kept = inputs
            .pop()
            .expect("one kept input per block")
            .restore(device);
        let x = Tensor::<B, 3>::from_inner(cast(kept, activations_dtype)).require_grad();
        B::seed(device, seeds.block(l));
        let grads = match mlp_rows {
            None => {
                let y = block.forward(x.clone(), &layout, None);
                let grads = (y * Tensor::from_inner(upstream.clone())).sum().backward();
                let adapters = block.adapters().into_iter().map(|(_, a)| a);
                per_block.push(adapter_gradients(adapters, &grads));
                grads
            }
            Some(rows) => {
                let m = block.attention_part(x.clone(), &layout, None);
                let (m_grad, mlp) =
                    mlp_backward_in_chunks(block, m.clone().inner(), &upstream, rows, |c| {
                        B::seed(device, seeds.chunk(l, c))
                    });
                let grads = (m * Tensor::from_inner(m_grad)).sum().backward();
                // Attention's adapters, then the MLP's: `Block::adapters` lists them in
                // `BlockLinear::of` order, where attention's linears come before the MLP's.
                let attention = block.adapters().into_iter().filter(|(w, _)| !w.in_mlp());
                let mut both = adapter_gradients(attention.map(|(_, a)| a), &grads);
                both.extend(mlp);
                per_block.push(both);
                grads
            }
        };
        if l > 0 {
            upstream = x
                .grad(&grads)
                .expect("a block's output depends on its input");
        }
    }
    drop(routes);
    (value, per_block.into_iter().rev().flatten().collect())
}

/// The backward pass of a block's MLP half `y = m + mlp(norm(m))`, `rows` tokens at a time:
/// `∂(Σ y ⊙ upstream)/∂m` and the MLP adapters' gradients (summed over the chunks, in
/// [`Block::adapters`] order). `seed(c)` runs before chunk `c`, as in the forward pass.
fn mlp_backward_in_chunks<B: TrainBackend>(
    block: &Block<B>,
    m: Tensor<B::InnerBackend, 3>,
    upstream: &Tensor<B::InnerBackend, 3>,
    rows: usize,
    seed: impl Fn(usize),
) -> (Tensor<B::InnerBackend, 3>, Vec<Tensor<B::InnerBackend, 1>>) {
    let dims = m.dims();
    let mut m_grads = Vec::new();
    let mut adapter_sums: Option<Vec<Tensor<B::InnerBackend, 1>>> = None;
    for (c, start, len) in chunks(dims, rows) {
        let part = Tensor::<B, 3>::from_inner(flat_rows(m.clone(), start, len)).require_grad();
        seed(c);
        let y = block.mlp_part(part.clone());
        let up = Tensor::from_inner(flat_rows(upstream.clone(), start, len));
        let grads = (y * up).sum().backward();
        m_grads.push(
            part.grad(&grads)
                .expect("the MLP half depends on its input"),
        );
        let mlp = block.adapters().into_iter().filter(|(w, _)| w.in_mlp());
        let chunk_grads = adapter_gradients(mlp.map(|(_, a)| a), &grads);
        adapter_sums = Some(add_gradients(adapter_sums, chunk_grads));
    }
    (
        Tensor::cat(m_grads, 1).reshape(dims),
        adapter_sums.unwrap_or_default(),
    )
}

/// The chunks of a `[batch, seq, hidden]` tensor's `batch × seq` rows, `rows` at a time:
/// (index, first row, rows).
fn chunks([batch, seq, _]: [usize; 3], rows: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let total = batch * seq;
    (0..total.div_ceil(rows)).map(move |c| (c, c * rows, rows.min(total - c * rows)))
}

/// Rows `start .. start + len` of `h`'s `batch × seq` rows, as `[1, len, hidden]`.
fn flat_rows<B: burn::tensor::backend::Backend>(
    h: Tensor<B, 3>,
    start: usize,
    len: usize,
) -> Tensor<B, 3> {
    let [batch, seq, hidden] = h.dims();
    h.reshape([1, batch * seq, hidden]).narrow(1, start, len)
}

/// The dropout seeds of one step: one per block, and one per MLP chunk of a block.
struct Seeds(u64);

impl Seeds {
    fn block(&self, l: usize) -> u64 {
        self.0.wrapping_mul(0x9E37_79B9).wrapping_add(l as u64)
    }

    fn chunk(&self, l: usize, c: usize) -> u64 {
        self.block(l) ^ (c as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
    }
}
