//! `y = x Wᵀ` straight from packed codes, for the few rows of `x` that token-by-token generation
//! has: each weight row is dequantized into a small scratch buffer that stays in L1 and is used at
//! once, so the full weight is never expanded and memory traffic is the packed size.

use rayon::prelude::*;

use super::QuantizedMatrix;

/// Output rows per parallel task: enough to amortise scheduling, few enough to balance 2 cores.
const ROWS_PER_TASK: usize = 64;

/// `x`: `[n, cols]` row-major → `[n, rows]`.
pub fn matmul_transposed(m: &QuantizedMatrix, x: &[f32], n: usize) -> Vec<f32> {
    // Computed as `[rows, n]` so each task writes one contiguous block, then transposed.
    let mut yt = vec![0f32; m.rows * n];
    yt.par_chunks_mut(ROWS_PER_TASK * n)
        .enumerate()
        .for_each(|(task, out)| {
            let mut scratch = vec![0f32; m.cols];
            for (i, out_row) in out.chunks_mut(n).enumerate() {
                row_kernel(m, task * ROWS_PER_TASK + i, x, &mut scratch, out_row);
            }
        });
    let mut y = vec![0f32; n * m.rows];
    for (row, values) in yt.chunks_exact(n).enumerate() {
        for (t, v) in values.iter().enumerate() {
            y[t * m.rows + row] = *v;
        }
    }
    y
}

/// Dispatches to a build of the kernel for AVX2 + FMA when the CPU has them: the portable
/// x86-64 baseline only has SSE2, which quarters the width of every multiply-add.
fn row_kernel(m: &QuantizedMatrix, row: usize, x: &[f32], scratch: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { row_avx2(m, row, x, scratch, out) };
        return;
    }
    row_body(m, row, x, scratch, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(
    m: &QuantizedMatrix,
    row: usize,
    x: &[f32],
    scratch: &mut [f32],
    out: &mut [f32],
) {
    row_body(m, row, x, scratch, out);
}

/// One output row for every input: dequantize the row once into `scratch`, then one long dot
/// product per input. (Per-group dots, `s·(x·q) + b·Σx`, save the dequantizing multiply-add but
/// pay a horizontal sum per group of 32, which measured 30% slower on SmolLM2.)
#[inline(always)]
fn row_body(m: &QuantizedMatrix, row: usize, x: &[f32], scratch: &mut [f32], out: &mut [f32]) {
    let cols = m.cols;
    m.dequantize_row(row, scratch);
    for (t, y) in out.iter_mut().enumerate() {
        *y = dot(&x[t * cols..(t + 1) * cols], scratch);
    }
}

/// Dot product with 32 independent accumulators: four 8-wide SIMD registers, each a chain of
/// fused multiply-adds that does not wait on the others. (With eight, one register, every
/// multiply-add waited on the last: SmolLM2's 20-token prompt ran at 120 tokens/s on 2 cores
/// against transformers' 222; session 27.)
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 32;
    let mut acc = [0f32; LANES];
    let (a32, a_rest) = a.split_at(a.len() / LANES * LANES);
    let (b32, b_rest) = b.split_at(a32.len());
    for (x, y) in a32.chunks_exact(LANES).zip(b32.chunks_exact(LANES)) {
        for k in 0..LANES {
            acc[k] = x[k].mul_add(y[k], acc[k]);
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::affine::{SUPPORTED_BITS, pack_codes};

    #[test]
    fn packed_matmul_equals_dense_matmul() {
        for bits in SUPPORTED_BITS {
            let (rows, cols, group) = (5, 128, 64);
            let codes: Vec<u32> = (0..rows * cols)
                .map(|i| ((i * 13 + 5) % (1 << bits)) as u32)
                .collect();
            let packed = pack_codes(&codes, bits);
            let scales: Vec<f32> = (0..rows * 2).map(|g| 0.01 * (g as f32 + 1.0)).collect();
            let biases: Vec<f32> = (0..rows * 2).map(|g| -0.1 * g as f32).collect();
            let m = QuantizedMatrix::new(rows, cols, bits, group, packed, scales, biases).unwrap();
            let x: Vec<f32> = (0..2 * cols)
                .map(|i| ((i * 7) % 11) as f32 * 0.1 - 0.5)
                .collect();
            let dense = m.dequantize();
            let got = matmul_transposed(&m, &x, 2);
            for t in 0..2 {
                for r in 0..rows {
                    let want: f32 = (0..cols)
                        .map(|c| x[t * cols + c] * dense[r * cols + c])
                        .sum();
                    assert!(
                        (got[t * rows + r] - want).abs() < 1e-4,
                        "bits {bits}: {} vs {want}",
                        got[t * rows + r]
                    );
                }
            }
        }
    }
}
