//! The base's weights with the adapters folded in, one tensor at a time, on the host:
//!
//! ```text
//! LoRA:  W' = W + s · (A B)ᵀ
//! DoRA:  W' = m / ‖W + s · (A B)ᵀ‖_row · (W + s · (A B)ᵀ)
//! ```
//!
//! `W` is the dequantized base weight, so nothing is rounded until a writer encodes `W'`; the
//! writer then measures how much of `W' − W` its encoding kept ([`Survival`]).

use std::borrow::Cow;

use anyhow::Result;

use crate::lora::stored::{HostAdapter, HostAdapters, canonical};
use crate::model::ModelFiles;
use crate::model::names::{TensorSpec, tensor_specs};
use crate::model::weights::HostWeight;
use crate::recipe::FloatDtype;

/// A base model and, optionally, the adapters to fold into it.
pub struct FusedModel<'a> {
    /// The base model's files.
    pub files: &'a ModelFiles,
    /// The adapters to fold in; `None` converts the base alone.
    pub adapters: Option<&'a HostAdapters>,
    /// Every weight of the model, in Hugging Face naming and file order (`lm_head.weight` absent
    /// when tied).
    pub specs: Vec<TensorSpec>,
}

/// One tensor: as the base stores it, and fused when an adapter touches it.
pub struct FusedTensor {
    /// The tensor as the base stores it (float, or packed quantized).
    pub base: HostWeight,
    /// `W'` in f32 when an adapter touches the tensor; `None` otherwise.
    pub fused: Option<Vec<f32>>,
}

impl FusedTensor {
    /// The base weight in float (dequantized if stored quantized).
    pub fn base_values(&self) -> Cow<'_, [f32]> {
        match &self.base {
            HostWeight::Dense { values, .. } => Cow::Borrowed(values),
            HostWeight::Quantized(q) => Cow::Owned(q.dequantize()),
        }
    }

    /// What to write in float: `W'` when adapted, else the base.
    pub fn values(&self) -> Cow<'_, [f32]> {
        match &self.fused {
            Some(f) => Cow::Borrowed(f),
            None => self.base_values(),
        }
    }
}

impl<'a> FusedModel<'a> {
    /// The base with the adapters (if any) to fold into it, over every tensor its config implies.
    pub fn new(files: &'a ModelFiles, adapters: Option<&'a HostAdapters>) -> Self {
        FusedModel {
            files,
            adapters,
            specs: tensor_specs(&files.config),
        }
    }

    /// Parameters of the whole model (quantized matrices count their logical elements).
    pub fn parameter_count(&self) -> usize {
        self.specs
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    }

    /// A progress bar over the tensors, for a writer to advance.
    pub fn progress(&self) -> crate::progress::Progress {
        let what = match self.adapters {
            Some(_) => "fusing and writing",
            None => "converting",
        };
        crate::progress::Progress::new(what, self.specs.len() as u64, "tensors")
    }

    /// The adapter of the module tensor `spec` belongs to, if any.
    pub fn adapter(&self, spec: &TensorSpec) -> Option<&'a HostAdapter> {
        self.adapters?.modules.get(&canonical(spec.module()))
    }

    /// Reads tensor `spec` and folds its adapter in, if it has one.
    pub fn tensor(&self, spec: &TensorSpec) -> Result<FusedTensor> {
        let base = self
            .files
            .weights
            .load(&spec.name, &spec.shape, &self.files.config)?;
        let fused = match self.adapter(spec) {
            None => None,
            Some(adapter) => {
                let w = match &base {
                    HostWeight::Dense { values, .. } => Cow::Borrowed(values.as_slice()),
                    HostWeight::Quantized(q) => Cow::Owned(q.dequantize()),
                };
                Some(fold(&w, adapter))
            }
        };
        Ok(FusedTensor { base, fused })
    }
}

impl FusedTensor {
    /// The tensor's bytes in float `dtype`; an adapted matrix records in `survival` how much of
    /// its change the rounding to `dtype` kept.
    pub fn float_bytes(&self, module: &str, dtype: FloatDtype, survival: &mut Survival) -> Vec<u8> {
        let values = self.values();
        if self.fused.is_some() {
            let base = self.base_values();
            survival.add(
                module,
                &base,
                &values,
                &dtype.round_trip(&base),
                &dtype.round_trip(&values),
            );
        }
        dtype.encode(&values)
    }
}

