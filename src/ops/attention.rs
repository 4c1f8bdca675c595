//! Scaled dot-product attention, a slice of queries at a time, with its own backward.
//!
//! The naive form materialises `[batch, heads, seq, seq]` scores, probabilities and their
//! gradients, and autodiff keeps them: 4.3 GB each at llama3.2-1b / batch 8 / seq 2048 in f32.
//! Here (flash attention's algorithm, at the granularity of a query slice rather than of a
//! kernel's tile):
//!
//! ```text
//! forward, per query slice c (keys 0..end(c): a causal query never sees later keys):
//!     S = (Q_c · scale) Kᵀ + mask_c      P = softmax(S)        O_c = P V
//!     (mask_c: the slice's additive mask, built from the [`Visibility`] rule)
//!     keep only O and lse_c = log Σ exp S  (per query)
//! backward, per slice, recomputing P = exp(S − lse_c):
//!     dV += Pᵀ dO_c          dP = dO_c Vᵀ          D_c = rowsum(dO_c ⊙ O_c)
//!     dS = P ⊙ (dP − D_c)          dQ_c = (dS K) · scale          dK += (dSᵀ Q_c) · scale
//! ```
//!
//! Gemma 2's soft-cap replaces the scores by `S = cap · tanh(S₀ / cap)` (`S₀ = (Q_c · scale) Kᵀ`),
//! before the mask; the backward then multiplies `dS` by `dS/dS₀ = 1 − (S / cap)²`.
//!
//! Memory grows with `seq × slice` instead of `seq²`, and a causal mask skips the keys after a
//! slice's last query (about 40% of the score FLOPs at 4 slices). The products go through
//! [`MatmulBackend::model_matmul`] (cuBLAS on CUDA).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, activation};

use super::matmul::{MatmulBackend, matmul};
use super::primitive::{inner, primitive};
use super::visibility::Visibility;

/// Scores per slice: 2²⁶ f32 values are 256 MiB. Smaller slices also skip more of the causal
/// mask's empty upper triangle (n slices compute (n+1)/2n of the scores).
const MAX_SLICE_ELEMENTS: usize = 1 << 26;

/// How `Q Kᵀ` becomes the scores the softmax sees: multiplied by `scale`, then soft-capped when
/// `softcap` is set (Gemma 2: `cap · tanh(s / cap)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// The factor `Q Kᵀ` is multiplied by (`1/√head_dim`, or Gemma's `1/√query_pre_attn_scalar`).
    pub scale: f64,
    /// Gemma 2's soft-cap of the scaled scores.
    pub softcap: Option<f64>,
}

impl Scores {
    /// `scale`, without a soft-cap.
    pub fn scaled(scale: f64) -> Self {
        Scores {
            scale,
            softcap: None,
        }
    }
}

/// Whether a backend's fused kernel covers a call over `keys` keys: every kernel applies the
/// causal and packed rules; a soft-cap, or a sliding window that hides some of the keys (one at
/// least as long as the keys hides none: Mistral's 4096 at a 2048-token row), only kernels that
/// take them ([`AttentionBackend::KERNELS_TAKE_WINDOW_AND_SOFTCAP`]); others take the sliced
/// form. Rows with first keys after a cache (a padded batch decoding) always take it: the
/// kernels read first keys only for packed training rows, which have no cache.
pub fn kernel_covers<B: AttentionBackend>(
    visibility: &Visibility<B>,
    scores: Scores,
    keys: usize,
) -> bool {
    let rows_fit = visibility.starts.is_none() || visibility.past == 0;
    rows_fit
        && (B::KERNELS_TAKE_WINDOW_AND_SOFTCAP
            || (visibility.window.is_none_or(|w| w >= keys) && scores.softcap.is_none()))
}

/// Backends that run the model's attention: the defaults are the sliced forms in Burn's ops;
/// a backend overrides them with a fused kernel or faster passes of its own.
pub trait AttentionBackend: MatmulBackend {
    /// Whether the fused kernels apply a sliding window and Gemma 2's soft-cap themselves.
    const KERNELS_TAKE_WINDOW_AND_SOFTCAP: bool = false;

