//! The cuBLAS product, the flash-attention kernels, RoPE and the dequantization pass as ops of
//! Burn's fusion stream.
//!
//! `burn::backend::Cuda` is `Fusion<CubeBackend<..>>`: ops are recorded and run lazily so
//! element-wise chains can be fused into one kernel. A custom op joins that stream as a
//! `CustomOpIr` (its inputs and output declared), and runs when the stream reaches it, on the
//! `CubeTensor`s behind the fusion handles (the pattern of burn-vision's CUDA ops).

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use super::kernel::Cube;
use super::{cublas, decode, dequant, flash, grouped_gemm, qgemv, rope};
use crate::ops::ModelBackend;
use crate::ops::attention::{
    AttentionBackend, Saved, Scores, kernel_covers, sliced_backward, sliced_forward,
};
use crate::ops::decode::{DecodeModel, DecodeSession};
use crate::ops::elementwise::ElementwiseBackend;
use crate::ops::grouped_matmul::{Stacked, grouped_by_groups};
use crate::ops::matmul::MatmulBackend;
use crate::ops::primitive::{inner, primitive};
use crate::ops::quantized_linear::DeviceQuantized;
use crate::ops::rope::RopeBackend;
use crate::ops::routing::RoutingBackend;
use crate::ops::visibility::Visibility;

type Runtime = <Cube as FusionBackend>::FusionRuntime;

/// `out = lhs · rhs`, as declared in `desc`.
#[derive(Debug)]
struct CublasMatmul {
    desc: CustomOpIr,
}

impl Operation<Runtime> for CublasMatmul {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let ([lhs, rhs], [out]) = self.desc.as_fixed();
        let lhs = handles.get_float_tensor::<Cube>(lhs);
        let rhs = handles.get_float_tensor::<Cube>(rhs);
        handles.register_float_tensor::<Cube>(&out.id, cublas::matmul(lhs, rhs));
    }
}

/// `out = lhs · rhs + acc`, as declared in `desc`.
#[derive(Debug)]
struct CublasMatmulAdd {
    desc: CustomOpIr,
}

impl Operation<Runtime> for CublasMatmulAdd {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let ([lhs, rhs, acc], [out]) = self.desc.as_fixed();
        let lhs = handles.get_float_tensor::<Cube>(lhs);
        let rhs = handles.get_float_tensor::<Cube>(rhs);
        let acc = handles.get_float_tensor::<Cube>(acc);
        handles.register_float_tensor::<Cube>(&out.id, cublas::matmul_add(lhs, rhs, acc));
    }
}

/// The experts' grouped product (`grouped_gemm.rs`), as declared in `desc`.
#[derive(Debug)]
struct CublasGrouped {
    desc: CustomOpIr,
    stacked: Stacked,
    counts: Vec<usize>,
}

impl Operation<Runtime> for CublasGrouped {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let ([lhs, rhs], [out]) = self.desc.as_fixed();
        let lhs = handles.get_float_tensor::<Cube>(lhs);
        let rhs = handles.get_float_tensor::<Cube>(rhs);
        let result = grouped_gemm::grouped_matmul(lhs, rhs, self.stacked, &self.counts);
        handles.register_float_tensor::<Cube>(&out.id, result);
    }
}

impl MatmulBackend for Fusion<Cube> {
    /// One `cublasGemmGroupedBatchedEx` call (where the loaded cuBLAS has it).
    fn model_grouped_matmul(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        stacked: Stacked,
        counts: &[usize],
    ) -> FloatTensor<Self> {
        if !grouped_gemm::available() {
            return grouped_by_groups::<Self>(lhs, rhs, stacked, counts);
        }
        let m = match stacked {
            Stacked::AsIs => rhs.shape[2],
            Stacked::Transposed => rhs.shape[1],
        };
        let shape = Shape::from([lhs.shape[0], m]);
        let client = lhs.client.clone();
        let streams = OperationStreams::with_inputs([&lhs, &rhs]);
        let out = TensorIr::uninit(client.create_empty_handle(), shape, DType::F32);
        let desc = CustomOpIr::new("cublas_grouped", &[lhs.into_ir(), rhs.into_ir()], &[out]);
        let op = CublasGrouped {
            desc: desc.clone(),
            stacked,
            counts: counts.to_vec(),
        };
        client
            .register(streams, OperationIr::Custom(desc), op)
            .output()
    }

