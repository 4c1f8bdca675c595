//! The CPU backend's matrix products, straight through `matrixmultiply`'s GEMM, which reads
//! operands with any strides.
//!
//! burn-ndarray's `matmul` copies an operand that is not contiguous (every `x · Wᵀ` copied `W`,
//! every backward product a transposed activation), zeroes its output before the GEMM overwrites
//! it, and runs one GEMM per batch matrix even when the right side is one shared matrix. A sum
//! onto the product (`matmul_add`: a LoRA update, or a gradient that other consumers of the same
//! tensor registered first) then cost one more pass. Here the views go in as they are, rows that
//! share one right-hand matrix go through one GEMM, the output is written once, and the sum is
//! the GEMM's β = 1.

use burn::backend::NdArray;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn_ndarray::{NdArrayTensor, SharedArray};
use ndarray::{Array, ArrayViewD, IxDyn};
use rayon::prelude::*;

use super::blas::{self, BlasElement};

type Cpu = NdArray<f32>;

/// `lhs · rhs`, plus `acc` when given. `lhs`: `[..., m, k]`, `rhs`: `[..., k, n]`, leading
/// dimensions equal or 1 on one side (broadcast); `acc` shaped like the product. f32 and f64
/// take the GEMM; other dtypes Burn's own ops.
pub fn product(
    lhs: FloatTensor<Cpu>,
    rhs: FloatTensor<Cpu>,
    acc: Option<FloatTensor<Cpu>>,
) -> FloatTensor<Cpu> {
    match (lhs, rhs, acc) {
        (NdArrayTensor::F32(a), NdArrayTensor::F32(b), None) => {
            typed(&a.view(), &b.view(), None).into()
        }
        (NdArrayTensor::F32(a), NdArrayTensor::F32(b), Some(NdArrayTensor::F32(c))) => {
            typed(&a.view(), &b.view(), Some(c.into_shared())).into()
        }
        (NdArrayTensor::F64(a), NdArrayTensor::F64(b), None) => {
            typed(&a.view(), &b.view(), None).into()
        }
        (NdArrayTensor::F64(a), NdArrayTensor::F64(b), Some(NdArrayTensor::F64(c))) => {
            typed(&a.view(), &b.view(), Some(c.into_shared())).into()
        }
        (lhs, rhs, acc) => {
            let product = Cpu::float_matmul(lhs, rhs);
            match acc {
                Some(acc) => Cpu::float_add(product, acc),
                None => product,
            }
        }
    }
}

/// The two element types `matrixmultiply` (and a CBLAS) multiplies.
pub trait Gemm: BlasElement + Send + Sync + 'static {
    /// `c ← a · b + β c` for an `m × k` matrix `a` and a `k × n` matrix `b` at any strides, β 0
    /// or 1. With β = 0, `c` is never read (it may be uninitialised).
    ///
    /// # Safety
    /// The pointers and strides address `m × k`, `k × n` and `m × n` valid elements, `c`'s
    /// distinct and not aliasing `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: (*const Self, isize, isize),
        b: (*const Self, isize, isize),
        accumulate: bool,
        c: *mut Self,
    );
}

macro_rules! gemm_for {
    ($elem:ty, $f:path) => {
        impl Gemm for $elem {
            unsafe fn gemm(
                m: usize,
                k: usize,
                n: usize,
                (a, rsa, csa): (*const Self, isize, isize),
                (b, rsb, csb): (*const Self, isize, isize),
                accumulate: bool,
                c: *mut Self,
            ) {
                let beta = if accumulate { 1.0 } else { 0.0 };
                // SAFETY: the caller's contract; `c` is a contiguous row-major m × n block.
                unsafe {
                    $f(
                        m, k, n, 1.0, a, rsa, csa, b, rsb, csb, beta, c, n as isize, 1,
                    )
                }
            }
        }
    };
}
gemm_for!(f32, matrixmultiply::sgemm);
gemm_for!(f64, matrixmultiply::dgemm);

/// `a · b` in one element type, onto `acc` if given (in place when `acc` is contiguous and
/// held nowhere else).
fn typed<E: Gemm>(
    a: &ArrayViewD<E>,
    b: &ArrayViewD<E>,
    acc: Option<SharedArray<E>>,
) -> SharedArray<E> {
    let shape = product_shape(a, b);
    let out = match acc {
        Some(acc) => {
            assert_eq!(acc.shape(), &shape[..], "matmul_add: accumulator shape");
            let mut c = acc.into_owned();
            if !c.is_standard_layout() {
                c = c.as_standard_layout().into_owned();
            }
            // SAFETY: `c` is a contiguous array of the product's shape.
            unsafe { multiply(a, b, true, c.as_mut_ptr()) };
            c
        }
        None => {
            let mut c = Array::<E, _>::uninit(IxDyn(&shape));
            // SAFETY: as above; with β = 0 every element is written and none read first.
            unsafe {
                multiply(a, b, false, c.as_mut_ptr().cast::<E>());
                c.assume_init()
            }
        }
    };
    out.into_shared()
}

