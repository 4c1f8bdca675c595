//! SwiGLU, RMSNorm and the cross-entropy loss, each one autodiff op whose backward is written
//! out, so a fusing backend runs each pass as one or two kernels instead of Burn's op-by-op chain
//! (at 8B, the MLP's element-wise backward was ~7 passes over `[tokens, 14336]` f32 per layer;
//! the loss, ~10 passes over each `[2048, 128256]` slice of logits).
//!
//! ```text
//! swiglu:   y = silu(g) ⊙ u,  σ = sigmoid(g)
//!           du = dy ⊙ g ⊙ σ          dg = dy ⊙ u ⊙ σ ⊙ (1 + g ⊙ (1 − σ))
//! geglu:    y = gelu(g) ⊙ u,  gelu(g) = g/2 (1 + t),  t = tanh(c (g + 0.044715 g³)),  c = √(2/π)
//!           du = dy ⊙ gelu(g)        dg = dy ⊙ u ⊙ ((1 + t)/2 + g/2 (1 − t²) c (1 + 3·0.044715 g²))
//! rms_norm: y = x / r ⊙ w,  r = √(mean(x²) + ε)  (over the last dimension)
//!           dx = (a − x ⊙ mean(a ⊙ x) / r²) / r,  a = dy ⊙ w        dw = Σ_rows dy ⊙ x / r
//! cross_entropy: loss = Σ_r w_r (lse_r − x_r[t_r]),  lse_r = log Σ_j exp(x_rj)
//!           dx_rj = dloss · w_r (exp(x_rj − lse_r) − [j = t_r])
//! ```
//!
//! SwiGLU and RMSNorm take the dtype their consumer's GEMM reads (`Some(bf16)` for a bf16 base),
//! so the cast happens inside the same pass. SwiGLU's input gradients can come back in bf16 too:
//! the gate and up GEMMs read them so. Everything else is computed in the inputs' dtype (f32, or f64
//! in the gradient checks).

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::IndexingUpdateOp;
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, FloatDType, Int, Tensor};

use super::matmul::{MatmulBackend, matmul};
use super::primitive::{inner, primitive};

/// The activation of a gated MLP's gate: `down(act(gate(x)) ⊙ up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `g · sigmoid(g)` (SwiGLU: Llama, Mistral, Qwen).
    Silu,
    /// Gelu with the tanh approximation (GeGLU: Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// `act(gate) ⊙ up` for either activation (see [`ElementwiseBackend::swiglu`]).
pub fn gated<B: ElementwiseBackend, const D: usize>(
    activation: Activation,
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
    dtype: Option<FloatDType>,
    grad_dtype: Option<FloatDType>,
) -> Tensor<B, D> {
    match activation {
        Activation::Silu => B::swiglu(gate, up, dtype, grad_dtype),
        Activation::GeluTanh => B::geglu(gate, up, dtype, grad_dtype),
    }
}

/// Backends that run SwiGLU, RMSNorm and the cross-entropy loss; the defaults are Burn's ops,
/// which a backend overrides with its own kernels or host passes.
pub trait ElementwiseBackend: MatmulBackend {
    /// `silu(gate) ⊙ up`, in `dtype` when given; under autodiff the gradients of `gate` and
    /// `up` come back in `grad_dtype` when given.
    fn swiglu<const D: usize>(
        gate: Tensor<Self, D>,
        up: Tensor<Self, D>,
        dtype: Option<FloatDType>,
        _grad_dtype: Option<FloatDType>,
    ) -> Tensor<Self, D> {
        swiglu_ops(gate, up, dtype)
    }

    /// `[d gate, d up]` of [`ElementwiseBackend::swiglu`] from its output's gradient `dy`, in
    /// `dtype` when given; each only when `wanted`.
    fn swiglu_backward<const D: usize>(
        gate: Tensor<Self, D>,
        up: Tensor<Self, D>,
        dy: Tensor<Self, D>,
        wanted: [bool; 2],
        dtype: Option<FloatDType>,
    ) -> [Option<Tensor<Self, D>>; 2] {
        swiglu_backward_ops(gate, up, dy, wanted, dtype)
    }

