//! One training step, the only one: the training loop, `bench train`, `bench check` and the
//! peft parity test all call [`Trainer::step`].
//!
//! ```text
//! step(micro_batches, lr):
//!     grads = Σ_k ∇ loss(batch_k) / K           K micro-batches (gradient accumulation)
//!     norm  = ‖grads‖ ; stop if not finite ; clip to max_grad_norm
//!     optimizer.update(params, grads, lr) ; write the adapters back into the model
//! ```
//!
//! The adapter tensors travel as flat lists in `Decoder::adapters` order between the model and
//! the optimizer; that order is private to this file.
//!
//! With an f16 base the backward pass carries activation gradients in f16, whose smallest
//! normal value is 6e-5: a mean over N tokens makes each token's gradient ~1/N of what it would
//! be alone, under that. Each micro-batch's loss is therefore differentiated times
//! `S = 2^⌈log₂(N·K)⌉` and its gradients divided by `S` (powers of two: exact both ways), as
//! PyTorch's `GradScaler` does with a scale it searches for; here the scale that undoes the mean
//! is known in advance. (At the device check's 512 tokens f16 trains within 0.5% of the CPU with
//! or without the scale, measured on lavapipe: the underflow is a large batch's, 6e-5 per token at
//! 16k tokens, not shown by a test here.)

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, FloatDType, Tensor, TensorData};

use super::loss::masked_cross_entropy;
use super::optimizer::{Optimizer, OptimizerConfig, clip_global_norm, global_norm};
use super::recompute::Checkpointing;
use crate::data::Batch;
use crate::distributed::{CollectiveError, Communicator, shard};
use crate::model::{Decoder, LoraAdapter};
use crate::ops::{ModelBackend, TrainBackend};

/// How a step treats its gradients and activations.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepSettings {
    /// Recompute each block's activations in the backward pass instead of keeping them; how:
    /// see [`Checkpointing`].
    pub grad_checkpoint: Option<Checkpointing>,
    /// Clip the global gradient norm to this.
    pub max_grad_norm: Option<f64>,
}

/// What one step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss over the micro-batches (with the routers' load-balancing term, if any).
    pub loss: f64,
    /// The part of `loss` that is the routers' load-balancing term, when training adds one.
    pub router_aux: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// What a step's micro-batches summed: their losses (the routers' terms included), the routers'
/// terms alone, and their gradients.
struct Accumulated<B: TrainBackend> {
    loss: f64,
    router_aux: f64,
    grads: Option<Vec<Tensor<B::InnerBackend, 1>>>,
}

/// A step whose loss or gradient norm was not finite: the adapters were not updated.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("{}", if loss.is_finite() {
    format!("the gradient norm became {grad_norm} (loss {loss})")
} else {
    format!("the training loss became {loss}")
})]
pub struct NonFiniteLoss {
    /// The mean loss of the step's micro-batches.
    pub loss: f64,
    /// The global gradient norm (NaN when the loss already was not finite).
    pub grad_norm: f64,
}

/// The model being trained, with its optimizer.
pub struct Trainer<B: TrainBackend> {
    /// The model with its adapters, tracked for autodiff.
    pub model: Decoder<B>,
    /// The optimizer's state, one entry per adapter tensor.
    pub optimizer: Optimizer<B::InnerBackend>,
    params: Vec<Tensor<B::InnerBackend, 1>>,
    settings: StepSettings,
    /// Some frozen linear multiplies in f16: the loss is scaled (module docs).
    f16_base: bool,
    device: B::Device,
}

impl<B: TrainBackend> Trainer<B> {
    /// Trains `model`'s adapters (injected, and loaded when resuming) from their current values
    /// with a fresh optimizer.
    pub fn new(
        mut model: Decoder<B>,
        optimizer: OptimizerConfig,
        settings: StepSettings,
        device: &B::Device,
    ) -> Self {
        let params = parameters(&model);
        let optimizer = Optimizer::new(optimizer, &params);
        // Any linear, not only the head: a head quantized at 3, 5 or 6 bits stays on the host in
        // f32 while the blocks multiply in f16.
        let f16 =
            |l: &crate::model::linear::FrozenLinear<B>| l.input_dtype() == Some(FloatDType::F16);
        let f16_base = f16(&model.lm_head)
            || model
                .layers
                .iter()
                .any(|b| b.linears().into_iter().any(|(_, l)| f16(l)));
        // Tracks the adapters for autodiff; without it the first step gets no gradients.
        set_parameters(&mut model, &params);
        Trainer {
            model,
            optimizer,
            params,
            settings,
            f16_base,
            device: device.clone(),
        }
    }

