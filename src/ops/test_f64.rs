//! f64 tensors for the unit tests that check a written-out backward against Burn's autodiff.
//!
//! Burn 0.21 fixes a device's default dtypes at the first tensor any backend creates on it, and
//! keys them by the device's type: `NdArray<f32>` and `NdArray<f64>` share `NdArrayDevice`. In
//! the one process that runs every unit test, an `NdArray<f64>` test therefore got f32 tensors
//! whenever an f32 test had created one first (and f32 tests would get f64 ones the other way
//! round). So unit tests all use the f32 backend, and these helpers ask for f64 by name.

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorData, Tolerance};

pub type B = Autodiff<NdArray<f32>>;

/// Normal(0, `std`) values in f64.
pub fn random<const D: usize>(shape: [usize; D], std: f64) -> Tensor<B, D> {
    let options = (&Default::default(), DType::F64);
    Tensor::random(shape, Distribution::Normal(0.0, std), options)
}

/// `values` in f64.
pub fn tensor<const D: usize>(values: Vec<f64>, shape: [usize; D]) -> Tensor<B, D> {
    let options = (&Default::default(), DType::F64);
    Tensor::from_data(TensorData::new(values, shape), options)
}

/// `x` converted to f64 (for tensors that model code builds in the default dtype).
pub fn cast<const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.cast(DType::F64)
}

/// Asserts that `ours` is `want`, both in f64, to rounding: the two sides compute the same math
/// in different orders, so they differ by a few f64 ulps, not by f32's 1e-7.
pub fn assert_same<Bk: Backend, const D: usize>(ours: Tensor<Bk, D>, want: Tensor<Bk, D>) {
    assert_eq!(ours.dtype(), DType::F64, "the check must run in f64");
    ours.into_data()
        .assert_approx_eq::<f64>(&want.into_data(), Tolerance::absolute(1e-10));
}

/// An f64 test tensor as the f32 CPU tensor the host passes take.
pub fn f32_of<const D: usize>(x: &Tensor<B, D>) -> Tensor<NdArray<f32>, D> {
    x.clone().inner().cast(DType::F32)
}

/// Asserts that a host pass's f32 `ours` is the f64 `want` within f32's rounding of the values
/// involved: 1e-5 relative, `abs` absolute.
pub fn assert_close_f32<const D: usize>(
    ours: Tensor<NdArray<f32>, D>,
    want: Tensor<B, D>,
    abs: f64,
) {
    ours.cast(DType::F64)
        .into_data()
        .assert_approx_eq::<f64>(&want.inner().into_data(), Tolerance::rel_abs(1e-5, abs));
}