    /// `gelu_tanh(gate) ⊙ up`, as [`ElementwiseBackend::swiglu`] (Burn's ops on every backend
    /// for now).
    fn geglu<const D: usize>(
        gate: Tensor<Self, D>,
        up: Tensor<Self, D>,
        dtype: Option<FloatDType>,
        _grad_dtype: Option<FloatDType>,
    ) -> Tensor<Self, D> {
        cast(gelu_tanh(gate).0 * up, dtype)
    }

    /// `[d gate, d up]` of [`ElementwiseBackend::geglu`], as
    /// [`ElementwiseBackend::swiglu_backward`].
    fn geglu_backward<const D: usize>(
        gate: Tensor<Self, D>,
        up: Tensor<Self, D>,
        dy: Tensor<Self, D>,
        [want_gate, want_up]: [bool; 2],
        dtype: Option<FloatDType>,
    ) -> [Option<Tensor<Self, D>>; 2] {
        let (gelu, t) = gelu_tanh(gate.clone());
        let du = want_up.then(|| cast(dy.clone() * gelu, dtype));
        let dg = want_gate.then(|| {
            let g2 = gate.clone().square();
            let inner = g2
                .mul_scalar(3.0 * GELU_CUBIC)
                .add_scalar(1.0)
                .mul_scalar(GELU_C);
            let slope = t.clone().add_scalar(1.0).mul_scalar(0.5)
                + gate.mul_scalar(0.5) * t.square().neg().add_scalar(1.0) * inner;
            cast(dy * up * slope, dtype)
        });
        [dg, du]
    }

    /// `x` normalised over its last dimension and scaled by `weight`, in `dtype` when given.
    fn rms_norm<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        eps: f64,
        dtype: Option<FloatDType>,
    ) -> Tensor<Self, D> {
        let rms = rms(x.clone(), eps);
        cast(x.div(rms) * weight.unsqueeze::<D>(), dtype)
    }

    /// `dx` of [`ElementwiseBackend::rms_norm`] given its output's gradient `dy` (in `x`'s
    /// dtype).
    fn rms_norm_input_grad<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        dy: Tensor<Self, D>,
        eps: f64,
    ) -> Tensor<Self, D> {
        rms_norm_input_grad_ops(x, weight, dy, eps)
    }

    /// `Σ_r weights_r · (logsumexp(logits_r) − logits_r[targets_r])` for `logits`
    /// `[rows, vocab]`, `targets` and `weights` `[rows, 1]` → `[1]`. Under autodiff the logits'
    /// gradient comes back in `grad_dtype` when given (the head GEMM's input dtype).
    fn cross_entropy(
        logits: Tensor<Self, 2>,
        targets: Tensor<Self, 2, Int>,
        weights: Tensor<Self, 2>,
        _grad_dtype: Option<FloatDType>,
    ) -> Tensor<Self, 1> {
        let lse = Self::logsumexp(logits.clone());
        weighted_nll(logits, lse, targets, weights)
    }

    /// `log Σ_j exp(x_rj)` per row of `[rows, n]` → `[rows, 1]`.
    fn logsumexp(x: Tensor<Self, 2>) -> Tensor<Self, 2> {
        logsumexp_ops(x)
    }

    /// The logits' gradient of [`ElementwiseBackend::cross_entropy`],
    /// `s_r · (exp(x_rj − lse_r) − [j = t_r])`, from the logits, their rows' log-sum-exp, the
    /// targets and each row's scale `s_r` (dloss · w_r), in `dtype` when given.
    fn cross_entropy_backward(
        logits: Tensor<Self, 2>,
        lse: Tensor<Self, 2>,
        targets: Tensor<Self, 2, Int>,
        row_scale: Tensor<Self, 2>,
        dtype: Option<FloatDType>,
    ) -> Tensor<Self, 2> {
        cross_entropy_backward_ops(logits, lse, targets, row_scale, dtype)
    }
}

/// √(2/π), gelu's tanh approximation's factor.
const GELU_C: f64 = 0.797_884_560_802_865_4;
/// The cubic term's weight in gelu's tanh approximation.
const GELU_CUBIC: f64 = 0.044715;

