//! The LM head and its loss, a slice of tokens at a time.
//!
//! ```text
//! for each slice s of the last hidden states h (leaf, needs grad):
//!     loss_s = Σ_{masked t ∈ s} −log softmax(lm_head(norm(h_t)))[target_t] / count
//!     g_s    = ∂(scale · loss_s)/∂h_s           (its own backward pass; the slice's graph dies)
//! loss = Σ loss_s ;  ∂loss/∂h = concat(g_s)
//! ```
//!
//! The full `[tokens, vocab]` logits are never alive at once: at llama3.2-1b's shape (batch 8,
//! seq 2048, vocab 128256) one f32 copy is 8.4 GB. A slice holds at most [`MAX_SLICE_ELEMENTS`]
//! logits (1,046 tokens at a 128k vocabulary), cut across batch rows where a row is longer: the
//! logits and their gradient are 1 GB, where whole 2048-token rows made them 2 GB, beside the
//! checkpointed block inputs. The adapter gradients are unaffected: the caller back-propagates
//! `Σ h ⊙ ∂loss/∂h` through the blocks (the same chaining as `recompute.rs`). The frozen head
//! gets no gradient, as always.

use burn::tensor::{ElementConversion, Tensor};

use super::loss::masked_cross_entropy;
use crate::model::Decoder;
use crate::ops::TrainBackend;

/// Logits per slice: 2²⁷ f32 values are 512 MiB. Smaller slices save little more, and a
/// quantized head is dequantized once per slice.
const MAX_SLICE_ELEMENTS: usize = 1 << 27;

/// The batch's mean loss over masked positions, and `∂(scale · loss)/∂top` for the last hidden
/// states `top` (`[batch, seq, hidden]`).
pub fn loss_and_input_grad<B: TrainBackend>(
    decoder: &Decoder<B>,
    top: Tensor<B::InnerBackend, 3>,
    targets: &[u32],
    mask: &[f32],
    scale: f64,
) -> (f64, Tensor<B::InnerBackend, 3>) {
    let [batch, seq, hidden] = top.dims();
    let tokens = batch * seq;
    let count = mask.iter().filter(|&&m| m > 0.0).count().max(1);
    let per_slice = (MAX_SLICE_ELEMENTS / decoder.config.vocab_size.max(1)).clamp(1, tokens);
    let grad_dtype = decoder.logits_grad_dtype();
    let top = top.reshape([tokens, hidden]);
    // The slices' losses stay on the device until the end: one read back per batch, not one
    // per slice (each read waits for the device to drain; at 32k tokens there are 32 slices).
    let mut losses = Vec::with_capacity(tokens.div_ceil(per_slice));
    let mut grads = Vec::with_capacity(tokens.div_ceil(per_slice));
    for start in (0..tokens).step_by(per_slice) {
        let slice = start..(start + per_slice).min(tokens);
        let h = Tensor::<B, 2>::from_inner(top.clone().slice([slice.clone(), 0..hidden]))
            .require_grad();
        let logits = decoder.head(h.clone().unsqueeze::<3>());
        let (mean, slice_count) =
            masked_cross_entropy(logits, &targets[slice.clone()], &mask[slice], grad_dtype);
        // `masked_cross_entropy` averages over the slice; the batch averages over all of it.
        let loss = mean.mul_scalar(slice_count.max(1) as f64 / count as f64);
        losses.push(loss.clone().inner());
        grads.push(
            h.grad(&loss.mul_scalar(scale).backward())
                .expect("the loss depends on the hidden states"),
        );
    }
    let value = Tensor::cat(losses, 0).sum().into_scalar().elem::<f64>();
    (value, Tensor::cat(grads, 0).reshape([batch, seq, hidden]))
}
