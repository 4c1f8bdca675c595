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
//! Burn's autodiff cannot run a backward pass inside another one (its graph lock is not
//! reentrant), so instead of a custom op the per-block backward passes are separate top-level
//! ones, chained here by hand. Dropout masks must be the same when a block is recomputed, so
//! each block draws them from a seed of its own, set before both of its forward passes.

use burn::tensor::{Distribution, ElementConversion, Tensor};

use super::step::{Batch, adapter_gradients};
use crate::model::Decoder;
use crate::model::valid::TrainBackend;

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
    let mut inputs = Vec::with_capacity(decoder.layers.len());
    let mut h = decoder.embed(&batch.inputs, batch.batch, device).inner();
    for (l, block) in decoder.layers.iter().enumerate() {
        inputs.push(h.clone());
        B::seed(device, block_seed(l));
        h = block.valid().forward(h, &inner_layout, None);
    }

    let (value, mut upstream) =
        super::head::loss_and_input_grad(decoder, h, &batch.targets, &batch.mask, scale);

    let mut per_block = Vec::with_capacity(decoder.layers.len());
    for (l, block) in decoder.layers.iter().enumerate().rev() {
        let x = Tensor::<B, 3>::from_inner(inputs[l].clone()).require_grad();
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
