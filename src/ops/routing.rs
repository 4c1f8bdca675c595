//! A mixture of experts' rows moved between token order and expert order, and the routers' extra
//! gradient term ([`add_to_gradient`], the load-balancing loss's).
//!
//! ```text
//! out[i] = x[picks[i]]                         x: [m, h], picks: [p] → out: [p, h]
//! dx[r]  = Σ_{j < times} dout[back[r·times + j]]    (each row of x picked exactly `times` times)
//! ```
//!
//! `back` lists, for each row of `x`, the `times` outputs that picked it. Burn's `select` has the
//! same forward, but its backward is a scatter-add (`select_assign`) which Burn's CubeCL kernel
//! runs with one thread per column looping over every picked row: 65,536 dependent steps per
//! column at Qwen3-30B-A3B's routed rows, several of them per layer, most of a 10 s step on an
//! H200 (bench/NOTES.md). The rows here are picked a known number of times each, so the backward
//! is a gather too, then a sum over the `times` copies.

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Shape, Tensor, TensorData, TensorMetadata};

use super::primitive::{inner, primitive};

/// A gradient term computed when the backward pass reaches it (a loss whose gradient is known in
/// closed form only after the forward pass: the routers' load balance,
/// `model/router_balance.rs`): the values of a `[rows, cols]` tensor, row-major.
#[derive(Clone)]
pub struct LateGradient(Arc<dyn Fn() -> Vec<f32> + Send + Sync>);

impl LateGradient {
    /// The term `values()` computes.
    pub fn new(values: impl Fn() -> Vec<f32> + Send + Sync + 'static) -> Self {
        LateGradient(Arc::new(values))
    }
}

impl std::fmt::Debug for LateGradient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LateGradient")
    }
}

/// Backends that move routed rows; the default is Burn's `select` (no backward of its own is
/// needed off the autodiff backend).
pub trait RoutingBackend: Backend {
    /// `x` unchanged; in the backward pass its gradient gains `term` (nothing off the autodiff
    /// backend, where there is no backward pass).
    fn add_to_gradient(x: FloatTensor<Self>, _term: LateGradient) -> FloatTensor<Self> {
        x
    }

    /// `x`: `[m, h]`, `picks`: `[p]` → `[p, h]`, `out[i] = x[picks[i]]`; `back`: `[m · times]`,
    /// the outputs that picked each row (its backward's gather).
    fn pick_rows(
        x: FloatTensor<Self>,
        picks: IntTensor<Self>,
        _back: IntTensor<Self>,
        _times: usize,
    ) -> FloatTensor<Self> {
        Self::float_select(x, 0, picks)
    }
}

/// `x` unchanged; its gradient gains `term`'s values (`x`'s shape) in the backward pass.
pub fn add_to_gradient<B: RoutingBackend>(x: Tensor<B, 2>, term: LateGradient) -> Tensor<B, 2> {
    inner(B::add_to_gradient(primitive(x), term))
}

/// `out[i] = x[picks[i]]`, each row of `x` picked `times` times, by the outputs `back` lists
/// (row `r`'s at `back[r·times .. (r+1)·times]`).
pub fn pick_rows<B: RoutingBackend>(
    x: Tensor<B, 2>,
    picks: Tensor<B, 1, Int>,
    back: Tensor<B, 1, Int>,
    times: usize,
) -> Tensor<B, 2> {
    assert_eq!(
        back.dims()[0],
        x.dims()[0] * times,
        "every row is picked `times` times"
    );
    inner(B::pick_rows(
        primitive(x),
        picks.into_primitive(),
        back.into_primitive(),
        times,
    ))
}

#[derive(Debug)]
struct PickBackward;

impl<B: Backend> Backward<B, 1> for PickBackward {
    /// `back`, `times`, and the shape of `x`.
    type State = (IntTensor<B>, usize, Shape);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (back, times, shape) = ops.state;
        let Some(node) = &ops.parents[0] else {
            return;
        };
        let copies = B::float_select(grad, 0, back);
        let dx = if times == 1 {
            copies
        } else {
            let (rows, width) = (shape[0], shape[1]);
            let copies = B::float_reshape(copies, Shape::from([rows, times, width]));
            B::float_reshape(B::float_sum_dim(copies, 1), shape)
        };
        grads.register::<B>(node.id, dx);
    }
}

#[derive(Debug)]
struct LateBackward;

impl<B: Backend> Backward<B, 1> for LateBackward {
    type State = (LateGradient, Shape);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (term, shape) = ops.state;
        let Some(node) = &ops.parents[0] else {
            return;
        };
        let device = B::float_device(&grad);
        let extra = B::float_from_data(TensorData::new((term.0)(), shape), &device);
        let dtype = grad.dtype();
        let extra = B::float_cast(extra, dtype.into());
        grads.register::<B>(node.id, B::float_add(grad, extra));
    }
}

impl<B: RoutingBackend, C: CheckpointStrategy> RoutingBackend for Autodiff<B, C> {
    fn add_to_gradient(x: FloatTensor<Self>, term: LateGradient) -> FloatTensor<Self> {
        let shape = x.primitive.shape();
        match LateBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((term, shape), x.primitive),
            OpsKind::UnTracked(prep) => prep.finish(x.primitive),
        }
    }

    fn pick_rows(
        x: FloatTensor<Self>,
        picks: IntTensor<Self>,
        back: IntTensor<Self>,
        times: usize,
    ) -> FloatTensor<Self> {
        let shape = x.primitive.shape();
        match PickBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((back, times, shape), B::float_select(x.primitive, 0, picks))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::float_select(x.primitive, 0, picks)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_f64::{B, assert_same, random};
    use burn::tensor::TensorData;

    fn ids(values: &[i64]) -> Tensor<B, 1, Int> {
        Tensor::from_data(
            TensorData::new(values.to_vec(), [values.len()]),
            &Default::default(),
        )
    }

    #[test]
    fn the_written_backward_is_selects_autodiff() {
        // 3 rows, each picked twice, in a shuffled order; `back` lists each row's two pickers.
        let picks = [2, 0, 1, 0, 2, 1];
        let back = [1, 3, 2, 5, 0, 4];
        let upstream = random([6, 4], 1.0);
        let x = random([3, 4], 1.0).require_grad();
        let y = pick_rows(x.clone(), ids(&picks), ids(&back), 2);
        let grads = (y.clone() * upstream.clone()).sum().backward();

        let x2 = x.clone().detach().require_grad();
        let want = x2.clone().select(0, ids(&picks));
        assert_same(y, want.clone());
        let grads2 = (want * upstream).sum().backward();
        assert_same(x.grad(&grads).unwrap(), x2.grad(&grads2).unwrap());
    }
}
