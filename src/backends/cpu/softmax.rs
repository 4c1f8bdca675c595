//! The softmax family on the CPU: attention's softmax (both ways) and the cross-entropy's
//! log-sum-exp and gradient, each one parallel pass over f32 rows with a vectorised `exp`.
//!
//! Burn's op chains allocated a fresh tensor per op and called libm's `expf` once an element.
//! For the loss, `log Σ exp` (max, subtract, exp, sum, log) and the gradient (subtract, exp,
//! scale, scatter) each made `[rows, vocab]` tensors, 100 MB apiece at SmolLM2's 49,152-token
//! vocabulary and 512 tokens; attention's softmax and its differentiated form did the same over
//! every layer's scores. Here the log-sum-exp allocates nothing of that size, the softmax one
//! output, and the two backward passes write over their input when nothing else holds it. Each
//! function returns `None` for tensors that are not f32 (the f64 gradient checks), which then
//! take the generic ops.

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor};
use rayon::prelude::*;

use crate::backends::cpu::elementwise::{exp, float, row_major, tensor};

type Cpu = NdArray<f32>;

/// Independent partial sums (and maxima) per row, so that the loops vectorise and the sum of
/// tens of thousands of terms does not run through one accumulator.
const LANES: usize = 16;

/// `log Σ_j exp(x_rj)` per row of `[rows, n]` → `[rows, 1]`, shifted by the row's max.
pub fn logsumexp(x: &Tensor<Cpu, 2>) -> Option<Tensor<Cpu, 2>> {
    let [rows, n] = x.dims();
    let x = row_major(x.clone())?;
    let lse: Vec<f32> = x
        .as_slice()?
        .par_chunks(n.max(1))
        .map(row_logsumexp)
        .collect();
    Some(tensor(lse, [rows, 1]))
}

fn row_logsumexp(row: &[f32]) -> f32 {
    let max = row_max(row);
    if max == f32::NEG_INFINITY {
        return max;
    }
    max + row_sum(row, |v| exp(v - max)).ln() as f32
}

/// `Σ f(v)` over a row, in [`LANES`] partial sums added up in f64 (`f` inlines, so the loop
/// vectorises).
fn row_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let (chunks, rest) = row.as_chunks::<LANES>();
    let mut sums = [0.0f32; LANES];
    for chunk in chunks {
        for (sum, &v) in sums.iter_mut().zip(chunk) {
            *sum += f(v);
        }
    }
    let tail: f64 = rest.iter().map(|&v| f64::from(f(v))).sum();
    sums.iter().map(|&s| f64::from(s)).sum::<f64>() + tail
}

/// The logits' gradient `s_r · (exp(x_rj − lse_r) − [j = t_r])` of `[rows, n]` logits, their
/// rows' log-sum-exp, targets and scales (`[rows, 1]` each), written over `logits` when nothing
/// else holds them.
pub fn cross_entropy_backward(
    logits: Tensor<Cpu, 2>,
    lse: &Tensor<Cpu, 2>,
    targets: &Tensor<Cpu, 2, Int>,
    row_scale: &Tensor<Cpu, 2>,
) -> Option<Tensor<Cpu, 2>> {
    let n = logits.dims()[1];
    let mut x = row_major(logits)?;
    let lse = row_major(lse.clone())?;
    let scale = row_major(row_scale.clone())?;
    let targets: Vec<i64> = targets.clone().into_data().convert::<i64>().to_vec().ok()?;
    let (lse, scale) = (lse.as_slice()?, scale.as_slice()?);
    // Copies only when the logits are shared (then a fresh buffer is written either way).
    let dx = x.as_slice_mut()?;
    dx.par_chunks_mut(n.max(1))
        .enumerate()
        .for_each(|(r, row)| {
            let (lse, scale) = (lse[r], scale[r]);
            for v in row.iter_mut() {
                *v = exp(*v - lse) * scale;
            }
            let target = usize::try_from(targets[r]).expect("a target is a token id");
            row[target] -= scale;
        });
    Some(float(x))
}

/// Softmax over the last dimension.
pub fn softmax<const D: usize>(x: &Tensor<Cpu, D>) -> Option<Tensor<Cpu, D>> {
    let dims = x.dims();
    let n = dims[D - 1].max(1);
    let x = row_major(x.clone())?;
    let mut p = vec![0.0; x.len()];
    p.par_chunks_mut(n)
        .zip(x.as_slice()?.par_chunks(n))
        .for_each(|(p, x)| {
            let max = row_max(x);
            for (p, &x) in p.iter_mut().zip(x) {
                *p = exp(x - max);
            }
            let inverse = (1.0 / row_sum(p, |v| v)) as f32;
            p.iter_mut().for_each(|p| *p *= inverse);
        });
    Some(tensor(p, dims))
}

