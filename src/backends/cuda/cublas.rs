//! `C = A · B` on Burn's CUDA buffers through cuBLAS (`cublasGemmStridedBatchedEx`).
//!
//! Burn 0.21's CubeCL matmul reaches 94 TFLOP/s in bf16 on an H200 where cuBLAS reaches 780
//! (issue 4), and matmuls are most of a LoRA step. This file is the whole bridge:
//!
//! - **Pointers.** `client.get_resource(handle)` gives the device pointer of a tensor's buffer,
//!   the pooled sub-allocation's offset already added (cubecl-cuda's `GpuStorage::get`).
//! - **Layout.** Burn tensors are row-major views with arbitrary strides (a transpose is a view).
//!   cuBLAS is column-major, so the row-major `C = A·B` is computed as the column-major
//!   `Cᵀ = Bᵀ·Aᵀ`. An operand whose rows are contiguous (`stride[-1] = 1`) is, read column-major,
//!   its own transpose: op `N`; one whose columns are contiguous (`stride[-2] = 1`) is op `T`.
//!   Anything else is copied contiguous first.
//! - **Precision.** bf16 operands (the frozen weights of a `dtype = "bf16"` run) run on bf16
//!   tensor cores with f32 accumulation, the other operand cast to bf16 on the way in. Two f32
//!   operands run with `CUBLAS_COMPUTE_32F_FAST_TF32`, which rounds like Burn's own f32 CUDA
//!   matmul does (bench/NOTES.md, device check), except a matrix-vector product (full f32: it
//!   is bandwidth-bound either way). The output is always f32.
//! - **Ordering.** The GEMM is queued on the CUDA stream CubeCL runs the calling thread's kernels
//!   on (exposed by our one-field patch of cubecl-cuda, `vendor/cubecl-cuda/PATCH.md`), so it
//!   runs after the kernels that wrote its inputs and before those that read its output, and the
//!   host never waits. (Without the stream, each call had to synchronise the device on both
//!   sides: about 65 µs a call, bench/NOTES.md.) Buffers of other streams are fenced by
//!   `get_resource`, as for CubeCL's own kernels.

use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, FloatDType};
use burn_cubecl::kernel::into_contiguous;
use cudarc::cublas::{result as cublas, sys as blas};
use cudarc::driver::CudaContext;

use super::kernel::{self, Cube, Queue, Tensor, cast};

/// `lhs`: `[..., m, k]`, `rhs`: `[..., k, n]` with the same leading (batch) dimensions →
/// `[..., m, n]` in f32.
pub fn matmul(lhs: Tensor, rhs: Tensor) -> Tensor {
    gemm(lhs, rhs, None)
}

/// `lhs · rhs + acc`. When `acc` is a contiguous f32 buffer no other tensor holds, the GEMM adds
/// onto it in place (β = 1), which saves writing the product and reading it back for the sum.
pub fn matmul_add(lhs: Tensor, rhs: Tensor, acc: Tensor) -> Tensor {
    if acc.dtype == DType::F32 && acc.is_contiguous() && acc.can_mut() {
        gemm(lhs, rhs, Some(acc))
    } else {
        // The product is f32; CubeCL's binary ops read both sides in the left one's dtype.
        Cube::float_add(matmul(lhs, rhs), cast(acc, FloatDType::F32))
    }
}

