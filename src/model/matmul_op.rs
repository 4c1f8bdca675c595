//! The model's matrix products as one backend extension, so a backend can route them to a
//! vendor GEMM (cuBLAS on CUDA, `src/gpu/`) while every other op stays Burn's.
//!
//! `Autodiff<B>` wraps the product with the usual backward, `dA = dC·Bᵀ` and `dB = Aᵀ·dC`, each
//! computed (and its operand kept) only when the other side is tracked: a frozen weight costs no
//! gradient and keeps no activation alive.

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};

pub trait MatmulBackend: Backend {
    /// `lhs`: `[..., m, k]`, `rhs`: `[..., k, n]`, same leading dimensions → `[..., m, n]`.
    /// Either side may be a transposed view.
    fn model_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }
}

/// `lhs · rhs` through [`MatmulBackend::model_matmul`].
pub fn matmul<B: MatmulBackend, const D: usize>(
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::model_matmul(
        lhs.into_primitive().tensor(),
        rhs.into_primitive().tensor(),
    )))
}

impl MatmulBackend for burn::backend::NdArray<f32> {}
impl MatmulBackend for burn::backend::NdArray<f64> {}

#[cfg(feature = "metal")]
impl MatmulBackend for burn::backend::Metal<f32> {}

#[derive(Debug)]
struct MatmulBackward;

impl<B: MatmulBackend> Backward<B, 2> for MatmulBackward {
    /// The operands, each kept only if the other one needs a gradient.
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let (lhs, rhs) = ops.state;
        let lhs: Option<FloatTensor<B>> = lhs.map(|id| ckpt.retrieve_node_output(id));
        let rhs: Option<FloatTensor<B>> = rhs.map(|id| ckpt.retrieve_node_output(id));
        binary::<B, _, _>(
            ops.parents,
            ops.node,
            grads,
            |grad| B::model_matmul(grad, transpose::<B>(rhs.expect("rhs kept for dA"))),
            |grad| B::model_matmul(transpose::<B>(lhs.expect("lhs kept for dB")), grad),
        );
    }
}

fn transpose<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
    let rank = t.shape().num_dims();
    B::float_swap_dims(t, rank - 2, rank - 1)
}

impl<B: MatmulBackend, C: CheckpointStrategy> MatmulBackend for Autodiff<B, C> {
    fn model_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
        match MatmulBackward
            .prepare::<C>([lhs.node.clone(), rhs.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let lhs_state = rhs_tracked.then(|| prep.checkpoint(&lhs));
                let rhs_state = lhs_tracked.then(|| prep.checkpoint(&rhs));
                prep.finish(
                    (lhs_state, rhs_state),
                    B::model_matmul(lhs.primitive, rhs.primitive),
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(B::model_matmul(lhs.primitive, rhs.primitive)),
        }
    }
}