    fn model_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let client = lhs.client.clone();
        let mut dims = lhs.shape.to_vec();
        let rank = dims.len();
        dims[rank - 1] = rhs.shape[rank - 1];
        let streams = OperationStreams::with_inputs([&lhs, &rhs]);
        let out = TensorIr::uninit(client.create_empty_handle(), Shape::from(dims), DType::F32);
        let desc = CustomOpIr::new("cublas_matmul", &[lhs.into_ir(), rhs.into_ir()], &[out]);
        client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                CublasMatmul { desc },
            )
            .output()
    }

    fn model_matmul_add(
        lhs: FloatTensor<Self>,
        rhs: FloatTensor<Self>,
        acc: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let client = lhs.client.clone();
        let streams = OperationStreams::with_inputs([&lhs, &rhs, &acc]);
        let out = TensorIr::uninit(client.create_empty_handle(), acc.shape.clone(), DType::F32);
        let desc = CustomOpIr::new(
            "cublas_matmul_add",
            &[lhs.into_ir(), rhs.into_ir(), acc.into_ir()],
            &[out],
        );
        client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                CublasMatmulAdd { desc },
            )
            .output()
    }
}

/// An op over a packed weight's words, scales and biases (its last three inputs), as declared in
/// `desc`: with no other input, the dense matrix; after the activations `x`, `x · Wᵀ` read
/// packed.
#[derive(Debug)]
struct PackedOp {
    desc: CustomOpIr,
    bits: u32,
    group: usize,
}

impl Operation<Runtime> for PackedOp {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let inputs = &self.desc.inputs;
        let n = inputs.len();
        let words = handles.get_int_tensor::<Cube>(&inputs[n - 3]);
        let scales = handles.get_float_tensor::<Cube>(&inputs[n - 2]);
        let biases = handles.get_float_tensor::<Cube>(&inputs[n - 1]);
        let out = &self.desc.outputs[0];
        let result = match n {
            3 => dequant::dequantize([words, scales, biases], self.bits, self.group, out.dtype),
            _ => {
                let x = handles.get_float_tensor::<Cube>(&inputs[0]);
                qgemv::qgemv([x, words, scales, biases], self.bits, self.group)
            }
        };
        handles.register_float_tensor::<Cube>(&out.id, result);
    }
}

/// Registers [`PackedOp`] `name` over `x` (if given) and `w`, making `shape` in `dtype`.
fn packed_op(
    name: &'static str,
    x: Option<FloatTensor<Fusion<Cube>>>,
    w: &DeviceQuantized<Fusion<Cube>>,
    shape: Shape,
    dtype: DType,
) -> FloatTensor<Fusion<Cube>> {
    let words = w.words.clone().into_primitive();
    let scales = primitive(w.scales.clone());
    let biases = primitive(w.biases.clone());
    let client = scales.client.clone();
    let mut tensors = vec![&words, &scales, &biases];
    if let Some(x) = &x {
        tensors.insert(0, x);
    }
    let streams = OperationStreams::with_inputs(tensors);
    let out = TensorIr::uninit(client.create_empty_handle(), shape, dtype);
    let inputs: Vec<TensorIr> = x
        .into_iter()
        .chain([words, scales, biases])
        .map(|t| t.into_ir())
        .collect();
    let desc = CustomOpIr::new(name, &inputs, &[out]);
    let op = PackedOp {
        desc: desc.clone(),
        bits: w.bits,
        group: w.group,
    };
    client
        .register(streams, OperationIr::Custom(desc), op)
        .output()
}

/// `w` as the dense matrix its GEMM reads (bf16 for a bf16 base), in one kernel.
pub fn dequantize(w: &DeviceQuantized<Fusion<Cube>>) -> FloatTensor<Fusion<Cube>> {
    let shape = Shape::from(w.dims().to_vec());
    packed_op("dequantize", None, w, shape, w.gemm_dtype())
}

/// `x · deq(W)ᵀ` for a few rows of `x` (decoding), from the packed words.
fn quantized_gemv(
    x: FloatTensor<Fusion<Cube>>,
    w: &DeviceQuantized<Fusion<Cube>>,
) -> FloatTensor<Fusion<Cube>> {
    let shape = Shape::new([x.shape[0], w.dims()[0]]);
    packed_op("quantized_gemv", Some(x), w, shape, DType::F32)
}

