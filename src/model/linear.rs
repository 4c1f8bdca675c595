//! Frozen weights of the base model: dense, or quantized and dequantized only when used.

use std::sync::Arc;

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

use crate::quant::QuantizedMatrix;

/// A `[out, in]` weight as the base model holds it.
#[derive(Debug, Clone)]
pub enum FrozenWeight<B: Backend> {
    Dense(Tensor<B, 2>),
    /// Rows are output features; stays packed until a forward pass needs it.
    Quantized(Arc<QuantizedMatrix>),
}

impl<B: Backend> FrozenWeight<B> {
    pub fn dims(&self) -> [usize; 2] {
        match self {
            FrozenWeight::Dense(t) => t.dims(),
            FrozenWeight::Quantized(q) => [q.rows, q.cols],
        }
    }

    /// The weight as a dense `[out, in]` tensor (dequantizing if needed).
    pub fn to_dense(&self, device: &B::Device) -> Tensor<B, 2> {
        match self {
            FrozenWeight::Dense(t) => t.clone(),
            FrozenWeight::Quantized(q) => {
                Tensor::from_data(TensorData::new(q.dequantize(), [q.rows, q.cols]), device)
            }
        }
    }

    /// Rows `ids` of the weight as `[ids.len(), in]` (an embedding lookup).
    pub fn rows(&self, ids: &[u32], device: &B::Device) -> Tensor<B, 2> {
        match self {
            FrozenWeight::Dense(t) => {
                let idx: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
                let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [ids.len()]), device);
                t.clone().select(0, idx)
            }
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

/// Up to this many tokens, a quantized linear multiplies from the packed codes on the host
/// (measured on SmolLM2, 2 cores: 22-token prompts 43 → 82 tokens/s); beyond it, dequantizing
/// once and running the backend's GEMM is faster.
const PACKED_MATMUL_MAX_ROWS: usize = 32;

/// `y = x Wᵀ (+ b)` with a weight that never trains.
#[derive(Debug, Clone)]
pub struct FrozenLinear<B: Backend> {
    pub weight: FrozenWeight<B>,
    pub bias: Option<Tensor<B, 1>>,
}

impl<B: Backend> FrozenLinear<B> {
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x`: `[batch, seq, in]` → `[batch, seq, out]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, features] = x.dims();
        let out = self.out_features();
        let device = x.device();
        let y = match &self.weight {
            // A few tokens (generation): multiply straight from the packed codes.
            FrozenWeight::Quantized(q) if batch * seq <= PACKED_MATMUL_MAX_ROWS => {
                let xs: Vec<f32> = x
                    .into_data()
                    .convert::<f32>()
                    .into_vec()
                    .expect("f32 activations");
                let ys = crate::quant::packed_matmul::matmul_transposed(q, &xs, batch * seq);
                Tensor::from_data(TensorData::new(ys, [batch, seq, out]), &device)
            }
            weight => x
                .reshape([batch * seq, features])
                .matmul(weight.to_dense(&device).transpose())
                .reshape([batch, seq, out]),
        };
        match &self.bias {
            Some(b) => y + b.clone().unsqueeze::<3>(),
            None => y,
        }
    }
}
