//! The experts' grouped products (`ops/grouped_matmul.rs`) on Burn's CUDA buffers, each in one
//! cuBLAS call (`cublasGemmGroupedBatchedEx`, cuBLAS 12.5 and later): one problem per expert with
//! rows, every problem's operands addressed by pointers into the same three buffers.
//!
//! - **Layout.** As in `cublas.rs`, row-major `Y = X·W` is column-major `Yᵀ = Wᵀ·Xᵀ`. Per expert
//!   `g` with `rows_g` rows, `y_g = x_g · w_g` is the problem `(m, n, k) = (out, rows_g, in)`: A
//!   the expert's matrix (op N for a `[k, m]` stack, op T for a `[m, k]` stack of `[out, in]`
//!   weights), B = `x_g` (op N), C = `y_g`. The forward product and the input gradient (the
//!   same product with the stack read the other way) both run here.
//! - **Not the stack's gradient.** `x_gᵀ · dy_g` contracts over each group's rows, so its problems
//!   differ in `k`. cuBLAS 12 on an H200 returned wrong results for those whenever the output's
//!   leading dimension was not a power of two (96, 100, 576 wrong; 8, 16, 64, 256 right), with
//!   either operand transposed, in TF32 and in full f32 (`bench check`'s `grouped_products`,
//!   bench/NOTES.md, docs/traps.md). It runs as a few batched GEMMs over zero-padded groups
//!   (`ops::grouped_matmul::grouped_outer`): only adapters on the experts have such a gradient
//!   (the stacks of `A` and `B`).
//! - **Pointers.** The problems' A/B/C pointer tables live on the device (cuBLAS reads them
//!   there): one small buffer allocated, filled and freed in the stream's order
//!   (`cuMemAllocAsync`, an async copy, `cuMemFreeAsync` after the GEMM), not a CubeCL buffer,
//!   which returns to its pool when its handle drops, before the GEMM has read it (docs/traps.md).
//!   (cudarc 0.19's `grouped_gemm` passes host arrays there.)
//! - **Precision.** cuBLAS's grouped GEMM writes bf16 for bf16 operands (no f32 output, unlike
//!   `cublasGemmEx`), so the product of a bf16 stack is rounded once to bf16 and then widened to
//!   f32. f32 operands run on TF32 tensor cores, as `cublas.rs` runs them.
//! - **Fallback.** A cuBLAS without the symbol (before 12.5) runs one GEMM per expert instead.

use std::ffi::c_void;
use std::sync::OnceLock;

use burn::tensor::{DType, FloatDType, Shape};
use burn_cubecl::kernel::into_contiguous;
use cudarc::cublas::sys as blas;
use cudarc::driver::result as driver;

use super::cublas::{blas_handle, common_dtype, to_i32};
use super::kernel::{self, Tensor, cast, pointer};
use crate::ops::grouped_matmul::Stacked;

use blas::cublasOperation_t::{CUBLAS_OP_N as N, CUBLAS_OP_T as T};

/// Whether the loaded cuBLAS has `cublasGemmGroupedBatchedEx` (12.5 and later).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        // SAFETY: looking a symbol up does not call it.
        unsafe {
            blas::culib()
                .get::<unsafe extern "C" fn()>(b"cublasGemmGroupedBatchedEx\0")
                .is_ok()
        }
    })
}

/// `x`: `[n, k]`, rows grouped by `counts`; `stack`: `[groups, k, m]` or (transposed)
/// `[groups, m, k]` → `[n, m]` in f32, each group's rows times its own matrix.
pub fn grouped_matmul(x: Tensor, stack: Tensor, stacked: Stacked, counts: &[usize]) -> Tensor {
    let (x, stack) = common_dtype(x, stack);
    let (x, stack) = (into_contiguous(x), into_contiguous(stack));
    let ([n, k], [groups, a, b]) = (dims(&x), dims(&stack));
    assert_eq!(groups, counts.len(), "one count per group");
    // A `[k, m]` matrix is column-major `m × k` as stored (op N); a `[m, k]` one is `k × m` (op T).
    let (inner, m, op_a) = match stacked {
        Stacked::AsIs => (a, b, N),
        Stacked::Transposed => (b, a, T),
    };
    assert_eq!(k, inner, "grouped matmul inner dimensions differ");
    let lda = b;
    let out = kernel::empty(&x, Shape::from([n, m]), x.dtype);
    let mut problems = Vec::new();
    let mut start = 0;
    for (g, &rows) in counts.iter().enumerate() {
        if rows > 0 {
            problems.push(Problem {
                dims: [m, rows, k],
                offsets: [g * k * m, start * k, start * m],
            });
        }
        start += rows;
    }
    assert_eq!(start, n, "counts cover the rows");
    let ops = Ops {
        a: (op_a, lda),
        b: (N, k),
        ldc: m,
    };
    run([&stack, &x, &out], &ops, &problems);
    cast(out, FloatDType::F32)
}

