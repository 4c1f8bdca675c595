//! The backends and their implementations of the model's ops (`crate::ops`): `cpu` (burn-ndarray
//! with our own host passes), `cuda` (cuBLAS and our kernels), `metal` and `vulkan` (one portable
//! wgpu backend: our CubeCL attention kernels, Burn's generic ops for the rest). Model code is generic over `B: Backend`; this is the one
//! place that names concrete backends, chosen by `device = "auto" | "cpu" | "cuda" | "metal" |
//! "vulkan"` (`resolve` says what `auto` means).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(any(feature = "metal", feature = "vulkan"))]
mod portable;

use anyhow::{Result, bail};

use crate::distributed::Group;
use crate::ops::ModelBackend;
use crate::recipe::{DeviceKind, GpuSet};

/// CPU backend: burn-ndarray (see README for why ndarray rather than flex).
pub type Cpu = burn::backend::NdArray<f32>;

/// Work that runs on whichever backend the user picked.
pub trait BackendTask {
    /// What the task returns.
    type Output;
    /// Runs the task on backend `B`, on `device`.
    fn run<B: ModelBackend + DeviceMemory + DataParallel>(
        self,
        device: B::Device,
    ) -> Result<Self::Output>;
}

/// Devices for data-parallel training (`train --gpus`, `[distributed]`): one per worker, each
/// with its end of one communicator.
pub trait DataParallel: burn::tensor::backend::Backend {
    /// The workers for `gpus`; an error on backends without a collective library (CUDA alone
    /// has NCCL).
    fn workers(_gpus: &GpuSet) -> Result<Group<Self::Device>> {
        bail!(
            "data-parallel training (--gpus, [distributed]) runs on CUDA: set device = \"cuda\" with a binary built with --features cuda"
        )
    }
}

impl DataParallel for Cpu {}

#[cfg(feature = "cuda")]
impl DataParallel for burn::backend::Cuda<f32> {
    fn workers(gpus: &GpuSet) -> Result<Group<Self::Device>> {
        let available = cudarc::driver::CudaContext::device_count()
            .map_err(|e| anyhow::anyhow!("counting CUDA devices: {e:?}"))?
            as usize;
        let ids = gpus
            .ids(available)
            .map_err(|e| anyhow::anyhow!("distributed.gpus / --gpus: {e}"))?;
        // NVLink multicast (NVLS) hangs or fails on some lent machines; off unless asked for.
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            // SAFETY: set before any worker thread starts or NCCL reads its environment.
            unsafe { std::env::set_var("NCCL_NVLS_ENABLE", "0") };
        }
        let comms = crate::distributed::Nccl::group(&ids).map_err(anyhow::Error::msg)?;
        Ok(ids
            .into_iter()
            .zip(comms)
            .map(|(id, comm)| {
                let device = burn::backend::cuda::CudaDevice::new(id);
                (
                    device,
                    Box::new(comm) as Box<dyn crate::distributed::Communicator>,
                )
            })
            .collect())
    }
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

/// The device `device = "auto"` stands for here (printed): CUDA if this binary has it and a GPU
/// answers, Metal on macOS if this binary has it, else the CPU. Vulkan is never guessed (a CPU's
/// Vulkan driver would be slower than the CPU backend). Other kinds come back as they are.
pub fn resolve(kind: DeviceKind) -> DeviceKind {
    if kind != DeviceKind::Auto {
        return kind;
    }
    let chosen = if cuda_answers() {
        DeviceKind::Cuda
    } else if cfg!(all(feature = "metal", target_os = "macos")) {
        DeviceKind::Metal
    } else {
        DeviceKind::Cpu
    };
    eprintln!("device = \"auto\": running on {chosen:?}");
    chosen
}

/// `probe()`, or `None` where it panics, without the panic's message: for the libraries that
/// panic when a device or its driver is missing (cudarc's dynamic loading, wgpu's adapter
/// lookup), where a missing device is an answer, not a crash. Call it before other threads run:
/// the panic hook is process-wide.
#[cfg(any(feature = "cuda", feature = "metal", feature = "vulkan"))]
fn quietly<R>(probe: impl FnOnce() -> R + std::panic::UnwindSafe) -> Option<R> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(probe).ok();
    std::panic::set_hook(hook);
    result
}

/// Whether a CUDA device answers (the driver library is loaded on first use; without one cudarc
/// panics).
#[cfg(feature = "cuda")]
fn cuda_answers() -> bool {
    matches!(
        quietly(cudarc::driver::CudaContext::device_count),
        Some(Ok(n)) if n > 0
    )
}

#[cfg(not(feature = "cuda"))]
fn cuda_answers() -> bool {
    false
}

/// Runs `task` on the backend for `kind` (`auto` resolved); an error where this binary was built
/// without it.
pub fn run_on<T: BackendTask>(kind: DeviceKind, task: T) -> Result<T::Output> {
    match kind {
        DeviceKind::Auto => run_on(resolve(kind), task),
        DeviceKind::Cpu => task.run::<Cpu>(Default::default()),
        DeviceKind::Cuda => cuda(task),
        DeviceKind::Metal => metal(task),
        DeviceKind::Vulkan => vulkan(task),
    }
}

#[cfg(feature = "cuda")]
fn cuda<T: BackendTask>(task: T) -> Result<T::Output> {
    if !cuda_answers() {
        bail!(
            "device = \"cuda\" but no CUDA device answered (no NVIDIA driver's libcuda, or no GPU): run on a machine with one, or set device = \"cpu\" (or \"auto\")"
        );
    }
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
    task.run::<portable::Portable>(portable::device::<Metal>("Metal")?)
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
    let device = portable::device::<Vulkan>("Vulkan").map_err(|e| {
        e.context(
            "install a Vulkan driver (without a GPU on Linux, Mesa's CPU driver: apt install mesa-vulkan-drivers)",
        )
    })?;
    task.run::<portable::Portable>(device)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_resolves_to_a_concrete_device_and_others_stay() {
        let chosen = resolve(DeviceKind::Auto);
        assert_ne!(chosen, DeviceKind::Auto);
        assert_ne!(chosen, DeviceKind::Vulkan, "Vulkan is never guessed");
        if cfg!(not(any(feature = "cuda", feature = "metal"))) {
            assert_eq!(chosen, DeviceKind::Cpu);
        }
        for kind in [DeviceKind::Cpu, DeviceKind::Cuda, DeviceKind::Vulkan] {
            assert_eq!(resolve(kind), kind);
        }
    }
}
