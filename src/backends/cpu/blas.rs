//! An optimised CBLAS for the CPU's large products, loaded at run time from the library that
//! `LORAFORGE_BLAS` names (OpenBLAS, `libmkl_rt`, BLIS: anything that exports `cblas_sgemm` and
//! `cblas_dgemm`, or SciPy's OpenBLAS build, whose symbols start `scipy_`).
//! `scripts/fetch-assets.sh openblas` fetches that build from PyPI.
//!
//! matrixmultiply, the default, runs the model's products at about two thirds of MKL's rate on
//! two threads (bench/NOTES.md). Nothing is linked at build time, so a fresh machine builds and
//! runs without any BLAS; one named but unusable is an error at start-up (`check`), never a
//! silent fallback.

use std::ffi::{CStr, CString, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The variable that names the library.
pub const ENV: &str = "LORAFORGE_BLAS";

/// Why the library that `LORAFORGE_BLAS` names can't be used.
#[derive(Debug, thiserror::Error)]
pub enum BlasError {
    /// The library could not be opened.
    #[error("{ENV}={path}: cannot load it: {reason}")]
    Load {
        /// The path `LORAFORGE_BLAS` gave.
        path: PathBuf,
        /// The loader's message (`dlerror`'s on Unix).
        reason: String,
    },
    /// The library exports no CBLAS gemm for one element type, under either prefix.
    #[error(
        "{ENV}={path}: it exports neither cblas_{name} nor scipy_cblas_{name}; name a CBLAS \
         library (OpenBLAS, libmkl_rt, BLIS), or unset {ENV} to use the built-in GEMM"
    )]
    Symbol {
        /// The path `LORAFORGE_BLAS` gave.
        path: PathBuf,
        /// The missing routine, without its prefix: `sgemm` or `dgemm`.
        name: &'static str,
    },
}

/// `cblas_?gemm`'s signature, for element type `E`.
pub type GemmFn<E> = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    E,
    *const E,
    c_int,
    *const E,
    c_int,
    E,
    *mut E,
    c_int,
);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// A loaded CBLAS. The library stays loaded for the life of the process.
#[derive(Debug)]
pub struct Cblas {
    sgemm: GemmFn<f32>,
    dgemm: GemmFn<f64>,
}

impl Cblas {
    /// Loads the library at `path`. Where it can set its thread count, that becomes rayon's, so
    /// that `RAYON_NUM_THREADS` governs every CPU pass.
    pub fn open(path: &Path) -> Result<Self, BlasError> {
        let load_error = |reason: String| BlasError::Load {
            path: path.to_owned(),
            reason,
        };
        let handle = open_library(path).map_err(load_error)?;
        let find = |name: &'static str| {
            ["cblas_", "scipy_cblas_"]
                .iter()
                .map(|prefix| symbol(handle, &format!("{prefix}{name}")))
                .find(|address| !address.is_null())
                .ok_or_else(|| BlasError::Symbol {
                    path: path.to_owned(),
                    name,
                })
        };
        let (sgemm, dgemm) = (find("sgemm")?, find("dgemm")?);
        let setters = [
            "openblas_set_num_threads",
            "scipy_openblas_set_num_threads",
            "MKL_Set_Num_Threads",
        ];
        for name in setters {
            let set = symbol(handle, name);
            if !set.is_null() {
                let threads = c_int::try_from(rayon::current_num_threads()).unwrap_or(1);
                // SAFETY: each is `void f(int)`, the thread count by value.
                unsafe {
                    let set: unsafe extern "C" fn(c_int) = std::mem::transmute(set);
                    set(threads);
                }
            }
        }
        // SAFETY: both are the CBLAS gemm entry points of their element type.
        unsafe {
            Ok(Self {
                sgemm: std::mem::transmute::<*mut c_void, GemmFn<f32>>(sgemm),
                dgemm: std::mem::transmute::<*mut c_void, GemmFn<f64>>(dgemm),
            })
        }
    }
}

/// A handle to the library at `path`, never closed.
#[cfg(unix)]
fn open_library(path: &Path) -> Result<*mut c_void, String> {
    let name = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| "the path holds a NUL byte".to_string())?;
    // SAFETY: a NUL-terminated path.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a NUL-terminated message after a failed dlopen.
        let reason = unsafe { CStr::from_ptr(libc::dlerror()) };
        return Err(reason.to_string_lossy().into_owned());
    }
    Ok(handle)
}

#[cfg(not(unix))]
fn open_library(_: &Path) -> Result<*mut c_void, String> {
    Err("loading a library at run time is implemented on Unix only".into())
}

/// The address of `name` in the library, null when it has none.
#[cfg(unix)]
fn symbol(handle: *mut c_void, name: &str) -> *mut c_void {
    let name = CString::new(name).expect("symbol names hold no NUL");
    // SAFETY: a live handle and a NUL-terminated name.
    unsafe { libc::dlsym(handle, name.as_ptr()) }
}

#[cfg(not(unix))]
fn symbol(_: *mut c_void, _: &str) -> *mut c_void {
    std::ptr::null_mut()
}

