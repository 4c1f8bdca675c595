//! The CPU decode session's matrix-vector products (`decode.rs`): `y = W x` for one input, from
//! MLX-packed codes or a dense f32 matrix, four output rows at a time so that each load of `x`
//! serves four rows, the rows split across rayon's threads in tasks of about 64k weights.
//!
//! A packed row is summed group by group, `Σ_g s_g (q_g · x_g) + b_g Σ x_g` (`q_g` the group's
//! codes, `Σ x_g` computed once a product), its codes unpacked straight into SIMD lanes (AVX2 +
//! FMA where the CPU has them, at 2, 4 and 8 bits): the row is never expanded in memory. Other
//! widths, and CPUs without AVX2, dequantize each row into a scratch buffer and take one dot
//! product, as the op-by-op path does (`quant/packed_matmul.rs`). The prompt pass's products
//! over several inputs are [`rows_product`].

use std::sync::Arc;

use burn::backend::NdArray;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};
use burn_ndarray::NdArrayTensor;
use rayon::prelude::*;

use super::elementwise::tensor;
use super::matmul::product;
use crate::quant::QuantizedMatrix;
use crate::quant::packed_matmul::matmul_transposed;

type Cpu = NdArray<f32>;

/// Weights a task of a product covers, about: enough to amortise rayon's hand-off, few enough
/// to balance the threads.
const TASK_WEIGHTS: usize = 1 << 16;

/// A matrix `[rows, cols]` as the session reads it.
pub enum Matrix {
    /// f32 `[rows, cols]` in row-major order (the model's tensor, not copied).
    Dense(NdArrayTensor),
    /// MLX affine codes on the host.
    Packed(Arc<QuantizedMatrix>),
}

impl Matrix {
    /// Output rows.
    pub fn rows(&self) -> usize {
        match self {
            Matrix::Dense(w) => w.shape()[0],
            Matrix::Packed(m) => m.rows,
        }
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        match self {
            Matrix::Dense(w) => w.shape()[1],
            Matrix::Packed(m) => m.cols,
        }
    }

    /// Row `row` into `out` (the embedding lookup).
    pub fn row(&self, row: usize, out: &mut [f32]) {
        match self {
            Matrix::Dense(w) => out.copy_from_slice(&dense(w)[row * out.len()..][..out.len()]),
            Matrix::Packed(m) => m.dequantize_row(row, out),
        }
    }

    /// `y[i] = W[first + i] · x` for every `i < y.len()`; `sums`: `x`'s group sums for this
    /// matrix's group size (packed only).
    fn rows_times(&self, first: usize, x: &[f32], sums: &[f32], y: &mut [f32]) {
        // The SIMD loads below trust these (the session builds every call to fit them).
        assert!(x.len() == self.cols() && first + y.len() <= self.rows());
        match self {
            Matrix::Dense(w) => {
                let (w, cols) = (dense(w), x.len());
                by_rows(
                    y,
                    first,
                    |row, out| dense_rows::<4>(w, cols, row, x, out),
                    |row, out| dense_rows::<1>(w, cols, row, x, out),
                );
            }
            Matrix::Packed(m) => {
                assert_eq!(sums.len(), m.cols / m.group_size);
                packed_rows(m, first, x, sums, y);
            }
        }
    }

    fn group(&self) -> Option<usize> {
        match self {
            Matrix::Dense(_) => None,
            Matrix::Packed(m) => Some(m.group_size),
        }
    }
}

/// Rows `first..first + y.len()` into `y`, four at a time through `four` (its row and four
/// outputs) and the last few one at a time through `one`.
#[inline(always)]
fn by_rows(
    y: &mut [f32],
    first: usize,
    mut four: impl FnMut(usize, &mut [f32]),
    mut one: impl FnMut(usize, &mut [f32]),
) {
    let done = y.len() / 4 * 4;
    let (quads, rest) = y.split_at_mut(done);
    for (i, out) in quads.chunks_exact_mut(4).enumerate() {
        four(first + 4 * i, out);
    }
    for (i, out) in rest.chunks_mut(1).enumerate() {
        one(first + done + i, out);
    }
}

/// A dense matrix's values (the session takes only f32 ones in row-major order).
fn dense(w: &NdArrayTensor) -> &[f32] {
    match w {
        NdArrayTensor::F32(w) => w.view().to_slice().expect("a row-major matrix"),
        _ => unreachable!("the session takes f32 matrices only"),
    }
}

