//! The experts' products: rows grouped by expert, each group times its own matrix.
//!
//! ```text
//! x: [n, k], rows sorted by group (counts[g] rows for group g, in order)
//! w: [groups, k, m]  (or [groups, m, k] read transposed: a stack of [out, in] weights)
//! y[rows of g]  = x[rows of g] · w_g                                            y: [n, m]
//! dx[rows of g] = dy[rows of g] · w_gᵀ        dw_g = x[rows of g]ᵀ · dy[rows of g]
//! ```
//!
//! One autodiff op ([`MatmulBackend::model_grouped_matmul`]) whose backward is the two grouped
//! products above, so the gradient of each group's rows is written once into one `[n, k]`
//! buffer (Burn's own `narrow` per group has a backward that writes a zero `[n, k]` tensor per
//! group: quadratic in the experts, 20 s a step at Qwen3-30B-A3B's 128). By default the grouped
//! product is one GEMM per group with rows, through [`MatmulBackend::model_matmul`]; CUDA runs it
//! as one cuBLAS grouped call (`backends/cuda/grouped_gemm.rs`). The stack's gradient is always
//! one GEMM per group ([`grouped_outer_by_groups`]): cuBLAS's grouped call gets it wrong (that
//! file says how).

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;

use super::matmul::MatmulBackend;
use super::primitive::{inner, primitive};

/// How the stacked matrices are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stacked {
    /// `[groups, k, m]`: each group's rows times `w_g`.
    AsIs,
    /// `[groups, m, k]` (weights `[out, in]`): each group's rows times `w_gᵀ`.
    Transposed,
}

impl Stacked {
    fn flipped(self) -> Self {
        match self {
            Stacked::AsIs => Stacked::Transposed,
            Stacked::Transposed => Stacked::AsIs,
        }
    }
}

/// `x`: `[n, k]` with rows grouped as `counts` says (summing to `n`), `w`: `[groups, k, m]` (or
/// `[groups, m, k]`, [`Stacked::Transposed`]) → `[n, m]`, each group's rows times its own matrix.
pub fn grouped_matmul<B: MatmulBackend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 3>,
    stacked: Stacked,
    counts: &[usize],
) -> Tensor<B, 2> {
    assert_eq!(w.dims()[0], counts.len(), "one count per group");
    assert_eq!(
        x.dims()[0],
        counts.iter().sum::<usize>(),
        "counts cover the rows"
    );
    inner(B::model_grouped_matmul(
        primitive(x),
        primitive(w),
        stacked,
        counts,
    ))
}

/// Group `g`'s matrix of a stack, as the product takes it (`[k, m]`).
fn matrix<B: Backend>(w: &Tensor<B, 3>, g: usize, stacked: Stacked) -> Tensor<B, 2> {
    let [_, a, b] = w.dims();
    let w_g = w.clone().narrow(0, g, 1).reshape([a, b]);
    match stacked {
        Stacked::AsIs => w_g,
        Stacked::Transposed => w_g.transpose(),
    }
}

/// The reference grouped product: one [`MatmulBackend::model_matmul`] per group with rows.
pub fn grouped_by_groups<B: MatmulBackend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    stacked: Stacked,
    counts: &[usize],
) -> FloatTensor<B> {
    // `w` is a stack held contiguous (a weight `[groups · a, b]` seen as `[groups, a, b]`), so
    // each group's matrix is a view.
    let (x, w): (Tensor<B, 2>, Tensor<B, 3>) = (inner(x), inner(w));
    let mut start = 0;
    let mut parts = Vec::new();
    for (g, &count) in counts.iter().enumerate() {
        if count > 0 {
            let rows = x.clone().narrow(0, start, count);
            parts.push(inner::<B, 2>(B::model_matmul(
                primitive(rows),
                primitive(matrix(&w, g, stacked)),
            )));
            start += count;
        }
    }
    primitive(Tensor::cat(parts, 0))
}

/// The gradient of a stack: `x_gᵀ · dy_g` per group (its transpose for a
/// [`Stacked::Transposed`] stack), zero for a group without rows, stacked like the matrices, in
/// the products' dtype (f32 on CUDA, whatever the operands').
pub fn grouped_outer_by_groups<B: MatmulBackend>(
    x: FloatTensor<B>,
    dy: FloatTensor<B>,
    stacked: Stacked,
    counts: &[usize],
) -> FloatTensor<B> {
    let (x, dy): (Tensor<B, 2>, Tensor<B, 2>) = (inner(x), inner(dy));
    let ([_, k], [_, m], device) = (x.dims(), dy.dims(), x.device());
    let shape = match stacked {
        Stacked::AsIs => [k, m],
        Stacked::Transposed => [m, k],
    };
    let mut start = 0;
    let products: Vec<Option<Tensor<B, 2>>> = counts
        .iter()
        .map(|&count| {
            let rows = |t: &Tensor<B, 2>| t.clone().narrow(0, start, count);
            let product = (count > 0).then(|| {
                let (lhs, rhs) = match stacked {
                    Stacked::AsIs => (rows(&x).transpose(), rows(&dy)),
                    Stacked::Transposed => (rows(&dy).transpose(), rows(&x)),
                };
                inner(B::model_matmul(primitive(lhs), primitive(rhs)))
            });
            start += count;
            product
        })
        .collect();
    let dtype = products
        .iter()
        .flatten()
        .next()
        .map_or(x.dtype(), Tensor::dtype);
    let parts = products
        .into_iter()
        .map(|p| p.unwrap_or_else(|| Tensor::zeros(shape, (&device, dtype))))
        .collect();
    primitive(Tensor::stack::<3>(parts, 0))
}

