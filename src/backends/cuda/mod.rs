//! CUDA-only pieces (built with `--features cuda`): the model's matrix products on cuBLAS,
//! attention as flash-attention kernels, rotary embeddings and quantized weights dequantized in
//! one pass each.
//!
//! With the `cuda` feature, `burn::backend::Cuda<f32>` is `Fusion<CubeBackend<CudaRuntime, ..>>`:
//! Burn records ops lazily and compiles element-wise chains into single kernels. The cuBLAS
//! product (`cublas.rs`) and the attention kernels (`flash.rs`, `attention.cu`) join that stream
//! as custom ops (`fusion.rs`) and run on the `CubeTensor`s behind the fusion handles.

pub mod cublas;
mod decode;
mod dequant;
mod flash;
mod fusion;
mod grouped_gemm;
mod kernel;
mod qgemm;
mod qgemv;
mod rope;
mod upload;

pub use fusion::dequantize;

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::CudaContext;
use cudarc::driver::sys::CUdevice_attribute;

/// A device's primary context (the one CubeCL runs on) and the properties the kernels check,
/// queried once: `flash::supports` asks on every attention call.
struct Device {
    context: Arc<CudaContext>,
    /// `(major, minor)`, e.g. `(9, 0)` for an H100 or H200.
    compute_capability: (i32, i32),
    /// The most shared memory one block may ask for (with the opt-in attribute), in bytes.
    max_shared_bytes: u32,
    /// Streaming multiprocessors (132 on an H100 SXM or H200).
    multiprocessors: usize,
}

fn device(ordinal: usize) -> &'static Device {
    static DEVICES: OnceLock<Mutex<Vec<&'static Device>>> = OnceLock::new();
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .expect("devices");
    while devices.len() <= ordinal {
        let context = CudaContext::new(devices.len()).expect("CUDA primary context");
        let compute_capability = context
            .compute_capability()
            .expect("query the compute capability");
        let max_shared_bytes = context
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .expect("query the shared memory per block");
        let multiprocessors = context
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .expect("query the multiprocessors");
        devices.push(Box::leak(Box::new(Device {
            context,
            compute_capability,
            max_shared_bytes: u32::try_from(max_shared_bytes).unwrap_or(0),
            multiprocessors: usize::try_from(multiprocessors).unwrap_or(1).max(1),
        })));
    }
    devices[ordinal]
}

fn context(ordinal: usize) -> Arc<CudaContext> {
    device(ordinal).context.clone()
}

fn compute_capability(ordinal: usize) -> (i32, i32) {
    device(ordinal).compute_capability
}

fn max_shared_bytes(ordinal: usize) -> u32 {
    device(ordinal).max_shared_bytes
}

fn multiprocessors(ordinal: usize) -> usize {
    device(ordinal).multiprocessors
}
