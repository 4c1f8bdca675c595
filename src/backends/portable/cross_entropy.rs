//! The loss's two passes over the logits as CubeCL kernels (the math in `ops/elementwise.rs`):
//! each row's log-sum-exp, one cube per row, and the logits' gradient in one element-wise pass
//! with the target's `−1` written in place (Burn's ops took four passes and a scatter):
//!
//! ```text
//! lse_r  = m_r + ln Σ_j e^(x_rj − m_r),  m_r = max_j x_rj
//! dx_rj  = s_r (e^(x_rj − lse_r) − [j = t_r])       (in the head GEMM's input dtype)
//! ```

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::reduce::{ROW_UNITS, cube_max, cube_sum, row_cubes};
use super::{contiguous_f32, elementwise_cubes, empty};

/// `log Σ_j exp(x_rj)` per row of `x` `[rows, n]` → `[rows, 1]`.
pub fn logsumexp<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    let x = contiguous_f32(x);
    let [rows, n] = x.meta.shape().dims::<2>();
    let lse = empty(&x, Shape::new([rows, 1]), DType::F32);
    logsumexp_kernel::launch::<R>(
        &x.client.clone(),
        row_cubes(rows),
        CubeDim::new_1d(ROW_UNITS),
        x.into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        rows as u32,
        n as u32,
    );
    lse
}

/// `s_r (exp(x_rj − lse_r) − [j = t_r])` for `logits` `[rows, n]`, `lse`, `targets` (i32) and
/// `row_scale` `[rows, 1]`, in `dtype`.
pub fn backward<R: CubeRuntime>(
    logits: CubeTensor<R>,
    lse: CubeTensor<R>,
    targets: CubeTensor<R>,
    row_scale: CubeTensor<R>,
    dtype: DType,
) -> CubeTensor<R> {
    let [logits, lse, row_scale] = [logits, lse, row_scale].map(contiguous_f32);
    let targets = into_contiguous(targets);
    assert_eq!(targets.dtype, DType::I32, "the kernel reads i32 targets");
    let [_, n] = logits.meta.shape().dims::<2>();
    let dx = empty(&logits, logits.meta.shape().clone(), dtype);
    let (cubes, dim) = elementwise_cubes(&logits, dx.meta.num_elements());
    backward_kernel::launch::<R>(
        &logits.client.clone(),
        cubes,
        dim,
        logits.into_tensor_arg(),
        lse.into_tensor_arg(),
        targets.into_tensor_arg(),
        row_scale.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        n as u32,
        dtype.into(),
    );
    dx
}

#[cube(launch)]
fn logsumexp_kernel(x: &Tensor<f32>, lse: &mut Tensor<f32>, rows: u32, n: u32) {
    let (rows, n) = (rows as usize, n as usize);
    let mut shared = SharedMemory::<f32>::new(ROW_UNITS as usize);
    let mut row = CUBE_POS_X as usize;
    while row < rows {
        let base = row * n;
        let mut local = f32::new(f32::MIN);
        let mut c = UNIT_POS_X as usize;
        while c < n {
            local = f32::max(local, x[base + c]);
            c += CUBE_DIM_X as usize;
        }
        let m = cube_max(local, &mut shared);
        let mut sum = 0.0f32;
        c = UNIT_POS_X as usize;
        while c < n {
            sum += (x[base + c] - m).exp();
            c += CUBE_DIM_X as usize;
        }
        let total = cube_sum(sum, &mut shared);
        if UNIT_POS_X == 0 {
            lse[row] = m + total.ln();
        }
        row += CUBE_COUNT_X as usize;
    }
}

#[cube(launch)]
fn backward_kernel<F: Float>(
    logits: &Tensor<f32>,
    lse: &Tensor<f32>,
    targets: &Tensor<i32>,
    row_scale: &Tensor<f32>,
    dx: &mut Tensor<F>,
    n: u32,
    #[define(F)] _dtype: StorageType,
) {
    let n = n as usize;
    let mut i = ABSOLUTE_POS;
    while i < dx.len() {
        let row = i / n;
        let mut p = (logits[i] - lse[row]).exp();
        if i % n == targets[row] as usize {
            p -= 1.0;
        }
        dx[i] = F::cast_from(row_scale[row] * p);
        i += CUBE_COUNT * CUBE_DIM as usize;
    }
}
