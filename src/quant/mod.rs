//! Quantized weights: the MLX affine layout every quantized base is held in, and the mapping of
//! GGUF blocks (and K-quant super-blocks) onto it.

pub mod affine;
pub mod ggml;
pub mod ggml_iq4;
pub mod ggml_k;
#[cfg(target_arch = "x86_64")]
pub mod lanes;
pub mod packed_matmul;
pub mod quantize;
pub mod tiled_matmul;

pub use affine::QuantizedMatrix;
