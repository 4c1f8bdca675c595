//! Flash attention on CUDA: the kernels of `attention.cu`, compiled by NVRTC once per head
//! dimension and queued on CubeCL's stream over Burn's CUDA buffers (as `cublas.rs` does).
//!
//! The scores stay in registers: where the sliced Burn-op attention (`ops/attention.rs`)
//! writes and reads `[batch, heads, slice, keys]` f32 scores about ten times per slice, these
//! kernels read Q, K, V and dO and write only the outputs. No mask exists: the kernels apply the
//! causal rule, for packed rows each query's first key (`starts`, O(seq) floats), a sliding
//! window (the key tiles before a block's window are skipped), and Gemma 2's score soft-cap
//! `cap · tanh(s / cap)` between the products and the mask (the backward multiplies dS by the
//! slope 1 − t², recomputed from the capped scores). Products run on bf16 tensor cores
//! (`mma.sync`, f32 accumulation), as PyTorch's SDPA does in a bf16 run.

use burn::tensor::{DType, FloatDType, Shape};
use burn_cubecl::kernel::into_contiguous;
use cudarc::driver::CudaFunction;

use super::kernel::{self, Args, Tensor, cast, empty, pointer, u32_of};

/// `attention.cu` after the bf16 helpers it shares.
const SOURCE: &str = concat!(include_str!("bf16_mma.cuh"), include_str!("attention.cu"));
const THREADS: u32 = 256;
/// The widest head whose rows a warp accumulates whole; past it two warps share each 16 rows,
/// each with half the columns (`SPLIT` in the source), so a block holds half the rows.
const WHOLE_ROWS_UP_TO: usize = 128;

/// Queries per block of the forward and dQ kernels, keys per block of the dK/dV kernel
/// (`BLOCK_ROWS` in the source).
fn block_rows(head_dim: usize) -> usize {
    if head_dim > WHOLE_ROWS_UP_TO { 64 } else { 128 }
}
/// Key tiles of the forward and dQ kernels, query tiles of the dK/dV kernel (`FWD_KEYS`,
/// `DQ_KEYS`, `KV_QUERIES` in the source), each double-buffered in shared memory.
const FWD_KEYS: usize = 64;
const DQ_KEYS: usize = 32;
const KV_QUERIES: usize = 32;

/// Whether the kernels serve this head dimension on this device: a multiple of 16 up to 128, or
/// of 32 up to 256 (Gemma's heads; each warp of a pair then takes a multiple of 16 columns), bf16
/// `mma.sync` (compute capability 8+), and the shared memory each kernel asks for.
pub fn supports(head_dim: usize, device: usize) -> bool {
    let step = if head_dim > WHOLE_ROWS_UP_TO { 32 } else { 16 };
    head_dim.is_multiple_of(step)
        && (16..=256).contains(&head_dim)
        && super::compute_capability(device).0 >= 8
        && SharedBytes::new(head_dim).largest() <= super::max_shared_bytes(device)
}

/// `out = softmax(scale · q kᵀ + mask) v` and each query's log-sum-exp of its scores.
/// `q`: `[batch, heads, seq, d]`; `k`, `v`: `[batch, kv_heads, keys, d]`, kv head `h / group`
/// serving query head `h` (`group = heads / kv_heads`, grouped-query attention). Query `i` sees
/// keys `start(i) ..= keys − seq + i`, where `starts` (`[batch, 1, 1, seq]`, packed rows only)
/// gives `start(i)`, else 0; `rule` may narrow that to a window and soft-cap the scores → (`[batch,
/// heads, seq, d]`, `[batch, heads, seq, 1]`).
pub fn forward([q, k, v]: [Tensor; 3], starts: Option<Tensor>, rule: Rule) -> (Tensor, Tensor) {
    let layout = Layout::new(&q, &k, starts.as_ref());
    let [q, k, v] = [q, k, v].map(rows);
    let starts = starts.map(contiguous_f32);
    let kernels = kernels(q.device.index, layout.d);
    let (k16, v16) = (to_bf16(kernels, &k, 1.0), to_bf16(kernels, &v, 1.0));
    let out = empty(&q, layout.q_shape(), DType::F32);
    let lse = empty(&q, layout.lse_shape(), DType::F32);
    let mut args = Args::default();
    args.pointers(&[&q, &k16, &v16]);
    args.optional_pointer(starts.as_ref());
    args.pointers(&[&out, &lse]);
    sizes(&mut args, &layout, rule);
    strides(&mut args, &[&q]);
    args.float(rule.scale);
    args.float(rule.softcap);
    let shared = kernels.shared.forward;
    launch(
        &kernels.forward,
        layout.grid(layout.seq, layout.heads),
        shared,
        &out,
        args,
    );
    (out, lse)
}

