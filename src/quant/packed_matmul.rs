//! `y = x Wᵀ` straight from packed codes, for the few rows of `x` that token-by-token generation
//! has: each weight row is dequantized into a small scratch buffer that stays in L1 and is used at
//! once, so the full weight is never expanded and memory traffic is the packed size.

use rayon::prelude::*;

use super::QuantizedMatrix;

/// Up to this many rows of `x`, the product from the packed codes beats dequantizing once and
/// running a GEMM (measured on SmolLM2, 2 cores: 22-token prompts 43 → 82 tokens/s; again in
/// session 27 with 20 rows through the tiled GEMM: 89-99 tokens/s against 139-181).
pub const MAX_ROWS: usize = 32;

/// Output rows per parallel task: enough to amortise scheduling, few enough to balance 2 cores.
const ROWS_PER_TASK: usize = 64;

/// `x`: `[n, cols]` row-major → `[n, rows]`.
pub fn matmul_transposed(m: &QuantizedMatrix, x: &[f32], n: usize) -> Vec<f32> {
    // Computed as `[rows, n]` so each task writes one contiguous block, then transposed.
    let mut yt = vec![0f32; m.rows * n];
    yt.par_chunks_mut(ROWS_PER_TASK * n)
        .enumerate()
        .for_each(|(task, out)| rows_kernel(m, task * ROWS_PER_TASK, x, n, out));
    let mut y = vec![0f32; n * m.rows];
    for (row, values) in yt.chunks_exact(n).enumerate() {
        for (t, v) in values.iter().enumerate() {
            y[t * m.rows + row] = *v;
        }
    }
    y
}

/// Rows `first..` of the product into `out` (`[rows, n]`), through the AVX2 + FMA kernel when
/// the CPU has them (the portable x86-64 baseline only has SSE2, which quarters the width of
/// every multiply-add).
fn rows_kernel(m: &QuantizedMatrix, first: usize, x: &[f32], n: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { avx2::rows(m, first, x, n, out) };
        return;
    }
    let mut scratch = vec![0f32; m.cols];
    for (i, out_row) in out.chunks_mut(n).enumerate() {
        m.dequantize_row(first + i, &mut scratch);
        for (t, y) in out_row.iter_mut().enumerate() {
            *y = dot(&x[t * m.cols..][..m.cols], &scratch);
        }
    }
}

/// Dot product with 32 independent accumulators (four 8-wide chains of multiply-adds): the
/// portable path.
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

