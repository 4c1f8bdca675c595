//! RMSNorm forward and its input gradient as CubeCL kernels, one cube per row (the math in
//! `ops/elementwise.rs`):
//!
//! ```text
//! forward:  r = √(Σ_c x_c² / n + ε)        y_c = x_c / r · w_c   (in the consumer GEMM's dtype)
//! backward: m = Σ_c dy_c w_c x_c / n       dx_c = (dy_c w_c − x_c m / r²) / r
//! ```
//!
//! Burn's ops took five passes forward and seven back over `[tokens, hidden]`; these take one
//! read of each input and one write.

use burn::tensor::DType;
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::reduce::{ROW_UNITS, cube_sum, row_cubes};
use super::{contiguous_f32, empty};

/// `x` normalised over its last dimension and scaled by `weight`, written in `dtype`.
pub fn forward<R: CubeRuntime>(
    x: CubeTensor<R>,
    weight: CubeTensor<R>,
    eps: f32,
    dtype: DType,
) -> CubeTensor<R> {
    let [x, weight] = [x, weight].map(contiguous_f32);
    let (rows, features) = rows_of(&x);
    let out = empty(&x, x.meta.shape().clone(), dtype);
    forward_kernel::launch::<R>(
        &x.client.clone(),
        row_cubes(rows),
        CubeDim::new_1d(ROW_UNITS),
        x.into_tensor_arg(),
        weight.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        rows as u32,
        features as u32,
        eps,
        dtype.into(),
    );
    out
}

/// `dx` of [`forward`] given the output's gradient `dy` (f32, like `x`).
pub fn input_grad<R: CubeRuntime>(
    x: CubeTensor<R>,
    weight: CubeTensor<R>,
    dy: CubeTensor<R>,
    eps: f32,
) -> CubeTensor<R> {
    let [x, weight, dy] = [x, weight, dy].map(contiguous_f32);
    let (rows, features) = rows_of(&x);
    let dx = empty(&x, x.meta.shape().clone(), DType::F32);
    input_grad_kernel::launch::<R>(
        &x.client.clone(),
        row_cubes(rows),
        CubeDim::new_1d(ROW_UNITS),
        x.into_tensor_arg(),
        weight.into_tensor_arg(),
        dy.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        rows as u32,
        features as u32,
        eps,
    );
    dx
}

/// `(rows, features)`: the last dimension and the product of the others.
fn rows_of<R: CubeRuntime>(x: &CubeTensor<R>) -> (usize, usize) {
    let shape = x.meta.shape();
    let features = shape[shape.len() - 1];
    (shape.num_elements() / features.max(1), features)
}

/// `r` of the row starting at `base`: every unit sums its strided share of `x²`.
#[cube]
fn row_rms(x: &Tensor<f32>, base: usize, n: usize, eps: f32, sums: &mut SharedMemory<f32>) -> f32 {
    let mut squares = 0.0f32;
    let mut c = UNIT_POS_X as usize;
    while c < n {
        let v = x[base + c];
        squares += v * v;
        c += CUBE_DIM_X as usize;
    }
    (cube_sum(squares, sums) / f32::cast_from(n) + eps).sqrt()
}

#[cube(launch)]
fn forward_kernel<F: Float>(
    x: &Tensor<f32>,
    weight: &Tensor<f32>,
    out: &mut Tensor<F>,
    rows: u32,
    n: u32,
    eps: f32,
    #[define(F)] _dtype: StorageType,
) {
    let (rows, n) = (rows as usize, n as usize);
    let mut sums = SharedMemory::<f32>::new(ROW_UNITS as usize);
    let mut row = CUBE_POS_X as usize;
    while row < rows {
        let base = row * n;
        let r = row_rms(x, base, n, eps, &mut sums);
        let mut c = UNIT_POS_X as usize;
        while c < n {
            out[base + c] = F::cast_from(x[base + c] / r * weight[c]);
            c += CUBE_DIM_X as usize;
        }
        row += CUBE_COUNT_X as usize;
    }
}

#[cube(launch)]
fn input_grad_kernel(
    x: &Tensor<f32>,
    weight: &Tensor<f32>,
    dy: &Tensor<f32>,
    dx: &mut Tensor<f32>,
    rows: u32,
    n: u32,
    eps: f32,
) {
    let (rows, n) = (rows as usize, n as usize);
    let mut sums = SharedMemory::<f32>::new(ROW_UNITS as usize);
    let mut row = CUBE_POS_X as usize;
    while row < rows {
        let base = row * n;
        let r = row_rms(x, base, n, eps, &mut sums);
        let mut dot = 0.0f32;
        let mut c = UNIT_POS_X as usize;
        while c < n {
            dot += dy[base + c] * weight[c] * x[base + c];
            c += CUBE_DIM_X as usize;
        }
        let m = cube_sum(dot, &mut sums) / f32::cast_from(n);
        c = UNIT_POS_X as usize;
        while c < n {
            dx[base + c] = (dy[base + c] * weight[c] - x[base + c] * m / (r * r)) / r;
            c += CUBE_DIM_X as usize;
        }
        row += CUBE_COUNT_X as usize;
    }
}