/// The gradients `(dq, dk, dv)` of [`forward`] given `d_out`, its `lse` and `delta =
/// rowsum(d_out ⊙ out)` (`[batch, heads, seq, 1]`).
pub fn backward(
    [q, k, v, d_out, lse, delta]: [Tensor; 6],
    starts: Option<Tensor>,
    rule: Rule,
) -> (Tensor, Tensor, Tensor) {
    let scale = rule.scale;
    let layout = Layout::new(&q, &k, starts.as_ref());
    let [q, k, v, d_out] = [q, k, v, d_out].map(rows);
    let starts = starts.map(contiguous_f32);
    let [lse, delta] = [lse, delta].map(|t| into_contiguous(cast(t, FloatDType::F32)));
    let kernels = kernels(q.device.index, layout.d);
    let (k16, v16) = (to_bf16(kernels, &k, 1.0), to_bf16(kernels, &v, 1.0));
    let dq = empty(&q, layout.q_shape(), DType::F32);
    let dk = empty(&q, layout.kv_shape(), DType::F32);
    let dv = empty(&q, layout.kv_shape(), DType::F32);

    let mut args = Args::default();
    args.pointers(&[&q, &k16, &v16]);
    args.optional_pointer(starts.as_ref());
    args.pointers(&[&d_out, &lse, &delta, &dq]);
    sizes(&mut args, &layout, rule);
    strides(&mut args, &[&q]);
    strides(&mut args, &[&d_out]);
    args.float(scale);
    args.float(rule.softcap);
    let shared = kernels.shared.dq;
    launch(
        &kernels.dq,
        layout.grid(layout.seq, layout.heads),
        shared,
        &dq,
        args,
    );

    let (q16, o16) = (to_bf16(kernels, &q, scale), to_bf16(kernels, &d_out, 1.0));
    let mut args = Args::default();
    args.pointers(&[&q16, &k16, &v16]);
    args.optional_pointer(starts.as_ref());
    args.pointers(&[&o16, &lse, &delta, &dk, &dv]);
    sizes(&mut args, &layout, rule);
    args.float(rule.softcap);
    let shared = kernels.shared.dkdv;
    let grid = layout.grid(layout.keys, layout.kv_heads);
    launch(&kernels.dkdv, grid, shared, &dk, args);
    (dq, dk, dv)
}

/// `x · mul` as contiguous bf16 `[batch · heads][rows][d]`, what the kernels stream into shared
/// memory tile by tile.
fn to_bf16(kernels: &Kernels, x: &Tensor, mul: f32) -> Tensor {
    let shape = x.meta.shape();
    let [batch, heads, n, d] = [shape[0], shape[1], shape[2], shape[3]];
    let out = empty(x, Shape::new([batch, heads, n, d]), DType::BF16);
    let mut args = Args::default();
    args.pointers(&[x, &out]);
    args.int(heads);
    args.int(n);
    strides(&mut args, &[x]);
    args.float(mul);
    let blocks = (n * d).div_ceil(4 * THREADS as usize);
    let grid = (u32_of(blocks), u32_of(heads), u32_of(batch));
    launch(&kernels.to_bf16, grid, 0, &out, args);
    out
}

/// The problem's sizes, checked.
struct Layout {
    batch: usize,
    heads: usize,
    /// Heads of K and V: `heads / group` (grouped-query attention), each serving `group` query
    /// heads.
    kv_heads: usize,
    seq: usize,
    keys: usize,
    d: usize,
}

impl Layout {
    fn new(q: &Tensor, k: &Tensor, starts: Option<&Tensor>) -> Self {
        let (qs, ks) = (q.meta.shape(), k.meta.shape());
        let [batch, heads, seq, d] = [qs[0], qs[1], qs[2], qs[3]];
        let (kv_heads, keys) = (ks[1], ks[2]);
        assert!(
            ks[0] == batch
                && kv_heads > 0
                && heads.is_multiple_of(kv_heads)
                && ks[3] == d
                && keys >= seq,
            "flash attention: k {ks:?} does not match q {qs:?}"
        );
        if let Some(starts) = starts {
            let ss = starts.meta.shape();
            assert!(
                ss.num_elements() == batch * seq && keys == seq,
                "flash attention: starts {ss:?} for q {qs:?} and k {ks:?} (packed rows have no cache)"
            );
        }
        Self {
            batch,
            heads,
            kv_heads,
            seq,
            keys,
            d,
        }
    }

    fn q_shape(&self) -> Shape {
        Shape::new([self.batch, self.heads, self.seq, self.d])
    }

    fn kv_shape(&self) -> Shape {
        Shape::new([self.batch, self.kv_heads, self.keys, self.d])
    }

    fn lse_shape(&self) -> Shape {
        Shape::new([self.batch, self.heads, self.seq, 1])
    }

    /// One block per head (of `heads` heads), per batch row, per [`block_rows`] of `rows`: the
    /// row blocks slowest, so the kernels can start the longest first (`attention.cu`).
    fn grid(&self, rows: usize, heads: usize) -> (u32, u32, u32) {
        let blocks = rows.div_ceil(block_rows(self.d));
        (u32_of(heads), u32_of(self.batch), u32_of(blocks))
    }
}