/// `(gelu_tanh(g), t)` with `t = tanh(c (g + 0.044715 g³))`, as PyTorch's `gelu(approximate="tanh")`.
fn gelu_tanh<B: Backend, const D: usize>(g: Tensor<B, D>) -> (Tensor<B, D>, Tensor<B, D>) {
    let cube = g.clone().powi_scalar(3).mul_scalar(GELU_CUBIC);
    let t = (g.clone() + cube).mul_scalar(GELU_C).tanh();
    (g.mul_scalar(0.5) * t.clone().add_scalar(1.0), t)
}

/// `dtype`, or f32 when none is given (a 16-bit base's GEMM dtype, or the activations' own).
pub fn dtype_or_f32(dtype: Option<FloatDType>) -> DType {
    dtype.map_or(DType::F32, DType::from)
}

/// `x` in `dtype` when given (and not already in it).
pub fn cast<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    dtype: Option<FloatDType>,
) -> Tensor<B, D> {
    match dtype {
        Some(dtype) if x.dtype() != dtype.into() => x.cast(dtype),
        _ => x,
    }
}

/// `√(mean(x²) + ε)` over the last dimension, kept as a size-1 dimension. Divided by, not
/// inverted: NdArray's f32 `recip` is an approximate SIMD reciprocal (Qwen3's logits moved 4e-4).
fn rms<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    x.square().mean_dim(D - 1).add_scalar(eps).sqrt()
}

/// `Σ_r w_r (lse_r − x_r[t_r])`: the loss given each row's log-sum-exp.
fn weighted_nll<B: Backend>(
    x: Tensor<B, 2>,
    lse: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
    weights: Tensor<B, 2>,
) -> Tensor<B, 1> {
    ((lse - x.gather(1, targets)) * weights).sum()
}

/// `log Σ_j exp(x_rj)` per row of `[rows, n]` → `[rows, 1]`, shifted by the row's max.
pub fn logsumexp_ops<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let max = x.clone().max_dim(1);
    (x - max.clone()).exp().sum_dim(1).log() + max
}

/// [`ElementwiseBackend::cross_entropy_backward`] in Burn ops. The one-hot part only touches
/// the targets (a scatter of `rows` values), so the pass over the logits is a single fused
/// element-wise kernel where the backend fuses, and it writes the dtype the head's GEMM reads.
pub fn cross_entropy_backward_ops<B: Backend>(
    logits: Tensor<B, 2>,
    lse: Tensor<B, 2>,
    targets: Tensor<B, 2, Int>,
    row_scale: Tensor<B, 2>,
    dtype: Option<FloatDType>,
) -> Tensor<B, 2> {
    let dx = cast((logits - lse).exp() * row_scale.clone(), dtype);
    dx.scatter(
        1,
        targets,
        cast(row_scale.neg(), dtype),
        IndexingUpdateOp::Add,
    )
}

/// [`ElementwiseBackend::rms_norm_input_grad`] in Burn's ops.
pub fn rms_norm_input_grad_ops<B: MatmulBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    dy: Tensor<B, D>,
    eps: f64,
) -> Tensor<B, D> {
    let features = weight.dims()[0];
    let rms = rms(x.clone(), eps);
    // mean(a ⊙ x) = ((dy ⊙ x) · w) / features, a matrix-vector product: as a reduction whose
    // input broadcasts w, Burn's fusion ran it on 64 blocks (1.3 ms a call at Llama 3.2 1B's
    // shape, 20x its bandwidth bound).
    let mut row_shape = x.dims();
    row_shape[D - 1] = 1;
    let mean_ax = matmul(
        (dy.clone() * x.clone()).reshape([-1, features as i32]),
        weight.clone().reshape([features, 1]),
    )
    .reshape(row_shape)
    .div_scalar(features as f64);
    let a = dy * weight.unsqueeze::<D>();
    (a - x * mean_ax.div(rms.clone().square())).div(rms)
}

#[derive(Debug)]
struct GatedBackward<const D: usize>(Activation);

