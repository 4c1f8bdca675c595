//! A quantized weight (MLX affine layout, `ops/quantized_linear.rs`) dequantized in one
//! CubeCL pass, one unit per packed word, written in the dtype its GEMM reads:
//!
//! ```text
//! W[r, c] = scales[r, c / group] · ((words[r, c / k] >> ((c mod k) · bits)) & (2^bits − 1))
//!           + biases[r, c / group],        k = 32 / bits
//! ```
//!
//! A word's codes share one group (groups are whole words). Burn's ops took five passes and
//! tensors the size of the dense matrix in i32 (the codes) and f32.

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{contiguous_f32, elementwise_cubes, empty};

/// The dense `[rows, cols]` matrix in `dtype` from `words` (`[rows, cols · bits / 32]`, i32),
/// `scales` and `biases` (`[rows, cols / group]`).
pub fn dequantize<R: CubeRuntime>(
    [words, scales, biases]: [CubeTensor<R>; 3],
    bits: u32,
    group: usize,
    dtype: DType,
) -> CubeTensor<R> {
    let words = into_contiguous(words);
    let [scales, biases] = [scales, biases].map(contiguous_f32);
    let [rows, per_row] = words.meta.shape().dims::<2>();
    let cols = per_row * 32 / bits as usize;
    assert!(
        (group * bits as usize).is_multiple_of(32),
        "groups of {group} at {bits} bits are not whole words"
    );
    let out = empty(&words, Shape::new([rows, cols]), dtype);
    let (cubes, dim) = elementwise_cubes(&words, rows * per_row);
    kernel::launch::<R>(
        &words.client.clone(),
        cubes,
        dim,
        words.into_tensor_arg(),
        scales.into_tensor_arg(),
        biases.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        (group * bits as usize / 32) as u32,
        bits,
        dtype.into(),
    );
    out
}

#[cube(launch)]
fn kernel<F: Float>(
    words: &Tensor<i32>,
    scales: &Tensor<f32>,
    biases: &Tensor<f32>,
    out: &mut Tensor<F>,
    words_per_group: u32,
    #[comptime] bits: u32,
    #[define(F)] _dtype: StorageType,
) {
    let per_word = comptime![(32 / bits) as usize];
    let mask = comptime![((1u64 << bits) - 1) as i32];
    let mut w = ABSOLUTE_POS;
    while w < words.len() {
        // Words are laid out row by row, and a row's groups are whole words, so the group of
        // word w is w / words_per_group whatever the row.
        let g = w / words_per_group as usize;
        let (scale, bias) = (scales[g], biases[g]);
        let word = words[w];
        #[unroll]
        for j in 0..per_word {
            // An arithmetic shift fills a negative word with ones; the mask drops them.
            let code = (word >> comptime![(j * bits as usize) as i32]) & mask;
            out[w * per_word + j] = F::cast_from(f32::cast_from(code) * scale + bias);
        }
        w += CUBE_COUNT * CUBE_DIM as usize;
    }
}