/// The scores' gradient `P ⊙ (dP − Σ_j dP_j P_j)` (per row) from the probabilities `p` and
/// their gradient `dp`, written over `dp` when nothing else holds it.
pub fn softmax_backward<const D: usize>(
    p: &Tensor<Cpu, D>,
    dp: Tensor<Cpu, D>,
) -> Option<Tensor<Cpu, D>> {
    let n = p.dims()[D - 1].max(1);
    let p = row_major(p.clone())?;
    let mut ds = row_major(dp)?;
    ds.as_slice_mut()?
        .par_chunks_mut(n)
        .zip(p.as_slice()?.par_chunks(n))
        .for_each(|(ds, p)| {
            let mut lanes = [0.0f32; LANES];
            for (chunk_ds, chunk_p) in ds.chunks(LANES).zip(p.chunks(LANES)) {
                for ((&dp, &p), lane) in chunk_ds.iter().zip(chunk_p).zip(&mut lanes) {
                    *lane += dp * p;
                }
            }
            let dot: f32 = lanes.iter().sum();
            for (ds, &p) in ds.iter_mut().zip(p) {
                *ds = p * (*ds - dot);
            }
        });
    Some(float(ds))
}

/// A row's largest value.
fn row_max(row: &[f32]) -> f32 {
    let (chunks, rest) = row.as_chunks::<LANES>();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    rest.iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::softmax;
    use burn::tensor::{Int, Tensor, TensorData};

    use super::Cpu;
    use crate::ops::test_f64::{B, assert_close_f32, f32_of, random, tensor};

    fn assert_close<const D: usize>(ours: Tensor<Cpu, D>, want: Tensor<B, D>) {
        assert_close_f32(ours, want, 1e-6);
    }

    /// Rows longer than the lanes and not a multiple of them, large logits (an unshifted exp
    /// would overflow f32), and a strided view.
    #[test]
    fn the_losss_passes_match_the_f64_math() {
        let logits = random([6, 1003], 30.0);
        let max = logits.clone().max_dim(1);
        let want_lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
        let ours_lse = super::logsumexp(&f32_of(&logits)).expect("f32");
        assert_close(ours_lse.clone(), want_lse.clone());
        let strided = random([1003, 6], 30.0).transpose();
        let max = strided.clone().max_dim(1);
        let want = (strided.clone() - max.clone()).exp().sum_dim(1).log() + max;
        assert_close(super::logsumexp(&f32_of(&strided)).expect("f32"), want);

        let targets = [5i64, 0, 1002, 77, 500, 3];
        let scale = random([6, 1], 1.0);
        let mut want = (logits.clone() - want_lse).exp() * scale.clone();
        for (r, &t) in targets.iter().enumerate() {
            let t = t as usize;
            let at = want.clone().slice([r..r + 1, t..t + 1]);
            let s = scale.clone().slice([r..r + 1, 0..1]);
            want = want.slice_assign([r..r + 1, t..t + 1], at - s);
        }
        let targets = Tensor::<Cpu, 2, Int>::from_data(
            TensorData::new(targets.to_vec(), [6, 1]),
            &Default::default(),
        );
        let ours =
            super::cross_entropy_backward(f32_of(&logits), &ours_lse, &targets, &f32_of(&scale))
                .expect("f32");
        assert_close(ours, want);
    }

    /// Under a causal mask (−∞ above the diagonal, as attention's scores), rows of 37 keys.
    #[test]
    fn attentions_softmax_both_ways_matches_burns_autodiff() {
        let (seq, keys) = (5, 37);
        let mut mask = vec![0.0; seq * keys];
        for i in 0..seq {
            mask[i * keys + 32 + i + 1..(i + 1) * keys].fill(f64::NEG_INFINITY);
        }
        let scores =
            (random([2, 3, seq, keys], 4.0) + tensor(mask, [1, 1, seq, keys])).require_grad();
        let dp = random([2, 3, seq, keys], 1.0);
        let want = softmax(scores.clone(), 3);
        let grads = (want.clone() * dp.clone()).sum().backward();
        let ours = super::softmax(&f32_of(&scores)).expect("f32");
        assert_close(ours.clone(), want);
        let ds = super::softmax_backward(&ours, f32_of(&dp)).expect("f32");
        assert_close(ds, Tensor::from_inner(scores.grad(&grads).unwrap()));
    }

    #[test]
    fn other_dtypes_are_left_to_burns_ops() {
        assert!(super::logsumexp(&random([2, 3], 1.0).inner()).is_none());
        assert!(super::softmax(&random([2, 3], 1.0).inner()).is_none());
    }
}