impl<B: ElementwiseBackend, const D: usize> Backward<B, 2> for GatedBackward<D> {
    /// gate, up, and the dtype of the gradients handed back.
    type State = (NodeId, NodeId, Option<FloatDType>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let (gate, up, dtype) = ops.state;
        let gate: Tensor<B, D> = inner(ckpt.retrieve_node_output(gate));
        let up: Tensor<B, D> = inner(ckpt.retrieve_node_output(up));
        let dy: Tensor<B, D> = inner(grads.consume::<B>(&ops.node));
        let dy = cast(dy, Some(gate.dtype().into()));
        let wanted = ops.parents.each_ref().map(Option::is_some);
        let gradients = match self.0 {
            Activation::Silu => B::swiglu_backward(gate, up, dy, wanted, dtype),
            Activation::GeluTanh => B::geglu_backward(gate, up, dy, wanted, dtype),
        };
        for (node, grad) in ops.parents.into_iter().zip(gradients) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, primitive(grad));
            }
        }
    }
}

/// [`ElementwiseBackend::swiglu`] in Burn's ops.
pub fn swiglu_ops<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
    dtype: Option<FloatDType>,
) -> Tensor<B, D> {
    cast(silu(gate) * up, dtype)
}

/// [`ElementwiseBackend::swiglu_backward`] in Burn's ops, σ recomputed from the gate.
pub fn swiglu_backward_ops<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
    dy: Tensor<B, D>,
    [want_gate, want_up]: [bool; 2],
    dtype: Option<FloatDType>,
) -> [Option<Tensor<B, D>>; 2] {
    let s = sigmoid(gate.clone());
    let du = want_up.then(|| cast(dy.clone() * gate.clone() * s.clone(), dtype));
    let dg = want_gate.then(|| {
        let slope = (gate * s.clone().neg().add_scalar(1.0)).add_scalar(1.0);
        cast(dy * up * s * slope, dtype)
    });
    [dg, du]
}

#[derive(Debug)]
struct RmsNormBackward<const D: usize>;

impl<B: ElementwiseBackend, const D: usize> Backward<B, 2> for RmsNormBackward<D> {
    /// x, the weight, and ε.
    type State = (NodeId, NodeId, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let (x, weight, eps) = ops.state;
        let x: Tensor<B, D> = inner(ckpt.retrieve_node_output(x));
        let weight: Tensor<B, 1> = inner(ckpt.retrieve_node_output(weight));
        let dy: Tensor<B, D> = inner(grads.consume::<B>(&ops.node));
        let dy = cast(dy, Some(x.dtype().into()));
        let [x_node, weight_node] = ops.parents;
        if let Some(node) = weight_node {
            let features = weight.dims()[0];
            let dw = (dy.clone() * x.clone().div(rms(x.clone(), eps)))
                .reshape([-1, features as i32])
                .sum_dim(0)
                .reshape([features]);
            grads.register::<B>(node.id, primitive(dw));
        }
        if let Some(node) = x_node {
            let dx = B::rms_norm_input_grad(x, weight, dy, eps);
            grads.register::<B>(node.id, primitive(dx));
        }
    }
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: ElementwiseBackend> Backward<B, 1> for CrossEntropyBackward {
    /// The logits, the targets, the weights, each row's log-sum-exp (`[rows, 1]`) and the
    /// gradient's dtype.
    type State = (
        NodeId,
        IntTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        Option<FloatDType>,
    );

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, ckpt: &mut Checkpointer) {
        let (logits, targets, weights, lse, dtype) = ops.state;
        let [Some(node)] = ops.parents else {
            return;
        };
        let logits: Tensor<B, 2> = inner(ckpt.retrieve_node_output(logits));
        let targets = Tensor::<B, 2, Int>::from_primitive(targets);
        let scale: Tensor<B, 1> = inner(grads.consume::<B>(&ops.node));
        // dloss · w_r, per row.
        let row_scale = inner::<B, 2>(weights) * scale.unsqueeze::<2>();
        let dx = B::cross_entropy_backward(logits, inner(lse), targets, row_scale, dtype);
        grads.register::<B>(node.id, primitive(dx));
    }
}