/// `lhs · rhs`, into a new buffer, or added onto `acc`.
fn gemm(lhs: Tensor, rhs: Tensor, acc: Option<Tensor>) -> Tensor {
    let (lhs, rhs) = common_dtype(lhs, rhs);
    let lhs = Operand::new(lhs);
    let rhs = Operand::new(rhs);
    let rank = lhs.shape.len();
    assert_eq!(rank, rhs.shape.len(), "matmul operands of different rank");
    assert_eq!(
        lhs.shape[..rank - 2],
        rhs.shape[..rank - 2],
        "matmul batch dimensions differ"
    );
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(k, rhs.rows, "matmul inner dimensions differ");

    let mut shape = lhs.shape.clone();
    shape[rank - 1] = n;
    let (out, beta) = match acc {
        Some(acc) => {
            assert_eq!(
                acc.meta.shape().to_vec(),
                shape,
                "accumulator of another shape"
            );
            (acc, 1f32)
        }
        None => (kernel::empty(&lhs.tensor, shape.into(), DType::F32), 0f32),
    };
    if m == 0 || n == 0 || lhs.batch == 0 {
        return out;
    }

    let client = &lhs.tensor.client;
    let a = client
        .get_resource(lhs.tensor.handle.clone())
        .expect("lhs buffer");
    let b = client
        .get_resource(rhs.tensor.handle.clone())
        .expect("rhs buffer");
    let c = client
        .get_resource(out.handle.clone())
        .expect("output buffer");
    let (data_type, compute) = match lhs.tensor.dtype {
        DType::BF16 => (
            blas::cudaDataType_t::CUDA_R_16BF,
            blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        // A matrix-vector product is bandwidth-bound: TF32 would lose precision for nothing.
        _ if m == 1 || n == 1 => (
            blas::cudaDataType_t::CUDA_R_32F,
            blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        _ => (
            blas::cudaDataType_t::CUDA_R_32F,
            blas::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        ),
    };
    let alpha = 1f32;
    let blas = blas_handle(lhs.tensor.device.index);
    let blas = blas.lock().expect("cuBLAS handle");
    // SAFETY: the three pointers are CubeCL allocations of at least the extents described, and
    // the GEMM runs on the stream of the output's allocation (the calling thread's CubeCL
    // stream): it reads its inputs after the kernels that wrote them, and CubeCL can reuse these
    // buffers only for work queued later on that same stream.
    unsafe {
        blas.ctx.bind_to_thread().expect("bind the CUDA context");
        cublas::set_stream(blas.handle, c.resource().stream.cast()).expect("cublasSetStream");
        cublas::gemm_strided_batched_ex(
            blas.handle,
            rhs.op,
            lhs.op,
            to_i32(n),
            to_i32(m),
            to_i32(k),
            (&raw const alpha).cast(),
            b.resource().ptr as *const c_void,
            data_type,
            to_i32(rhs.ld),
            rhs.batch_stride as i64,
            a.resource().ptr as *const c_void,
            data_type,
            to_i32(lhs.ld),
            lhs.batch_stride as i64,
            (&raw const beta).cast(),
            c.resource().ptr as *mut c_void,
            blas::cudaDataType_t::CUDA_R_32F,
            to_i32(n),
            (m * n) as i64,
            to_i32(lhs.batch),
            compute,
            blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .expect("cublasGemmStridedBatchedEx");
    }
    out
}

/// Both operands in one element type: bf16 if either is (the bf16 weight decides the GEMM's
/// precision), else f32.
pub(super) fn common_dtype(lhs: Tensor, rhs: Tensor) -> (Tensor, Tensor) {
    let dtype = if lhs.dtype == DType::BF16 || rhs.dtype == DType::BF16 {
        FloatDType::BF16
    } else {
        FloatDType::F32
    };
    (cast(lhs, dtype), cast(rhs, dtype))
}

/// One GEMM operand as cuBLAS sees it.
struct Operand {
    tensor: Tensor,
    shape: Vec<usize>,
    rows: usize,
    cols: usize,
    /// Product of the leading dimensions.
    batch: usize,
    batch_stride: usize,
    /// Leading dimension, in elements.
    ld: usize,
    op: blas::cublasOperation_t,
}

impl Operand {
    fn new(tensor: Tensor) -> Self {
        Self::strided(tensor.clone()).unwrap_or_else(|| {
            Self::strided(into_contiguous(tensor)).expect("a contiguous tensor is a GEMM operand")
        })
    }

    /// The operand read in place, or `None` if its strides are not a (batched) matrix layout.
    fn strided(tensor: Tensor) -> Option<Self> {
        let shape: Vec<usize> = tensor.meta.shape().iter().copied().collect();
        let strides: Vec<usize> = tensor.meta.strides().iter().copied().collect();
        let rank = shape.len();
        let (rows, cols) = (shape[rank - 2], shape[rank - 1]);
        // A dimension of size 1 has no meaningful stride.
        let row_stride = if rows == 1 { cols } else { strides[rank - 2] };
        let col_stride = if cols == 1 { 1 } else { strides[rank - 1] };
        let (op, ld) = if col_stride == 1 && row_stride >= cols.max(1) {
            (blas::cublasOperation_t::CUBLAS_OP_N, row_stride)
        } else if row_stride == 1 && col_stride >= rows.max(1) {
            (blas::cublasOperation_t::CUBLAS_OP_T, col_stride)
        } else {
            return None;
        };
        let (batch, batch_stride) = batch_layout(&shape[..rank - 2], &strides[..rank - 2])?;
        Some(Self {
            tensor,
            shape,
            rows,
            cols,
            batch,
            batch_stride,
            ld,
            op,
        })
    }
}

/// The leading dimensions as one batch with one stride, if they collapse to that.
fn batch_layout(shape: &[usize], strides: &[usize]) -> Option<(usize, usize)> {
    let batch = shape.iter().product();
    let mut dims = shape
        .iter()
        .zip(strides)
        .filter(|(size, _)| **size > 1)
        .rev();
    let Some((&inner_size, &inner_stride)) = dims.next() else {
        return Some((batch, 0));
    };
    let mut expected = inner_stride * inner_size;
    for (&size, &stride) in dims {
        if stride != expected {
            return None;
        }
        expected *= size;
    }
    Some((batch, inner_stride))
}

pub(super) fn to_i32(n: usize) -> i32 {
    i32::try_from(n).expect("GEMM dimension above cuBLAS's 32-bit limit")
}

/// A cuBLAS handle and the context it was made on.
pub(super) struct Blas {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) handle: blas::cublasHandle_t,
}

// SAFETY: the handle is only used under the mutex that owns it.
unsafe impl Send for Blas {}

/// One cuBLAS handle per device, on the device's primary context (the one CubeCL uses).
pub(super) fn blas_handle(device: usize) -> &'static Mutex<Blas> {
    static HANDLES: OnceLock<Mutex<Vec<&'static Mutex<Blas>>>> = OnceLock::new();
    let mut handles = HANDLES
        .get_or_init(Default::default)
        .lock()
        .expect("handles");
    while handles.len() <= device {
        let ctx = super::context(handles.len());
        ctx.bind_to_thread().expect("bind the CUDA context");
        let handle = cublas::create_handle().expect("load libcublas and create a handle");
        handles.push(Box::leak(Box::new(Mutex::new(Blas { ctx, handle }))));
    }
    handles[device]
}

/// `y[rows, out] = x[rows, inner] · w[out, inner]ᵀ` (added onto `y` when `accumulate`) on raw
/// device addresses, queued on `queue`: `x` and `w` of `dtype` (bf16 on tensor cores with f32
/// sums, or f32 in full f32, not TF32 as [`matmul`] runs it), `y` f32 with `ldy` floats a row (so that `w`
/// may be a slab of a taller matrix, its results a slab of `y`'s columns). The decode session's
/// prompt pass (`decode/prefill.rs`) calls it on buffers it allocated once.
pub fn gemm_rows(
    queue: Queue,
    dtype: DType,
    [x, w, y]: [u64; 3],
    [rows, out, inner]: [usize; 3],
    ldy: usize,
    accumulate: bool,
) {
    let (data_type, compute) = match dtype {
        DType::BF16 => (
            blas::cudaDataType_t::CUDA_R_16BF,
            blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        // Full f32, not TF32: an f32 model's decode steps are exact f32 GEMVs, and its prompt
        // pass in TF32 came out 2.06e-3 from the op-by-op path (session 28's check; 2e-3 its
        // tolerance).
        _ => (
            blas::cudaDataType_t::CUDA_R_32F,
            blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
    };
    let (alpha, beta) = (1f32, if accumulate { 1f32 } else { 0f32 });
    let blas = blas_handle(queue.device());
    let blas = blas.lock().expect("cuBLAS handle");
    // Column-major, yᵀ [out, rows] = wᵀᵀ · xᵀ: w read as its transpose (op T, `inner` a row),
    // x as is (op N).
    // SAFETY: the caller's buffers hold at least these extents and live until the GEMM, queued
    // on the stream that orders their other work, has run.
    unsafe {
        blas.ctx.bind_to_thread().expect("bind the CUDA context");
        cublas::set_stream(blas.handle, queue.stream().cast()).expect("cublasSetStream");
        cublas::gemm_ex(
            blas.handle,
            blas::cublasOperation_t::CUBLAS_OP_T,
            blas::cublasOperation_t::CUBLAS_OP_N,
            to_i32(out),
            to_i32(rows),
            to_i32(inner),
            (&raw const alpha).cast(),
            w as *const c_void,
            data_type,
            to_i32(inner),
            x as *const c_void,
            data_type,
            to_i32(inner),
            (&raw const beta).cast(),
            y as *mut c_void,
            blas::cudaDataType_t::CUDA_R_32F,
            to_i32(ldy),
            compute,
            blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .expect("cublasGemmEx");
    }
}