/// `x Wᵀ` for `n` inputs (`x`: `[n, cols]`, row-major) → `[n, rows]`, the prompt pass's
/// products: packed through `quant/packed_matmul.rs` (two rows against four inputs a block),
/// dense through the backend's GEMM (`matmul.rs`), `W` read transposed in place.
pub fn rows_product(m: &Matrix, x: &[f32], n: usize) -> Vec<f32> {
    match m {
        Matrix::Packed(m) => matmul_transposed(m, x, n),
        Matrix::Dense(w) => {
            let x = tensor(x.to_vec(), [n, m.cols()]).into_primitive().tensor();
            let y = product(x, Cpu::float_transpose(w.clone()), None);
            Tensor::<Cpu, 2>::from_primitive(TensorPrimitive::Float(y))
                .into_data()
                .into_vec()
                .expect("f32 products")
        }
    }
}

/// `ys[i] = W_i x` for each `(W_i, ys[i])`, in one parallel pass over all their rows.
pub fn products(pairs: &mut [(&Matrix, &mut [f32])], x: &[f32]) {
    let sums: Vec<Vec<f32>> = pairs
        .iter()
        .map(|(m, _)| m.group().map_or_else(Vec::new, |g| group_sums(x, g)))
        .collect();
    let mut tasks = Vec::new();
    for ((m, y), sums) in pairs.iter_mut().zip(&sums) {
        let rows = task_rows(m.cols());
        for (i, y) in y.chunks_mut(rows).enumerate() {
            tasks.push((&**m, i * rows, y, sums.as_slice()));
        }
    }
    tasks
        .into_par_iter()
        .for_each(|(m, first, y, sums)| m.rows_times(first, x, sums, y));
}

/// `y = silu(W_g x) ⊙ (W_u x)`, both products and the gating in one parallel pass.
pub fn gated(gate: &Matrix, up: &Matrix, x: &[f32], y: &mut [f32]) {
    let sums = [gate, up].map(|m| m.group().map_or_else(Vec::new, |g| group_sums(x, g)));
    let rows = task_rows(gate.cols());
    y.par_chunks_mut(rows).enumerate().for_each(|(i, y)| {
        let mut u = vec![0f32; y.len()];
        gate.rows_times(i * rows, x, &sums[0], y);
        up.rows_times(i * rows, x, &sums[1], &mut u);
        silu_times(y, &u);
    });
}