/// One product of the call: column-major `C (m×n) = op(A) (m×k) · op(B) (k×n)`.
struct Problem {
    /// `[m, n, k]`.
    dims: [usize; 3],
    /// Where A, B and C start in their buffers, in elements.
    offsets: [usize; 3],
}

/// What every problem of a call shares: each operand's op and leading dimension.
struct Ops {
    a: (blas::cublasOperation_t, usize),
    b: (blas::cublasOperation_t, usize),
    ldc: usize,
}

/// All `problems` in one `cublasGemmGroupedBatchedEx` on the stream of `c`'s allocation (each
/// problem its own group of one: the experts' row counts differ).
fn run([a, b, c]: [&Tensor; 3], ops: &Ops, problems: &[Problem]) {
    if problems.is_empty() {
        return;
    }
    let (data_type, compute) = match c.dtype {
        DType::BF16 => (
            blas::cudaDataType_t::CUDA_R_16BF,
            blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        DType::F32 => (
            blas::cudaDataType_t::CUDA_R_32F,
            blas::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        ),
        other => panic!("grouped GEMM of {other:?}"),
    };
    let size = c.dtype.size() as u64;
    let bases = [pointer(a), pointer(b), pointer(c)];
    let mut table = Vec::with_capacity(3 * problems.len());
    for (operand, base) in bases.iter().enumerate() {
        table.extend(
            problems
                .iter()
                .map(|p| base + p.offsets[operand] as u64 * size),
        );
    }
    let client = &c.client;
    let stream = client
        .get_resource(c.handle.clone())
        .expect("output buffer")
        .resource()
        .stream;
    let blas = blas_handle(c.device.index);
    let blas = blas.lock().expect("cuBLAS handle");
    blas.ctx.bind_to_thread().expect("bind the CUDA context");
    // The table in memory allocated, filled and freed in the stream's order: a CubeCL buffer
    // went back to its pool when its handle dropped, before the GEMM had read it, and another
    // stream could write it first (session 28's check: CUBLAS_STATUS_INTERNAL_ERROR once the
    // recomputed blocks stopped draining the device at every router).
    // SAFETY: `table` outlives the call (a copy from pageable memory is staged before it
    // returns); the pointer is freed on the same stream after the GEMM.
    let table_ptr = unsafe {
        let ptr = driver::malloc_async(stream.cast(), table.len() * 8).expect("pointer table");
        driver::memcpy_htod_async(ptr, &table, stream.cast()).expect("copy the pointer table");
        ptr
    };
    let count = problems.len();
    let per_problem = |f: &dyn Fn(&Problem) -> usize| -> Vec<i32> {
        problems.iter().map(|p| to_i32(f(p))).collect()
    };
    let (ms, ns, ks) = (
        per_problem(&|p| p.dims[0]),
        per_problem(&|p| p.dims[1]),
        per_problem(&|p| p.dims[2]),
    );
    let (op_a, op_b) = (vec![ops.a.0; count], vec![ops.b.0; count]);
    let (lda, ldb, ldc) = (
        vec![to_i32(ops.a.1); count],
        vec![to_i32(ops.b.1); count],
        vec![to_i32(ops.ldc); count],
    );
    let (alpha, beta, ones) = (vec![1f32; count], vec![0f32; count], vec![1i32; count]);
    let pointers =
        |operand: usize| (table_ptr + (operand * count * 8) as u64) as *const *const c_void;
    // SAFETY: the table holds `count` pointers per operand into live CubeCL allocations of at
    // least the extents the problems describe; the call runs on the stream of the output's
    // allocation (the calling thread's CubeCL stream), after the table's upload and the kernels
    // that wrote the operands, and before any reuse of these buffers.
    unsafe {
        cudarc::cublas::result::set_stream(blas.handle, stream.cast()).expect("cublasSetStream");
        blas::cublasGemmGroupedBatchedEx(
            blas.handle,
            op_a.as_ptr(),
            op_b.as_ptr(),
            ms.as_ptr(),
            ns.as_ptr(),
            ks.as_ptr(),
            alpha.as_ptr().cast(),
            pointers(0),
            data_type,
            lda.as_ptr(),
            pointers(1),
            data_type,
            ldb.as_ptr(),
            beta.as_ptr().cast(),
            pointers(2).cast(),
            data_type,
            ldc.as_ptr(),
            to_i32(count),
            ones.as_ptr(),
            compute,
        )
        .result()
        .expect("cublasGemmGroupedBatchedEx");
        driver::free_async(table_ptr, stream.cast()).expect("free the pointer table");
    }
}

fn dims<const D: usize>(t: &Tensor) -> [usize; D] {
    let shape: Vec<usize> = t.meta.shape().iter().copied().collect();
    shape.try_into().expect("operand rank")
}
