//! Frozen weights of the base model: dense, or quantized and dequantized only when used.

use std::sync::Arc;

use burn::tensor::{DType, Distribution, FloatDType, Int, Tensor, TensorData};

use crate::model::LoraAdapter;
use crate::ops::elementwise::cast;
use crate::ops::frozen_linear::ModelBackend;
use crate::ops::grouped_matmul::{Stacked, grouped_matmul};
use crate::ops::matmul::{matmul, matmul_add};
use crate::ops::primitive::{inner, primitive};
use crate::ops::quantized_linear::DeviceQuantized;

use crate::quant::QuantizedMatrix;

/// A `[out, in]` weight as the base model holds it.
#[derive(Debug, Clone)]
pub enum FrozenWeight<B: ModelBackend> {
    /// Held dense: f32, or 16-bit for a base held so (`BaseStorage::half`).
    Dense(Tensor<B, 2>),
    /// Rows are output features; stays packed on the host until a forward pass needs it.
    Quantized(Arc<QuantizedMatrix>),
    /// Packed on the device, dequantized there per use (backends with
    /// [`ModelBackend::DEVICE_QUANTIZED`]).
    DeviceQuantized(DeviceQuantized<B>),
}

impl<B: ModelBackend> FrozenWeight<B> {
    /// A quantized matrix where this backend multiplies it from: the device if it dequantizes
    /// there (and takes the bit width), else the host.
    pub fn quantized(q: QuantizedMatrix, half: Option<FloatDType>, device: &B::Device) -> Self {
        let on_device = B::DEVICE_QUANTIZED
            .then(|| DeviceQuantized::upload(&q, half, device))
            .flatten();
        match on_device {
            Some(w) => FrozenWeight::DeviceQuantized(w),
            None => FrozenWeight::Quantized(Arc::new(q)),
        }
    }

    /// The 16-bit float the GEMM multiplies in (a base held so), which its activations are
    /// cast to; `None` for f32.
    fn gemm_dtype(&self) -> Option<FloatDType> {
        match self {
            FrozenWeight::Dense(t) => match t.dtype() {
                DType::BF16 => Some(FloatDType::BF16),
                DType::F16 => Some(FloatDType::F16),
                _ => None,
            },
            FrozenWeight::DeviceQuantized(w) => w.half,
            FrozenWeight::Quantized(_) => None,
        }
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            FrozenWeight::Dense(t) => t.dims(),
            FrozenWeight::Quantized(q) => [q.rows, q.cols],
            FrozenWeight::DeviceQuantized(w) => w.dims(),
        }
    }

    /// The weight as a dense f32 `[out, in]` tensor (dequantizing if needed).
    pub fn to_dense(&self, device: &B::Device) -> Tensor<B, 2> {
        match self {
            FrozenWeight::Dense(t) => to_f32(t.clone()),
            FrozenWeight::Quantized(q) => crate::ops::frozen_linear::dense(q, device),
            FrozenWeight::DeviceQuantized(w) => w.dequantize(),
        }
    }

    /// The weight as its GEMM reads it: dense as held, or dequantized for this use (in
    /// [`ModelBackend::dequantize_for_gemm`]'s dtype on the device, f32 from the host).
    pub fn for_gemm(&self, device: &B::Device) -> Tensor<B, 2> {
        match self {
            FrozenWeight::Dense(t) => t.clone(),
            FrozenWeight::DeviceQuantized(w) => inner(B::dequantize_for_gemm(w)),
            FrozenWeight::Quantized(q) => crate::ops::frozen_linear::dense(q, device),
        }
    }

    /// Rows `start..start + len` as a weight of their own, held as this one is (a part of a
    /// fused linear).
    pub fn row_range(&self, start: usize, len: usize) -> Self {
        match self {
            FrozenWeight::Dense(t) => FrozenWeight::Dense(t.clone().narrow(0, start, len)),
            FrozenWeight::Quantized(q) => {
                FrozenWeight::Quantized(Arc::new(q.row_range(start, len)))
            }
            FrozenWeight::DeviceQuantized(w) => {
                FrozenWeight::DeviceQuantized(w.row_range(start, len))
            }
        }
    }

    /// Rows `ids` of the weight as `[ids.len(), in]` (an embedding lookup).
    pub fn rows(&self, ids: &[u32], device: &B::Device) -> Tensor<B, 2> {
        let indices = || {
            let idx: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
            Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [ids.len()]), device)
        };
        match self {
            FrozenWeight::Dense(t) => to_f32(t.clone().select(0, indices())),
            FrozenWeight::DeviceQuantized(w) => w.select_rows(indices()).dequantize(),
            FrozenWeight::Quantized(q) => {
                let mut out = vec![0f32; ids.len() * q.cols];
                for (row, &id) in out.chunks_exact_mut(q.cols).zip(ids) {
                    q.dequantize_row(id as usize, row);
                }
                Tensor::from_data(TensorData::new(out, [ids.len(), q.cols]), device)
            }
        }
    }
}

/// A 16-bit weight's values in f32: a base held so (`BaseStorage::half`) computes everything
/// but its GEMMs in f32. Other dtypes (f32, and f64 in the gradient checks) pass through.
fn to_f32<B: ModelBackend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    match t.dtype() {
        DType::BF16 | DType::F16 => t.cast(FloatDType::F32),
        _ => t,
    }
}

