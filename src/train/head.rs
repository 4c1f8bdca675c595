//! The LM head and its loss, a slice of rows at a time.
//!
//! ```text
//! for each slice s of the last hidden states h (leaf, needs grad):
//!     loss_s = Σ_{masked t ∈ s} −log softmax(lm_head(norm(h_t)))[target_t] / count
//!     g_s    = ∂(scale · loss_s)/∂h_s           (its own backward pass; the slice's graph dies)
//! loss = Σ loss_s ;  ∂loss/∂h = concat(g_s)
//! ```
//!
//! The full `[tokens, vocab]` logits are never alive at once: at llama3.2-1b's shape (batch 8,
//! seq 2048, vocab 128256) one f32 copy is 8.4 GB and autodiff keeps three (logits, their
//! log-softmax, its gradient). A slice holds at most [`MAX_SLICE_ELEMENTS`] logits. The adapter
//! gradients are unaffected: the caller back-propagates `Σ h ⊙ ∂loss/∂h` through the blocks (the
//! same chaining as `checkpointed.rs`). The frozen head gets no gradient, as always.

use burn::tensor::{ElementConversion, Tensor};

use super::loss::masked_cross_entropy;
use crate::model::Decoder;
use crate::model::valid::TrainBackend;

/// Logits per slice: 2²⁸ f32 values are 1 GiB.
const MAX_SLICE_ELEMENTS: usize = 1 << 28;

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
    let count = mask.iter().filter(|&&m| m > 0.0).count().max(1);
    let vocab = decoder.config.vocab_size;
    // Whole rows of the batch per slice keep the targets and mask plain sub-slices.
    let rows_per_slice = (MAX_SLICE_ELEMENTS / (seq * vocab).max(1)).clamp(1, batch);
    let mut value = 0.0;
    let mut grads = Vec::with_capacity(batch.div_ceil(rows_per_slice));
    for start in (0..batch).step_by(rows_per_slice) {
        let rows = rows_per_slice.min(batch - start);
        let tokens = start * seq..(start + rows) * seq;
        let h =
            Tensor::<B, 3>::from_inner(top.clone().slice([start..start + rows, 0..seq, 0..hidden]))
                .require_grad();
        let logits = decoder.head(h.clone());
        let (mean, slice_count) =
            masked_cross_entropy(logits, &targets[tokens.clone()], &mask[tokens]);
        // `masked_cross_entropy` averages over the slice; the batch averages over all of it.
        let loss = mean.mul_scalar(slice_count.max(1) as f64 / count as f64);
        value += loss.clone().into_scalar().elem::<f64>();
        grads.push(
            h.grad(&loss.mul_scalar(scale).backward())
                .expect("the loss depends on the hidden states"),
        );
    }
    (value, Tensor::cat(grads, 0))
}
