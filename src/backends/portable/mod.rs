//! The portable backend: Burn's CubeCL backend on the wgpu runtime, through Metal (MSL) on Apple
//! Silicon (`metal` feature) or Vulkan (SPIR-V) elsewhere (`vulkan` feature): one type for both.
//! The model's own ops are CubeCL kernels of ours (`#[cube]`, one file each), which run on every
//! CubeCL runtime: flash attention, RMSNorm, SwiGLU, RoPE, the loss's passes and the 4-bit
//! dequantization; the matrix products are Burn's (CubeCL's matmul). Metal compiles here and has
//! never run on Apple hardware.

mod attention;
mod cross_entropy;
mod dequant;
mod reduce;
mod rms_norm;
mod rope;
mod swiglu;

use anyhow::{Result, anyhow};
use burn::backend::wgpu::{CubeBackend, WgpuRuntime};
use burn::tensor::ops::FloatTensor;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, FloatDType, Int, Shape, Tensor};
use burn_cubecl::CubeRuntime;
use burn_cubecl::kernel::matmul::{MatmulStrategy, matmul};
use burn_cubecl::kernel::{cast, into_contiguous};
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::{CubeCount, CubeDim};

use crate::ops::ModelBackend;
use crate::ops::attention::{
    AttentionBackend, Saved, Scores, kernel_covers, sliced_backward, sliced_forward,
};
use crate::ops::elementwise::{ElementwiseBackend, dtype_or_f32};
use crate::ops::matmul::MatmulBackend;
use crate::ops::primitive::{inner, primitive};
use crate::ops::quantized_linear::DeviceQuantized;
use crate::ops::rope::RopeBackend;
use crate::ops::routing::RoutingBackend;
use crate::ops::visibility::Visibility;

/// What `burn::backend::Metal<f32>` and `Vulkan<f32>` are without Burn's fusion (which a build
/// with `cuda` switches on for every backend): our kernels take the buffers directly.
pub type Portable = CubeBackend<WgpuRuntime, f32, i32, u8>;

/// Products on CubeCL's matmul. One with a 16-bit operand (the weight of a base held so) runs
/// with both operands in that type, on the device's cooperative matrices (tensor cores) where it
/// has them, accumulating and writing f32: what cuBLAS does on CUDA (`backends/cuda/cublas.rs`).
impl MatmulBackend for Portable {
    fn model_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let half = [lhs.dtype, rhs.dtype]
            .into_iter()
            .find(|d| matches!(d, DType::F16 | DType::BF16));
        let (lhs, rhs) = match half {
            Some(half) => (to_dtype(lhs, half), to_dtype(rhs, half)),
            None => (lhs, rhs),
        };
        let strategy = MatmulStrategy::default();
        matmul(lhs, rhs, None, strategy, DType::F32)
            .unwrap_or_else(|e| panic!("a {half:?} matrix product on this device: {e:?}"))
    }

    fn model_matmul_add(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        acc: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::float_add(Self::model_matmul(lhs, rhs), f32_of(acc))
    }
}

/// Flash attention in CubeCL (`attention.rs`), for head dimensions up to
/// [`attention::MAX_HEAD_DIM`].
impl AttentionBackend for Portable {
    const KERNELS_TAKE_WINDOW_AND_SOFTCAP: bool = true;

    fn fused_attention(head_dim: usize, _device: &Self::Device) -> bool {
        head_dim <= attention::MAX_HEAD_DIM
    }

    fn attention_forward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        visibility: &Visibility<Self>,
        scores: Scores,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>) {
        if !kernel_covers(visibility, scores, k.dims()[2]) {
            return sliced_forward(q, k, v, visibility, scores);
        }
        let starts = visibility
            .starts
            .as_ref()
            .map(|s| primitive(s.device.clone()));
        let rule = rule(visibility, scores);
        let (out, lse) =
            attention::forward([q, k, v].map(primitive), starts, scores.scale as f32, rule);
        (inner(out), inner(lse))
    }

    fn attention_backward(
        saved: Saved<Self>,
        d_out: Tensor<Self, 4>,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        if !kernel_covers(&saved.visibility, saved.scores, saved.k.dims()[2]) {
            return sliced_backward(saved, d_out);
        }
        let delta = (d_out.clone() * saved.out).sum_dim(3);
        let inputs = [saved.q, saved.k, saved.v, d_out, saved.lse, delta].map(primitive);
        let rule = rule(&saved.visibility, saved.scores);
        let starts = saved.visibility.starts.map(|s| primitive(s.device));
        let (dq, dk, dv) = attention::backward(inputs, starts, saved.scores.scale as f32, rule);
        (inner(dq), inner(dk), inner(dv))
    }
}

/// SwiGLU, RMSNorm and the loss's two passes as our kernels (`swiglu.rs`, `rms_norm.rs`,
/// `cross_entropy.rs`).
impl ElementwiseBackend for Portable {
    fn swiglu<const D: usize>(
        gate: Tensor<Self, D>,
        up: Tensor<Self, D>,
        dtype: Option<FloatDType>,
        _grad_dtype: Option<FloatDType>,
    ) -> Tensor<Self, D> {
        inner(swiglu::forward(
            primitive(gate),
            primitive(up),
            dtype_or_f32(dtype),
        ))
    }

    fn swiglu_backward<const D: usize>(
        gate: Tensor<Self, D>,
        up: Tensor<Self, D>,
        dy: Tensor<Self, D>,
        wanted: [bool; 2],
        dtype: Option<FloatDType>,
    ) -> [Option<Tensor<Self, D>>; 2] {
        let [gate, up, dy] = [gate, up, dy].map(primitive);
        swiglu::backward(gate, up, dy, wanted, dtype_or_f32(dtype)).map(|g| g.map(inner))
    }

