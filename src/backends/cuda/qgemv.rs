//! A few activation rows times a packed quantized matrix, read packed (`qgemv.cu`): batch-1 to
//! batch-8 decoding of a quantized model, where dequantizing the whole matrix every step took
//! 82% of an 8B model's decode step on an H200 (bench/NOTES.md, session 23).

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;

use super::kernel::{self, Args, ByScales, Tensor, empty, u32_of};

const SOURCE: &str = include_str!("qgemv.cu");
/// Warps a block (one output each), as `WARPS` in the kernel.
const WARPS: usize = 4;
/// The most activation rows the kernel takes (`MAX_ROWS`); more go through the GEMM.
pub const MAX_ROWS: usize = 8;

/// `x`: f32 `[rows, cols]` (rows ≤ [`MAX_ROWS`]); `words`: i32 `[n_out, cols · bits / 32]`;
/// `scales`, `biases`: `[n_out, cols / group]` in f32 or bf16 → `x · Wᵀ`: f32 `[rows, n_out]`.
pub fn qgemv([x, words, scales, biases]: [Tensor; 4], bits: u32, group: usize) -> Tensor {
    assert!(
        x.dtype == DType::F32 && matches!(words.dtype, DType::I32 | DType::U32),
        "f32 activations and 32-bit packed words, not {:?} and {:?}",
        x.dtype,
        words.dtype
    );
    let [x, words, scales, biases] = [x, words, scales, biases].map(into_contiguous);
    let (rows, cols) = (x.meta.shape()[0], x.meta.shape()[1]);
    let n_out = words.meta.shape()[0];
    assert!(
        rows <= MAX_ROWS,
        "{rows} rows: the GEMV takes {MAX_ROWS} at most"
    );
    assert_eq!(
        words.meta.shape()[1] * 32 / bits as usize,
        cols,
        "packed words for {cols} columns"
    );
    let out = empty(&x, Shape::new([rows, n_out]), DType::F32);
    let function = kernels(x.device.index, bits).of(scales.dtype);
    let mut args = Args::default();
    args.pointers(&[&x, &words, &scales, &biases, &out]);
    args.int(rows);
    args.int(cols);
    args.int(n_out);
    args.int(group);
    let grid = (u32_of(n_out.div_ceil(WARPS)), 1, 1);
    kernel::launch(function, grid, (WARPS * 32) as u32, 0, &out, args);
    out
}

fn kernels(device: usize, bits: u32) -> &'static ByScales {
    static KERNELS: kernel::Cache<(usize, u32), ByScales> = kernel::Cache::new();
    kernel::cached(&KERNELS, (device, bits), || {
        ByScales::build(device, "qgemv.cu", SOURCE, bits, "qgemv")
    })
}