#[derive(Debug)]
struct GroupedBackward;

impl<B: MatmulBackend> Backward<B, 2> for GroupedBackward {
    /// The operands (each kept only if the other needs a gradient), how the stack is read, and
    /// the groups' row counts.
    type State = (Option<NodeId>, Option<NodeId>, Stacked, Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, w, stacked, counts) = ops.state;
        if let Some(node) = &ops.parents[0] {
            let w = ckpt.retrieve_node_output(w.expect("w kept for dx"));
            let dx = B::model_grouped_matmul(grad.clone(), w, stacked.flipped(), &counts);
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = &ops.parents[1] {
            let x = ckpt.retrieve_node_output(x.expect("x kept for dw"));
            let dw = grouped_outer_by_groups::<B>(x, grad, stacked, &counts);
            grads.register::<B>(node.id, dw);
        }
    }
}

/// [`MatmulBackend::model_grouped_matmul`] on the autodiff backend: the inner backend's
/// product, with [`GroupedBackward`].
pub fn autodiff_grouped<B: MatmulBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
    stacked: Stacked,
    counts: &[usize],
) -> FloatTensor<Autodiff<B, C>> {
    let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
    match GroupedBackward
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let x_state = w_tracked.then(|| prep.checkpoint(&x));
            let w_state = x_tracked.then(|| prep.checkpoint(&w));
            prep.finish(
                (x_state, w_state, stacked, counts.to_vec()),
                B::model_grouped_matmul(x.primitive, w.primitive, stacked, counts),
            )
        }
        OpsKind::UnTracked(prep) => prep.finish(B::model_grouped_matmul(
            x.primitive,
            w.primitive,
            stacked,
            counts,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_f64::{B, assert_same, random, tensor};

    /// Each row against its group's matrix, one row at a time: the definition.
    fn by_rows(x: &Tensor<B, 2>, w: &Tensor<B, 3>, counts: &[usize]) -> Tensor<B, 2> {
        let [_, k, m] = w.dims();
        let mut rows = Vec::new();
        let mut r = 0;
        for (g, &count) in counts.iter().enumerate() {
            for _ in 0..count {
                let row = x.clone().narrow(0, r, 1);
                rows.push(row.matmul(w.clone().narrow(0, g, 1).reshape([k, m])));
                r += 1;
            }
        }
        Tensor::cat(rows, 0)
    }

    #[test]
    fn each_group_multiplies_its_own_matrix_and_empty_groups_are_skipped() {
        let counts = [2, 0, 3, 1];
        let x = random([6, 5], 1.0);
        let w = random([4, 5, 3], 1.0);
        let want = by_rows(&x, &w, &counts);
        let got = grouped_matmul(x.clone(), w.clone(), Stacked::AsIs, &counts);
        assert_same(got, want.clone());
        // A stack of [out, in] weights read transposed gives the same.
        let weights = random([4, 3, 5], 1.0);
        let got = grouped_matmul(x.clone(), weights.clone(), Stacked::Transposed, &counts);
        assert_same(got, by_rows(&x, &weights.swap_dims(1, 2), &counts));
        // The matrix of a group without rows does not reach the output.
        let mut values = w.to_data().into_vec::<f64>().unwrap();
        values[15..30].iter_mut().for_each(|v| *v = 1e9);
        let w = tensor(values, [4, 5, 3]);
        assert_same(grouped_matmul(x, w, Stacked::AsIs, &counts), want);
    }

    #[test]
    fn the_written_backward_is_autodiffs_of_the_row_by_row_definition() {
        let counts = [3, 0, 1, 2];
        let upstream = random([6, 4], 1.0);
        for stacked in [Stacked::AsIs, Stacked::Transposed] {
            let x = random([6, 5], 1.0).require_grad();
            // The stack as held ([groups, 5, 4], or [groups, 4, 5] read transposed).
            let stack = match stacked {
                Stacked::AsIs => random([4, 5, 4], 1.0),
                Stacked::Transposed => random([4, 4, 5], 1.0),
            }
            .require_grad();
            let y = grouped_matmul(x.clone(), stack.clone(), stacked, &counts);
            let grads = (y * upstream.clone()).sum().backward();
            let (dx, dstack) = (x.grad(&grads).unwrap(), stack.grad(&grads).unwrap());

            let x2 = x.clone().detach().require_grad();
            let stack2 = stack.clone().detach().require_grad();
            let w2 = match stacked {
                Stacked::AsIs => stack2.clone(),
                Stacked::Transposed => stack2.clone().swap_dims(1, 2),
            };
            let grads = (by_rows(&x2, &w2, &counts) * upstream.clone())
                .sum()
                .backward();
            assert_same(dx, x2.grad(&grads).unwrap());
            assert_same(dstack, stack2.grad(&grads).unwrap());
        }
    }
}
