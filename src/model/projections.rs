//! Projections of one input: q, k and v (or gate and up) as separate linears, or as one fused
//! linear whose output's columns split into them (Phi-3's `qkv_proj` and `gate_up_proj`).
//!
//! ```text
//! split:  [q, k, v] = [x Wqᵀ, x Wkᵀ, x Wvᵀ]
//! fused:  [q | k | v] = x W_qkvᵀ   (W_qkv = [Wq; Wk; Wv], one GEMM, one LoRA on the whole)
//! ```
//!
//! A fused linear whose parts are adapted on their own (`self_attn.q_proj` on Phi-3) is split
//! into its parts' rows first ([`Projections::split`]): each part then runs its own GEMM and
//! carries its own adapter, the same product as the fused one with `ΔW = [ΔWq; 0; ΔWv]`.

use burn::tensor::{FloatDType, Tensor};

use super::linear::FrozenLinear;
use super::names::BlockLinear;
use crate::ops::frozen_linear::ModelBackend;

/// Linears that all read the same input.
#[derive(Debug, Clone)]
pub enum Projections<B: ModelBackend> {
    /// One linear per output, each with its name.
    Split(Vec<(BlockLinear, FrozenLinear<B>)>),
    /// One linear whose output columns are the outputs, `widths` wide each, in order.
    Fused {
        /// Its name (`BlockLinear::Qkv`, `BlockLinear::GateUp`).
        name: BlockLinear,
        /// The fused weight, `[sum(widths), in]`.
        linear: FrozenLinear<B>,
        /// Each output's width.
        widths: Vec<usize>,
    },
}

impl<B: ModelBackend> Projections<B> {
    /// The same outputs as separate linears, each over its rows of the fused weight (and bias),
    /// named by the fused linear's parts, so that each can take an adapter of its own. Split
    /// projections come back as they are. The fused linear must not carry an adapter yet.
    pub fn split(self) -> Self {
        match self {
            Projections::Fused {
                name,
                linear,
                widths,
            } => {
                debug_assert!(linear.adapter.is_none(), "split before adapters are added");
                let mut start = 0;
                let parts = name.parts().iter().zip(&widths).map(|(&part, &width)| {
                    let rows = FrozenLinear::new(
                        linear.weight.row_range(start, width),
                        linear.bias.clone().map(|b| b.narrow(0, start, width)),
                    );
                    start += width;
                    (part, rows)
                });
                Projections::Split(parts.collect())
            }
            split => split,
        }
    }

    /// The linear whose GEMM input dtype the op feeding these projections writes.
    pub fn first(&self) -> &FrozenLinear<B> {
        match self {
            Projections::Split(linears) => &linears[0].1,
            Projections::Fused { linear, .. } => linear,
        }
    }

    /// `x` (`[n, in]`) through every projection: one `[n, width]` output each, in order. The
    /// split linears take one `[n, in]` tensor, so their input gradients add up in one buffer.
    pub fn forward_rows(&self, x: Tensor<B, 2>) -> Vec<Tensor<B, 2>> {
        match self {
            Projections::Split(linears) => linears
                .iter()
                .map(|(_, linear)| linear.forward_rows(x.clone()))
                .collect(),
            Projections::Fused { linear, widths, .. } => {
                let y = linear.forward_rows(x);
                let mut start = 0;
                widths
                    .iter()
                    .map(|&w| {
                        start += w;
                        y.clone().narrow(1, start - w, w)
                    })
                    .collect()
            }
        }
    }

    /// The dtype the backward pass may hand every output's gradient back in (see
    /// [`FrozenLinear::output_grad_dtype`]): one all the linears take.
    pub fn output_grad_dtype(&self) -> Option<FloatDType> {
        match self {
            Projections::Split(linears) => linears
                .iter()
                .map(|(_, l)| l.output_grad_dtype())
                .reduce(|a, b| a.and(b))
                .flatten(),
            Projections::Fused { linear, .. } => linear.output_grad_dtype(),
        }
    }

    /// The linears with their names.
    pub fn linears(&self) -> Vec<(BlockLinear, &FrozenLinear<B>)> {
        match self {
            Projections::Split(linears) => linears.iter().map(|(n, l)| (*n, l)).collect(),
            Projections::Fused { name, linear, .. } => vec![(*name, linear)],
        }
    }

    /// The linears with their names, to change.
    pub fn linears_mut(&mut self) -> Vec<(BlockLinear, &mut FrozenLinear<B>)> {
        match self {
            Projections::Split(linears) => linears.iter_mut().map(|(n, l)| (*n, l)).collect(),
            Projections::Fused { name, linear, .. } => vec![(*name, linear)],
        }
    }

    /// The same projections with every linear replaced by `f(linear)`.
    pub fn map<C: ModelBackend>(
        &self,
        mut f: impl FnMut(&FrozenLinear<B>) -> FrozenLinear<C>,
    ) -> Projections<C> {
        match self {
            Projections::Split(linears) => {
                Projections::Split(linears.iter().map(|(n, l)| (*n, f(l))).collect())
            }
            Projections::Fused {
                name,
                linear,
                widths,
            } => Projections::Fused {
                name: *name,
                linear: f(linear),
                widths: widths.clone(),
            },
        }
    }
}
