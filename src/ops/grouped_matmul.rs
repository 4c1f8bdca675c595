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
//! as one cuBLAS grouped call (`backends/cuda/grouped_gemm.rs`). The stack's gradient, whose
//! groups differ in the contracted dimension (which cuBLAS's grouped call gets wrong, that file
//! says how), is a few batched products over zero-padded groups ([`grouped_outer`]).

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Int, Tensor, TensorData};

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
///
/// A few batched products instead of one per group: the groups, largest first, are cut into
/// [`buckets`]; each bucket's rows are gathered into `[groups, rows, ·]` blocks padded to its
/// largest group (the wider operand padded with copies of the group's own first row, the
/// narrower with zeros, so a padded row adds nothing and a NaN stays in its group; an infinity
/// there turns its group's gradient NaN rather than infinite) and
/// multiplied in one [`MatmulBackend::model_matmul`]. Qwen3-30B-A3B's 128 experts route about
/// evenly, so each of its stacks is one call where there were 128.
pub fn grouped_outer<B: MatmulBackend>(
    x: FloatTensor<B>,
    dy: FloatTensor<B>,
    stacked: Stacked,
    counts: &[usize],
) -> FloatTensor<B> {
    let (x, dy): (Tensor<B, 2>, Tensor<B, 2>) = (inner(x), inner(dy));
    let ([n, k], [_, m], device) = (x.dims(), dy.dims(), x.device());
    let shape = match stacked {
        Stacked::AsIs => [k, m],
        Stacked::Transposed => [m, k],
    };
    let buckets = buckets(counts);
    if buckets.is_empty() {
        let [a, b] = shape;
        return primitive(Tensor::<B, 3>::zeros(
            [counts.len(), a, b],
            (&device, x.dtype()),
        ));
    }
    let starts: Vec<usize> = counts
        .iter()
        .scan(0, |start, &c| {
            let here = *start;
            *start += c;
            Some(here)
        })
        .collect();
    // The narrower operand gains one zero row (index n), the padding's partner.
    let zero_x = k <= m;
    let pad = |t: Tensor<B, 2>| {
        let width = t.dims()[1];
        let zeros = Tensor::zeros([1, width], (&device, t.dtype()));
        Tensor::cat(vec![t, zeros], 0)
    };
    let (x, dy) = if zero_x { (pad(x), dy) } else { (x, pad(dy)) };
    let ids = |values: Vec<i64>| {
        let len = values.len();
        Tensor::<B, 1, Int>::from_data(TensorData::new(values, [len]), &device)
    };
    let mut products = Vec::new();
    // Where each group's gradient lands among the products' (`None`: no rows).
    let mut places = vec![None; counts.len()];
    let mut placed = 0;
    for bucket in buckets {
        let rows = counts[bucket[0]];
        let (mut real, mut padded) = (Vec::new(), Vec::new());
        for &g in &bucket {
            places[g] = Some(placed);
            placed += 1;
            for i in 0..rows {
                let row = starts[g] + if i < counts[g] { i } else { 0 };
                real.push(row as i64);
                padded.push(if i < counts[g] { row } else { n } as i64);
            }
        }
        let (x_ids, dy_ids) = if zero_x {
            (padded, real)
        } else {
            (real, padded)
        };
        let groups = bucket.len();
        let xs = x.clone().select(0, ids(x_ids)).reshape([groups, rows, k]);
        let dys = dy.clone().select(0, ids(dy_ids)).reshape([groups, rows, m]);
        let (lhs, rhs) = match stacked {
            Stacked::AsIs => (xs.swap_dims(1, 2), dys),
            Stacked::Transposed => (dys.swap_dims(1, 2), xs),
        };
        products.push(inner::<B, 3>(B::model_matmul(
            primitive(lhs),
            primitive(rhs),
        )));
    }
    if placed < counts.len() {
        let [a, b] = shape;
        products.push(Tensor::zeros([1, a, b], (&device, products[0].dtype())));
    }
    let order: Vec<i64> = places.iter().map(|p| p.unwrap_or(placed) as i64).collect();
    let stack = Tensor::cat(products, 0);
    if order.iter().enumerate().all(|(g, &p)| p == g as i64) {
        return primitive(stack);
    }
    primitive(stack.select(0, ids(order)))
}

