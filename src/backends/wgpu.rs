//! The portable backend: Burn's wgpu backend (`burn::backend::Wgpu`), through Metal (MSL) on Apple
//! Silicon (`metal` feature) or Vulkan (SPIR-V) elsewhere (`vulkan` feature): one type for both.
//! Every op takes its reference form in Burn's ops (the traits' defaults). Metal compiles here
//! and has never run on Apple hardware.

use anyhow::{Result, anyhow};

use crate::ops::ModelBackend;
use crate::ops::attention::AttentionBackend;
use crate::ops::elementwise::ElementwiseBackend;
use crate::ops::matmul::MatmulBackend;
use crate::ops::rope::RopeBackend;

/// `burn::backend::Metal<f32>` and `Vulkan<f32>` are both this type.
pub type Portable = burn::backend::Wgpu<f32, i32, u8>;

impl MatmulBackend for Portable {}

impl AttentionBackend for Portable {}

impl ElementwiseBackend for Portable {}

impl RopeBackend for Portable {}

impl ModelBackend for Portable {}

impl super::DeviceMemory for Portable {}

/// The default device, set up on `G`'s graphics API; an error (not wgpu's panic) when no adapter
/// of that API answers.
pub fn device<G: burn::backend::wgpu::graphics::GraphicsApi>(
    what: &str,
) -> Result<burn::backend::wgpu::WgpuDevice> {
    use burn::backend::wgpu::{RuntimeOptions, WgpuDevice, init_setup};
    let device = WgpuDevice::DefaultDevice;
    super::quietly(|| {
        init_setup::<G>(&device, RuntimeOptions::default());
    })
    .ok_or_else(|| anyhow!("no {what} device answered (wgpu found no adapter)"))?;
    Ok(device)
}
