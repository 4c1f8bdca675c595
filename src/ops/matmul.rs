//! The model's matrix products as one backend extension, so a backend can route them to a
//! vendor GEMM (cuBLAS on CUDA, `backends/cuda/`) while every other op stays Burn's.
//!
//! `Autodiff<B>` wraps the product with the usual backward, `dA = dC·Bᵀ` and `dB = Aᵀ·dC`, each
//! computed (and its operand kept) only when the other side is tracked: a frozen weight costs no
//! gradient and keeps no activation alive. `A·B + C` (a frozen projection summed onto its LoRA
//! update) is one op too, so a GEMM that can accumulate (cuBLAS's β) saves the separate sum; its
//! backward adds `dC = dY`. The backward products accumulate the same way: an input gradient
//! lands on the gradient other consumers of that tensor already registered ([`add_product`]).

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorMetadata};

use super::grouped_matmul::{Stacked, autodiff_grouped, grouped_by_groups};
use super::primitive::{inner, primitive};

/// Backends that run the model's matrix products; the default is Burn's `float_matmul`, and a
/// backend may route them to a vendor GEMM.
pub trait MatmulBackend: Backend {
    /// `lhs`: `[..., m, k]`, `rhs`: `[..., k, n]`, same leading dimensions → `[..., m, n]`.
    /// Either side may be a transposed view.
    fn model_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }

    /// `lhs`: `[n, k]` with rows grouped as `counts` says, `rhs`: a stack of one matrix per
    /// group → `[n, m]` (see [`grouped_matmul`](super::grouped_matmul)).
    fn model_grouped_matmul(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        stacked: Stacked,
        counts: &[usize],
    ) -> FloatTensor<Self> {
        grouped_by_groups::<Self>(lhs, rhs, stacked, counts)
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
    inner(B::model_matmul(primitive(lhs), primitive(rhs)))
}

/// `lhs · rhs + acc` through [`MatmulBackend::model_matmul_add`].
pub fn matmul_add<B: MatmulBackend, const D: usize>(
    lhs: Tensor<B, D>,
    rhs: Tensor<B, D>,
    acc: Tensor<B, D>,
) -> Tensor<B, D> {
    inner(B::model_matmul_add(
        primitive(lhs),
        primitive(rhs),
        primitive(acc),
    ))
}

#[derive(Debug)]
struct MatmulBackward;

impl<B: MatmulBackend> Backward<B, 2> for MatmulBackward {
    /// The operands, each kept only if the other one needs a gradient.
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        operand_grads::<B, _, 2>(&ops, ops.state, grad, grads, ckpt);
    }
}

#[derive(Debug)]
struct MatmulAddBackward;

impl<B: MatmulBackend> Backward<B, 3> for MatmulAddBackward {
    /// The product's operands, each kept only if the other one needs a gradient.
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        operand_grads::<B, _, 3>(&ops, ops.state, grad.clone(), grads, ckpt);
        if let Some(node) = &ops.parents[2] {
            grads.register::<B>(node.id, grad);
        }
    }
}

/// The gradients of the product's operands (parents 0 and 1): `dA = dC · Bᵀ`, `dB = Aᵀ · dC`.
fn operand_grads<B: MatmulBackend, S, const N: usize>(
    ops: &Ops<S, N>,
    (lhs, rhs): (Option<NodeId>, Option<NodeId>),
    grad: FloatTensor<B>,
    grads: &mut Gradients,
    ckpt: &mut Checkpointer,
) {
    if ops.parents[0].is_some() {
        let rhs = ckpt.retrieve_node_output(rhs.expect("rhs kept for dA"));
        add_product::<B, S, N>(ops, 0, grads, grad.clone(), transpose::<B>(rhs));
    }
    if ops.parents[1].is_some() {
        let lhs = ckpt.retrieve_node_output(lhs.expect("lhs kept for dB"));
        add_product::<B, S, N>(ops, 1, grads, transpose::<B>(lhs), grad);
    }
}

/// Adds `lhs · rhs` into the gradient of `ops.parents[parent]`. A gradient already there (from
/// another consumer of the same tensor: q, k and v of one normed input, a frozen projection and
/// its LoRA A-product) becomes the GEMM's accumulator (`model_matmul_add`, cuBLAS's β = 1 on
/// CUDA) instead of being summed with the product by a separate kernel.
fn add_product<B: MatmulBackend, S, const N: usize>(
    ops: &Ops<S, N>,
    parent: usize,
    grads: &mut Gradients,
    lhs: FloatTensor<B>,
    rhs: FloatTensor<B>,
) {
    let Some(node) = &ops.parents[parent] else {
        return;
    };
    let existing = {
        // `Gradients` looks a gradient up by tensor: a leaf carrying the parent's node is the key.
        let mut key = Autodiff::<B>::from_inner(lhs.clone());
        key.node = node.clone();
        grads.remove::<B>(&key)
    };
    let grad = match existing {
        Some(acc) => B::model_matmul_add(lhs, rhs, acc),
        None => B::model_matmul(lhs, rhs),
    };
    grads.register::<B>(node.id, grad);
}

fn transpose<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
    let rank = t.shape().num_dims();
    B::float_swap_dims(t, rank - 2, rank - 1)
}

impl<B: MatmulBackend, C: CheckpointStrategy> MatmulBackend for Autodiff<B, C> {
    fn model_grouped_matmul(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        stacked: Stacked,
        counts: &[usize],
    ) -> FloatTensor<Self> {
        autodiff_grouped::<B, C>(lhs, rhs, stacked, counts)
    }

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