/// `(out, lse) = attention(q, k, v)` under the causal rule, and for packed rows each query's
/// first key (a fourth input, `starts`), as declared in `desc`.
#[derive(Debug)]
struct FlashForward {
    desc: CustomOpIr,
    rule: flash::Rule,
}

impl Operation<Runtime> for FlashForward {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let mut inputs = float_inputs(&self.desc, handles);
        let starts = (inputs.len() == 4).then(|| inputs.remove(3));
        let [q, k, v]: [_; 3] = inputs.try_into().expect("q, k and v");
        let (o, l) = flash::forward([q, k, v], starts, self.rule);
        let [out, lse] = &self.desc.outputs[..] else {
            unreachable!("declared with two outputs")
        };
        handles.register_float_tensor::<Cube>(&out.id, o);
        handles.register_float_tensor::<Cube>(&lse.id, l);
    }
}

/// `(dq, dk, dv)` from `(q, k, v, d_out, lse, delta)` and, for packed rows, `starts`, as
/// declared in `desc`.
#[derive(Debug)]
struct FlashBackward {
    desc: CustomOpIr,
    rule: flash::Rule,
}

impl Operation<Runtime> for FlashBackward {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let mut inputs = float_inputs(&self.desc, handles);
        let starts = (inputs.len() == 7).then(|| inputs.remove(6));
        let six: [_; 6] = inputs.try_into().expect("q, k, v, d_out, lse and delta");
        let (gq, gk, gv) = flash::backward(six, starts, self.rule);
        let [dq, dk, dv] = &self.desc.outputs[..] else {
            unreachable!("declared with three outputs")
        };
        handles.register_float_tensor::<Cube>(&dq.id, gq);
        handles.register_float_tensor::<Cube>(&dk.id, gk);
        handles.register_float_tensor::<Cube>(&dv.id, gv);
    }
}

/// The kernels' scale, soft-cap and window for these scores and this rule.
fn rule(visibility: &Visibility<Fusion<Cube>>, scores: Scores) -> flash::Rule {
    flash::Rule {
        scale: scores.scale as f32,
        softcap: scores.softcap.unwrap_or(0.0) as f32,
        window: visibility.window.unwrap_or(0),
    }
}

/// The op's inputs as the CUDA tensors behind them.
fn float_inputs(
    desc: &CustomOpIr,
    handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>,
) -> Vec<super::kernel::Tensor> {
    desc.inputs
        .iter()
        .map(|ir| handles.get_float_tensor::<Cube>(ir))
        .collect()
}

impl AttentionBackend for Fusion<Cube> {
    const KERNELS_TAKE_WINDOW_AND_SOFTCAP: bool = true;

    fn fused_attention(head_dim: usize, device: &Self::Device) -> bool {
        flash::supports(head_dim, device.index)
    }

    fn attention_forward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        visibility: &Visibility<Self>,
        scores: Scores,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>) {
        let covered = kernel_covers(visibility, scores, k.dims()[2]);
        if !Self::fused_attention(q.dims()[3], &q.device()) || !covered {
            return sliced_forward(q, k, v, visibility, scores);
        }
        let [batch, heads, seq, _] = q.dims();
        let out_shape = Shape::from(q.dims().to_vec());
        let mut inputs = vec![q, k, v];
        inputs.extend(visibility.starts.as_ref().map(|s| s.device.clone()));
        let [out, lse] = custom(
            "flash_attention_forward",
            inputs,
            [out_shape, Shape::new([batch, heads, seq, 1])],
            |desc| FlashForward {
                desc,
                rule: rule(visibility, scores),
            },
        );
        (out, lse)
    }

    fn attention_backward(
        saved: Saved<Self>,
        d_out: Tensor<Self, 4>,
    ) -> (Tensor<Self, 4>, Tensor<Self, 4>, Tensor<Self, 4>) {
        let covered = kernel_covers(&saved.visibility, saved.scores, saved.k.dims()[2]);
        if !Self::fused_attention(saved.q.dims()[3], &saved.q.device()) || !covered {
            return sliced_backward(saved, d_out);
        }
        let rule = rule(&saved.visibility, saved.scores);
        let delta = (d_out.clone() * saved.out).sum_dim(3);
        let shapes = [&saved.q, &saved.k, &saved.v].map(|x| Shape::from(x.dims().to_vec()));
        let mut inputs = vec![saved.q, saved.k, saved.v, d_out, saved.lse, delta];
        inputs.extend(saved.visibility.starts.map(|s| s.device));
        let [dq, dk, dv] = custom("flash_attention_backward", inputs, shapes, |desc| {
            FlashBackward { desc, rule }
        });
        (dq, dk, dv)
    }
}