    /// `q`: `[batch, heads, seq, d]`; `k`, `v`: `[batch, heads, past + seq, d]` (fewer heads,
    /// dividing `heads`, where [`AttentionBackend::fused_attention`]); which keys each query
    /// sees: `visibility` → `[batch, heads, seq, d]`.
    fn model_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        visibility: &Visibility<Self>,
        scores: Scores,
    ) -> FloatTensor<Self> {
        primitive(Self::attention_forward(inner(q), inner(k), inner(v), visibility, scores).0)
    }

    /// Whether [`AttentionBackend::attention_forward`] and `attention_backward` are a fused
    /// kernel for this head dimension on this device (then autodiff always takes them, at any
    /// size).
    fn fused_attention(_head_dim: usize, _device: &Self::Device) -> bool {
        false
    }

    /// The output and each query's log-sum-exp of its scores (`[batch, heads, seq, 1]`), what
    /// [`AttentionBackend::attention_backward`] recomputes from. By default the sliced form.
    fn attention_forward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        visibility: &Visibility<Self>,
        scores: Scores,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>) {
        sliced_forward(q, k, v, visibility, scores)
    }

    /// `(dQ, dK, dV)` from `dO`. By default the sliced form.
    fn attention_backward(
        saved: Saved<Self>,
        d_out: Tensor<Self, 4>,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        sliced_backward(saved, d_out)
    }

    /// The plain form's softmax of the scores over the keys (the last dimension).
    fn attention_softmax(scores: Tensor<Self, 4>) -> Tensor<Self, 4> {
        activation::softmax(scores, 3)
    }

    /// The scores' gradient `P ⊙ (dP − rowsum(dP ⊙ P))` from the probabilities and theirs.
    fn attention_softmax_backward(p: Tensor<Self, 4>, dp: Tensor<Self, 4>) -> Tensor<Self, 4> {
        softmax_backward_ops(p, dp)
    }
}

/// [`AttentionBackend::attention_softmax_backward`] in Burn's ops.
pub fn softmax_backward_ops<B: burn::tensor::backend::Backend>(
    p: Tensor<B, 4>,
    dp: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let dot = (dp.clone() * p.clone()).sum_dim(3);
    p * (dp - dot)
}

/// The default [`AttentionBackend::attention_forward`]: in slices of at most
/// [`MAX_SLICE_ELEMENTS`] scores.
pub fn sliced_forward<B: MatmulBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    visibility: &Visibility<B>,
    scores: Scores,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let slice = slice_len(&q, &k);
    forward(q, k, v, visibility, scores, slice)
}

/// The default [`AttentionBackend::attention_backward`].
pub fn sliced_backward<B: MatmulBackend>(
    saved: Saved<B>,
    d_out: Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let slice = slice_len(&saved.q, &saved.k);
    backward(saved, d_out, slice)
}

/// [`AttentionBackend::model_attention`] on tensors. `k` and `v` may have fewer heads than `q`
/// (grouped-query attention: `[batch, kv_heads, keys, d]`, kv head `h / (heads / kv_heads)`
/// serving query head `h`): a fused kernel reads them as they are, the other forms get them
/// repeated to every query head.
pub fn attention<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    visibility: &Visibility<B>,
    scores: Scores,
) -> Tensor<B, 4> {
    let [_, heads, _, d] = q.dims();
    let group = heads / k.dims()[1];
    let covered = kernel_covers(visibility, scores, k.dims()[2]);
    let (k, v) = if B::fused_attention(d, &q.device()) && covered {
        (k, v)
    } else {
        (repeat_kv(k, group), repeat_kv(v, group))
    };
    inner(B::model_attention(
        primitive(q),
        primitive(k),
        primitive(v),
        visibility,
        scores,
    ))
}

/// `[batch, kv_heads, len, d]` → `[batch, kv_heads * group, len, d]`, each kv head repeated for
/// the `group` query heads that share it: a broadcast view made contiguous, one copy (Burn's
/// `repeat_dim` zero-filled the whole result first, then copied each repeat into it: 12.8% of
/// a CPU batch of 8 decoding 192 tokens, bench/NOTES.md session 30).
pub fn repeat_kv<B: burn::tensor::backend::Backend>(x: Tensor<B, 4>, group: usize) -> Tensor<B, 4> {
    if group == 1 {
        return x;
    }
    let [b, h, len, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, h, group, len, d])
        .reshape([b, h * group, len, d])
}

