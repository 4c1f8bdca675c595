//! The model's matrix products as one backend extension, so a backend can route them to a
//! vendor GEMM (cuBLAS on CUDA, `src/gpu/`) while every other op stays Burn's.
//!
//! `Autodiff<B>` wraps the product with the usual backward, `dA = dC·Bᵀ` and `dB = Aᵀ·dC`, each
//! computed (and its operand kept) only when the other side is tracked: a frozen weight costs no
//! gradient and keeps no activation alive. `A·B + C` (a frozen projection summed onto its LoRA
//! update) is one op too, so a GEMM that can accumulate (cuBLAS's β) saves the separate sum; its
//! backward adds `dC = dY`.

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

    /// `lhs · rhs + acc`, `acc` shaped like the product.
    fn model_matmul_add(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        acc: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::float_add(Self::model_matmul(lhs, rhs), acc)
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

/// `lhs · rhs + acc` through [`MatmulBackend::model_matmul_add`].
pub fn matmul_add<B: MatmulBackend, const D: usize>(
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
    acc: Tensor<B, D>,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::model_matmul_add(
        lhs.into_primitive().tensor(),
        rhs.into_primitive().tensor(),
        acc.into_primitive().tensor(),
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
            |grad| lhs_grad::<B>(grad, rhs.expect("rhs kept for dA")),
            |grad| rhs_grad::<B>(lhs.expect("lhs kept for dB"), grad),
        );
    }
}

#[derive(Debug)]
struct MatmulAddBackward;

impl<B: MatmulBackend> Backward<B, 3> for MatmulAddBackward {
    /// The product's operands, each kept only if the other one needs a gradient.
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let (lhs, rhs) = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let [lhs_node, rhs_node, acc_node] = ops.parents;
        if let Some(node) = lhs_node {
            let rhs = ckpt.retrieve_node_output(rhs.expect("rhs kept for dA"));
            grads.register::<B>(node.id, lhs_grad::<B>(grad.clone(), rhs));
        }
        if let Some(node) = rhs_node {
            let lhs = ckpt.retrieve_node_output(lhs.expect("lhs kept for dB"));
            grads.register::<B>(node.id, rhs_grad::<B>(lhs, grad.clone()));
        }
        if let Some(node) = acc_node {
            grads.register::<B>(node.id, grad);
        }
    }
}

/// `dA = dC · Bᵀ`
fn lhs_grad<B: MatmulBackend>(grad: FloatTensor<B>, rhs: FloatTensor<B>) -> FloatTensor<B> {
    B::model_matmul(grad, transpose::<B>(rhs))
}

/// `dB = Aᵀ · dC`
fn rhs_grad<B: MatmulBackend>(lhs: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    B::model_matmul(transpose::<B>(lhs), grad)
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

    fn model_matmul_add(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        acc: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
        match MatmulAddBackward
            .prepare::<C>([lhs.node.clone(), rhs.node.clone(), acc.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let lhs_state = rhs_tracked.then(|| prep.checkpoint(&lhs));
                let rhs_state = lhs_tracked.then(|| prep.checkpoint(&rhs));
                prep.finish(
                    (lhs_state, rhs_state),
                    B::model_matmul_add(lhs.primitive, rhs.primitive, acc.primitive),
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(B::model_matmul_add(
                lhs.primitive,
                rhs.primitive,
                acc.primitive,
            )),
        }
    }
}