/// [`gated`] as one autodiff op of gate and up, whose backward is [`GatedBackward`].
fn tracked_gated<B: ElementwiseBackend, C: CheckpointStrategy, const D: usize>(
    activation: Activation,
    gate: Tensor<Autodiff<B, C>, D>,
    up: Tensor<Autodiff<B, C>, D>,
    dtype: Option<FloatDType>,
    grad_dtype: Option<FloatDType>,
) -> Tensor<Autodiff<B, C>, D> {
    inner(two_input_op::<B, C, _, _>(
        GatedBackward::<D>(activation),
        [primitive(gate), primitive(up)],
        grad_dtype,
        |gate, up| {
            primitive(gated::<B, D>(
                activation,
                inner(gate),
                inner(up),
                dtype,
                None,
            ))
        },
    ))
}

/// The backward passes recompute σ and r from the kept inputs (one more read of a tensor the
/// pass reads anyway) rather than keep them. Activation checkpointing is per block
/// (`train/recompute.rs`), so Burn's own recompute strategies are not used here.
impl<B: ElementwiseBackend, C: CheckpointStrategy> ElementwiseBackend for Autodiff<B, C> {
    fn swiglu<const D: usize>(
        gate: Tensor<Self, D>,
        up: Tensor<Self, D>,
        dtype: Option<FloatDType>,
        grad_dtype: Option<FloatDType>,
    ) -> Tensor<Self, D> {
        tracked_gated::<B, C, D>(Activation::Silu, gate, up, dtype, grad_dtype)
    }

    fn geglu<const D: usize>(
        gate: Tensor<Self, D>,
        up: Tensor<Self, D>,
        dtype: Option<FloatDType>,
        grad_dtype: Option<FloatDType>,
    ) -> Tensor<Self, D> {
        tracked_gated::<B, C, D>(Activation::GeluTanh, gate, up, dtype, grad_dtype)
    }

    fn cross_entropy(
        logits: Tensor<Self, 2>,
        targets: Tensor<Self, 2, Int>,
        weights: Tensor<Self, 2>,
        grad_dtype: Option<FloatDType>,
    ) -> Tensor<Self, 1> {
        let logits = primitive(logits);
        let targets = targets.inner();
        let weights = weights.inner();
        let loss = |x, lse| primitive(weighted_nll(x, lse, targets.clone(), weights.clone()));
        let out = match CrossEntropyBackward
            .prepare::<C>([logits.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x = inner::<B, 2>(logits.primitive.clone());
                let lse = B::logsumexp(x.clone());
                let state = (
                    prep.checkpoint(&logits),
                    targets.clone().into_primitive(),
                    primitive(weights.clone()),
                    primitive(lse.clone()),
                    grad_dtype,
                );
                prep.finish(state, loss(x, lse))
            }
            OpsKind::UnTracked(prep) => {
                let x = inner::<B, 2>(logits.primitive);
                prep.finish(loss(x.clone(), B::logsumexp(x)))
            }
        };
        inner(out)
    }

    fn rms_norm<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        eps: f64,
        dtype: Option<FloatDType>,
    ) -> Tensor<Self, D> {
        inner(two_input_op::<B, C, _, _>(
            RmsNormBackward::<D>,
            [primitive(x), primitive(weight)],
            eps,
            |x, weight| primitive(B::rms_norm::<D>(inner(x), inner(weight), eps, dtype)),
        ))
    }
}