/// Queries per slice, so a slice's scores stay under [`MAX_SLICE_ELEMENTS`].
fn slice_len<B: burn::tensor::backend::Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>) -> usize {
    let (q, k) = (q.dims(), k.dims());
    let per_query = (q[0] * q[1] * k[2]).max(1);
    (MAX_SLICE_ELEMENTS / per_query).max(64).min(q[2]).max(1)
}

/// The query slices `c0..c1` with the keys each needs, `0..past + c1`.
fn slices(seq: usize, keys: usize, slice: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let past = keys - seq;
    (0..seq).step_by(slice).map(move |c0| {
        let c1 = (c0 + slice).min(seq);
        (c0, c1, past + c1)
    })
}

/// `S = (Q_c · scale) K[..end]ᵀ + mask_c` for one slice (scaling the `d`-wide queries rather
/// than the `end`-wide scores), soft-capped before the mask where asked; with a soft-cap, also
/// `tanh(S₀ / cap)`, from which the backward's `1 − t²` comes.
fn scores<B: MatmulBackend>(
    q: &Tensor<B, 4>,
    k: &Tensor<B, 4>,
    visibility: &Visibility<B>,
    (c0, c1, end): (usize, usize, usize),
    scores: Scores,
) -> (Tensor<B, 4>, Option<Tensor<B, 4>>) {
    let qc = q.clone().narrow(2, c0, c1 - c0);
    let kc = k.clone().narrow(2, 0, end);
    let mc = visibility.additive(c0..c1, end, q.dtype(), &q.device());
    let (s, t) = softcapped(
        matmul(qc.mul_scalar(scores.scale), kc.swap_dims(2, 3)),
        scores,
    );
    (s + mc, t)
}

/// `cap · tanh(s / cap)` and the `tanh` when soft-capped; `s` as it is otherwise.
fn softcapped<B: burn::tensor::backend::Backend>(
    s: Tensor<B, 4>,
    scores: Scores,
) -> (Tensor<B, 4>, Option<Tensor<B, 4>>) {
    match scores.softcap {
        Some(cap) => {
            let t = s.div_scalar(cap).tanh();
            (t.clone().mul_scalar(cap), Some(t))
        }
        None => (s, None),
    }
}

/// The output and the log-sum-exp of each query's scores (`[batch, heads, seq, 1]`).
fn forward<B: MatmulBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    visibility: &Visibility<B>,
    scores_rule: Scores,
    slice: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [_, _, seq, _] = q.dims();
    let keys = k.dims()[2];
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for range in slices(seq, keys, slice) {
        let (s, _) = scores(&q, &k, visibility, range, scores_rule);
        let max = s.clone().max_dim(3);
        let e = (s - max.clone()).exp();
        let sum = e.clone().sum_dim(3);
        outs.push(matmul(e, v.clone().narrow(2, 0, range.2)) / sum.clone());
        lses.push(max + sum.log());
    }
    (Tensor::cat(outs, 2), Tensor::cat(lses, 2))
}

/// What the backward pass recomputes from.
#[derive(Debug, Clone)]
pub struct Saved<B: burn::tensor::backend::Backend> {
    /// The queries, `[batch, heads, seq, d]`.
    pub q: Tensor<B, 4>,
    /// The keys, `[batch, heads, past + seq, d]` (`kv_heads` heads where the kernel is fused).
    pub k: Tensor<B, 4>,
    /// The values, shaped as `k`.
    pub v: Tensor<B, 4>,
    /// Which keys each query sees.
    pub visibility: Visibility<B>,
    /// The forward's output `O`, `[batch, heads, seq, d]` (for `D = rowsum(dO ⊙ O)`).
    pub out: Tensor<B, 4>,
    /// `[batch, heads, seq, 1]`
    pub lse: Tensor<B, 4>,
    /// How `Q Kᵀ` became the scores.
    pub scores: Scores,
}

