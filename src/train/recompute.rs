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

use burn::tensor::{Distribution, ElementConversion, Tensor};

use super::trainer::adapter_gradients;
use crate::data::Batch;
use crate::model::Decoder;
use crate::ops::TrainBackend;
use crate::ops::elementwise::cast;

/// [`super::trainer::loss_and_gradients`] with `grad_checkpoint`: the same loss and adapter
/// gradients, keeping only each block's input and recomputing the block for its backward pass.
pub fn loss_and_gradients<B: TrainBackend>(
    decoder: &Decoder<B>,
    batch: &Batch,
    scale: f64,
    device: &B::Device,
) -> (f64, Vec<Tensor<B::InnerBackend, 1>>) {
    let layout = decoder.layout(batch.segments.as_deref(), batch.batch, batch.seq, device);
    let seed: u64 = Tensor::<B, 1>::random([1], Distribution::Uniform(0.0, 1e9), device)
        .into_scalar()
        .elem::<f64>() as u64;
    let block_seed = |l: usize| seed.wrapping_mul(0x9E37_79B9).wrapping_add(l as u64);

    // The forward pass runs on the inner backend: on the autodiff one, Burn would record (and
    // keep) every op even without gradients.
    let inner_layout = layout.valid();
    let kept_dtype = decoder.layers[0].self_attn.q_proj.input_dtype();
    let mut inputs = Vec::with_capacity(decoder.layers.len());
    let mut h = decoder.embed(&batch.inputs, batch.batch, device).inner();
    let activations_dtype = Some(h.dtype().into());
    for (l, block) in decoder.layers.iter().enumerate() {
        inputs.push(cast(h.clone(), kept_dtype));
        B::seed(device, block_seed(l));
        h = block.valid().forward(h, &inner_layout, None);
    }

    let (value, mut upstream) =
        super::head::loss_and_input_grad(decoder, h, &batch.targets, &batch.mask, scale);

    let mut per_block = Vec::with_capacity(decoder.layers.len());
    for (l, block) in decoder.layers.iter().enumerate().rev() {
        let kept = inputs.pop().expect("one kept input per block");
        let x = Tensor::<B, 3>::from_inner(cast(kept, activations_dtype)).require_grad();
        B::seed(device, block_seed(l));
        let y = block.forward(x.clone(), &layout, None);
        let grads = (y * Tensor::from_inner(upstream.clone())).sum().backward();
        per_block.push(adapter_gradients(
            block.adapters().into_iter().map(|(_, a)| a),
            &grads,
        ));
        if l > 0 {
            upstream = x
                .grad(&grads)
                .expect("a block's output depends on its input");
        }
    }
    (value, per_block.into_iter().rev().flatten().collect())
}