/// `[lead..., m, n]`, the leading dimensions broadcast; panics on operands that do not multiply.
fn product_shape<E>(a: &ArrayViewD<E>, b: &ArrayViewD<E>) -> Vec<usize> {
    let rank = a.ndim();
    let (sa, sb) = (a.shape(), b.shape());
    assert!(
        rank >= 2 && b.ndim() == rank && sa[rank - 1] == sb[rank - 2],
        "matmul: {sa:?} · {sb:?}"
    );
    let mut shape: Vec<usize> = (0..rank - 2)
        .map(|i| {
            assert!(
                sa[i] == sb[i] || sa[i] == 1 || sb[i] == 1,
                "matmul: {sa:?} · {sb:?} do not broadcast"
            );
            sa[i].max(sb[i])
        })
        .collect();
    shape.extend([sa[rank - 2], sb[rank - 1]]);
    shape
}

/// Writes (or with `accumulate` adds) `a · b` into `c`, contiguous in the product's shape.
///
/// # Safety
/// `c` addresses the product's elements and aliases neither operand.
unsafe fn multiply<E: Gemm>(a: &ArrayViewD<E>, b: &ArrayViewD<E>, accumulate: bool, c: *mut E) {
    let rank = a.ndim();
    let (m, k, n) = (
        a.shape()[rank - 2],
        a.shape()[rank - 1],
        b.shape()[rank - 1],
    );
    let lead: Vec<usize> = (0..rank - 2)
        .map(|i| a.shape()[i].max(b.shape()[i]))
        .collect();
    let batches: usize = lead.iter().product();
    if batches * m * n == 0 {
        return;
    }
    let matrix = |x: &ArrayViewD<E>, offset: isize| {
        let s = x.strides();
        // SAFETY: `offset` is a batch matrix's start inside `x`.
        (
            unsafe { x.as_ptr().offset(offset) },
            s[rank - 2],
            s[rank - 1],
        )
    };
    if rows_in_one_range(a, b) {
        // SAFETY: the merged rows are `a`'s, at its row stride; `c` holds batches·m rows.
        unsafe { large_gemm(batches * m, k, n, matrix(a, 0), matrix(b, 0), accumulate, c) };
        return;
    }
    let out = SharedOut(c);
    (0..batches).into_par_iter().for_each(|batch| {
        let (offset_a, offset_b) = batch_offsets(batch, &lead, a, b);
        // SAFETY: each batch writes its own m·n block of `c`.
        unsafe {
            E::gemm(
                m,
                k,
                n,
                matrix(a, offset_a),
                matrix(b, offset_b),
                accumulate,
                out.block(batch * m * n),
            )
        }
    });
}

/// One product of every row against one matrix: through the CBLAS `LORAFORGE_BLAS` names when
/// there is one and it can read these layouts (`blas.rs`), else matrixmultiply. The
/// batched products (attention's, per head) are small and already run in parallel, so they stay
/// on matrixmultiply.
///
/// # Safety
/// As [`Gemm::gemm`].
unsafe fn large_gemm<E: Gemm>(
    m: usize,
    k: usize,
    n: usize,
    a: (*const E, isize, isize),
    b: (*const E, isize, isize),
    accumulate: bool,
    c: *mut E,
) {
    match blas::global() {
        // SAFETY: the caller's contract; `c` is row-major m × n.
        Ok(Some(blas)) if unsafe { blas.gemm(m, k, n, a, b, accumulate, (c, n)) } => {}
        // SAFETY: the caller's contract.
        Ok(_) => unsafe { E::gemm(m, k, n, a, b, accumulate, c) },
        // The command line checks this at start-up (`blas::check`).
        Err(error) => panic!("{error}"),
    }
}

/// Whether every batch matrix of `a` meets the same `b` (b's leading dimensions all 1) and `a`'s
/// rows are evenly spaced across its batches, so that its rows are one matrix.
fn rows_in_one_range<E>(a: &ArrayViewD<E>, b: &ArrayViewD<E>) -> bool {
    let rank = a.ndim();
    if b.shape()[..rank - 2].iter().any(|&size| size != 1) {
        return false;
    }
    let (shape, strides) = (a.shape(), a.strides());
    let mut next_stride = strides[rank - 2] * shape[rank - 2] as isize;
    for i in (0..rank - 2).rev() {
        if shape[i] == 1 {
            continue;
        }
        if strides[i] != next_stride {
            return false;
        }
        next_stride *= shape[i] as isize;
    }
    true
}