/// `(dQ, dK, dV)` from `dO`, `slice` queries at a time.
fn backward<B: MatmulBackend>(
    s: Saved<B>,
    d_out: Tensor<B, 4>,
    slice: usize,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [_, _, seq, _] = s.q.dims();
    let keys = s.k.dims()[2];
    // The gradient may come back in the next GEMM's 16-bit input dtype.
    let d_out = crate::ops::elementwise::cast(d_out, Some(s.q.dtype().into()));
    let delta = (d_out.clone() * s.out).sum_dim(3);
    let mut dq = Vec::new();
    let mut dk = s.k.zeros_like();
    let mut dv = s.v.zeros_like();
    for range @ (c0, c1, end) in slices(seq, keys, slice) {
        let rows = c1 - c0;
        let (scores_c, tanh) = scores(&s.q, &s.k, &s.visibility, range, s.scores);
        let prob = (scores_c - s.lse.clone().narrow(2, c0, rows)).exp();
        let d_oc = d_out.clone().narrow(2, c0, rows);
        let (kc, vc) = (s.k.clone().narrow(2, 0, end), s.v.clone().narrow(2, 0, end));
        let dv_c = matmul(prob.clone().swap_dims(2, 3), d_oc.clone());
        let dp = matmul(d_oc, vc.swap_dims(2, 3));
        let ds = prob * (dp - delta.clone().narrow(2, c0, rows));
        let ds = match tanh {
            Some(t) => ds * t.square().neg().add_scalar(1.0),
            None => ds,
        };
        let scale = s.scores.scale;
        dq.push(matmul(ds.clone(), kc).mul_scalar(scale));
        let dk_c = matmul(ds.swap_dims(2, 3), s.q.clone().narrow(2, c0, rows)).mul_scalar(scale);
        dk = add_into_prefix(dk, dk_c);
        dv = add_into_prefix(dv, dv_c);
    }
    (Tensor::cat(dq, 2), dk, dv)
}

/// `acc[.., 0..n, ..] += part` where `part` has `n` rows on dimension 2.
fn add_into_prefix<B: burn::tensor::backend::Backend>(
    acc: Tensor<B, 4>,
    part: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, h, n, d] = part.dims();
    if n == acc.dims()[2] {
        return acc + part;
    }
    let ranges = [0..b, 0..h, 0..n, 0..d];
    let sum = acc.clone().slice(ranges.clone()) + part;
    acc.slice_assign(ranges, sum)
}

/// Which forward/backward pair the autodiff op runs.
#[derive(Debug, Clone, Copy)]
enum Kernel {
    /// The backend's own ([`AttentionBackend::attention_forward`] and `attention_backward`).
    Backend,
    /// The sliced form with this many queries per slice.
    Sliced(usize),
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: AttentionBackend> Backward<B, 3> for AttentionBackward {
    type State = (Saved<B>, Kernel);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = inner::<B, 4>(grads.consume::<B>(&ops.node));
        let (saved, kernel) = ops.state;
        let (dq, dk, dv) = match kernel {
            Kernel::Backend => B::attention_backward(saved, d_out),
            Kernel::Sliced(slice) => backward(saved, d_out, slice),
        };
        for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, primitive(grad));
            }
        }
    }
}

/// Under autodiff: the backend's fused kernel where it has one; else, when one slice holds
/// every query, the plain form differentiated by Burn (nothing to save, and no recomputation in
/// the backward pass: about 8% of a SmolLM2 step on the CPU); otherwise the sliced op.
impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    const KERNELS_TAKE_WINDOW_AND_SOFTCAP: bool = B::KERNELS_TAKE_WINDOW_AND_SOFTCAP;

    fn fused_attention(head_dim: usize, device: &Self::Device) -> bool {
        B::fused_attention(head_dim, device)
    }

    fn model_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        visibility: &Visibility<Self>,
        scores: Scores,
    ) -> FloatTensor<Self> {
        let (q_in, k_in) = (
            inner::<B, 4>(q.primitive.clone()),
            inner::<B, 4>(k.primitive.clone()),
        );
        let covered = kernel_covers(visibility, scores, k_in.dims()[2]);
        if B::fused_attention(q_in.dims()[3], &q_in.device()) && covered {
            return tracked::<B, C>([q, k, v], visibility.inner(), scores, Kernel::Backend);
        }
        let slice = slice_len(&q_in, &k_in);
        let [_, _, seq, _] = q_in.dims();
        if slice >= seq {
            let (q, k, v) = (
                inner::<Self, 4>(q),
                inner::<Self, 4>(k),
                inner::<Self, 4>(v),
            );
            let mask = visibility.additive(0..seq, k_in.dims()[2], q.dtype(), &q.device());
            let (s, _) = softcapped(
                matmul(q.mul_scalar(scores.scale), k.swap_dims(2, 3)),
                scores,
            );
            return primitive(matmul(Self::attention_softmax(s + mask), v));
        }
        tracked::<B, C>([q, k, v], visibility.inner(), scores, Kernel::Sliced(slice))
    }

    fn attention_softmax(scores: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let scores = primitive(scores);
        let out = match SoftmaxBackward
            .prepare::<C>([scores.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let p = B::attention_softmax(inner(scores.primitive));
                prep.finish(primitive(p.clone()), primitive(p))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(primitive(B::attention_softmax(inner(scores.primitive))))
            }
        };
        inner(out)
    }
}