/// `W'` for one adapter (see the module docs).
fn fold(w: &[f32], adapter: &HostAdapter) -> Vec<f32> {
    let mut out = adapter.delta();
    out.iter_mut().zip(w).for_each(|(d, w)| *d += w);
    if let Some(m) = &adapter.magnitude {
        let cols = adapter.in_features;
        for (row, &m) in out.chunks_exact_mut(cols).zip(m) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            let k = m / norm.max(f32::MIN_POSITIVE);
            row.iter_mut().for_each(|v| *v *= k);
        }
    }
    out
}

/// How much of the adapters' change an encoding kept (the fuse trap in docs/formats.md), over every adapted
/// matrix together and for the layer that kept least. With `D = W' − W` and `K = E(W') − E(W)`
/// (`E`: the writer's encoding, read back):
///
/// - `kept = ⟨K, D⟩ / ‖D‖²`: the share of the change that survives along its own direction;
///   1 when stored exactly, 0 when rounded away;
/// - `norm_ratio = ‖K‖ / ‖D‖`: the first measure we used, which rounding noise inflates past 1
///   when `D` is small against the quantization step, so it is reported beside `kept`.
#[derive(Debug, Clone, Default)]
pub struct Survival {
    dot: f64,
    kept_sq: f64,
    change_sq: f64,
    /// Adapted matrices measured.
    pub layers: usize,
    /// The module that kept least, with its share kept.
    pub worst: Option<(String, f64)>,
}

impl Survival {
    /// `base`, `fused`: the float weights; `encoded_*`: the same after the writer's encoding.
    pub fn add(
        &mut self,
        module: &str,
        base: &[f32],
        fused: &[f32],
        encoded_base: &[f32],
        encoded_fused: &[f32],
    ) {
        let (mut dot, mut kept_sq, mut change_sq) = (0f64, 0f64, 0f64);
        for (((b, f), eb), ef) in base.iter().zip(fused).zip(encoded_base).zip(encoded_fused) {
            let (d, k) = (f64::from(f - b), f64::from(ef - eb));
            dot += k * d;
            kept_sq += k * k;
            change_sq += d * d;
        }
        self.dot += dot;
        self.kept_sq += kept_sq;
        self.change_sq += change_sq;
        self.layers += 1;
        let kept = dot / change_sq.max(f64::MIN_POSITIVE);
        if self.worst.as_ref().is_none_or(|(_, w)| kept < *w) {
            self.worst = Some((module.to_string(), kept));
        }
    }

    /// The share of the change kept along its direction (1.0 when nothing was adapted).
    pub fn kept(&self) -> f64 {
        if self.change_sq == 0.0 {
            1.0
        } else {
            self.dot / self.change_sq
        }
    }

    /// `‖E(W') − E(W)‖ / ‖W' − W‖` over all adapted matrices.
    pub fn norm_ratio(&self) -> f64 {
        if self.change_sq == 0.0 {
            1.0
        } else {
            (self.kept_sq / self.change_sq).sqrt()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dora_fold_gives_rows_of_norm_m() {
        let adapter = HostAdapter {
            a: vec![0.5, -1.0],
            b: vec![1.0, 2.0],
            magnitude: Some(vec![3.0, 0.5]),
            in_features: 2,
            out_features: 2,
            rank: 1,
            scale: 1.0,
            experts: 1,
        };
        let w = [1.0, 0.0, 0.0, 1.0];
        let out = fold(&w, &adapter);
        for (row, m) in out.chunks(2).zip([3.0f32, 0.5]) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - m).abs() < 1e-6);
        }
        // Direction is that of W + ΔW: row 0 = [1 + 0.5, -1].
        assert!((out[0] / out[1] - (1.5 / -1.0)).abs() < 1e-6);
    }

    #[test]
    fn survival_projects_the_kept_change_on_the_change() {
        let mut s = Survival::default();
        // The change is [0.25, 1.0]; the encoding rounds the first part away and keeps [0, 1].
        s.add("m", &[0.0, 0.0], &[0.25, 1.0], &[0.0, 0.0], &[0.0, 1.0]);
        assert!((s.kept() - 1.0 / 1.0625).abs() < 1e-12);
        assert!((s.norm_ratio() - (1.0 / 1.0625f64).sqrt()).abs() < 1e-12);
        // Pure noise across the change keeps nothing along it, though its norm is large.
        let mut noise = Survival::default();
        noise.add("n", &[0.0, 0.0], &[0.1, 0.0], &[0.0, 0.0], &[0.0, 0.5]);
        assert_eq!(noise.kept(), 0.0);
        assert!((noise.norm_ratio() - 5.0).abs() < 1e-6);
        assert_eq!(noise.worst.as_ref().unwrap().0, "n");
    }
}
