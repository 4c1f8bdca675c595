//! Rotary position embeddings, Hugging Face layout (`rotate_half`, not interleaved), with the
//! `linear`, `llama3` and `longrope` (Phi-3) frequency scalings.
//!
//! ```text
//! rope(x)  = x ⊙ cos + rotate_half(x) ⊙ sin,   rotate_half([x₁, x₂]) = [−x₂, x₁]
//! ∂x       = dy ⊙ cos + rotate_halfᵀ(dy ⊙ sin) = rope(dy) with sin negated
//! ```
//!
//! The rotation is one autodiff op ([`RopeBackend`]): its backward keeps only the tables, where
//! Burn's chain of slices, concatenation and products kept x and its rotated copy for q and k.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, backend::Backend};

use super::primitive::{inner, primitive};

#[derive(Debug, Clone, PartialEq)]
/// How a family rescales RoPE's frequencies for longer contexts (`rope_scaling` in config.json).
pub enum RopeScaling {
    /// The frequencies `theta^(−2i / head_dim)` as they are.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// What every frequency is divided by.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent rescaling.
    Llama3 {
        /// What the low frequencies (long wavelengths) are divided by.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` take the full
        /// `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` stay unscaled;
        /// those between the two bounds are interpolated.
        high_freq_factor: f64,
        /// The context length the model was pretrained at, in tokens.
        original_max_position_embeddings: f64,
    },
    /// Phi-3's LongRoPE (`longrope`, formerly `su`): each pair's frequency is divided by its
    /// factor, the short factors while a forward pass's positions stay within the pretrained
    /// length, the long ones past it; cos and sin are multiplied by `attention_factor`.
    LongRope {
        /// One factor per pair of dimensions, for passes within the pretrained length.
        short_factor: Vec<f64>,
        /// One factor per pair, for passes that reach past it.
        long_factor: Vec<f64>,
        /// The pretrained context length: a pass whose last position is at or past it takes the
        /// long factors.
        original_max_position_embeddings: usize,
        /// Multiplies cos and sin: `√(1 + ln(factor) / ln(original))` by default, `factor` being
        /// `max_position_embeddings / original` (1 when that is at most 1).
        attention_factor: f64,
    },
}

/// RoPE's per-pair frequencies for one head size, from which position tables are built.
#[derive(Debug, Clone)]
pub struct Rope {
    /// One frequency per pair of dimensions (`head_dim / 2`).
    inv_freq: Vec<f32>,
    /// LongRoPE: the frequencies of passes whose positions reach `.1` or past it.
    long: Option<(Vec<f32>, usize)>,
    /// What cos and sin are multiplied by (LongRoPE's attention factor; 1 otherwise).
    magnitude: f32,
}

impl Rope {
    /// Frequencies `theta^(−2i / head_dim)` for each pair of dimensions, rescaled by `scaling`
    /// (LongRoPE's factor lists are `head_dim / 2` long: the configuration checks).
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let half = head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        let divided = |factors: &[f64]| -> Vec<f32> {
            base.iter()
                .zip(factors)
                .map(|(f, d)| (f / d) as f32)
                .collect()
        };
        let (long, magnitude) = match scaling {
            RopeScaling::LongRope {
                long_factor,
                original_max_position_embeddings,
                attention_factor,
                ..
            } => (
                Some((divided(long_factor), *original_max_position_embeddings)),
                *attention_factor as f32,
            ),
            _ => (None, 1.0),
        };
        let inv_freq = match *scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::LongRope {
                ref short_factor, ..
            } => divided(short_factor).into_iter().map(f64::from).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => {
                let low_freq_wavelen = old_len / low_freq_factor;
                let high_freq_wavelen = old_len / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_len / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        Rope {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
            long,
            magnitude,
        }
    }

    /// The (scaled) frequency of each pair of dimensions, for passes within the pretrained
    /// length.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Whether one table serves every position: no LongRoPE (whose frequencies and magnitude
    /// change with the pass's length).
    pub fn plain(&self) -> bool {
        self.long.is_none() && self.magnitude == 1.0
    }

    /// The frequencies of a pass over `len` positions (LongRoPE: the long ones once `len`
    /// exceeds the pretrained length, as transformers picks them from the pass's last position).
    fn inv_freq_for(&self, len: usize) -> &[f32] {
        match &self.long {
            Some((long, original)) if len > *original => long,
            _ => &self.inv_freq,
        }
    }

    /// Whether keys cached from the first `cached` positions were rotated with other frequencies
    /// than a pass reaching `len` positions uses (LongRoPE crossing its pretrained length), so
    /// the cache must be rebuilt, as transformers does.
    pub fn cache_outdated(&self, cached: usize, len: usize) -> bool {
        let crosses = |original: usize| cached > 0 && cached <= original && len > original;
        self.long
            .as_ref()
            .is_some_and(|(_, original)| crosses(*original))
    }

