//! Optimizers over the adapter tensors, written out so each step can be checked against
//! `torch.optim` line by line. Parameters and moments are f32 on the backend.
//!
//! AdamW (torch's single-tensor path):
//! ```text
//! p ← p · (1 − lr·wd)
//! m ← β1 m + (1 − β1) g          v ← β2 v + (1 − β2) g²
//! p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)
//! ```
//! Adam adds `wd·p` to the gradient instead; SGD is `p ← p − lr (g + wd·p)`.

use burn::tensor::{ElementConversion, Tensor, backend::Backend};

use crate::recipe::{OptimizerKind, TrainSection};

/// Which optimizer, with its hyperparameters (the recipe's `[train]` values).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerConfig {
    /// SGD, Adam or AdamW.
    pub kind: OptimizerKind,
    /// Adam's β1 and β2, the decay rates of the first and second moments.
    pub betas: [f64; 2],
    /// Added to the denominator `√v̂` of the Adam update.
    pub eps: f64,
    /// Weight decay: decoupled in AdamW, added to the gradient in Adam and SGD.
    pub weight_decay: f64,
}

impl OptimizerConfig {
    /// The optimizer settings of a recipe's `[train]`.
    pub fn from_recipe(train: &TrainSection) -> Self {
        OptimizerConfig {
            kind: train.optimizer,
            betas: train.betas,
            eps: train.eps,
            weight_decay: train.weight_decay,
        }
    }
}

/// Moments for every parameter, in the adapters' fixed order.
#[derive(Debug, Clone)]
pub struct Optimizer<B: Backend> {
    /// The update rule and its hyperparameters.
    pub config: OptimizerConfig,
    /// Steps taken so far (`t` of the bias correction is `step + 1` for the next one).
    pub step: usize,
    /// First moment (`m`) of each parameter, flattened; unused by SGD.
    pub first: Vec<Tensor<B, 1>>,
    /// Second moment (`v`) of each parameter, flattened; unused by SGD.
    pub second: Vec<Tensor<B, 1>>,
}

impl<B: Backend> Optimizer<B> {
    /// An optimizer at step 0, its moments zeros shaped like `params`.
    pub fn new(config: OptimizerConfig, params: &[Tensor<B, 1>]) -> Self {
        let zeros = || params.iter().map(Tensor::zeros_like).collect::<Vec<_>>();
        Optimizer {
            config,
            step: 0,
            first: zeros(),
            second: zeros(),
        }
    }

    /// Updates `params` in place with `grads` (same order and shapes).
    pub fn update(&mut self, params: &mut [Tensor<B, 1>], grads: &[Tensor<B, 1>], lr: f64) {
        self.step += 1;
        let [b1, b2] = self.config.betas;
        let (eps, wd) = (self.config.eps, self.config.weight_decay);
        let t = self.step as i32;
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let g = g.clone();
            match self.config.kind {
                OptimizerKind::Sgd => {
                    let g = if wd != 0.0 {
                        g + p.clone().mul_scalar(wd)
                    } else {
                        g
                    };
                    *p = p.clone() - g.mul_scalar(lr);
                }
                OptimizerKind::Adam | OptimizerKind::Adamw => {
                    let g = if self.config.kind == OptimizerKind::Adam && wd != 0.0 {
                        g + p.clone().mul_scalar(wd)
                    } else {
                        g
                    };
                    if self.config.kind == OptimizerKind::Adamw && wd != 0.0 {
                        *p = p.clone().mul_scalar(1.0 - lr * wd);
                    }
                    let m = self.first[i].clone().mul_scalar(b1) + g.clone().mul_scalar(1.0 - b1);
                    let v = self.second[i].clone().mul_scalar(b2) + g.square().mul_scalar(1.0 - b2);
                    let step_size = lr / (1.0 - b1.powi(t));
                    let denom = v
                        .clone()
                        .sqrt()
                        .div_scalar((1.0 - b2.powi(t)).sqrt())
                        .add_scalar(eps);
                    *p = p.clone() - (m.clone() / denom).mul_scalar(step_size);
                    self.first[i] = m;
                    self.second[i] = v;
                }
            }
        }
    }
}

/// `√Σ‖g‖²` over every gradient (the global norm, not per tensor). One read back to the host,
/// not one per tensor: on a GPU each read waits for the device to drain.
pub fn global_norm<B: Backend>(grads: &[Tensor<B, 1>]) -> f64 {
    if grads.is_empty() {
        return 0.0;
    }
    let squares = grads.iter().map(|g| g.clone().square().sum()).collect();
    Tensor::cat(squares, 0)
        .sum()
        .into_scalar()
        .elem::<f64>()
        .sqrt()
}

/// Scales the gradients so their global norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does (`coef = max / (norm + 1e-6)`, capped at 1).
pub fn clip_global_norm<B: Backend>(grads: &mut [Tensor<B, 1>], norm: f64, max_norm: f64) {
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = g.clone().mul_scalar(coef);
        }
    }
}
