//! Between Burn's `Tensor` and the float primitive that custom autodiff ops (`Backward` impls)
//! take and return.

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

/// A float primitive as a rank-`D` tensor.
pub fn inner<B: Backend, const D: usize>(x: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(x))
}

/// A tensor's float primitive, as custom autodiff ops take it.
pub fn primitive<B: Backend, const D: usize>(x: Tensor<B, D>) -> FloatTensor<B> {
    x.into_primitive().tensor()
}
