//! CUDA-only pieces (built with `--features cuda`): the model's matrix products on cuBLAS.
//!
//! With the `cuda` feature, `burn::backend::Cuda<f32>` is `Fusion<CubeBackend<CudaRuntime, ..>>`:
//! Burn records ops lazily and compiles element-wise chains into single kernels. The cuBLAS
//! product joins that stream as a custom op (`fusion.rs`) and runs on the `CubeTensor`s behind
//! the fusion handles (`cublas.rs`).

mod cublas;
mod fusion;