/// The softmax keeps its output, from which its backward is one pass.
#[derive(Debug)]
struct SoftmaxBackward;

impl<B: AttentionBackend> Backward<B, 1> for SoftmaxBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [Some(node)] = ops.parents else {
            return;
        };
        let dp = inner(grads.consume::<B>(&ops.node));
        let ds = B::attention_softmax_backward(inner(ops.state), dp);
        grads.register::<B>(node.id, primitive(ds));
    }
}

/// The sliced op under autodiff, `slice` queries at a time (the device check drives it at sizes
/// where the dispatch would take the fused kernel or the plain form).
pub fn sliced<B: AttentionBackend, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
    visibility: &Visibility<Autodiff<B, C>>,
    scores: Scores,
    slice: usize,
) -> FloatTensor<Autodiff<B, C>> {
    tracked::<B, C>([q, k, v], visibility.inner(), scores, Kernel::Sliced(slice))
}

/// Attention as one autodiff op of q, k and v, running `kernel`.
fn tracked<B: AttentionBackend, C: CheckpointStrategy>(
    [q, k, v]: [FloatTensor<Autodiff<B, C>>; 3],
    visibility: Visibility<B>,
    scores: Scores,
    kernel: Kernel,
) -> FloatTensor<Autodiff<B, C>> {
    let (q_in, k_in, v_in) = (
        inner(q.primitive.clone()),
        inner(k.primitive.clone()),
        inner(v.primitive.clone()),
    );
    let run = |q, k, v| match kernel {
        Kernel::Backend => B::attention_forward(q, k, v, &visibility, scores),
        Kernel::Sliced(slice) => forward(q, k, v, &visibility, scores, slice),
    };
    match AttentionBackward
        .prepare::<C>([q.node, k.node, v.node])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, lse) = run(q_in.clone(), k_in.clone(), v_in.clone());
            let saved = Saved {
                q: q_in,
                k: k_in,
                v: v_in,
                visibility: visibility.clone(),
                out: out.clone(),
                lse,
                scores,
            };
            prep.finish((saved, kernel), primitive(out))
        }
        OpsKind::UnTracked(prep) => prep.finish(primitive(run(q_in, k_in, v_in).0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_f64::{B, assert_same, random, tensor};
    use burn::tensor::activation::softmax;

    type Inner = burn::backend::NdArray<f32>;

    /// The naive form: full scores, softmax, product.
    fn naive<Bk: burn::tensor::backend::Backend>(
        q: Tensor<Bk, 4>,
        k: Tensor<Bk, 4>,
        v: Tensor<Bk, 4>,
        mask: Tensor<Bk, 4>,
        scores: Scores,
    ) -> Tensor<Bk, 4> {
        let mut s = q.matmul(k.swap_dims(2, 3)).mul_scalar(scores.scale);
        if let Some(cap) = scores.softcap {
            s = s.div_scalar(cap).tanh().mul_scalar(cap);
        }
        softmax(s + mask, 3).matmul(v)
    }

    /// Query `i` sees keys `past + i + 1 − window ..= past + i`.
    fn causal_mask(past: usize, seq: usize, window: Option<usize>) -> Tensor<B, 4> {
        let total = past + seq;
        let mut mask = vec![f64::NEG_INFINITY; seq * total];
        for i in 0..seq {
            let first = window.map_or(0, |w| (past + i + 1).saturating_sub(w));
            mask[i * total + first..i * total + past + i + 1].fill(0.0);
        }
        tensor(mask, [1, 1, seq, total])
    }

    /// The fused kernels serve a window that hides no key (Mistral's 4096 over 2048 keys) and
    /// not one that does, nor a soft-cap.
    #[test]
    fn kernels_cover_windows_that_hide_nothing() {
        let windowed = |w| Visibility::<Inner>::causal(0).with_window(Some(w));
        let plain = Scores::scaled(0.125);
        assert!(kernel_covers(&Visibility::<Inner>::causal(3), plain, 100));
        assert!(kernel_covers(&windowed(100), plain, 100));
        assert!(!kernel_covers(&windowed(99), plain, 100));
        let capped = Scores {
            softcap: Some(50.0),
            ..plain
        };
        assert!(!kernel_covers(&windowed(100), capped, 100));
    }

    /// In f64, where both sides agree to rounding. (In f32 Burn's differentiated softmax is the
    /// less exact side: 1e-4 off an f64 reference at gradients of magnitude 2, against 6e-7 for
    /// the sliced form, which made a 1e-4 tolerance fail one CI run in a few hundred.)
    #[test]
    fn slices_match_the_naive_form_forward_and_backward() {
        slices_match_the_naive_form(Scores::scaled(0.25), None);
    }

    /// Gemma 2's attention: scores soft-capped at 2 (they reach ±3 here), a 6-key window. (A cap
    /// whose inverse is not an f32, 1.5, leaves the two sides 3e-8 apart: Burn turns an f64
    /// tensor's `div_scalar` into a product with the reciprocal rounded to the backend's f32
    /// element on one path and not the other.)
    #[test]
    fn slices_match_the_naive_form_with_a_softcap_and_a_window() {
        let scores = Scores {
            scale: 0.25,
            softcap: Some(2.0),
        };
        slices_match_the_naive_form(scores, Some(6));
    }

    fn slices_match_the_naive_form(scores: Scores, window: Option<usize>) {
        // 37 queries in slices of 8 (the last one short), after 5 cached keys.
        let (past, seq, d) = (5, 37, 16);
        let (q, k, v) = (
            random([2, 3, seq, d], 1.0).require_grad(),
            random([2, 3, past + seq, d], 1.0).require_grad(),
            random([2, 3, past + seq, d], 1.0).require_grad(),
        );
        let mask = causal_mask(past, seq, window);
        let weights = random([2, 3, seq, d], 1.0);

        let visibility = Visibility::<Inner>::causal(past).with_window(window);
        let (out, lse) = forward(
            q.clone().inner(),
            k.clone().inner(),
            v.clone().inner(),
            &visibility,
            scores,
            8,
        );
        let (dq, dk, dv) = backward(
            Saved {
                q: q.clone().inner(),
                k: k.clone().inner(),
                v: v.clone().inner(),
                visibility,
                out: out.clone(),
                lse,
                scores,
            },
            weights.clone().inner(),
            8,
        );

        let reference = naive(q.clone(), k.clone(), v.clone(), mask, scores);
        let grads = (reference.clone() * weights.clone()).sum().backward();
        let grad = |x: &Tensor<B, 4>, grads| x.grad(grads).unwrap();
        assert_same(out, reference.clone().inner());
        assert_same(dq, grad(&q, &grads));
        assert_same(dk, grad(&k, &grads));
        assert_same(dv, grad(&v, &grads));

        // And through the autodiff op in slices of 8, then through the dispatch (one slice at
        // this size: the plain form).
        let out = inner(sliced::<
            Inner,
            burn::backend::autodiff::checkpoint::strategy::NoCheckpointing,
        >(
            primitive(q.clone()),
            primitive(k.clone()),
            primitive(v.clone()),
            &Visibility::causal(past).with_window(window),
            scores,
            8,
        ));
        let grads_op = (out.clone() * weights.clone()).sum().backward();
        let plain = attention(
            q.clone(),
            k.clone(),
            v.clone(),
            &Visibility::causal(past).with_window(window),
            scores,
        );
        let grads_plain = (plain.clone() * weights).sum().backward();
        assert_same(out, reference.clone());
        assert_same(plain, reference);
        for x in [&q, &k, &v] {
            assert_same(grad(x, &grads_op), grad(x, &grads));
            assert_same(grad(x, &grads_plain), grad(x, &grads));
        }
    }
}