/// `rope(x, cos, sin)` or its backward, as declared in `desc`.
#[derive(Debug)]
struct Rope {
    desc: CustomOpIr,
    backward: bool,
}

impl Operation<Runtime> for Rope {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let (inputs, [out]) = self.desc.as_fixed::<3, 1>();
        let inputs = inputs
            .each_ref()
            .map(|ir| handles.get_float_tensor::<Cube>(ir));
        handles.register_float_tensor::<Cube>(&out.id, rope::rope(inputs, self.backward));
    }
}

impl RopeBackend for Fusion<Cube> {
    fn rope(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let shape = Shape::from(x.dims().to_vec());
        let [out] = custom("rope", [x, cos, sin], [shape], |desc| Rope {
            desc,
            backward: false,
        });
        out
    }

    fn rope_backward(
        dy: Tensor<Self, 4>,
        cos: Tensor<Self, 4>,
        sin: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        let shape = Shape::from(dy.dims().to_vec());
        let [dx] = custom("rope_backward", [dy, cos, sin], [shape], |desc| Rope {
            desc,
            backward: true,
        });
        dx
    }
}

/// Registers a custom op of f32 inputs and `M` f32 outputs of the given shapes on the fusion
/// stream.
fn custom<const M: usize, O: Operation<Runtime> + 'static>(
    name: &'static str,
    inputs: impl IntoIterator<Item = Tensor<Fusion<Cube>, 4>>,
    shapes: [Shape; M],
    op: impl FnOnce(CustomOpIr) -> O,
) -> [Tensor<Fusion<Cube>, 4>; M] {
    let inputs: Vec<_> = inputs.into_iter().map(primitive).collect();
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let outputs =
        shapes.map(|shape| TensorIr::uninit(client.create_empty_handle(), shape, DType::F32));
    let inputs: Vec<_> = inputs.into_iter().map(|x| x.into_ir()).collect();
    let desc = CustomOpIr::new(name, &inputs, &outputs);
    client
        .register(streams, OperationIr::Custom(desc.clone()), op(desc))
        .outputs::<M>()
        .map(inner)
}

impl ElementwiseBackend for burn::backend::Cuda<f32> {}

impl RoutingBackend for burn::backend::Cuda<f32> {}

/// On CUDA, a quantized base stays packed in device memory (QLoRA's saving) and is dequantized
/// by device kernels per use, instead of crossing PCIe as f32 on every product.
impl ModelBackend for burn::backend::Cuda<f32> {
    const DEVICE_QUANTIZED: bool = true;
    const DECODE_SESSIONS: bool = true;
    /// A prompt pass's GEMMs through cuBLAS on the session's buffers, its launches a few a
    /// block where the op-by-op path's host work cost ~40 ms a prompt on an 8B model; longer
    /// prompts go op by op (flash attention, no `[rows, heads, positions]` scores).
    const SESSION_PROMPT: usize = decode::PROMPT_ROWS;

    fn decode_session(
        model: DecodeModel<Self>,
        kv: Vec<[FloatTensor<Self>; 2]>,
        room: usize,
    ) -> Option<Box<dyn DecodeSession<Self>>> {
        let session = decode::Session::open(model, kv, room)?;
        Some(Box::new(session))
    }

    /// From the file's pages into the weight's buffer (`upload.rs`), without a host copy.
    fn bf16_matrix(bytes: &[u8], shape: [usize; 2], device: &Self::Device) -> FloatTensor<Self> {
        super::upload::bf16_matrix(bytes, shape, device)
    }

    fn dequantize_for_gemm(w: &DeviceQuantized<Self>) -> FloatTensor<Self> {
        dequantize(w)
    }

    /// Up to [`qgemv::MAX_ROWS`] rows (decoding) read the packed words directly; more rows
    /// dequantize once for the GEMM.
    fn device_quantized_linear(
        x: FloatTensor<Self>,
        w: &DeviceQuantized<Self>,
    ) -> FloatTensor<Self> {
        if x.shape.num_dims() == 2 && x.shape[0] <= qgemv::MAX_ROWS && x.dtype == DType::F32 {
            quantized_gemv(x, w)
        } else {
            crate::ops::quantized_linear::forward(x, w)
        }
    }
}