    fn rms_norm<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        eps: f64,
        dtype: Option<FloatDType>,
    ) -> Tensor<Self, D> {
        let out = rms_norm::forward(
            primitive(x),
            primitive(weight),
            eps as f32,
            dtype_or_f32(dtype),
        );
        inner(out)
    }

    fn rms_norm_input_grad<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        dy: Tensor<Self, D>,
        eps: f64,
    ) -> Tensor<Self, D> {
        let [x, dy] = [x, dy].map(primitive);
        inner(rms_norm::input_grad(x, primitive(weight), dy, eps as f32))
    }

    fn logsumexp(x: Tensor<Self, 2>) -> Tensor<Self, 2> {
        inner(cross_entropy::logsumexp(primitive(x)))
    }

    fn cross_entropy_backward(
        logits: Tensor<Self, 2>,
        lse: Tensor<Self, 2>,
        targets: Tensor<Self, 2, Int>,
        row_scale: Tensor<Self, 2>,
        dtype: Option<FloatDType>,
    ) -> Tensor<Self, 2> {
        let [logits, lse, row_scale] = [logits, lse, row_scale].map(primitive);
        let targets = targets.into_primitive();
        inner(cross_entropy::backward(
            logits,
            lse,
            targets,
            row_scale,
            dtype_or_f32(dtype),
        ))
    }
}

/// RoPE in one pass each way (`rope.rs`).
impl RopeBackend for Portable {
    fn rope(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        inner(rope::rope([x, cos, sin].map(primitive), false))
    }

    fn rope_backward(
        dy: Tensor<Self, 4>,
        cos: Tensor<Self, 4>,
        sin: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        inner(rope::rope([dy, cos, sin].map(primitive), true))
    }
}

/// Routed rows through Burn's `select` and the written backward (`ops/routing.rs`).
impl RoutingBackend for Portable {}

/// Quantized weights stay packed on the device and are dequantized by `dequant.rs` per use.
impl ModelBackend for Portable {
    const DEVICE_QUANTIZED: bool = true;

    /// The device must store, convert and compute in the type (LoRA's dropout multiplies the
    /// GEMM's input in it). NVIDIA's Vulkan driver lists bf16 for cooperative matrices but not
    /// arithmetic, lavapipe not at all: bf16 is refused on both, f16 taken.
    fn check_half(half: FloatDType, device: &Self::Device) -> Result<()> {
        use cubecl::Runtime;
        use cubecl::ir::features::TypeUsage;
        use cubecl::ir::{ElemType, FloatKind, StorageType};
        let kind = match half {
            FloatDType::BF16 => FloatKind::BF16,
            _ => FloatKind::F16,
        };
        let elem = ElemType::Float(kind);
        let client = WgpuRuntime::client(device);
        let props = client.properties();
        let usage = props.type_usage(StorageType::Scalar(elem));
        let needed = TypeUsage::Buffer | TypeUsage::Conversion | TypeUsage::Arithmetic;
        if usage.is_superset(needed) {
            return Ok(());
        }
        let name = if kind == FloatKind::BF16 {
            "bf16"
        } else {
            "f16"
        };
        Err(anyhow!(
            "model.dtype = \"{name}\": this GPU's driver does not compute in {name} (usage {usage:?}); set model.dtype = \"f16\" or \"f32\""
        ))
    }

    fn dequantize_for_gemm(w: &DeviceQuantized<Self>) -> FloatTensor<Self> {
        let words = w.words.clone().into_primitive();
        let [scales, biases] = [&w.scales, &w.biases].map(|t| primitive(t.clone()));
        dequant::dequantize([words, scales, biases], w.bits, w.group, w.gemm_dtype())
    }
}

/// The kernels' window (0 for none) and soft-cap for a call.
fn rule(visibility: &Visibility<Portable>, scores: Scores) -> attention::Rule {
    attention::Rule {
        window: visibility
            .window
            .map_or(0, |w| u32::try_from(w).unwrap_or(u32::MAX)),
        softcap: scores.softcap.map(|c| c as f32),
    }
}

/// An uninitialised tensor of `shape` and `dtype` on `like`'s device.
fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    empty_device_dtype(like.client.clone(), like.device.clone(), shape, dtype)
}

/// `t` in `dtype` (a copy only when it is in another).
fn to_dtype<R: CubeRuntime>(t: CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
    if t.dtype == dtype { t } else { cast(t, dtype) }
}

/// `t` in f32 (the kernels read f32 inputs).
fn f32_of<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    to_dtype(t, DType::F32)
}

/// `t` in f32 and contiguous, as the element-wise kernels index it.
fn contiguous_f32<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    into_contiguous(f32_of(t))
}

/// Cubes of 256 units covering `n` elements (over two dimensions past 65,535 cubes); the
/// kernels loop while their index is under `n`, so extra units do nothing. Their indices are
/// 32-bit: `n` must fit (Vulkan's buffers are capped at 4 GiB anyway).
fn elementwise_cubes<R: CubeRuntime>(like: &CubeTensor<R>, n: usize) -> (CubeCount, CubeDim) {
    assert!(
        u32::try_from(n).is_ok(),
        "{n} elements: over 32-bit indexing"
    );
    let dim = CubeDim::new_1d(256);
    let cubes = cubecl::calculate_cube_count_elemwise(&like.client, n.max(1), dim);
    (cubes, dim)
}

impl super::DeviceMemory for Portable {}

impl super::DataParallel for Portable {}

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