/// `g = silu(g) ⊙ u`, SwiGLU's gating.
pub fn silu_times(g: &mut [f32], u: &[f32]) {
    for (g, u) in g.iter_mut().zip(u) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Output rows a task takes for rows of `cols` weights: a multiple of 4.
fn task_rows(cols: usize) -> usize {
    (TASK_WEIGHTS / cols.max(1)).max(4).next_multiple_of(4)
}

/// Each group's `Σ x` (groups of `group` consecutive values).
fn group_sums(x: &[f32], group: usize) -> Vec<f32> {
    x.chunks(group).map(|g| g.iter().sum()).collect()
}

/// `R` dense rows from `first` times `x`, with eight running sums a row (one SIMD register;
/// a single sum would force strictly sequential adds).
#[inline(always)]
fn dense_rows<const R: usize>(w: &[f32], cols: usize, first: usize, x: &[f32], out: &mut [f32]) {
    let rows: [&[f32]; R] = std::array::from_fn(|r| &w[(first + r) * cols..][..cols]);
    let mut acc = [[0f32; 8]; R];
    let whole = cols / 8 * 8;
    for c in (0..whole).step_by(8) {
        let xv = &x[c..c + 8];
        for r in 0..R {
            let wv = &rows[r][c..c + 8];
            for k in 0..8 {
                acc[r][k] += wv[k] * xv[k];
            }
        }
    }
    for r in 0..R {
        let tail: f32 = (whole..cols).map(|c| rows[r][c] * x[c]).sum();
        out[r] = acc[r].iter().sum::<f32>() + tail;
    }
}

/// Packed rows `first..first + y.len()` times `x`.
fn packed_rows(m: &QuantizedMatrix, first: usize, x: &[f32], sums: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::lanes::fit(m.bits, m.group_size) {
        // SAFETY: `fit` checked the CPU's features and the matrix's layout.
        unsafe { simd::packed_rows(m, first, x, sums, y) };
        return;
    }
    let mut scratch = vec![0f32; m.cols];
    for (i, out) in y.iter_mut().enumerate() {
        m.dequantize_row(first + i, &mut scratch);
        let mut one = [0f32];
        dense_rows::<1>(&scratch, m.cols, 0, x, &mut one);
        *out = one[0];
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    //! The packed rows through AVX2 + FMA: eight codes of a row become eight i32 lanes (4 bits:
    //! one word broadcast and shifted by 0, 4, .., 28; 8 bits: eight bytes widened; 2 bits:
    //! half a word), converted to f32 and multiplied into the group's running sums.

    use std::arch::x86_64::*;

    use crate::quant::QuantizedMatrix;
    use crate::quant::lanes::codes;

    /// Packed rows `first..first + y.len()` times `x`, four rows at a time.
    ///
    /// # Safety
    /// `quant::lanes::fit` holds for `m`; `x` and `sums` hold its columns and groups; the rows exist.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn packed_rows(
        m: &QuantizedMatrix,
        first: usize,
        x: &[f32],
        sums: &[f32],
        y: &mut [f32],
    ) {
        // SAFETY (both): as the caller's, for the rows each call takes.
        let four = |row, out: &mut [f32]| unsafe {
            match m.bits {
                4 => rows::<4, 4>(m, row, x, sums, out),
                8 => rows::<8, 4>(m, row, x, sums, out),
                _ => rows::<2, 4>(m, row, x, sums, out),
            }
        };
        let one = |row, out: &mut [f32]| unsafe {
            match m.bits {
                4 => rows::<4, 1>(m, row, x, sums, out),
                8 => rows::<8, 1>(m, row, x, sums, out),
                _ => rows::<2, 1>(m, row, x, sums, out),
            }
        };
        super::by_rows(y, first, four, one);
    }

    /// `R` rows from `first` of a `BITS`-bit matrix times `x`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn rows<const BITS: usize, const R: usize>(
        m: &QuantizedMatrix,
        first: usize,
        x: &[f32],
        sums: &[f32],
        out: &mut [f32],
    ) {
        let words_a_row = m.words_per_row();
        let groups = m.cols / m.group_size;
        let vectors = m.group_size / 8;
        let rows: [*const u32; R] =
            std::array::from_fn(|r| m.packed[(first + r) * words_a_row..].as_ptr());
        let mut acc = [_mm256_setzero_ps(); R];
        let mut bias = [0f32; R];
        for (g, &xsum) in sums.iter().enumerate().take(groups) {
            let mut dot = [_mm256_setzero_ps(); R];
            for v in 0..vectors {
                let at = g * vectors + v;
                // SAFETY: `at * 8 + 8 <= cols`, the length of `x`.
                let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(at * 8)) };
                for r in 0..R {
                    // SAFETY: vector `at` of a row lies within its words.
                    let q = unsafe { codes::<BITS>(rows[r], at) };
                    dot[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), xv, dot[r]);
                }
            }
            for r in 0..R {
                let at = (first + r) * groups + g;
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(m.scales[at]), dot[r], acc[r]);
                bias[r] += m.biases[at] * xsum;
            }
        }
        for r in 0..R {
            out[r] = sum(acc[r]) + bias[r];
        }
    }

    /// The eight lanes' sum.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn sum(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::quant::affine::{SUPPORTED_BITS, random_matrix as packed};

    /// `W x` in f64 from the dequantized rows.
    fn reference(w: &[f32], cols: usize, x: &[f32]) -> Vec<f64> {
        w.chunks(cols)
            .map(|row| {
                row.iter()
                    .zip(x)
                    .map(|(&w, &x)| f64::from(w) * f64::from(x))
                    .sum()
            })
            .collect()
    }

    fn input(cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..cols).map(|_| rng.random_range(-2.0..2.0)).collect()
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let err = (f64::from(*g) - w).abs() / scale;
            assert!(err < 1e-5, "{what}: row {i}: {g} against {w}");
        }
    }

    #[test]
    fn packed_products_equal_the_dequantized_rows_at_every_width() {
        // 4,103 rows: tasks of several quads and a tail of 3; groups of 16 to 128.
        let (rows, cols) = (4103, 256);
        for bits in SUPPORTED_BITS {
            for group in [16, 32, 128] {
                let m = packed(rows, cols, bits, group, u64::from(bits) * 7 + group as u64);
                let x = input(cols, 3);
                let want = reference(&m.dequantize(), cols, &x);
                let matrix = Matrix::Packed(Arc::new(m));
                let mut y = vec![0f32; rows];
                products(&mut [(&matrix, &mut y)], &x);
                assert_close(&y, &want, &format!("{bits}-bit, group {group}"));
            }
        }
    }

    #[test]
    fn gated_and_dense_products_equal_their_references() {
        let (rows, cols) = (1029, 192);
        let [gate, up] = [1, 2].map(|seed| packed(rows, cols, 4, 32, seed));
        let x = input(cols, 5);
        let (g, u) = (
            reference(&gate.dequantize(), cols, &x),
            reference(&up.dequantize(), cols, &x),
        );
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let mut y = vec![0f32; rows];
        let [gate, up] = [gate, up].map(|m| Matrix::Packed(Arc::new(m)));
        gated(&gate, &up, &x, &mut y);
        assert_close(&y, &want, "gated");

        let w = input(rows * cols, 9);
        let data = burn::tensor::TensorData::new(w.clone(), [rows, cols]);
        let tensor = burn::tensor::Tensor::<burn::backend::NdArray<f32>, 2>::from_data(
            data,
            &Default::default(),
        );
        let matrix = Matrix::Dense(tensor.into_primitive().tensor());
        products(&mut [(&matrix, &mut y)], &x);
        assert_close(&y, &reference(&w, cols, &x), "dense");
    }
}