    /// `(cos, sin)`, each `[rows, 1, seq, head_dim]`, for `positions` (`rows * seq` of them,
    /// row-major): one row broadcasts over the batch, or one row per batch row when positions
    /// differ between rows (packed examples restart at 0).
    pub fn tables<B: Backend>(
        &self,
        positions: &[usize],
        rows: usize,
        device: &B::Device,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let half = self.inv_freq.len();
        let inv_freq = self.inv_freq_for(positions.iter().max().map_or(0, |p| p + 1));
        let m = self.magnitude;
        let mut cos = Vec::with_capacity(positions.len() * half * 2);
        let mut sin = Vec::with_capacity(positions.len() * half * 2);
        for &pos in positions {
            let angles: Vec<f32> = inv_freq.iter().map(|f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos() * m));
                sin.extend(angles.iter().map(|a| a.sin() * m));
            }
        }
        let shape = [rows, 1, positions.len() / rows, half * 2];
        (
            Tensor::from_data(TensorData::new(cos, shape), device),
            Tensor::from_data(TensorData::new(sin, shape), device),
        )
    }
}

/// Backends that apply RoPE; the default is Burn's slices and products, which a backend may
/// replace with one pass of its own.
pub trait RopeBackend: Backend {
    /// `x` (`[batch, heads, seq, head_dim]`) rotated by tables from [`Rope::tables`].
    fn rope(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        rotate_by_slices(x, cos, sin)
    }

    /// The gradient of [`RopeBackend::rope`]'s input given its output's, `dy`: the rotation
    /// back.
    fn rope_backward(
        dy: Tensor<Self, 4>,
        cos: Tensor<Self, 4>,
        sin: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        Self::rope(dy, cos, sin.neg())
    }
}

/// `x` (`[batch, heads, seq, head_dim]`) rotated by [`RopeBackend::rope`] over its leading
/// `cos.dims()[3]` dimensions, the rest passed through: RoPE over part of each head
/// (`partial_rotary_factor`, Phi-4-mini), whole heads when the tables are as wide.
pub fn rope_leading<B: RopeBackend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let (d, r) = (x.dims()[3], cos.dims()[3]);
    if r == d {
        return B::rope(x, cos, sin);
    }
    let rotated = B::rope(x.clone().narrow(3, 0, r), cos, sin);
    Tensor::cat(vec![rotated, x.narrow(3, r, d - r)], 3)
}

/// [`RopeBackend::rope`] in Burn's ops: `x ⊙ cos + [−x₂, x₁] ⊙ sin`.
pub fn rotate_by_slices<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let half = x.dims()[3] / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos + rotated * sin
}

#[derive(Debug)]
struct RopeBackward;

impl<B: RopeBackend> Backward<B, 1> for RopeBackward {
    /// The tables.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (cos, sin) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| {
            primitive(B::rope_backward(inner(dy), inner(cos), inner(sin)))
        });
    }
}

impl<B: RopeBackend, C: CheckpointStrategy> RopeBackend for Autodiff<B, C> {
    fn rope(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let (cos, sin) = (cos.inner(), sin.inner());
        let x = primitive(x);
        let rotate = |x| primitive(B::rope(inner(x), cos.clone(), sin.clone()));
        let out = match RopeBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let tables = (primitive(cos.clone()), primitive(sin.clone()));
                prep.finish(tables, rotate(x.primitive))
            }
            OpsKind::UnTracked(prep) => prep.finish(rotate(x.primitive)),
        };
        inner(out)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use super::RopeScaling;
    use super::{Rope, RopeBackend};
    use crate::ops::test_f64::{B, assert_same, cast, random};

    /// The op's written-out backward (the rotation back) against Burn's differentiation of the
    /// slice-and-concatenate form, with Llama 3 scaled frequencies and one table per row.
    #[test]
    fn rope_gradient_matches_burns_autodiff() {
        let device = Default::default();
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16.0,
        };
        let rope = Rope::new(8, 500_000.0, &scaling);
        let positions: Vec<usize> = (0..10).map(|i| (i * 7) % 11).collect();
        let (cos, sin) = rope.tables::<B>(&positions, 2, &device);
        let (cos, sin) = (cast(cos), cast(sin));
        let (x, dy) = (random([2, 3, 5, 8], 1.0), random([2, 3, 5, 8], 1.0));
        let grads_of = |op: bool| {
            let x = x.clone().require_grad();
            let y = if op {
                B::rope(x.clone(), cos.clone(), sin.clone())
            } else {
                let x1 = x.clone().narrow(3, 0, 4);
                let x2 = x.clone().narrow(3, 4, 4);
                x.clone() * cos.clone() + Tensor::cat(vec![x2.neg(), x1], 3) * sin.clone()
            };
            let grads = (y.clone() * dy.clone()).sum().backward();
            (y.inner(), x.grad(&grads).expect("x tracked"))
        };
        let ((y, dx), (want_y, want_dx)) = (grads_of(true), grads_of(false));
        assert_same(y, want_y);
        assert_same(dx, want_dx);
    }
}