    /// What `batch`'s loss is differentiated times (one of `micro_batches`): `S` of the module
    /// docs with an f16 base, else 1.
    fn gradient_scale(&self, batch: &Batch, micro_batches: usize) -> f64 {
        if !self.f16_base {
            return 1.0;
        }
        (batch.trained_tokens().max(1) * micro_batches).next_power_of_two() as f64
    }

    /// Trainable parameters (elements).
    pub fn parameter_count(&self) -> usize {
        self.params.iter().map(|p| p.dims()[0]).sum()
    }

    /// Whether every adapter value and optimizer moment is finite: one reduction read back, for
    /// before a save (a NaN would otherwise be written as the last good checkpoint). `Σ 0·x` is 0
    /// exactly when every `x` is finite (0·∞ and 0·NaN are NaN), and cannot overflow.
    pub fn state_is_finite(&self) -> bool {
        let tensors = self.params.iter().chain(&self.optimizer.first);
        let sums: Vec<_> = tensors
            .chain(&self.optimizer.second)
            .map(|t| t.clone().mul_scalar(0.0).sum())
            .collect();
        if sums.is_empty() {
            return true;
        }
        let total: f64 = Tensor::cat(sums, 0).sum().into_scalar().elem();
        total.is_finite()
    }

    /// One optimizer update over `micro_batches` at learning rate `lr`. A non-finite loss
    /// leaves the adapters and the optimizer as they were.
    pub fn step(&mut self, micro_batches: &[Batch], lr: f64) -> Result<StepStats, NonFiniteLoss> {
        let n = micro_batches.len() as f64;
        let sums = self.accumulate(micro_batches.iter(), micro_batches.len());
        self.apply(sums.loss / n, sums.router_aux / n, sums.grads, lr)
    }

    /// [`Trainer::step`] as one of the workers of `comm`: this worker runs its share of the
    /// step's `micro_batches` (see [`crate::distributed::shard`]), one all-reduce sums the
    /// workers' gradients and losses, and every worker applies the same update. The result
    /// equals the single-worker step's up to the order of the sums.
    pub fn step_distributed(
        &mut self,
        micro_batches: &[Batch],
        lr: f64,
        comm: &dyn Communicator,
    ) -> Result<StepStats, StepError> {
        let total = micro_batches.len();
        let mine = shard(total, comm.rank(), comm.world()).map(|k| &micro_batches[k]);
        let sums = self.accumulate(mine, total);
        let grads =
            (sums.grads).unwrap_or_else(|| self.params.iter().map(|p| p.zeros_like()).collect());
        let mut flat = flatten(&grads);
        flat.extend([sums.loss as f32, sums.router_aux as f32]);
        comm.all_reduce_sum(&mut flat)?;
        let mut mean = || f64::from(flat.pop().expect("the sums were pushed")) / total as f64;
        let (router_aux, loss) = (mean(), mean());
        let grads = unflatten(&flat, &grads, &self.device);
        Ok(self.apply(loss, router_aux, Some(grads), lr)?)
    }

