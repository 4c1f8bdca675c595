//! The portable backend: Burn's CubeCL backend on the wgpu runtime, through Metal (MSL) on Apple
//! Silicon (`metal` feature) or Vulkan (SPIR-V) elsewhere (`vulkan` feature): one type for both.
//! The fast ops are CubeCL kernels of our own (`#[cube]`, one file each), which run on every
//! CubeCL runtime; the others take their reference form in Burn's ops (the traits' defaults).
//! Metal compiles here and has never run on Apple hardware.

mod attention;

use anyhow::{Result, anyhow};
use burn::backend::wgpu::{CubeBackend, WgpuRuntime};
use burn::tensor::Tensor;

use crate::ops::ModelBackend;
use crate::ops::attention::{AttentionBackend, Saved};
use crate::ops::elementwise::ElementwiseBackend;
use crate::ops::matmul::MatmulBackend;
use crate::ops::primitive::{inner, primitive};
use crate::ops::rope::RopeBackend;
use crate::ops::visibility::Visibility;

/// What `burn::backend::Metal<f32>` and `Vulkan<f32>` are without Burn's fusion (which a build
/// with `cuda` switches on for every backend): our kernels take the buffers directly.
pub type Portable = CubeBackend<WgpuRuntime, f32, i32, u8>;

impl MatmulBackend for Portable {}

/// Flash attention in CubeCL (`attention.rs`), for head dimensions up to
/// [`attention::MAX_HEAD_DIM`].
impl AttentionBackend for Portable {
    fn fused_attention(head_dim: usize, _device: &Self::Device) -> bool {
        head_dim <= attention::MAX_HEAD_DIM
    }

    fn attention_forward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        visibility: &Visibility<Self>,
        scale: f64,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>) {
        let starts = visibility
            .starts
            .as_ref()
            .map(|s| primitive(s.device.clone()));
        let (out, lse) = attention::forward([q, k, v].map(primitive), starts, scale as f32);
        (inner(out), inner(lse))
    }

    fn attention_backward(
        saved: Saved<Self>,
        d_out: Tensor<Self, 4>,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        let delta = (d_out.clone() * saved.out).sum_dim(3);
        let inputs = [saved.q, saved.k, saved.v, d_out, saved.lse, delta].map(primitive);
        let starts = saved.visibility.starts.map(|s| primitive(s.device));
        let (dq, dk, dv) = attention::backward(inputs, starts, saved.scale as f32);
        (inner(dq), inner(dk), inner(dv))
    }
}

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
