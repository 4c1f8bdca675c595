//! The CPU backend (burn-ndarray): its implementations of the model's ops. The heavy ones are
//! our own passes over f32 rows: GEMMs through `matrixmultiply` or a CBLAS loaded at run time
//! (`matmul.rs`, `blas.rs`), SwiGLU and RoPE (`elementwise.rs`), and the softmax and the loss's
//! log-sum-exp (`softmax.rs`). f64 tensors (the finite-difference checks) take Burn's ops.

pub mod blas;
mod decode;
pub mod elementwise;
pub mod matmul;
mod products;
pub mod softmax;

use std::sync::Arc;

use burn::tensor::activation;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, FloatDType, Int, Tensor};

use crate::ops::ModelBackend;
use crate::ops::attention::{AttentionBackend, softmax_backward_ops};
use crate::ops::decode::{DecodeModel, DecodeSession};
use crate::ops::elementwise::{
    ElementwiseBackend, cast, cross_entropy_backward_ops, logsumexp_ops, swiglu_backward_ops,
    swiglu_ops,
};
use crate::ops::frozen_linear::{host_linear, on_host};
use crate::ops::matmul::MatmulBackend;
use crate::ops::primitive::{inner, primitive};
use crate::ops::rope::{RopeBackend, rotate_by_slices};
use crate::ops::routing::RoutingBackend;
use crate::quant::{QuantizedMatrix, tiled_matmul};

/// On the CPU the products go straight to `matrixmultiply` (`matmul.rs`): no copies of
/// transposed operands, and the sum of `matmul_add` inside the GEMM.
macro_rules! cpu_matmul_for {
    ($($elem:ty),*) => {$(
        impl MatmulBackend for burn::backend::NdArray<$elem> {
            fn model_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
                matmul::product(lhs, rhs, None)
            }

            fn model_matmul_add(
                lhs: FloatTensor<Self>,
                rhs: FloatTensor<Self>,
                acc: FloatTensor<Self>,
            ) -> FloatTensor<Self> {
                matmul::product(lhs, rhs, Some(acc))
            }
        }
    )*};
}

cpu_matmul_for!(f32, f64);

/// The plain form's softmax as single passes on the host (`softmax.rs`).
impl AttentionBackend for burn::backend::NdArray<f32> {
    fn attention_softmax(scores: Tensor<Self, 4>) -> Tensor<Self, 4> {
        softmax::softmax(&scores).unwrap_or_else(|| activation::softmax(scores, 3))
    }

    fn attention_softmax_backward(p: Tensor<Self, 4>, dp: Tensor<Self, 4>) -> Tensor<Self, 4> {
        match dp.dtype() {
            DType::F32 => softmax::softmax_backward(&p, dp).expect("f32 gradients"),
            _ => softmax_backward_ops(p, dp),
        }
    }
}

impl AttentionBackend for burn::backend::NdArray<f64> {}

/// SwiGLU and the cross-entropy as single passes on the host (`elementwise.rs`,
/// `softmax.rs`); other dtypes take Burn's ops.
impl ElementwiseBackend for burn::backend::NdArray<f32> {
    fn swiglu<const D: usize>(
        gate: Tensor<Self, D>,
        up: Tensor<Self, D>,
        dtype: Option<FloatDType>,
        _grad_dtype: Option<FloatDType>,
    ) -> Tensor<Self, D> {
        match elementwise::swiglu(&gate, &up) {
            Some(y) => cast(y, dtype),
            None => swiglu_ops(gate, up, dtype),
        }
    }

    fn swiglu_backward<const D: usize>(
        gate: Tensor<Self, D>,
        up: Tensor<Self, D>,
        dy: Tensor<Self, D>,
        wanted: [bool; 2],
        dtype: Option<FloatDType>,
    ) -> [Option<Tensor<Self, D>>; 2] {
        match elementwise::swiglu_backward(&gate, &up, &dy) {
            Some(grads) => {
                let [dg, du] = grads.map(|grad| cast(grad, dtype));
                [wanted[0].then_some(dg), wanted[1].then_some(du)]
            }
            None => swiglu_backward_ops(gate, up, dy, wanted, dtype),
        }
    }

    fn logsumexp(x: Tensor<Self, 2>) -> Tensor<Self, 2> {
        softmax::logsumexp(&x).unwrap_or_else(|| logsumexp_ops(x))
    }

    fn cross_entropy_backward(
        logits: Tensor<Self, 2>,
        lse: Tensor<Self, 2>,
        targets: Tensor<Self, 2, Int>,
        row_scale: Tensor<Self, 2>,
        dtype: Option<FloatDType>,
    ) -> Tensor<Self, 2> {
        // The host pass takes the logits by value, to write the gradient over them, so the
        // dtype decides beforehand which form runs.
        match logits.dtype() {
            burn::tensor::DType::F32 => {
                let dx = softmax::cross_entropy_backward(logits, &lse, &targets, &row_scale)
                    .expect("f32 logits");
                cast(dx, dtype)
            }
            _ => cross_entropy_backward_ops(logits, lse, targets, row_scale, dtype),
        }
    }
}

impl ElementwiseBackend for burn::backend::NdArray<f64> {}

impl RoutingBackend for burn::backend::NdArray<f32> {}
impl RoutingBackend for burn::backend::NdArray<f64> {}

/// One pass on the host (`elementwise.rs`); f64 tensors take the slices.
impl RopeBackend for burn::backend::NdArray<f32> {
    fn rope(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        match elementwise::rope(&x, &cos, &sin) {
            Some(y) => y,
            None => rotate_by_slices(x, cos, sin),
        }
    }
}

impl RopeBackend for burn::backend::NdArray<f64> {}

/// On the CPU, every product runs from the packed weight: row by row for a few rows, tile by
/// tile through sgemm for many (`quant/tiled_matmul.rs`), so no dense copy of `W` is made.
impl ModelBackend for burn::backend::NdArray<f32> {
    const DECODE_SESSIONS: bool = true;

    const SESSION_PROMPT: usize = decode::PASS_ROWS;

    fn decode_session(
        model: DecodeModel<Self>,
        kv: Vec<[FloatTensor<Self>; 2]>,
        room: usize,
    ) -> Option<Box<dyn DecodeSession<Self>>> {
        let session = decode::Session::open(model, kv, room)?;
        Some(Box::new(session))
    }

    fn quantized_linear(x: FloatTensor<Self>, w: &Arc<QuantizedMatrix>) -> FloatTensor<Self> {
        let x = inner::<Self, 2>(x);
        let [n, _] = x.dims();
        primitive(on_host(x, w.rows, |xs| host_linear(w, xs, n)))
    }

    fn quantized_linear_input_grad(
        dy: FloatTensor<Self>,
        w: &Arc<QuantizedMatrix>,
    ) -> FloatTensor<Self> {
        let dy = inner::<Self, 2>(dy);
        let [n, _] = dy.dims();
        primitive(on_host(dy, w.cols, |dys| {
            tiled_matmul::input_grad(w, dys, n)
        }))
    }
}

/// f64 serves the finite-difference gradient checks.
impl ModelBackend for burn::backend::NdArray<f64> {}