    /// The summed loss of `batches` and the sum of their gradients, each micro-batch's loss
    /// divided by `total` (the step's micro-batch count) before differentiating.
    fn accumulate<'a>(
        &self,
        batches: impl Iterator<Item = &'a Batch>,
        total: usize,
    ) -> Accumulated<B> {
        let scale = 1.0 / total as f64;
        let mut sums = Accumulated {
            loss: 0.0,
            router_aux: 0.0,
            grads: None,
        };
        for batch in batches {
            let grad_scale = self.gradient_scale(batch, total);
            let (loss, router_aux, grads) = loss_and_gradients(
                &self.model,
                batch,
                scale * grad_scale,
                self.settings.grad_checkpoint,
                &self.device,
            );
            let grads = if grad_scale > 1.0 {
                grads
                    .into_iter()
                    .map(|g| g.div_scalar(grad_scale))
                    .collect()
            } else {
                grads
            };
            sums.loss += loss;
            sums.router_aux += router_aux;
            sums.grads = Some(add_gradients(sums.grads, grads));
        }
        sums
    }

    /// The update from a step's mean `loss` (of which `router_aux` is the routers' term) and
    /// summed gradients: the norm, clipping, the optimizer, the adapters written back. Nothing
    /// changes when either is not finite.
    fn apply(
        &mut self,
        loss: f64,
        router_aux: f64,
        grads: Option<Vec<Tensor<B::InnerBackend, 1>>>,
        lr: f64,
    ) -> Result<StepStats, NonFiniteLoss> {
        if !loss.is_finite() {
            let grad_norm = f64::NAN;
            return Err(NonFiniteLoss { loss, grad_norm });
        }
        let mut grads = grads.unwrap_or_default();
        let grad_norm = global_norm(&grads);
        if !grad_norm.is_finite() {
            return Err(NonFiniteLoss { loss, grad_norm });
        }
        if let Some(max) = self.settings.max_grad_norm {
            clip_global_norm(&mut grads, grad_norm, max);
        }
        self.optimizer.update(&mut self.params, &grads, lr);
        set_parameters(&mut self.model, &self.params);
        let router_aux = self.model.router_balance().map(|_| router_aux);
        Ok(StepStats {
            loss,
            router_aux,
            grad_norm,
        })
    }
}

/// Why a distributed step did not update the adapters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepError {
    /// The loss or the gradient norm was not finite (on every worker alike).
    #[error(transparent)]
    NonFinite(#[from] NonFiniteLoss),
    /// The all-reduce failed: another worker stopped.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
}

/// Mean loss over the batch's trained positions.
pub fn batch_loss<B: ModelBackend>(
    decoder: &Decoder<B>,
    batch: &Batch,
    device: &B::Device,
) -> Tensor<B, 1> {
    let logits = decoder.forward_with_segments(
        &batch.inputs,
        batch.segments.as_deref(),
        batch.batch,
        device,
    );
    let grad_dtype = decoder.logits_grad_dtype();
    masked_cross_entropy(logits, &batch.targets, &batch.mask, grad_dtype).0
}

/// The batch's mean loss (with the routers' load-balancing term, if any), that term alone (0
/// without one), and the gradients of `scale ×` the loss (`scale` = 1 / accumulation steps),
/// flattened in [`parameters`] order. With `grad_checkpoint`, block activations are recomputed
/// in the backward pass instead of kept (see [`super::recompute`]).
pub fn loss_and_gradients<B: TrainBackend>(
    decoder: &Decoder<B>,
    batch: &Batch,
    scale: f64,
    grad_checkpoint: Option<Checkpointing>,
    device: &B::Device,
) -> (f64, f64, Vec<Tensor<B::InnerBackend, 1>>) {
    let balance = decoder.router_balance();
    if let Some(balance) = &balance {
        balance.start(batch.tokens(), scale);
    }
    let (value, grads) = match grad_checkpoint {
        Some(how) => super::recompute::loss_and_gradients(decoder, batch, scale, how, device),
        None => plain_loss_and_gradients(decoder, batch, scale, device),
    };
    // The routers' term joined the gradients as the backward pass reached each router.
    let router_aux = balance.map_or(0.0, |b| b.end());
    (value + router_aux, router_aux, grads)
}

/// [`loss_and_gradients`] keeping every activation for the backward pass.
fn plain_loss_and_gradients<B: TrainBackend>(
    decoder: &Decoder<B>,
    batch: &Batch,
    scale: f64,
    device: &B::Device,
) -> (f64, Vec<Tensor<B::InnerBackend, 1>>) {
    // The head runs a slice at a time (`head.rs`); its gradient then flows through the blocks.
    let top = decoder.forward_blocks(
        &batch.inputs,
        batch.segments.as_deref(),
        batch.batch,
        device,
    );
    // Every router has counted its choices: the load-balancing term's gradient is known.
    if let Some(balance) = decoder.router_balance() {
        balance.finish();
    }
    let (value, upstream) = super::head::loss_and_input_grad(
        decoder,
        top.clone().inner(),
        &batch.targets,
        &batch.mask,
        scale,
    );
    let grads = (top * Tensor::from_inner(upstream)).sum().backward();
    (value, gradients(decoder, &grads))
}

