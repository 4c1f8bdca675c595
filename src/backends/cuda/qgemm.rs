//! The prompt pass's product with a packed matrix, read packed on tensor cores (`qgemm.cu`),
//! where dequantizing slabs of rows and running cuBLAS over them read and wrote each weight
//! three times (its codes, then its bf16 value twice) in GEMMs a few tiles wide.

use burn::tensor::DType;

use super::dequant::Packing;
use super::kernel::{self, Args, Queue, u32_of};

/// `qgemm.cu` after the bf16 helpers it shares.
const SOURCE: &str = concat!(include_str!("bf16_mma.cuh"), include_str!("qgemm.cu"));
/// Warps a block (`WARPS`), each 16 rows of the matrix.
const WARPS: usize = 4;
/// Prompt rows a launch row covers (`TILES` · 8).
const TOKENS: usize = 64;

/// Inputs a warp covers with one 16-byte load a lane of each of its rows (`SPAN`).
fn span(bits: u32) -> usize {
    16 * 32 / bits as usize
}

/// Whether `qgemm` reads a matrix packed as `layout` with `scales`-typed scales over `cols`
/// inputs: bf16 scales (its products are bf16), 2, 4 or 8 bits, whole spans and groups, and
/// groups of whole 4-word chunks (`CHUNK` codes).
pub fn supports(layout: Packing, scales: DType, cols: usize) -> bool {
    let chunk = 4 * 32 / layout.bits as usize;
    scales == DType::BF16
        && matches!(layout.bits, 2 | 4 | 8)
        && cols.is_multiple_of(span(layout.bits))
        && cols.is_multiple_of(layout.group)
        && layout.group.is_multiple_of(chunk)
}

/// Queues `y (+)= x · Wᵀ` on raw device addresses `[x, words, scales, biases, y]`: `x` bf16
/// `[rows, cols]`, W packed as `layout` (`supports` holds) with `out` rows. With one part, `y`
/// is f32 with `ldy` floats a row and the sums are added onto it when `accumulate`; with
/// `parts` > 1 (`cols / parts` a multiple of `span`), part `p` of the inputs' sums goes to
/// `y + p · rows · out` for `sum_splits` to add up.
pub fn qgemm(
    queue: Queue,
    addresses: [u64; 5],
    [rows, out, cols]: [usize; 3],
    layout: Packing,
    ldy: usize,
    accumulate: bool,
    parts: usize,
) {
    let [x, ..] = addresses;
    debug_assert!(cols.is_multiple_of(parts * span(layout.bits)));
    debug_assert!(x.is_multiple_of(16), "x is read 16 bytes at a time");
    let function = kernel::cached(&KERNELS, (queue.device(), layout.bits), || {
        let module = kernel::module(
            queue.device(),
            "qgemm.cu",
            SOURCE,
            &[format!("BITS={}", layout.bits)],
        );
        kernel::function(&module, "qgemm", 0)
    });
    let mut args = Args::default();
    args.addresses(&addresses);
    for n in [rows, out, cols, layout.group, ldy, usize::from(accumulate)] {
        args.int(n);
    }
    let grid = (
        u32_of(out.div_ceil(16 * WARPS)),
        u32_of(parts),
        u32_of(rows.div_ceil(TOKENS)),
    );
    queue.launch(function, grid, u32_of(32 * WARPS), 0, args);
}

static KERNELS: kernel::Cache<(usize, u32), cudarc::driver::CudaFunction> = kernel::Cache::new();

/// Parts `qgemm` splits `cols` into for `rows` tokens and `out` outputs: doubled while its
/// warps fall short of `warps` (a few per SM keep loads in flight), each part whole spans, at
/// most 16; or `asked` (`LORAFORGE_PROMPT_SPLITS`) where that divides into whole spans.
pub fn parts(
    rows: usize,
    out: usize,
    cols: usize,
    bits: u32,
    warps: usize,
    asked: Option<usize>,
) -> usize {
    let span = span(bits);
    if let Some(n) = asked {
        return if n >= 1 && cols.is_multiple_of(n * span) {
            n
        } else {
            1
        };
    }
    let tasks = out.div_ceil(16) * rows.div_ceil(TOKENS);
    let mut p = 1;
    while p < 16 && tasks * p < warps && cols.is_multiple_of(2 * p * span) {
        p *= 2;
    }
    p
}