/// `y = x Wᵀ (+ b)` with a weight that never trains.
#[derive(Debug, Clone)]
pub struct FrozenLinear<B: ModelBackend> {
    /// `[out, in]`, frozen.
    pub weight: FrozenWeight<B>,
    /// `[out]`, added to the output (on q, k and v where the config has `attention_bias`).
    pub bias: Option<Tensor<B, 1>>,
    /// The trainable part, when LoRA / DoRA targets this linear.
    pub adapter: Option<LoraAdapter<B>>,
    /// 1, or the experts whose `[out, in]` matrices the weight stacks (`[experts · out, in]`):
    /// such a linear runs through [`Self::forward_grouped`].
    pub experts: usize,
}

impl<B: ModelBackend> FrozenLinear<B> {
    /// A single linear (not an experts' stack) over `weight`, without an adapter.
    pub fn new(weight: FrozenWeight<B>, bias: Option<Tensor<B, 1>>) -> Self {
        FrozenLinear {
            weight,
            bias,
            adapter: None,
            experts: 1,
        }
    }

    /// Output features: rows of the weight (of one expert's matrix, for an experts' stack).
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0] / self.experts
    }

    /// `x Wᵀ` for `x`: `[n, in]`.
    fn base(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.weight {
            FrozenWeight::Dense(w) => matmul(x, w.clone().transpose()),
            FrozenWeight::Quantized(q) => inner(B::quantized_linear(primitive(x), q)),
            FrozenWeight::DeviceQuantized(w) => crate::ops::quantized_linear::linear(x, w),
        }
    }

    /// The dtype this linear's GEMM reads its input in, when it is not the activations' own:
    /// bf16 for a bf16 base. The ops that feed a projection (RMSNorm, SwiGLU) write it.
    pub fn input_dtype(&self) -> Option<FloatDType> {
        self.weight.gemm_dtype()
    }

    /// `x` in the precision this linear's GEMM takes it (a no-op when the op that made `x`
    /// already wrote [`Self::input_dtype`]). The LoRA product reuses the cast.
    pub fn gemm_input<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        cast(x, self.input_dtype())
    }

    /// The dtype the backward pass may hand this linear its output's gradient in: its GEMM's
    /// input dtype (bf16 for a bf16 base), unless DoRA's rescale multiplies that gradient by f32
    /// values first (Burn's binary ops take one dtype).
    pub fn output_grad_dtype(&self) -> Option<FloatDType> {
        match &self.adapter {
            Some(adapter) if adapter.magnitude.is_some() => None,
            _ => self.input_dtype(),
        }
    }

    /// An experts' stack: `x`: `[n, in]`, its rows grouped by expert as `counts` says (see
    /// [`grouped_matmul`]) → `[n, out]` in f32, each group through its expert's matrix and
    /// adapter.
    pub fn forward_grouped(&self, x: Tensor<B, 2>, counts: &[usize]) -> Tensor<B, 2> {
        let x = self.gemm_input(x);
        let [rows, inp] = self.weight.dims();
        let out = rows / self.experts;
        let w = self
            .weight
            .for_gemm(&x.device())
            .reshape([self.experts, out, inp]);
        let y = grouped_matmul(x.clone(), w, Stacked::Transposed, counts);
        match &self.adapter {
            Some(adapter) => y + adapter.update_grouped(x.clone(), self.dropout_mask(&x), counts),
            None => y,
        }
    }

    /// The adapter's dropout mask for input `x` (`[n, in]` of 0 or 1/(1-p)), when it drops
    /// anything in this pass: training on the autodiff backend, or checkpointing's forward.
    fn dropout_mask(&self, x: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
        let adapter = self.adapter.as_ref()?;
        let training = adapter.dropout_without_autodiff || B::ad_enabled(&x.device());
        (adapter.dropout > 0.0 && training).then(|| {
            let keep = 1.0 - adapter.dropout;
            x.random_like(Distribution::Bernoulli(keep))
                .div_scalar(keep)
        })
    }

    /// `x`: `[batch, seq, in]` → `[batch, seq, out]` in f32.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, features] = x.dims();
        self.forward_rows(x.reshape([batch * seq, features]))
            .reshape([batch, seq, self.out_features()])
    }

    /// `x`: `[n, in]` → `[n, out]` in f32. Projections of one input (q, k, v; gate, up) take the
    /// same `[n, in]` tensor, so the backward pass accumulates their input gradients in one
    /// buffer (`ops::matmul`).
    pub fn forward_rows(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let x = self.gemm_input(x);
        let update = self
            .adapter
            .as_ref()
            .map(|adapter| adapter.update(x.clone(), self.dropout_mask(&x)));
        let y = match (&self.weight, update) {
            // The GEMM adds its product onto the LoRA update (cuBLAS's β = 1 on CUDA) instead of
            // writing it and reading it back for a separate sum.
            (FrozenWeight::Dense(w), Some(update)) => matmul_add(x, w.clone().transpose(), update),
            (_, update) => {
                let base = self.base(x);
                match update {
                    Some(update) => base + update,
                    None => base,
                }
            }
        };
        let y = match &self.adapter {
            Some(adapter) => adapter.rescale(y, &self.weight),
            None => y,
        };
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze::<2>(),
            None => y,
        }
    }
}