/// The trainable tensors (without autodiff), flattened.
pub fn parameters<B: AutodiffBackend + ModelBackend>(
    decoder: &Decoder<B>,
) -> Vec<Tensor<B::InnerBackend, 1>> {
    decoder
        .adapters()
        .iter()
        .flat_map(|(_, a)| a.parameters())
        .map(|p| p.inner())
        .collect()
}

/// 1-D tensors' values end to end, as one host buffer.
fn flatten<B: burn::tensor::backend::Backend>(tensors: &[Tensor<B, 1>]) -> Vec<f32> {
    let mut flat = Vec::with_capacity(tensors.iter().map(|t| t.dims()[0]).sum());
    for t in tensors {
        flat.extend(t.to_data().convert::<f32>().iter::<f32>());
    }
    flat
}

/// [`flatten`]'s buffer back into tensors of `like`'s lengths.
fn unflatten<B: burn::tensor::backend::Backend>(
    flat: &[f32],
    like: &[Tensor<B, 1>],
    device: &B::Device,
) -> Vec<Tensor<B, 1>> {
    let mut at = 0;
    like.iter()
        .map(|t| {
            let len = t.dims()[0];
            at += len;
            Tensor::from_data(TensorData::new(flat[at - len..at].to_vec(), [len]), device)
        })
        .collect()
}

/// The gradients of the trainable tensors, flattened; zeros where a tensor got none.
pub fn gradients<B: AutodiffBackend + ModelBackend>(
    decoder: &Decoder<B>,
    grads: &B::Gradients,
) -> Vec<Tensor<B::InnerBackend, 1>> {
    adapter_gradients(decoder.adapters().into_iter().map(|(_, a)| a), grads)
}

/// `sum + grads`, tensor by tensor; `grads` alone when there is no sum yet.
pub fn add_gradients<B: burn::tensor::backend::Backend>(
    sum: Option<Vec<Tensor<B, 1>>>,
    grads: Vec<Tensor<B, 1>>,
) -> Vec<Tensor<B, 1>> {
    match sum {
        None => grads,
        Some(sum) => sum.into_iter().zip(grads).map(|(s, g)| s + g).collect(),
    }
}

/// [`gradients`] for some of the adapters, in the order given.
pub fn adapter_gradients<'a, B: AutodiffBackend + ModelBackend>(
    adapters: impl IntoIterator<Item = &'a LoraAdapter<B>>,
    grads: &B::Gradients,
) -> Vec<Tensor<B::InnerBackend, 1>> {
    let mut out = Vec::new();
    for adapter in adapters {
        let mut push = |t: Tensor<B, 1>, g: Option<Tensor<B::InnerBackend, 1>>| {
            out.push(g.unwrap_or_else(|| t.inner().zeros_like()));
        };
        push(
            adapter.a.clone().flatten(0, 1),
            adapter.a.grad(grads).map(|g| g.flatten(0, 1)),
        );
        push(
            adapter.b.clone().flatten(0, 1),
            adapter.b.grad(grads).map(|g| g.flatten(0, 1)),
        );
        if let Some(m) = &adapter.magnitude {
            push(m.clone(), m.grad(grads));
        }
    }
    out
}

/// Writes updated trainable tensors back into the model, tracked for the next step.
pub fn set_parameters<B: AutodiffBackend + ModelBackend>(
    decoder: &mut Decoder<B>,
    params: &[Tensor<B::InnerBackend, 1>],
) {
    let mut next = params.iter();
    let mut take = |shape: &[usize]| -> Tensor<B::InnerBackend, 1> {
        let t = next
            .next()
            .expect("one tensor per trainable parameter")
            .clone();
        debug_assert_eq!(t.dims()[0], shape.iter().product::<usize>());
        t
    };
    for (_, linear) in decoder.linears_mut() {
        let Some(adapter) = linear.adapter.as_mut() else {
            continue;
        };
        let a = take(&adapter.a.dims()).reshape(adapter.a.dims());
        let b = take(&adapter.b.dims()).reshape(adapter.b.dims());
        let magnitude = adapter.magnitude.as_ref().map(|m| take(&m.dims()));
        *adapter = LoraAdapter {
            a: Tensor::from_inner(a),
            b: Tensor::from_inner(b),
            magnitude: magnitude.map(Tensor::from_inner),
            ..adapter.clone()
        }
        .require_grad();
    }
}
