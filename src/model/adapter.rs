//! One adapter, in MLX's layout and math:
//!
//! ```text
//! LoRA:  y = W x + s · (drop(x) A) B                      A: [in, r], B: [r, out]
//! DoRA:  y = m / ‖W + s·(AB)ᵀ‖_row · (W x + s · (drop(x) A) B)   (the norm is not differentiated)
//! experts: one A_e, B_e per expert e, stacked: A: [experts · in, r], B: [experts · r, out];
//!          a token routed to e gets s · (drop(x) A_e) B_e
//! ```

use burn::tensor::{Tensor, TensorData, backend::Backend};

use crate::model::linear::FrozenWeight;
use crate::ops::ModelBackend;
use crate::ops::grouped_matmul::{Stacked, grouped_matmul};
use crate::ops::matmul::matmul;

/// The LoRA (or DoRA) adapter on one linear: the trainable low-rank update to its frozen
/// weight.
#[derive(Debug, Clone)]
pub struct LoraAdapter<B: Backend> {
    /// `[in, r]`
    pub a: Tensor<B, 2>,
    /// `[r, out]`
    pub b: Tensor<B, 2>,
    /// DoRA magnitude `[out]`; `None` for plain LoRA.
    pub magnitude: Option<Tensor<B, 1>>,
    /// `s`, the factor on the low-rank update `(x A) B`.
    pub scale: f64,
    /// Probability of zeroing each input element of the update while training (0 for none).
    pub dropout: f64,
    /// Draw dropout masks on a backend without autodiff too: checkpointing's no-grad forward
    /// pass must drop what its recomputation (on the autodiff backend) drops.
    pub dropout_without_autodiff: bool,
}

impl<B: ModelBackend> LoraAdapter<B> {
    /// mlx-lm's initialisation: `A ~ U(-1/√in, 1/√in)`, drawn on the host from `rng` (the same
    /// values on every backend and in every thread), `B = 0`; DoRA's magnitude starts at the row
    /// norms of `W`, so the adapted layer starts equal to the base. `weight` stacks `experts`
    /// matrices (1 for a plain linear), each getting its own `A` and `B`.
    #[allow(clippy::too_many_arguments)]
    pub fn init(
        weight: &FrozenWeight<B>,
        experts: usize,
        rank: usize,
        scale: f64,
        dropout: f64,
        dora: bool,
        rng: &mut impl rand::Rng,
        device: &B::Device,
    ) -> Self {
        let [rows, inp] = weight.dims();
        let out = rows / experts;
        let bound = 1.0 / (inp as f64).sqrt();
        let values: Vec<f32> = (0..experts * inp * rank)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = from_vec(values, [experts * inp, rank], device);
        let b = Tensor::zeros([experts * rank, out], device);
        let magnitude = dora.then(|| row_norms(weight.to_dense(device)));
        LoraAdapter {
            a,
            b,
            magnitude,
            scale,
            dropout,
            dropout_without_autodiff: false,
        }
    }

    /// `r`, the inner dimension of `A` and `B`.
    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    /// Marks the trainable tensors so autodiff tracks them.
    pub fn require_grad(self) -> Self {
        LoraAdapter {
            a: self.a.require_grad(),
            b: self.b.require_grad(),
            magnitude: self.magnitude.map(Tensor::require_grad),
            ..self
        }
    }

    /// The trainable tensors flattened to 1-D views, in a fixed order (a, b, magnitude).
    pub fn parameters(&self) -> Vec<Tensor<B, 1>> {
        let mut out = vec![self.a.clone().flatten(0, 1), self.b.clone().flatten(0, 1)];
        out.extend(self.magnitude.clone());
        out
    }

    /// `s · (drop(x) A) B` for `x`: `[n, in]` → `[n, out]`. `dropout_mask`, when given, is
    /// `[n, in]` of 0 or 1/(1-p).
    pub fn update(&self, x: Tensor<B, 2>, dropout_mask: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
        let x = match dropout_mask {
            Some(mask) => x * mask,
            None => x,
        };
        // Scaling the rank-r intermediate touches r values per token instead of `out`.
        matmul(
            matmul(x, self.a.clone()).mul_scalar(self.scale),
            self.b.clone(),
        )
    }

    /// [`Self::update`] for an experts' stack: `x`'s rows grouped by expert as `counts` says,
    /// each group through its expert's `A_e`, `B_e`.
    pub fn update_grouped(
        &self,
        x: Tensor<B, 2>,
        dropout_mask: Option<Tensor<B, 2>>,
        counts: &[usize],
    ) -> Tensor<B, 2> {
        let x = match dropout_mask {
            Some(mask) => x * mask,
            None => x,
        };
        let (experts, r) = (counts.len(), self.rank());
        let inp = self.a.dims()[0] / experts;
        let out = self.b.dims()[1];
        let a = self.a.clone().reshape([experts, inp, r]);
        let b = self.b.clone().reshape([experts, r, out]);
        let u = grouped_matmul(x, a, Stacked::AsIs, counts).mul_scalar(self.scale);
        grouped_matmul(u, b, Stacked::AsIs, counts)
    }

    /// `y = W x + update`, rescaled by DoRA's magnitude when the adapter has one.
    pub fn rescale(&self, y: Tensor<B, 2>, weight: &FrozenWeight<B>) -> Tensor<B, 2> {
        let Some(m) = &self.magnitude else {
            return y;
        };
        let device = y.device();
        // ‖W + s·(AB)ᵀ‖ per output row, outside the graph as in mlx-lm / peft.
        let delta = self
            .a
            .clone()
            .detach()
            .matmul(self.b.clone().detach())
            .mul_scalar(self.scale);
        let adapted = weight.to_dense(&device) + delta.transpose();
        let denom = row_norms(adapted).detach();
        y * (m.clone() / denom).unsqueeze::<2>()
    }
}

/// L2 norm of each row of `[out, in]` → `[out]`.
fn row_norms<B: Backend>(w: Tensor<B, 2>) -> Tensor<B, 1> {
    w.square().sum_dim(1).sqrt().squeeze_dim::<1>(1)
}

/// Host data of a 2-D tensor as f32, for saving.
pub fn to_vec<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Vec<f32> {
    t.to_data()
        .convert::<f32>()
        .into_vec()
        .expect("float tensor")
}

/// A tensor from f32 host data.
pub fn from_vec<B: Backend, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}