/// `forward(a, b)` as one autodiff op whose backward, `op`, gets both inputs back and `extra`.
fn two_input_op<B, C, O, X>(
    op: O,
    [a, b]: [FloatTensor<Autodiff<B, C>>; 2],
    extra: X,
    forward: impl FnOnce(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>>
where
    B: Backend,
    C: CheckpointStrategy,
    O: Backward<B, 2, State = (NodeId, NodeId, X)>,
    X: Clone + Send + std::fmt::Debug + 'static,
{
    match op
        .prepare::<C>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (prep.checkpoint(&a), prep.checkpoint(&b), extra);
            prep.finish(state, forward(a.primitive, b.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(a.primitive, b.primitive)),
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Int, Tensor, TensorData};

    use super::{Activation, ElementwiseBackend};
    use crate::ops::test_f64::{B, assert_same, random, tensor};

    /// The written-out backward against Burn's own differentiation of the same forward math, on
    /// random inputs and a random upstream gradient.
    #[test]
    fn gated_activations_gradients_match_burns_autodiff() {
        let (gate, up, dy) = (
            random([2, 3, 5], 2.0),
            random([2, 3, 5], 2.0),
            random([2, 3, 5], 2.0),
        );
        for activation in [Activation::Silu, Activation::GeluTanh] {
            let grads_of = |fused: bool| {
                let (g, u) = (gate.clone().require_grad(), up.clone().require_grad());
                let y = if fused {
                    super::gated(activation, g.clone(), u.clone(), None, None)
                } else if activation == Activation::Silu {
                    burn::tensor::activation::silu(g.clone()) * u.clone()
                } else {
                    // PyTorch's formula, differentiated by Burn.
                    let x = g.clone();
                    let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715))
                        .mul_scalar((2.0 / std::f64::consts::PI).sqrt());
                    x.mul_scalar(0.5) * inner.tanh().add_scalar(1.0) * u.clone()
                };
                let grads = (y * dy.clone()).sum().backward();
                [g.grad(&grads).unwrap(), u.grad(&grads).unwrap()]
            };
            for (ours, burns) in grads_of(true).into_iter().zip(grads_of(false)) {
                assert_same(ours, burns);
            }
        }
    }

    /// gelu_tanh against PyTorch's `gelu(x, approximate="tanh")` at a few points (torch 2.11,
    /// float64).
    #[test]
    fn gelu_tanh_matches_pytorch() {
        let x = tensor(vec![-3.0, -1.0, -0.1, 0.0, 0.5, 2.0], [6]);
        let torch = [
            -0.0036373920817729943,
            -0.15880800939172324,
            -0.04601724895456484,
            0.0,
            0.34571400982514394,
            1.954597694087775,
        ];
        let got: Vec<f64> = super::gelu_tanh(x).0.into_data().into_vec().unwrap();
        for (g, w) in got.iter().zip(torch) {
            assert!((g - w).abs() < 1e-14, "{got:?} vs {torch:?}");
        }
    }

    #[test]
    fn cross_entropy_value_and_gradient_match_burns_autodiff() {
        let device = Default::default();
        let logits = random([6, 11], 3.0);
        let ids = [3i64, 0, 10, 7, 7, 1];
        let targets =
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [6, 1]), &device);
        let w = [0.5, 0.0, 0.25, 1.0, 0.125, 0.5];
        let weights = tensor(w.to_vec(), [6, 1]);
        let run = |fused: bool| {
            let x = logits.clone().require_grad();
            let loss = if fused {
                B::cross_entropy(x.clone(), targets.clone(), weights.clone(), None)
            } else {
                let picked = log_softmax(x.clone(), 1).gather(1, targets.clone());
                (picked * weights.clone()).sum().neg()
            };
            let grads = loss.clone().mul_scalar(1.5).backward();
            (loss, x.grad(&grads).unwrap())
        };
        let ((loss, grad), (want_loss, want_grad)) = (run(true), run(false));
        assert_same(loss, want_loss);
        assert_same(grad, want_grad);
    }

    #[test]
    fn rms_norm_gradients_match_burns_autodiff() {
        let (x, w, dy) = (
            random([2, 2, 3, 8], 1.5),
            random([8], 1.5),
            random([2, 2, 3, 8], 1.5),
        );
        let eps = 1e-5;
        let grads_of = |fused: bool| {
            let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
            let y = if fused {
                B::rms_norm(x.clone(), w.clone(), eps, None)
            } else {
                let rms = x.clone().square().mean_dim(3).add_scalar(eps).sqrt();
                x.clone().div(rms) * w.clone().unsqueeze::<4>()
            };
            let grads = (y * dy.clone()).sum().backward();
            (x.grad(&grads).unwrap(), w.grad(&grads).unwrap())
        };
        let (ours, burns) = (grads_of(true), grads_of(false));
        assert_same(ours.0, burns.0);
        assert_same(ours.1, burns.1);
    }
}
