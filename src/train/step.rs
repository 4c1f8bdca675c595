//! One training step's pieces on an autodiff backend: the loss of a batch, and moving the adapter
//! tensors and their gradients in and out of the model as flat lists (in `Decoder::adapters`
//! order) for the optimizer.

use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;

use super::loss::masked_cross_entropy;
use crate::lora::LoraAdapter;
use crate::model::valid::TrainBackend;
use crate::model::{Decoder, FrozenLinearBackend};

/// A padded batch: `inputs`, `targets` and `mask` are `[batch, seq]` row-major; `targets` is the
/// input shifted by one and `mask` is 1 where the target is trained. Packed rows also carry
/// `segments`: the example each position belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub mask: Vec<f32>,
    pub segments: Option<Vec<u32>>,
}

impl Batch {
    /// Positions whose loss counts.
    pub fn trained_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m > 0.0).count()
    }
}

/// Mean loss over the batch's trained positions.
pub fn batch_loss<B: FrozenLinearBackend>(
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
    let grad_dtype = decoder.lm_head.output_grad_dtype();
    masked_cross_entropy(logits, &batch.targets, &batch.mask, grad_dtype).0
}

/// The batch's mean loss and the gradients of `scale ×` that loss (`scale` = 1 / accumulation
/// steps), flattened in [`parameters`] order. With `grad_checkpoint`, block activations are
/// recomputed in the backward pass instead of kept (see [`super::checkpointed`]).
pub fn loss_and_gradients<B: TrainBackend>(
    decoder: &Decoder<B>,
    batch: &Batch,
    scale: f64,
    grad_checkpoint: bool,
    device: &B::Device,
) -> (f64, Vec<Tensor<B::InnerBackend, 1>>) {
    if grad_checkpoint {
        return super::checkpointed::loss_and_gradients(decoder, batch, scale, device);
    }
    // The head runs a slice at a time (`head.rs`); its gradient then flows through the blocks.
    let top = decoder.forward_blocks(
        &batch.inputs,
        batch.segments.as_deref(),
        batch.batch,
        device,
    );
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
pub fn parameters<B: AutodiffBackend + FrozenLinearBackend>(
    decoder: &Decoder<B>,
) -> Vec<Tensor<B::InnerBackend, 1>> {
    decoder
        .adapters()
        .iter()
        .flat_map(|(_, a)| a.parameters())
        .map(|p| p.inner())
        .collect()
}

/// The gradients of the trainable tensors, flattened; zeros where a tensor got none.
pub fn gradients<B: AutodiffBackend + FrozenLinearBackend>(
    decoder: &Decoder<B>,
    grads: &B::Gradients,
) -> Vec<Tensor<B::InnerBackend, 1>> {
    adapter_gradients(decoder.adapters().into_iter().map(|(_, a)| a), grads)
}

/// [`gradients`] for some of the adapters, in the order given.
pub fn adapter_gradients<'a, B: AutodiffBackend + FrozenLinearBackend>(
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
pub fn set_parameters<B: AutodiffBackend + FrozenLinearBackend>(
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
