//! A quantized base weight to the dense matrix its GEMM reads, in one pass of `dequant.cu`
//! (QLoRA). Burn's integer and float ops took several passes and a full-size i32 intermediate
//! (2 GB for Llama 3's 128256-row head).

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;

use super::kernel::{self, Args, ByScales, Queue, Tensor, empty, pointer, u32_of};

/// `dequant.cu` after the bf16 helpers it shares.
const SOURCE: &str = concat!(include_str!("bf16_mma.cuh"), include_str!("dequant.cu"));
const THREADS: u32 = 256;

/// `words`: i32 `[rows, cols · bits / 32]`; `scales`, `biases`: `[rows, cols / group]` in `dtype`
/// → `[rows, cols]` in `dtype` (bf16 or f32).
pub fn dequantize(
    [words, scales, biases]: [Tensor; 3],
    bits: u32,
    group: usize,
    dtype: DType,
) -> Tensor {
    assert!(
        matches!(words.dtype, DType::I32 | DType::U32),
        "packed words as 32-bit integers, not {:?}",
        words.dtype
    );
    assert!(
        scales.dtype == dtype && biases.dtype == dtype,
        "{dtype:?} scales and biases for a {dtype:?} matrix, not {:?} / {:?}",
        scales.dtype,
        biases.dtype
    );
    let [words, scales, biases] = [words, scales, biases].map(into_contiguous);
    let shape = words.meta.shape();
    let (rows, words_per_row) = (shape[0], shape[1]);
    let per_word = 32 / bits as usize;
    assert!(
        group.is_multiple_of(per_word),
        "a group of {group} splits the {per_word} codes of a {bits}-bit word"
    );
    let out = empty(&scales, Shape::new([rows, words_per_row * per_word]), dtype);
    let addresses = [&words, &scales, &biases, &out].map(pointer);
    let layout = Packing {
        bits,
        group,
        words_per_row,
    };
    dequantize_rows(Queue::of(&out), dtype, addresses, rows, layout);
    out
}

/// How a packed matrix's rows are laid out.
#[derive(Clone, Copy)]
pub struct Packing {
    /// Bits a code (2, 4 or 8).
    pub bits: u32,
    /// Codes sharing a scale (a multiple of a word's codes).
    pub group: usize,
    /// Packed words a row.
    pub words_per_row: usize,
}

/// Queues the dequantization of `rows` rows laid out as `layout` on raw device addresses:
/// `[words, scales, biases, out]`, each at the first row (so a slab of a taller matrix may be
/// dequantized into a buffer of its own), scales, biases and `out` in `dtype`.
pub fn dequantize_rows(
    queue: Queue,
    dtype: DType,
    addresses: [u64; 4],
    rows: usize,
    layout: Packing,
) {
    let function = kernels(queue.device(), layout.bits).of(dtype);
    let n_words = rows * layout.words_per_row;
    let mut args = Args::default();
    args.addresses(&addresses);
    args.long(n_words);
    args.int(layout.words_per_row);
    args.int(layout.group);
    let grid = (u32_of(n_words.div_ceil(THREADS as usize)), 1, 1);
    queue.launch(function, grid, THREADS, 0, args);
}

fn kernels(device: usize, bits: u32) -> &'static ByScales {
    static KERNELS: kernel::Cache<(usize, u32), ByScales> = kernel::Cache::new();
    kernel::cached(&KERNELS, (device, bits), || {
        ByScales::build(device, "dequant.cu", SOURCE, bits, "dequantize")
    })
}