/// An f32 operand the kernels read as float4s: the last dimension contiguous, the other strides
/// and the start 16-byte aligned. Anything else is copied contiguous first.
fn rows(t: Tensor) -> Tensor {
    let t = last_contiguous(t);
    let aligned = |t: &Tensor| {
        let (shape, strides) = (t.meta.shape(), t.meta.strides());
        let rank = shape.len();
        let strides_aligned = shape[..rank - 1]
            .iter()
            .zip(&strides[..rank - 1])
            .all(|(&size, &stride)| size == 1 || stride.is_multiple_of(4));
        strides_aligned && pointer(t).is_multiple_of(16)
    };
    if aligned(&t) {
        return t;
    }
    let t = into_contiguous(t);
    assert!(aligned(&t), "a contiguous CUDA buffer is 16-byte aligned");
    t
}

/// An f32 operand whose last dimension is contiguous.
fn last_contiguous(t: Tensor) -> Tensor {
    let t = cast(t, FloatDType::F32);
    let shape = t.meta.shape();
    if shape[shape.len() - 1] > 1 && t.meta.strides()[shape.len() - 1] != 1 {
        into_contiguous(t)
    } else {
        t
    }
}

/// A contiguous f32 tensor (each packed row's `starts`, read one value at a time).
fn contiguous_f32(t: Tensor) -> Tensor {
    into_contiguous(cast(t, FloatDType::F32))
}

/// The sizes every kernel takes: heads, seq, keys, the query heads per kv head, and the window
/// (0 for none).
fn sizes(args: &mut Args, layout: &Layout, rule: Rule) {
    let group = layout.heads / layout.kv_heads;
    for n in [layout.heads, layout.seq, layout.keys, group, rule.window] {
        args.int(n);
    }
}

/// How scores are made and which keys a query sees beyond the causal (and packed) rule.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// What `q · k` is multiplied by.
    pub scale: f32,
    /// The scores' soft-cap, `cap · tanh(s / cap)`; 0 for none.
    pub softcap: f32,
    /// A query sees itself and the `window − 1` keys before it; 0 for every earlier key.
    pub window: usize,
}

/// Batch, head and row strides (0 for a dimension of size 1).
fn strides(args: &mut Args, tensors: &[&Tensor]) {
    for tensor in tensors {
        let (shape, strides) = (tensor.meta.shape(), tensor.meta.strides());
        for dim in 0..3 {
            args.long(if shape[dim] == 1 { 0 } else { strides[dim] });
        }
    }
}

fn launch(function: &CudaFunction, grid: (u32, u32, u32), shared: u32, out: &Tensor, args: Args) {
    kernel::launch(function, grid, THREADS, shared, out, args);
}

/// The kernels for one head dimension on one device.
struct Kernels {
    to_bf16: CudaFunction,
    forward: CudaFunction,
    dq: CudaFunction,
    dkdv: CudaFunction,
    shared: SharedBytes,
}

/// Each kernel's dynamic shared memory, in bytes: the layouts `attention.cu` describes above
/// each kernel (bf16 tiles of `d + 8` elements a row).
struct SharedBytes {
    forward: u32,
    dq: u32,
    dkdv: u32,
}

impl SharedBytes {
    fn new(head_dim: usize) -> Self {
        let row = 2 * (head_dim + 8);
        let bytes = |rows: usize| u32_of(rows * row);
        let block = block_rows(head_dim);
        // Past WHOLE_ROWS_UP_TO the block's scale·Q (and dO) rows are staged too.
        let staged = if head_dim > WHOLE_ROWS_UP_TO {
            block
        } else {
            0
        };
        Self {
            forward: bytes(2 * 2 * FWD_KEYS + staged),
            dq: bytes(2 * 2 * DQ_KEYS + 2 * staged),
            // K and V, the double-buffered scale·Q and dO tiles, and their lse and D in f32.
            dkdv: bytes(2 * block + 2 * 2 * KV_QUERIES) + u32_of(2 * 2 * KV_QUERIES * 4),
        }
    }

    /// What the hungriest kernel asks for.
    fn largest(&self) -> u32 {
        self.forward.max(self.dq).max(self.dkdv)
    }
}

fn kernels(device: usize, head_dim: usize) -> &'static Kernels {
    static KERNELS: kernel::Cache<(usize, usize), Kernels> = kernel::Cache::new();
    kernel::cached(&KERNELS, (device, head_dim), || compile(device, head_dim))
}

fn compile(device: usize, head_dim: usize) -> Kernels {
    let module = kernel::module(
        device,
        "attention.cu",
        SOURCE,
        &[format!("HEAD_DIM={head_dim}")],
    );
    let shared = SharedBytes::new(head_dim);
    Kernels {
        to_bf16: kernel::function(&module, "to_bf16", 0),
        forward: kernel::function(&module, "attention_forward", shared.forward),
        dq: kernel::function(&module, "attention_backward_dq", shared.dq),
        dkdv: kernel::function(&module, "attention_backward_dkdv", shared.dkdv),
        shared,
    }
}
