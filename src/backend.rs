//! Backend selection. Model code is generic over `B: Backend`; this is the one place that names
//! concrete backends, chosen by `device = "cpu" | "cuda" | "metal"`.

use anyhow::{Result, bail};

use crate::model::FrozenLinearBackend;

/// CPU backend: burn-ndarray (see README for why ndarray rather than flex).
pub type Cpu = burn::backend::NdArray<f32>;

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
    Default,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
    Metal,
}

/// `[model] dtype`: every backend computes the base in f32 for now; a bf16 or f16 request is
/// refused rather than silently run in f32.
pub fn check_compute_dtype(dtype: crate::recipe::Dtype) -> Result<()> {
    if dtype != crate::recipe::Dtype::F32 {
        bail!(
            "model.dtype = {dtype:?}: loraforge computes the base in f32 on every backend for now; set model.dtype = \"f32\" (or remove it)"
        );
    }
    Ok(())
}

/// Work that runs on whichever backend the user picked.
pub trait BackendTask {
    type Output;
    fn run<B: FrozenLinearBackend>(self, device: B::Device) -> Result<Self::Output>;
}

pub fn run_on<T: BackendTask>(kind: DeviceKind, task: T) -> Result<T::Output> {
    match kind {
        DeviceKind::Cpu => task.run::<Cpu>(Default::default()),
        DeviceKind::Cuda => cuda(task),
        DeviceKind::Metal => metal(task),
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
    task.run::<burn::backend::Metal<f32>>(Default::default())
}

#[cfg(not(feature = "metal"))]
fn metal<T: BackendTask>(_task: T) -> Result<T::Output> {
    bail!(
        "this binary was built without Metal support: rebuild with `cargo build --release --features metal`"
    )
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), for CPU runs.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
