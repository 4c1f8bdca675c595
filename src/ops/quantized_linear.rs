//! A quantized weight held on the device and dequantized there, one matrix at a time, when a
//! product needs it (QLoRA on a GPU).
//!
//! The MLX affine layout (`quant/affine.rs`) stays as it is: the packed u32 words go up as i32
//! bit patterns, the scales and biases as f32, or in the base's 16-bit float (as MLX stores them:
//! half the bytes, 0.5 GB at 8B). Codes of 3, 5 or 6 bits (K-quant GGUFs) go up widened to 4
//! or 8 bits, so that codes never straddle words. Dequantizing `[rows, cols]` at `bits` is
//!
//! ```text
//! q[r, w·k + j] = (words[r, w] >> (j·bits)) & (2^bits − 1)        k = 32 / bits codes per word
//! W[r, c]       = scales[r, c / group] · q[r, c] + biases[r, c / group]
//! ```
//!
//! An arithmetic shift of a negative i32 fills with ones, which the mask drops, so the i32
//! view of the words gives the same codes as the u32 one.
//!
//! As the host path (`frozen_linear.rs`), the linear is its own autodiff op: the backward pass
//! dequantizes again rather than keeping a dense copy alive from the forward pass, so training
//! memory holds the packed weights plus one dense matrix at a time.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{
    DType, ElementConversion, FloatDType, Int, Tensor, TensorCreationOptions, TensorData,
};

use super::elementwise::{cast, dtype_or_f32};
use super::frozen_linear::ModelBackend;
use super::matmul::matmul;
use super::primitive::{inner, primitive};
use crate::quant::QuantizedMatrix;

/// Bit widths whose codes never cross a 32-bit word: the device kernels' layouts.
pub const DEVICE_BITS: [u32; 3] = [2, 4, 8];

/// The device width that holds `bits`-bit codes: 3 → 4, 5 and 6 → 8, the others themselves.
/// The codes are exact in the wider words; the memory is 1 more bit a weight for 3 and 6 bits
/// (a Q3_K or Q6_K GGUF), 3 more for 5 (Q5_K).
fn device_width(bits: u32) -> u32 {
    DEVICE_BITS
        .into_iter()
        .find(|&b| b >= bits)
        .expect("at most 8 bits a code")
}

/// A quantized weight held on the device in the MLX affine layout, dequantized there per use.
#[derive(Debug, Clone)]
pub struct DeviceQuantized<B: Backend> {
    /// `[rows, cols · bits / 32]`, the packed words as i32.
    pub words: Tensor<B, 2, Int>,
    /// `[rows, cols / group]` each, in [`Self::half`] when given.
    pub scales: Tensor<B, 2>,
    /// `[rows, cols / group]`, added after scaling; in [`Self::half`] when given.
    pub biases: Tensor<B, 2>,
    /// Bits per code, one of [`DEVICE_BITS`].
    pub bits: u32,
    /// Consecutive elements along a row that share one scale and bias.
    pub group: usize,
    /// Hand the GEMM a matrix in this 16-bit float (`BaseStorage::half`), else f32.
    pub half: Option<FloatDType>,
}

impl<B: Backend> DeviceQuantized<B> {
    /// Uploads `q`, its codes widened to a [`DEVICE_BITS`] width where they are not one; `None`
    /// where a widened word would hold codes of two groups (a group of fewer codes than a word).
    pub fn upload(
        q: &QuantizedMatrix,
        half: Option<FloatDType>,
        device: &B::Device,
    ) -> Option<Self> {
        let bits = device_width(q.bits);
        if !q.group_size.is_multiple_of(32 / bits as usize) {
            return None;
        }
        let widened;
        let q = match bits == q.bits {
            true => q,
            false => {
                widened = q.widened(bits);
                &widened
            }
        };
        let (rows, groups) = (q.rows, q.cols / q.group_size);
        let words: Vec<i32> = q.packed.iter().map(|&w| w as i32).collect();
        let dtype = dtype_or_f32(half);
        let per_group = |values: &[f32]| {
            let data = TensorData::new(values.to_vec(), [rows, groups]);
            Tensor::from_data(
                data,
                TensorCreationOptions::new(device.clone()).with_dtype(dtype),
            )
        };
        Some(DeviceQuantized {
            words: Tensor::from_data(TensorData::new(words, [rows, q.words_per_row()]), device),
            scales: per_group(&q.scales),
            biases: per_group(&q.biases),
            bits: q.bits,
            group: q.group_size,
            half,
        })
    }

    /// `[rows, cols]` of the dense matrix.
    pub fn dims(&self) -> [usize; 2] {
        let [rows, words] = self.words.dims();
        [rows, words * 32 / self.bits as usize]
    }

    /// Rows `start..start + len` only (a part of a fused linear).
    pub fn row_range(&self, start: usize, len: usize) -> Self {
        DeviceQuantized {
            words: self.words.clone().narrow(0, start, len),
            scales: self.scales.clone().narrow(0, start, len),
            biases: self.biases.clone().narrow(0, start, len),
            ..self.clone()
        }
    }

