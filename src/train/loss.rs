//! Causal-LM cross-entropy over the positions that count.
//!
//! Position `t` of the input predicts token `t+1`; the caller passes inputs `ids[:, :-1]`,
//! targets `ids[:, 1:]` and a mask that is 1 where the target is trained (not prompt, not
//! padding). The loss is the mean over masked positions of the whole batch, as transformers'
//! `ForCausalLMLoss` and mlx-lm compute it (mlx-lm also counts one padding token per row; we do
//! not).

use burn::tensor::{Int, Tensor, TensorData, activation::log_softmax, backend::Backend};

/// Returns the mean loss (a 1-element tensor) and the number of positions it averaged.
pub fn masked_cross_entropy<B: Backend>(
    logits: Tensor<B, 3>,
    targets: &[u32],
    mask: &[f32],
) -> (Tensor<B, 1>, usize) {
    let [batch, seq, _] = logits.dims();
    let device = logits.device();
    let targets: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
    let targets =
        Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [batch, seq, 1]), &device);
    let count = mask.iter().filter(|&&m| m > 0.0).count();
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask.to_vec(), [batch, seq]), &device);
    let picked = log_softmax(logits, 2)
        .gather(2, targets)
        .reshape([batch, seq]);
    let total = (picked * mask).sum().neg();
    (total.div_scalar(count.max(1) as f64), count)
}
