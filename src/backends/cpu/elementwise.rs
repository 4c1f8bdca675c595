//! SwiGLU (both ways) and RoPE on the CPU, each one pass over f32 rows in parallel.
//!
//! Burn's op chains made several passes and a fresh allocation per step: its sigmoid is
//! `exp(−log1p(exp(−x)))`, three transcendental calls an element, computed in SwiGLU's forward
//! and again in its backward (13% of a SmolLM2 training step on 2 cores), and RoPE's slices and
//! concatenation copied `x` twice on the way (7%). Each function returns `None` for tensors that
//! are not f32 (the f64 gradient checks), which then take the generic ops.

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorPrimitive};
use burn_ndarray::{NdArrayTensor, SharedArray};
use ndarray::{ArcArray, Ix4, IxDyn, s};
use rayon::prelude::*;

type Cpu = NdArray<f32>;

/// Elements per parallel task: enough that rayon's hand-off is noise against the work.
const CHUNK: usize = 1 << 14;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `eˣ` within 2 ulp of the exact value, written so that a loop over it vectorises (libm's
/// `expf` is one call an element). Cephes' `expf`: `x = n ln 2 + r` with `|r| ≤ ln 2 / 2`
/// (`ln 2` in two parts, so that `r` is exact), `eʳ` by its degree-7 Taylor-like polynomial,
/// and `2ⁿ` built in the exponent bits; `n` is rounded by adding 1.5·2²³, which needs no
/// rounding instruction. 0 below e⁻⁸⁷ (f32's normal range ends near e⁻⁸⁷·³), +∞ above e⁸⁸·³⁷⁶
/// (where `n` would reach 128; f32 overflows at e⁸⁸·⁷²): the uses here only exponentiate
/// arguments at most 0, or take `1 / (1 + eˣ)`.
pub(super) fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³
    const LN2_HI: f32 = 355.0 / 512.0; // few bits, so that n · LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAX: f32 = 88.376;
    let clamped = x.clamp(-87.0, MAX);
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // Cephes' 5.0000001201e-1, which is 0.5 in f32
    let er = p * r * r + r + 1.0;
    // n sits in the low mantissa bits of `shifted`, as an offset from 1.5·2²³'s pattern.
    let n = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let two_n = f32::from_bits(((n + 127) << 23) as u32);
    match x {
        x if x < -87.0 => 0.0,
        x if x > MAX => f32::INFINITY,
        _ => er * two_n,
    }
}

/// `silu(gate) ⊙ up`.
pub fn swiglu<const D: usize>(
    gate: &Tensor<Cpu, D>,
    up: &Tensor<Cpu, D>,
) -> Option<Tensor<Cpu, D>> {
    let (g, u) = (row_major(gate.clone())?, row_major(up.clone())?);
    let (g, u) = (g.as_slice()?, u.as_slice()?);
    let mut y = vec![0.0; g.len()];
    y.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each(|(y, (g, u))| {
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = g * sigmoid(g) * u;
            }
        });
    Some(tensor(y, gate.dims()))
}

/// `[d gate, d up]` from `d y` (`ops/elementwise.rs` has the math).
pub fn swiglu_backward<const D: usize>(
    gate: &Tensor<Cpu, D>,
    up: &Tensor<Cpu, D>,
    dy: &Tensor<Cpu, D>,
) -> Option<[Tensor<Cpu, D>; 2]> {
    let (g, u, dy) = (
        row_major(gate.clone())?,
        row_major(up.clone())?,
        row_major(dy.clone())?,
    );
    let (g, u, dy) = (g.as_slice()?, u.as_slice()?, dy.as_slice()?);
    let (mut dg, mut du) = (vec![0.0; g.len()], vec![0.0; g.len()]);
    dg.par_chunks_mut(CHUNK)
        .zip(du.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|(((dg, du), (g, u)), dy)| {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                du[i] = dy[i] * g[i] * s;
                dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
            }
        });
    Some([tensor(dg, gate.dims()), tensor(du, gate.dims())])
}

/// `x` (`[batch, heads, seq, d]`, any strides) rotated by `cos` and `sin`
/// (`[1 or batch, 1, seq, d]`): `x ⊙ cos + [−x₂, x₁] ⊙ sin`, `x₁` and `x₂` its halves.
pub fn rope(
    x: &Tensor<Cpu, 4>,
    cos: &Tensor<Cpu, 4>,
    sin: &Tensor<Cpu, 4>,
) -> Option<Tensor<Cpu, 4>> {
    let x = f32_array(x.clone())?;
    let x = x.view().into_dimensionality::<Ix4>().ok()?;
    let (cos, sin) = (row_major(cos.clone())?, row_major(sin.clone())?);
    let &[batch, heads, seq, d] = x.shape() else {
        unreachable!("four dimensions")
    };
    let one_table = cos.shape()[0] == 1;
    assert_eq!(
        &cos.shape()[1..],
        [1, seq, d],
        "rope: tables for {:?}",
        x.shape()
    );
    let (cos, sin) = (cos.as_slice()?, sin.as_slice()?);
    let mut out = vec![0.0; batch * heads * seq * d];
    out.par_chunks_mut(seq * d)
        .enumerate()
        .for_each(|(head_row, out)| {
            let (b, h) = (head_row / heads, head_row % heads);
            let table = if one_table { 0 } else { b * seq * d };
            for (t, out) in out.chunks_mut(d).enumerate() {
                let row = x.slice(s![b, h, t, ..]);
                let at = table + t * d..table + (t + 1) * d;
                match row.as_slice() {
                    Some(row) => rotate(row, &cos[at.clone()], &sin[at], out),
                    None => rotate(&row.to_vec(), &cos[at.clone()], &sin[at], out),
                }
            }
        });
    Some(tensor(out, [batch, heads, seq, d]))
}

fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (x1, x2) = (x[i], x[i + half]);
        out[i] = x1 * cos[i] - x2 * sin[i];
        out[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
    }
}

/// `x`'s values, or `None` unless they are f32.
fn f32_array<const D: usize>(x: Tensor<Cpu, D>) -> Option<SharedArray<f32>> {
    match x.into_primitive().tensor() {
        NdArrayTensor::F32(storage) => Some(storage.into_shared()),
        _ => None,
    }
}

/// [`f32_array`], contiguous in row-major order (copied only when it was a strided view). Taken
/// by value, so that a tensor nothing else holds comes back unique and can be written over.
pub(super) fn row_major<const D: usize>(x: Tensor<Cpu, D>) -> Option<SharedArray<f32>> {
    let x = f32_array(x)?;
    Some(match x.is_standard_layout() {
        true => x,
        false => x.as_standard_layout().into_owned().into_shared(),
    })
}

pub(super) fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<Cpu, D> {
    float(ArcArray::from_shape_vec(IxDyn(&shape), values).expect("values fill the shape"))
}

/// An f32 array as a tensor of its rank.
pub(super) fn float<const D: usize>(array: SharedArray<f32>) -> Tensor<Cpu, D> {
    Tensor::from_primitive(TensorPrimitive::Float(array.into()))
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use burn::tensor::activation::silu;

    use crate::ops::rope::rotate_by_slices;
    use crate::ops::test_f64::{B, assert_close_f32, f32_of, random};

    fn assert_close<const D: usize>(ours: Tensor<super::Cpu, D>, want: Tensor<B, D>) {
        assert_close_f32(ours, want, 1e-5);
    }

    #[test]
    fn swiglu_both_ways_matches_burns_autodiff_in_f64() {
        let (gate, up, dy) = (
            random([3, 5, 40], 3.0).require_grad(),
            random([3, 5, 40], 3.0).require_grad(),
            random([3, 5, 40], 1.0),
        );
        let want = silu(gate.clone()) * up.clone();
        let grads = (want.clone() * dy.clone()).sum().backward();
        let ours = super::swiglu(&f32_of(&gate), &f32_of(&up)).expect("f32 inputs");
        assert_close(ours, want);
        let [dg, du] =
            super::swiglu_backward(&f32_of(&gate), &f32_of(&up), &f32_of(&dy)).expect("f32 inputs");
        assert_close(dg, Tensor::from_inner(gate.grad(&grads).unwrap()));
        assert_close(du, Tensor::from_inner(up.grad(&grads).unwrap()));
    }

    /// On a strided `x` (heads swapped in from a `[batch, seq, heads, d]` projection), with one
    /// table for every row and with a table per row.
    #[test]
    fn rope_matches_the_slice_form_in_f64() {
        let x = random([2, 5, 3, 8], 1.0).swap_dims(1, 2);
        for rows in [1, 2] {
            let (cos, sin) = (random([rows, 1, 5, 8], 1.0), random([rows, 1, 5, 8], 1.0));
            let ours = super::rope(&f32_of(&x), &f32_of(&cos), &f32_of(&sin)).expect("f32");
            assert_close(ours, rotate_by_slices(x.clone(), cos, sin));
        }
    }

    /// Against f64's exp at a million points across the range, and at the edges.
    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        let worst = (0..=1_000_000)
            .map(|i| -87.0 + 175.3 * i as f64 / 1e6)
            .map(|x| {
                let x = x as f32;
                let exact = f64::from(x).exp();
                ((f64::from(super::exp(x)) - exact) / exact).abs()
            })
            .fold(0.0, f64::max);
        assert!(
            worst < 2.0 * f64::from(f32::EPSILON),
            "relative error {worst:e}"
        );
        assert_eq!(super::exp(0.0), 1.0);
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(-100.0), 0.0);
        assert_eq!(super::exp(f32::INFINITY), f32::INFINITY);
        assert!(super::exp(f32::NAN).is_nan());
    }

    #[test]
    fn other_dtypes_are_left_to_burns_ops() {
        let x = random([2, 3], 1.0).inner();
        assert!(super::swiglu(&x, &x).is_none());
    }
}
