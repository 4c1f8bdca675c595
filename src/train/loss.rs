//! Causal-LM cross-entropy over the positions that count.
//!
//! Position `t` of the input predicts token `t+1`; the caller passes inputs `ids[:, :-1]`,
//! targets `ids[:, 1:]` and a mask that is 1 where the target is trained (not prompt, not
//! padding). The loss is the mean over masked positions of the whole batch, as transformers'
//! `ForCausalLMLoss` and mlx-lm compute it (mlx-lm also counts one padding token per row; we do
//! not).

use burn::tensor::{FloatDType, Int, Tensor, TensorData};

use crate::ops::elementwise::ElementwiseBackend;

/// Returns the mean loss (a 1-element tensor) and the number of positions it averaged. The
/// logits' gradient comes back in `grad_dtype` when given (the head GEMM's input dtype).
pub fn masked_cross_entropy<B: ElementwiseBackend>(
    logits: Tensor<B, 3>,
    targets: &[u32],
    mask: &[f32],
    grad_dtype: Option<FloatDType>,
) -> (Tensor<B, 1>, usize) {
    let [batch, seq, vocab] = logits.dims();
    let rows = batch * seq;
    let device = logits.device();
    let targets: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [rows, 1]), &device);
    let count = mask.iter().filter(|&&m| m > 0.0).count();
    // The mean over masked positions as weights: a position's mask over the count.
    let weights: Vec<f32> = mask.iter().map(|&m| m / count.max(1) as f32).collect();
    let weights = Tensor::<B, 2>::from_data(TensorData::new(weights, [rows, 1]), &device);
    let loss = B::cross_entropy(logits.reshape([rows, vocab]), targets, weights, grad_dtype);
    (loss, count)
}
