//! The frozen quantized linear as its own autodiff op.
//!
//! Forward: `y = x · deq(W)ᵀ`. Backward: only `dx = dy · deq(W)`, re-dequantizing from the
//! packed weight; no weight gradient is ever computed and no dense copy of `W` is kept between
//! forward and backward. Training memory therefore scales with the packed size.
//!
//! Backends opt in by implementing [`ModelBackend`]; the default methods work on any
//! backend (dequantize on the host, then the backend's matmul), and `Autodiff<B>` wraps them
//! with the backward above.

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};

use super::attention::AttentionBackend;
use super::decode::{DecodeModel, DecodeSession};
use super::elementwise::ElementwiseBackend;
use super::primitive::{inner, primitive};
use super::quantized_linear::DeviceQuantized;
use super::rope::RopeBackend;
use super::routing::RoutingBackend;
use crate::quant::QuantizedMatrix;
use crate::quant::packed_matmul::{MAX_ROWS as PACKED_MATMUL_MAX_ROWS, matmul_transposed};
use crate::quant::tiled_matmul;

/// Backends that run the whole model: attention, the element-wise ops, RoPE, and the frozen
/// quantized linears (by default dequantized on the host).
pub trait ModelBackend:
    AttentionBackend + ElementwiseBackend + RopeBackend + RoutingBackend
{
    /// Quantized weights live on the device and are dequantized there per use
    /// (`quantized_linear.rs`); otherwise they stay on the host, multiplied by host kernels.
    const DEVICE_QUANTIZED: bool = false;

    /// Whether this device computes a base held in `half` (its GEMMs and casts); an error saying
    /// what to set instead where it does not.
    fn check_half(_half: FloatDType, _device: &Self::Device) -> anyhow::Result<()> {
        Ok(())
    }

    /// A `[rows, cols]` bf16 matrix from its stored little-endian bytes, held in bf16 (a bf16
    /// base loaded without widening to f32 and back). Backends with a direct copy override it.
    fn bf16_matrix(bytes: &[u8], shape: [usize; 2], device: &Self::Device) -> FloatTensor<Self> {
        let data = TensorData::from_bytes_vec(bytes.to_vec(), shape, DType::BF16);
        Self::float_from_data(data, device)
    }

    /// A device-held quantized weight as the dense `[out, in]` matrix its GEMM reads (bf16 for
    /// a bf16 base).
    fn dequantize_for_gemm(w: &DeviceQuantized<Self>) -> FloatTensor<Self> {
        primitive(w.for_gemm())
    }

    /// `x`: `[n, in]` → `x · deq(W)ᵀ` for a device-held quantized weight.
    fn device_quantized_linear(
        x: FloatTensor<Self>,
        w: &DeviceQuantized<Self>,
    ) -> FloatTensor<Self> {
        super::quantized_linear::forward(x, w)
    }

    /// Whether [`Self::decode_session`] may give a session (so `generate` hands the model over
    /// only then).
    const DECODE_SESSIONS: bool = false;

    /// Prompts of at most this many new tokens run through a decode session
    /// ([`DecodeSession::run`]) when one opens; longer ones run op by op before it opens (as
    /// every prompt does where this is 0).
    const SESSION_PROMPT: usize = 0;

    /// A session running `model`'s decode steps whole, continuing the keys and values `kv`
    /// (`[1, kv_heads, len, head_dim]` per block; none for an empty cache) with room for `room`
    /// more positions; `None` where this backend decodes op by op.
    fn decode_session(
        _model: DecodeModel<Self>,
        _kv: Vec<[FloatTensor<Self>; 2]>,
        _room: usize,
    ) -> Option<Box<dyn DecodeSession<Self>>> {
        None
    }

    /// `x`: `[n, in]` → `[n, out]`.
    fn quantized_linear(x: FloatTensor<Self>, w: &Arc<QuantizedMatrix>) -> FloatTensor<Self> {
        let x = inner::<Self, 2>(x);
        let [n, _] = x.dims();
        let device = x.device();
        let y = if n <= PACKED_MATMUL_MAX_ROWS {
            on_host(x, w.rows, |xs| host_linear(w, xs, n))
        } else {
            let wt = TensorData::new(w.dequantize_transposed(), [w.cols, w.rows]);
            x.matmul(Tensor::from_data(wt, &device))
        };
        primitive(y)
    }

    /// `dy`: `[n, out]` → `dx = dy · deq(W)`: `[n, in]`.
    fn quantized_linear_input_grad(
        dy: FloatTensor<Self>,
        w: &Arc<QuantizedMatrix>,
    ) -> FloatTensor<Self> {
        let dy = inner::<Self, 2>(dy);
        let device = dy.device();
        primitive(dy.matmul(dense(w, &device)))
    }
}

/// `f` applied to the rows of `x` on the host, giving `[n, cols]`.
pub fn on_host<B: Backend>(
    x: Tensor<B, 2>,
    cols: usize,
    f: impl FnOnce(&[f32]) -> Vec<f32>,
) -> Tensor<B, 2> {
    let [n, _] = x.dims();
    let device = x.device();
    let xs: Vec<f32> = x
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("float activations");
    Tensor::from_data(TensorData::new(f(&xs), [n, cols]), &device)
}

/// `x · deq(W)ᵀ` on the host for `n` rows of `x`: from the packed codes row by row for a few
/// rows, tile by tile through sgemm for many.
pub fn host_linear(w: &QuantizedMatrix, xs: &[f32], n: usize) -> Vec<f32> {
    if n <= PACKED_MATMUL_MAX_ROWS {
        matmul_transposed(w, xs, n)
    } else {
        tiled_matmul::forward(w, xs, n)
    }
}

/// The dequantized weight as a dense `[out, in]` tensor.
pub fn dense<B: Backend>(w: &QuantizedMatrix, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(w.dequantize(), [w.rows, w.cols]), device)
}

#[derive(Debug)]
struct QuantizedLinearBackward;

impl<B: ModelBackend> Backward<B, 1> for QuantizedLinearBackward {
    type State = Arc<QuantizedMatrix>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| {
            B::quantized_linear_input_grad(dy, &w)
        });
    }
}

impl<B: ModelBackend, C: CheckpointStrategy> ModelBackend for Autodiff<B, C> {
    fn quantized_linear(x: FloatTensor<Self>, w: &Arc<QuantizedMatrix>) -> FloatTensor<Self> {
        match QuantizedLinearBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(w.clone(), B::quantized_linear(x.primitive, w)),
            OpsKind::UnTracked(prep) => prep.finish(B::quantized_linear(x.primitive, w)),
        }
    }

    const DEVICE_QUANTIZED: bool = B::DEVICE_QUANTIZED;

    fn check_half(half: FloatDType, device: &Self::Device) -> anyhow::Result<()> {
        B::check_half(half, device)
    }

    fn bf16_matrix(bytes: &[u8], shape: [usize; 2], device: &Self::Device) -> FloatTensor<Self> {
        <Self as AutodiffBackend>::from_inner(B::bf16_matrix(bytes, shape, device))
    }

    fn device_quantized_linear(
        x: FloatTensor<Self>,
        w: &DeviceQuantized<Self>,
    ) -> FloatTensor<Self> {
        super::quantized_linear::autodiff_forward::<B, C>(x, w)
    }
}