/// The AVX2 + FMA kernel: two weight rows, dequantized once into an L1 scratch, against four
/// inputs at a time, eight 8-wide accumulators (one per row and input), summed across their
/// lanes together at the end.
///
/// One row against one input at a time (session 27) loaded a row value and an input value for
/// every multiply-add, and the 32 lanes of each dot were then summed one by one, which took as
/// long as the dot at SmolLM2's 576 columns (bench/NOTES.md); here six loads serve eight
/// multiply-adds and eight dots share one lane sum.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::QuantizedMatrix;

    /// Inputs a block takes.
    const INPUTS: usize = 4;

    /// Rows `first..` into `out` (`[rows, n]`): rows in pairs (a last odd row paired with
    /// itself), inputs in fours (a last short block repeating its last input), and only real
    /// pairs stored.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn rows(m: &QuantizedMatrix, first: usize, x: &[f32], n: usize, out: &mut [f32]) {
        let cols = m.cols;
        let rows = out.len() / n;
        let mut scratch = vec![0f32; 2 * cols];
        for pair in (0..rows).step_by(2) {
            let two = pair + 1 < rows;
            let (w0, w1) = scratch.split_at_mut(cols);
            m.dequantize_row(first + pair, w0);
            if two {
                m.dequantize_row(first + pair + 1, w1);
            } else {
                w1.copy_from_slice(w0);
            }
            for t0 in (0..n).step_by(INPUTS) {
                let inputs: [&[f32]; INPUTS] =
                    std::array::from_fn(|j| &x[(t0 + j).min(n - 1) * cols..][..cols]);
                // SAFETY: the caller's CPU has AVX2 and FMA; every slice is `cols` long.
                let sums = unsafe { block(w0, w1, inputs) };
                for j in 0..INPUTS.min(n - t0) {
                    out[pair * n + t0 + j] = sums[j];
                    if two {
                        out[(pair + 1) * n + t0 + j] = sums[INPUTS + j];
                    }
                }
            }
        }
    }

    /// `[w0 · x_0, .., w0 · x_3, w1 · x_0, .., w1 · x_3]`; every slice `w0.len()` long.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block(w0: &[f32], w1: &[f32], x: [&[f32]; INPUTS]) -> [f32; 2 * INPUTS] {
        let cols = w0.len();
        let full = cols / 8 * 8;
        let mut acc = [_mm256_setzero_ps(); 2 * INPUTS];
        let mut c = 0;
        while c < full {
            // SAFETY: c + 8 <= cols for every slice.
            unsafe {
                let a = _mm256_loadu_ps(w0.as_ptr().add(c));
                let b = _mm256_loadu_ps(w1.as_ptr().add(c));
                for j in 0..INPUTS {
                    let v = _mm256_loadu_ps(x[j].as_ptr().add(c));
                    acc[j] = _mm256_fmadd_ps(a, v, acc[j]);
                    acc[INPUTS + j] = _mm256_fmadd_ps(b, v, acc[INPUTS + j]);
                }
            }
            c += 8;
        }
        let mut sums = [0f32; 2 * INPUTS];
        // SAFETY: storing 8 lanes into an 8-element array.
        unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), lane_sums(acc)) };
        for k in full..cols {
            for j in 0..INPUTS {
                sums[j] += w0[k] * x[j][k];
                sums[INPUTS + j] += w1[k] * x[j][k];
            }
        }
        sums
    }

    /// Each register's eight lanes summed: `[Σ a_0, .., Σ a_7]`.
    #[target_feature(enable = "avx2,fma")]
    fn lane_sums(a: [__m256; 8]) -> __m256 {
        // Pairs of lanes, then fours, within each 128-bit half; then the halves added.
        let s01 = _mm256_hadd_ps(a[0], a[1]);
        let s23 = _mm256_hadd_ps(a[2], a[3]);
        let s45 = _mm256_hadd_ps(a[4], a[5]);
        let s67 = _mm256_hadd_ps(a[6], a[7]);
        let s0123 = _mm256_hadd_ps(s01, s23);
        let s4567 = _mm256_hadd_ps(s45, s67);
        let low = _mm256_permute2f128_ps(s0123, s4567, 0x20);
        let high = _mm256_permute2f128_ps(s0123, s4567, 0x31);
        _mm256_add_ps(low, high)
    }
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
            // 1 to 9 inputs: whole and partial blocks of four (and 5 rows: a last odd row).
            for n in [1, 2, 3, 4, 5, 9] {
                check(&m, n);
            }
        }
    }

    /// `matmul_transposed` of `n` inputs against each row's sum over the dense matrix.
    fn check(m: &QuantizedMatrix, n: usize) {
        let (rows, cols, bits) = (m.rows, m.cols, m.bits);
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 7) % 11) as f32 * 0.1 - 0.5)
            .collect();
        let dense = m.dequantize();
        let got = matmul_transposed(m, &x, n);
        for t in 0..n {
            for r in 0..rows {
                let want: f32 = (0..cols)
                    .map(|c| x[t * cols + c] * dense[r * cols + c])
                    .sum();
                assert!(
                    (got[t * rows + r] - want).abs() < 1e-4,
                    "bits {bits}, {n} inputs, row {r}, input {t}: {} vs {want}",
                    got[t * rows + r]
                );
            }
        }
    }
}
