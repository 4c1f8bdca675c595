//! The backends and their implementations of the model's ops (`crate::ops`): `cpu` (burn-ndarray
//! with our own host passes), `cuda` (cuBLAS and our kernels), `metal` and `vulkan` (one portable
//! wgpu backend, Burn's generic ops). Model code is generic over `B: Backend`; this is the one
//! place that names concrete backends, chosen by `device = "cpu" | "cuda" | "metal" | "vulkan"`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(any(feature = "metal", feature = "vulkan"))]
mod wgpu;

use anyhow::{Result, bail};

use crate::ops::ModelBackend;
use crate::recipe::DeviceKind;

/// CPU backend: burn-ndarray (see README for why ndarray rather than flex).
pub type Cpu = burn::backend::NdArray<f32>;

/// Work that runs on whichever backend the user picked.
pub trait BackendTask {
    /// What the task returns.
    type Output;
    /// Runs the task on backend `B`, on `device`.
    fn run<B: ModelBackend + DeviceMemory>(self, device: B::Device) -> Result<Self::Output>;
}

/// What a device's memory pool holds, for benchmarks.
pub trait DeviceMemory: burn::tensor::backend::Backend {
    /// Bytes the backend has reserved on the device (its pool, which keeps what it reserves).
    fn reserved_bytes(_device: &Self::Device) -> Option<u64> {
        None
    }
}

impl DeviceMemory for Cpu {}

#[cfg(feature = "cuda")]
impl DeviceMemory for burn::backend::Cuda<f32> {
    fn reserved_bytes(device: &Self::Device) -> Option<u64> {
        use burn_cubecl::cubecl::Runtime;
        let client = burn_cubecl::cubecl::cuda::CudaRuntime::client(device);
        client.memory_usage().ok().map(|usage| usage.bytes_reserved)
    }
}

/// Runs `task` on the backend for `kind`; an error where this binary was built without it.
pub fn run_on<T: BackendTask>(kind: DeviceKind, task: T) -> Result<T::Output> {
    match kind {
        DeviceKind::Cpu => task.run::<Cpu>(Default::default()),
        DeviceKind::Cuda => cuda(task),
        DeviceKind::Metal => metal(task),
        DeviceKind::Vulkan => vulkan(task),
    }
}

#[cfg(feature = "cuda")]
fn cuda<T: BackendTask>(task: T) -> Result<T::Output> {
    task.run::<burn::backend::Cuda<f32>>(Default::default())
}

#[cfg(not(feature = "cuda"))]
fn cuda<T: BackendTask>(_task: T) -> Result<T::Output> {
    bail!(
        "this binary was built without CUDA support: rebuild with `cargo build --release --features cuda`"
    )
}

#[cfg(feature = "metal")]
fn metal<T: BackendTask>(task: T) -> Result<T::Output> {
    use burn::backend::wgpu::graphics::Metal;
    task.run::<wgpu::Portable>(wgpu::device::<Metal>("Metal")?)
}

#[cfg(not(feature = "metal"))]
fn metal<T: BackendTask>(_task: T) -> Result<T::Output> {
    bail!(
        "this binary was built without Metal support: rebuild with `cargo build --release --features metal`"
    )
}

#[cfg(feature = "vulkan")]
fn vulkan<T: BackendTask>(task: T) -> Result<T::Output> {
    use burn::backend::wgpu::graphics::Vulkan;
    let device = wgpu::device::<Vulkan>("Vulkan").map_err(|e| {
        e.context(
            "install a Vulkan driver (without a GPU on Linux, Mesa's CPU driver: apt install mesa-vulkan-drivers)",
        )
    })?;
    task.run::<wgpu::Portable>(device)
}

#[cfg(not(feature = "vulkan"))]
fn vulkan<T: BackendTask>(_task: T) -> Result<T::Output> {
    bail!(
        "this binary was built without Vulkan support: rebuild with `cargo build --release --features vulkan`"
    )
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), for CPU runs.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