/// Rows a bucket may pad beyond a quarter of its real rows (so small groups share a call).
const BUCKET_SLACK_ROWS: usize = 64;

/// The groups with rows, largest first, cut where one more group would pad its bucket (every
/// group to the bucket's first, largest one) to more than 5/4 of its real rows plus
/// [`BUCKET_SLACK_ROWS`]: the padded blocks stay within that of the rows themselves.
fn buckets(counts: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..counts.len()).filter(|&g| counts[g] > 0).collect();
    order.sort_by_key(|&g| std::cmp::Reverse(counts[g]));
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut real = 0;
    for g in order {
        let fits = buckets.last().is_some_and(|bucket| {
            let padded = (bucket.len() + 1) * counts[bucket[0]];
            4 * padded <= 5 * (real + counts[g]) + 4 * BUCKET_SLACK_ROWS
        });
        if fits {
            real += counts[g];
            buckets.last_mut().expect("a bucket").push(g);
        } else {
            real = counts[g];
            buckets.push(vec![g]);
        }
    }
    buckets
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
            let dw = grouped_outer::<B>(x, grad, stacked, &counts);
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
        // One bucket, with an empty group.
        the_backward_matches_the_definition(&[3, 0, 1, 2], 5, 4);
        // Three buckets (300; 120; 9 and 1) and an empty group, both operands the narrower.
        assert_eq!(
            buckets(&[300, 0, 9, 120, 1]),
            [vec![0], vec![3], vec![2, 4]]
        );
        the_backward_matches_the_definition(&[300, 0, 9, 120, 1], 3, 5);
        the_backward_matches_the_definition(&[300, 0, 9, 120, 1], 5, 3);
    }

    fn the_backward_matches_the_definition(counts: &[usize], k: usize, m: usize) {
        let (n, groups) = (counts.iter().sum(), counts.len());
        let upstream = random([n, m], 1.0);
        for stacked in [Stacked::AsIs, Stacked::Transposed] {
            let x = random([n, k], 1.0).require_grad();
            // The stack as held ([groups, k, m], or [groups, m, k] read transposed).
            let stack = match stacked {
                Stacked::AsIs => random([groups, k, m], 1.0),
                Stacked::Transposed => random([groups, m, k], 1.0),
            }
            .require_grad();
            let y = grouped_matmul(x.clone(), stack.clone(), stacked, counts);
            let grads = (y * upstream.clone()).sum().backward();
            let (dx, dstack) = (x.grad(&grads).unwrap(), stack.grad(&grads).unwrap());

            let x2 = x.clone().detach().require_grad();
            let stack2 = stack.clone().detach().require_grad();
            let w2 = match stacked {
                Stacked::AsIs => stack2.clone(),
                Stacked::Transposed => stack2.clone().swap_dims(1, 2),
            };
            let grads = (by_rows(&x2, &w2, counts) * upstream.clone())
                .sum()
                .backward();
            assert_same(dx, x2.grad(&grads).unwrap());
            assert_same(dstack, stack2.grad(&grads).unwrap());
        }
    }

    #[test]
    fn buckets_pad_at_most_a_quarter_more_rows_than_they_hold() {
        // Even routing: one bucket. Skewed routing: several, each within its bound.
        let even: Vec<usize> = (0..128).map(|g| 500 + (g * 37) % 60).collect();
        assert_eq!(buckets(&even).len(), 1);
        let skewed: Vec<usize> = (0..64).map(|g| 4000 >> (g % 12)).collect();
        let cut = buckets(&skewed);
        assert!(cut.len() > 1 && cut.len() < 20, "{cut:?}");
        let mut seen: Vec<usize> = cut.concat();
        seen.sort();
        assert_eq!(seen, (0..64).collect::<Vec<_>>());
        for bucket in cut {
            let padded = bucket.len() * skewed[bucket[0]];
            let real: usize = bucket.iter().map(|&g| skewed[g]).sum();
            assert!(4 * padded <= 5 * real + 4 * BUCKET_SLACK_ROWS, "{bucket:?}");
        }
    }
}