    /// Rows `ids` only (an embedding lookup).
    pub fn select_rows(&self, ids: Tensor<B, 1, Int>) -> Self {
        // Scales of one group a row (`[rows, 1]`) are selected as a vector: Burn's CUDA `select`
        // on a `[rows, 1]` tensor read the wrong memory (session 23: 64-wide rows in groups of
        // 64, as a 4-bit g64 model's embedding at hidden 64; `bench check`'s embedding_q4).
        let per_row = |t: &Tensor<B, 2>| {
            let [rows, groups] = t.dims();
            match groups {
                1 => t
                    .clone()
                    .reshape([rows])
                    .select(0, ids.clone())
                    .unsqueeze_dim::<2>(1),
                _ => t.clone().select(0, ids.clone()),
            }
        };
        DeviceQuantized {
            words: self.words.clone().select(0, ids.clone()),
            scales: per_row(&self.scales),
            biases: per_row(&self.biases),
            ..self.clone()
        }
    }

    /// The dense `[rows, cols]` matrix in f32.
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let [rows, cols] = self.dims();
        let per_word = 32 / self.bits as usize;
        let device = self.words.device();
        let [_, words] = self.words.dims();
        let expanded = [rows, words, per_word];
        // Both sides expanded to the full shape: not every backend broadcasts integer ops.
        let shifts = Tensor::<B, 1, Int>::arange(0..per_word as i64, &device)
            .mul_scalar(self.bits as i64)
            .reshape([1, 1, per_word])
            .expand(expanded);
        let codes = self
            .words
            .clone()
            .unsqueeze_dim::<3>(2)
            .expand(expanded)
            .bitwise_right_shift(shifts)
            .bitwise_and_scalar(((1u32 << self.bits) - 1).elem::<B::IntElem>())
            .float()
            .reshape([rows, cols / self.group, self.group]);
        let f32 = |t: &Tensor<B, 2>| cast(t.clone(), Some(FloatDType::F32)).unsqueeze_dim::<3>(2);
        let (scales, biases) = (f32(&self.scales), f32(&self.biases));
        (codes * scales + biases).reshape([rows, cols])
    }

    /// The matrix as the GEMM takes it: f32, or [`Self::half`] (a backend may do this in one
    /// pass: [`ModelBackend::dequantize_for_gemm`]).
    pub fn for_gemm(&self) -> Tensor<B, 2> {
        cast(self.dequantize(), self.half)
    }

    /// The dense matrix's dtype: [`Self::half`] or f32.
    pub fn gemm_dtype(&self) -> DType {
        dtype_or_f32(self.half)
    }

    /// The same weight on the autodiff backend's inner backend (its tensors untracked).
    pub fn inner(&self) -> DeviceQuantized<B::InnerBackend>
    where
        B: AutodiffBackend,
    {
        DeviceQuantized {
            words: self.words.clone().inner(),
            scales: self.scales.clone().inner(),
            biases: self.biases.clone().inner(),
            bits: self.bits,
            group: self.group,
            half: self.half,
        }
    }
}

/// `x`: `[n, in]` → `x · deq(W)ᵀ`: `[n, out]`, with the backward described above.
pub fn linear<B: ModelBackend>(x: Tensor<B, 2>, w: &DeviceQuantized<B>) -> Tensor<B, 2> {
    inner(B::device_quantized_linear(primitive(x), w))
}

/// The product on a backend without autodiff.
pub fn forward<B: ModelBackend>(x: FloatTensor<B>, w: &DeviceQuantized<B>) -> FloatTensor<B> {
    primitive(matmul(inner::<B, 2>(x), dense::<B>(w).transpose()))
}

fn dense<B: ModelBackend>(w: &DeviceQuantized<B>) -> Tensor<B, 2> {
    inner(B::dequantize_for_gemm(w))
}

#[derive(Debug)]
struct DeviceQuantizedBackward;

impl<B: ModelBackend> Backward<B, 1> for DeviceQuantizedBackward {
    type State = DeviceQuantized<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| {
            primitive(matmul(inner::<B, 2>(dy), dense::<B>(&w)))
        });
    }
}

/// The autodiff form of [`forward`].
pub fn autodiff_forward<B: ModelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: &DeviceQuantized<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let inner = w.inner();
    match DeviceQuantizedBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = forward::<B>(x.primitive, &inner);
            prep.finish(inner, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward::<B>(x.primitive, &inner)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    #[test]
    fn dequantizes_as_the_host_does_at_each_width_widened_where_codes_straddle_words() {
        let device = Default::default();
        let (rows, cols) = (3, 128);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        for bits in crate::quant::affine::SUPPORTED_BITS {
            let q = crate::quant::quantize::quantize(&values, rows, cols, bits, 32).unwrap();
            let on_device = DeviceQuantized::<NdArray<f32>>::upload(&q, None, &device).unwrap();
            assert_eq!(on_device.bits, device_width(bits));
            let got: Vec<f32> = on_device.dequantize().into_data().into_vec().unwrap();
            assert_eq!(got, q.dequantize(), "{bits} bits");
            let ids = Tensor::from_data(TensorData::new(vec![2i64, 0], [2]), &device);
            let picked: Vec<f32> = on_device
                .select_rows(ids)
                .dequantize()
                .into_data()
                .into_vec()
                .unwrap();
            let host = q.dequantize();
            assert_eq!(picked[..cols], host[2 * cols..]);
            assert_eq!(picked[cols..], host[..cols]);
        }
    }
}
