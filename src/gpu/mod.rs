//! CUDA-only pieces (built with `--features cuda`): the model's matrix products on cuBLAS and
//! attention as flash-attention kernels.
//!
//! With the `cuda` feature, `burn::backend::Cuda<f32>` is `Fusion<CubeBackend<CudaRuntime, ..>>`:
//! Burn records ops lazily and compiles element-wise chains into single kernels. The cuBLAS
//! product (`cublas.rs`) and the attention kernels (`flash.rs`, `attention.cu`) join that stream
//! as custom ops (`fusion.rs`) and run on the `CubeTensor`s behind the fusion handles.

mod cublas;
mod flash;
mod fusion;

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::CudaContext;

/// The primary context of a device: the one CubeCL runs on.
fn context(device: usize) -> Arc<CudaContext> {
    static CONTEXTS: OnceLock<Mutex<Vec<Arc<CudaContext>>>> = OnceLock::new();
    let mut contexts = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .expect("contexts");
    while contexts.len() <= device {
        let ordinal = contexts.len();
        contexts.push(CudaContext::new(ordinal).expect("CUDA primary context"));
    }
    contexts[device].clone()
}

/// `(major, minor)`, e.g. `(9, 0)` for an H100 or H200.
fn compute_capability(device: usize) -> (i32, i32) {
    context(device)
        .compute_capability()
        .expect("query the compute capability")
}

/// The most shared memory one block may ask for (with the opt-in attribute), in bytes.
fn max_shared_bytes(device: usize) -> u32 {
    let bytes = context(device)
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )
        .expect("query the shared memory per block");
    u32::try_from(bytes).unwrap_or(0)
}