/// Where batch matrix `batch` (row-major over `lead`) starts in `a` and in `b`, a dimension of
/// size 1 broadcast.
fn batch_offsets<E>(
    batch: usize,
    lead: &[usize],
    a: &ArrayViewD<E>,
    b: &ArrayViewD<E>,
) -> (isize, isize) {
    let (mut rest, mut offset_a, mut offset_b) = (batch, 0, 0);
    for i in (0..lead.len()).rev() {
        let index = (rest % lead[i]) as isize;
        rest /= lead[i];
        if a.shape()[i] > 1 {
            offset_a += index * a.strides()[i];
        }
        if b.shape()[i] > 1 {
            offset_b += index * b.strides()[i];
        }
    }
    (offset_a, offset_b)
}

/// The output pointer, shared by the parallel batches, which write disjoint blocks.
struct SharedOut<E>(*mut E);

// SAFETY: the batches write disjoint m·n blocks of one buffer that outlives them.
unsafe impl<E> Sync for SharedOut<E> {}

impl<E> SharedOut<E> {
    /// The block starting `offset` elements in.
    ///
    /// # Safety
    /// `offset` is inside the buffer.
    unsafe fn block(&self, offset: usize) -> *mut E {
        unsafe { self.0.add(offset) }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Distribution, Tensor, Tolerance};

    use super::Cpu;
    use crate::ops::matmul::{matmul, matmul_add};

    fn random<const D: usize>(shape: [usize; D]) -> Tensor<Cpu, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    fn assert_close<const D: usize>(ours: Tensor<Cpu, D>, want: Tensor<Cpu, D>) {
        assert_eq!(ours.dims(), want.dims());
        ours.into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::rel_abs(1e-5, 1e-5));
    }

    /// Against burn-ndarray's matmul (which copies every operand contiguous first), on the
    /// layouts the model makes: `x · Wᵀ` with rows from a wider tensor, a batch of rows against
    /// one matrix, per-head products with a transposed right side, broadcast batches, batches
    /// whose rows are not evenly spaced, and empty products.
    #[test]
    fn strided_and_batched_products_equal_burns() {
        let x = random([9, 12]).narrow(1, 2, 7); // row stride 12, not 7
        let w = random([3, 7]);
        assert_close(
            matmul(x.clone(), w.clone().transpose()),
            x.matmul(w.transpose()),
        );

        let rows = random([2, 5, 7]);
        let shared = random([1, 7, 3]);
        assert_close(matmul(rows.clone(), shared.clone()), rows.matmul(shared));

        let q = random([2, 3, 4, 8]);
        let k = random([2, 3, 6, 8]).swap_dims(2, 3);
        assert_close(matmul(q.clone(), k.clone()), q.matmul(k.clone()));
        let one_q = random([1, 3, 4, 8]);
        assert_close(matmul(one_q.clone(), k.clone()), one_q.matmul(k));

        let uneven = random([3, 2, 5, 7]).swap_dims(0, 1); // batch strides out of order
        let right = random([1, 1, 7, 4]);
        assert_close(matmul(uneven.clone(), right.clone()), uneven.matmul(right));

        let no_inner = matmul(random([4, 0]), random([0, 3]));
        assert_close(no_inner, Tensor::zeros([4, 3], &Default::default()));
        assert_eq!(matmul(random([0, 5]), random([5, 3])).dims(), [0, 3]);
    }

    /// The sum lands in place when the accumulator is contiguous and unshared; otherwise on a
    /// copy, leaving the caller's tensor as it was.
    #[test]
    fn accumulates_onto_any_accumulator_without_touching_a_shared_one() {
        let (x, w) = (random([6, 5]), random([5, 4]));
        let want = |acc: Tensor<Cpu, 2>| x.clone().matmul(w.clone()) + acc;

        let acc = random([6, 4]);
        assert_close(
            matmul_add(x.clone(), w.clone(), acc.clone()),
            want(acc.clone()),
        );
        let kept = acc.clone().into_data();
        let _ = matmul_add(x.clone(), w.clone(), acc.clone());
        acc.clone().into_data().assert_eq(&kept, true);

        let transposed = random([4, 6]).transpose();
        assert_close(
            matmul_add(x.clone(), w.clone(), transposed.clone()),
            want(transposed),
        );
    }

    #[test]
    fn f64_operands_multiply_in_f64() {
        let options = (&Default::default(), DType::F64);
        let a = Tensor::<Cpu, 2>::random([3, 5], Distribution::Normal(0.0, 1.0), options);
        let b = Tensor::<Cpu, 2>::random([4, 5], Distribution::Normal(0.0, 1.0), options);
        let ours = matmul(a.clone(), b.clone().transpose());
        assert_eq!(ours.dtype(), DType::F64);
        ours.into_data().assert_approx_eq::<f64>(
            &a.matmul(b.transpose()).into_data(),
            Tolerance::absolute(1e-12),
        );
    }
}