/// The library `LORAFORGE_BLAS` names, loaded on first use; `None` when it is unset or empty.
pub fn global() -> Result<Option<&'static Cblas>, &'static BlasError> {
    static GLOBAL: OnceLock<Result<Option<Cblas>, BlasError>> = OnceLock::new();
    GLOBAL
        .get_or_init(|| match std::env::var_os(ENV) {
            Some(path) if !path.is_empty() => Cblas::open(Path::new(&path)).map(Some),
            _ => Ok(None),
        })
        .as_ref()
        .map(Option::as_ref)
}

/// Loads the library `LORAFORGE_BLAS` names now, so that a wrong path fails at start-up.
pub fn check() -> Result<(), &'static BlasError> {
    global().map(drop)
}

/// The element types a CBLAS multiplies.
pub trait BlasElement: Copy {
    /// The library's gemm for this element type (`cblas_sgemm` or `cblas_dgemm`).
    fn cblas_gemm(blas: &Cblas) -> GemmFn<Self>;
    /// The multiplicative identity (`alpha`, and `beta` when accumulating).
    const ONE: Self;
    /// Zero (`beta` when overwriting `c`).
    const ZERO: Self;
}

impl BlasElement for f32 {
    fn cblas_gemm(blas: &Cblas) -> GemmFn<Self> {
        blas.sgemm
    }
    const ONE: Self = 1.0;
    const ZERO: Self = 0.0;
}

impl BlasElement for f64 {
    fn cblas_gemm(blas: &Cblas) -> GemmFn<Self> {
        blas.dgemm
    }
    const ONE: Self = 1.0;
    const ZERO: Self = 0.0;
}

impl Cblas {
    /// `c ← a · b + β c` (β 0 or 1) for `m × k` `a` and `k × n` `b` given as (pointer, row
    /// stride, column stride), and a row-major `c` with rows `ldc` apart. Returns `false`, having
    /// done nothing, when an operand is neither row- nor column-major (CBLAS needs one unit
    /// stride) or a size does not fit CBLAS's `int`.
    ///
    /// # Safety
    /// The pointers and strides address `m × k`, `k × n` and `m × n` valid elements, `c`'s
    /// distinct and not aliasing `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm<E: BlasElement>(
        &self,
        m: usize,
        k: usize,
        n: usize,
        (a, rsa, csa): (*const E, isize, isize),
        (b, rsb, csb): (*const E, isize, isize),
        accumulate: bool,
        (c, ldc): (*mut E, usize),
    ) -> bool {
        let (Some((trans_a, lda)), Some((trans_b, ldb))) =
            (layout(m, k, rsa, csa), layout(k, n, rsb, csb))
        else {
            return false;
        };
        let int = |x: usize| c_int::try_from(x).ok();
        let (Some(m), Some(k), Some(n), Some(ldc)) = (int(m), int(k), int(n), int(ldc.max(1)))
        else {
            return false;
        };
        let beta = if accumulate { E::ONE } else { E::ZERO };
        // SAFETY: the caller's contract, with the layouts checked above.
        unsafe {
            E::cblas_gemm(self)(
                ROW_MAJOR,
                trans_a,
                trans_b,
                m,
                n,
                k,
                E::ONE,
                a,
                lda,
                b,
                ldb,
                beta,
                c,
                ldc,
            )
        };
        true
    }
}

/// How CBLAS reads a `rows × cols` matrix with these strides: row-major as it is (`NO_TRANS`,
/// rows `ld` apart) or column-major (`TRANS`, columns `ld` apart); `None` for any other layout.
/// A dimension of size 1 has no stride to speak of.
fn layout(rows: usize, cols: usize, rs: isize, cs: isize) -> Option<(c_int, c_int)> {
    // The distance between rows (or columns), at least a row's (column's) length.
    let apart = |stride: isize, single: bool, length: usize| match single {
        true => Some(length),
        false => usize::try_from(stride).ok().filter(|&ld| ld >= length),
    };
    let row_major = (cs == 1 || cols == 1)
        .then(|| apart(rs, rows == 1, cols))
        .flatten()
        .map(|ld| (NO_TRANS, ld));
    let column_major = || {
        (rs == 1 || rows == 1)
            .then(|| apart(cs, cols == 1, rows))
            .flatten()
            .map(|ld| (TRANS, ld))
    };
    let (trans, ld) = row_major.or_else(column_major)?;
    Some((trans, c_int::try_from(ld.max(1)).ok()?))
}

#[cfg(test)]
mod tests {
    use super::{NO_TRANS, TRANS, layout};

    #[test]
    fn layouts_cblas_can_read() {
        assert_eq!(layout(4, 3, 3, 1), Some((NO_TRANS, 3)));
        assert_eq!(
            layout(4, 3, 8, 1),
            Some((NO_TRANS, 8)),
            "rows of a wider matrix"
        );
        assert_eq!(layout(4, 3, 1, 4), Some((TRANS, 4)), "a transposed view");
        assert_eq!(
            layout(1, 3, 0, 1),
            Some((NO_TRANS, 3)),
            "one row: its stride is moot"
        );
        assert_eq!(layout(4, 1, 5, 7), Some((NO_TRANS, 5)), "one column");
        assert_eq!(layout(4, 3, 2, 1), None, "rows overlap");
        assert_eq!(layout(4, 3, 0, 1), None, "a broadcast row");
        assert_eq!(layout(4, 3, 6, 2), None, "no unit stride");
        assert_eq!(layout(4, 3, -3, 1), None, "reversed rows");
    }
}
