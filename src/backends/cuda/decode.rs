//! The decode session on CUDA (`ops/decode.rs`): one token through a Llama-shaped model in six
//! kernel launches a block (`decode.cu`), on buffers allocated once, with the weights' and
//! buffers' addresses taken once, the step's launches captured as a CUDA graph at its first step
//! and replayed with one launch after. Op by op, Burn's host work for the few dozen ops a block
//! (fusion, allocation, launch) outlasted the GPU's, so an 8B model decoded at 25-35 tokens/s
//! with the GPU mostly idle (bench/NOTES.md, session 23).
//!
//! The keys and values move into buffers of `[1, kv_heads, capacity, head_dim]` a block when the
//! session opens (room for up to 1,024 more positions, doubled whenever full), and back into
//! Burn tensors (views of those buffers) when it ends.

use std::cell::Cell;

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor as BurnTensor, TensorData};
use burn_cubecl::kernel::into_contiguous;
use cudarc::driver::sys::{
    CUgraphExec, CUgraphInstantiate_flags_enum, CUresult, CUstreamCaptureMode,
    CUstreamCaptureStatus,
};
use cudarc::driver::{CudaFunction, result as driver};

use super::kernel::{self, Args, Queue, Tensor, empty, pointer, u32_of};
use super::upload::into_fusion;
use crate::ops::decode::{
    DecodeLinear, DecodeMatrix, DecodeModel, DecodeSession, SessionBlock, cached_positions,
    first_capacity,
};
use crate::ops::primitive::{inner, primitive};

mod prefill;

pub use prefill::ROWS as PROMPT_ROWS;

const SOURCE: &str = include_str!("decode.cu");
type Cuda = burn::backend::Cuda<f32>;

/// How a matrix is held, which picks the module its products run in.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Dense(Float),
    Packed { bits: u32, scales: Float },
}

/// Shared memory a packed product may stage its input in: at most 200 KiB (of an H100's or
/// H200's 227; inputs up to about 49,600 wide at 4 bits), within what the device allows a block
/// beside the kernel's own partial sums (`staging_limit`).
const MAX_STAGED: usize = 200 * 1024;

/// The packed products' static shared memory: a float per warp (16 warps at most, at the widest
/// tile `LORAFORGE_DECODE_TILE` may ask for) and the kernel's other small slots.
const STATIC_SHARED: usize = 4 * (512 / 32) + 16;

/// Dynamic shared memory a packed product may take on `device` (an A100 allows a block 163 KiB,
/// consumer cards 99).
fn staging_limit(device: usize) -> usize {
    (super::max_shared_bytes(device) as usize)
        .saturating_sub(STATIC_SHARED)
        .min(MAX_STAGED)
}

impl Kind {
    /// Dynamic shared memory a product over `cols` inputs takes: a packed one stages x and
    /// each chunk's sum (`decode.cu`).
    fn staged(self, cols: usize) -> usize {
        match self {
            Kind::Dense(_) => 0,
            Kind::Packed { bits, .. } => 4 * (cols + cols / chunk(bits)),
        }
    }
}

/// Columns a lane of a packed product reads at a time: 4 words (`CHUNK` in `decode.cu`).
fn chunk(bits: u32) -> usize {
    4 * 32 / bits as usize
}

/// How the products split their work: `R` and `THREADS` in `decode.cu` (output rows a task,
/// which a block takes for dense matrices and a warp for packed ones; threads a block).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Tile {
    rows: usize,
    threads: usize,
}

impl Tile {
    /// The tile for `kind`: dense rows 4 a block of 256 threads (session 25), packed ones 2 a
    /// warp in blocks of 256 (session 26: 239-246 tokens/s on an 8B model at 4 bits, against
    /// 193 with 4 a warp in blocks of 128; bench/NOTES.md). `LORAFORGE_DECODE_TILE=RxT` (rows
    /// x threads) overrides it, for measuring others.
    fn of(kind: Kind) -> Self {
        let tile = std::env::var("LORAFORGE_DECODE_TILE").ok().and_then(|v| {
            let (rows, threads) = v.split_once('x')?;
            let (rows, threads) = (rows.parse().ok()?, threads.parse().ok()?);
            let fits = [1, 2, 4, 8].contains(&rows) && [32, 64, 128, 256, 512].contains(&threads);
            fits.then_some(Tile { rows, threads })
        });
        tile.unwrap_or(match kind {
            Kind::Dense(_) => Tile {
                rows: 4,
                threads: 256,
            },
            Kind::Packed { .. } => Tile {
                rows: 2,
                threads: 256,
            },
        })
    }
}

/// The two float types the kernels read.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Float {
    Bf16,
    F32,
}

impl Float {
    fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::BF16 => Some(Float::Bf16),
            DType::F32 => Some(Float::F32),
            _ => None,
        }
    }

    /// The type's name in `decode.cu`.
    fn name(self) -> &'static str {
        match self {
            Float::Bf16 => "bf16",
            Float::F32 => "float",
        }
    }
}

/// One module's kernels (`decode.cu` compiled for a matrix kind and a cache dtype).
struct Kernels {
    linear: CudaFunction,
    gated: CudaFunction,
    embed: CudaFunction,
    rope_append: CudaFunction,
    attend: CudaFunction,
    // The prompt pass's (`prefill.rs`).
    rmsnorm_rows: CudaFunction,
    silu_mul: CudaFunction,
    to_gemm: CudaFunction,
    add_bias: CudaFunction,
    sum_splits: CudaFunction,
    tile: Tile,
    /// Dynamic shared memory the products may take (0 for dense ones).
    staging: usize,
}

impl Kernels {
    /// Blocks a launch of `tasks` tasks takes: a block a task for dense matrices, a warp a task
    /// for packed ones.
    fn blocks(&self, kind: Kind, tasks: usize) -> usize {
        match kind {
            Kind::Dense(_) => tasks,
            Kind::Packed { .. } => tasks.div_ceil(self.tile.threads / 32),
        }
    }
}

fn kernels(device: usize, kind: Kind, kv: Float) -> &'static Kernels {
    static KERNELS: kernel::Cache<(usize, Kind, Float, Tile), Kernels> = kernel::Cache::new();
    let tile = Tile::of(kind);
    kernel::cached(&KERNELS, (device, kind, kv, tile), || {
        let mut defines = vec![
            format!("KV_T={}", kv.name()),
            format!("R={}", tile.rows),
            format!("THREADS={}", tile.threads),
        ];
        match kind {
            Kind::Dense(t) => defines.push(format!("DENSE_T={}", t.name())),
            Kind::Packed { bits, scales } => {
                defines.push(format!("BITS={bits}"));
                defines.push(format!("SCALE_T={}", scales.name()));
            }
        }
        let module = kernel::module(device, "decode.cu", SOURCE, &defines);
        let f = |name| kernel::function(&module, name, 0);
        // The packed products stage their input in dynamic shared memory.
        let staging = match kind {
            Kind::Dense(_) => 0,
            Kind::Packed { .. } => staging_limit(device),
        };
        let product = |name| kernel::function(&module, name, u32_of(staging));
        Kernels {
            linear: product("linear"),
            gated: product("gated"),
            embed: f("embed"),
            rope_append: f("rope_append"),
            attend: f("attend"),
            rmsnorm_rows: f("rmsnorm_rows"),
            silu_mul: f("silu_mul"),
            to_gemm: f("to_gemm"),
            add_bias: f("add_bias"),
            sum_splits: f("sum_splits"),
            tile,
            staging,
        }
    })
}

/// A matrix on the device: its buffers, the kernel arguments that name it, and the kernels
/// compiled for it (looked up once, not per launch).
struct Matrix {
    kind: Kind,
    /// Dense: the matrix; packed: words, scales, biases.
    buffers: Vec<Buffer>,
    group: usize,
    kernels: &'static Kernels,
}

impl Matrix {
    /// `m` on the device, its kernels compiled for caches held in `kv`.
    fn new(m: DecodeMatrix<Cuda>, kv: Float) -> Option<Self> {
        let (kind, buffers, group) = match m {
            DecodeMatrix::Dense(w) => {
                let w = float(w);
                (Kind::Dense(Float::of(w.dtype)?), vec![w], 0)
            }
            DecodeMatrix::Packed {
                words,
                scales,
                biases,
                bits,
                group,
            } => {
                let words = into_contiguous(words.client.clone().resolve_tensor_int::<Cube>(words));
                // A lane reads 4 words at a time, all in one group; groups are found by shifts,
                // and offsets in 32 bits.
                let fits = group.is_power_of_two()
                    && group.is_multiple_of(chunk(bits))
                    && words.meta.shape().num_elements() / 4 <= i32::MAX as usize;
                if !fits {
                    return None;
                }
                let [scales, biases] = [scales, biases].map(float);
                let scales_dtype = Float::of(scales.dtype)?;
                if biases.dtype != scales.dtype {
                    return None;
                }
                let kind = Kind::Packed {
                    bits,
                    scales: scales_dtype,
                };
                (kind, vec![words, scales, biases], group)
            }
            // Packed on the host (groups of fewer codes than a device word holds).
            DecodeMatrix::Host(_) => return None,
        };
        let kernels = kernels(buffers[0].device.index, kind, kv);
        let buffers: Vec<Buffer> = buffers.into_iter().map(Buffer::new).collect();
        // Rows are read up to 16 bytes at a time.
        if !buffers.iter().all(Buffer::aligned) {
            return None;
        }
        Some(Matrix {
            kind,
            buffers,
            group,
            kernels,
        })
    }

    /// The kernel's parameters for this matrix (`MATRIX_PARAMS`).
    fn push(&self, args: &mut Args) {
        for b in &self.buffers {
            args.addresses(&[b.at]);
        }
        if matches!(self.kind, Kind::Packed { .. }) {
            args.int(self.group.trailing_zeros() as usize);
        }
    }

    /// Output rows a task of this matrix's products takes.
    fn rows_a_task(&self) -> usize {
        self.kernels.tile.rows
    }

    /// The parameters of an absent segment of this kind: null matrices.
    fn push_none(kind: Kind, args: &mut Args) {
        match kind {
            Kind::Dense(_) => args.addresses(&[0]),
            Kind::Packed { .. } => {
                args.addresses(&[0, 0, 0]);
                args.int(0);
            }
        }
    }
}

/// A buffer kept alive with its device address, taken once.
struct Buffer {
    tensor: Tensor,
    at: u64,
}

impl Buffer {
    fn new(tensor: Tensor) -> Self {
        Buffer {
            at: pointer(&tensor),
            tensor,
        }
    }

    /// Whether the buffer can be read 16 bytes at a time.
    fn aligned(&self) -> bool {
        self.at.is_multiple_of(16)
    }
}

/// A linear: its matrix, bias and output features.
struct Linear {
    matrix: Matrix,
    bias: Option<Buffer>,
    out: usize,
}

impl Linear {
    fn new(l: DecodeLinear<Cuda>, kv: Float) -> Option<Self> {
        Some(Linear {
            matrix: Matrix::new(l.matrix, kv)?,
            bias: l.bias.map(|b| Buffer::new(float(b))),
            out: l.out,
        })
    }

    /// The bias's address, 0 for none.
    fn bias(&self) -> u64 {
        self.bias.as_ref().map_or(0, |b| b.at)
    }
}

/// One block on the device.
type Block = SessionBlock<Buffer, Linear>;

/// Activations of one position, f32, allocated once.
struct Scratch {
    h: Buffer,
    q: Buffer,
    k: Buffer,
    v: Buffer,
    attn: Buffer,
    mlp: Buffer,
    logits: Buffer,
    scores: Buffer,
    /// The step's token and position, `[id, pos]` i32, written before each step (the kernels
    /// read them from here so that every step's launches are alike, and replay as one graph).
    step: Buffer,
}

/// A decode session over one model on one device.
pub struct Session {
    queue: Queue,
    kv_dtype: DType,
    embed: Matrix,
    blocks: Vec<Block>,
    norm: Buffer,
    head: Linear,
    /// Per block, keys and values `[1, kv_heads, capacity, head_dim]`.
    cache: Vec<[Buffer; 2]>,
    inv_freq: Buffer,
    scratch: Scratch,
    hidden: usize,
    intermediate: usize,
    heads: [usize; 3],
    eps: f32,
    scale: f32,
    /// Positions held.
    len: usize,
    capacity: usize,
    /// A step's launches captured as a CUDA graph, replayed each step with one launch (the
    /// host's work for 194 launches of an 8B model is gone); made at the first step after the
    /// session opens or its cache grows (which moves the buffers), `None` until then.
    graph: Option<Graph>,
    /// Whether the driver refused the capture once (not asked again).
    graph_refused: bool,
    /// Whether the step's kernels are launched to overlap the one before them (programmatic
    /// dependent launch: compute capability 9.0 and later, unless `LORAFORGE_DECODE_PDL=0`;
    /// cleared if the driver refuses one).
    overlap: Cell<bool>,
    /// Whether a refused overlapped launch has spoilt the capture under way: the rest of the
    /// step is not queued into it, and `capture` reports it failed (the driver may have ended
    /// the capture, or kept it without that kernel).
    spoilt: Cell<bool>,
}

/// An instantiated CUDA graph, destroyed with it.
struct Graph(CUgraphExec);

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: the graph was instantiated by `capture` and is destroyed once; a graph
        // replay still queued keeps its own reference until it runs.
        unsafe {
            let _ = driver::graph::exec_destroy(self.0);
        }
    }
}

type Cube = kernel::Cube;

/// The CubeCL tensor behind a fusion tensor, contiguous.
fn float(t: FloatTensor<Cuda>) -> Tensor {
    into_contiguous(t.client.clone().resolve_tensor_float::<Cube>(t))
}

impl Session {
    /// A session over `model` continuing `kv` (none: no positions yet) with room for `room` more
    /// positions; `None` where a matrix or the cache is held in a way the kernels do not read.
    pub fn open(
        model: DecodeModel<Cuda>,
        kv: Vec<[FloatTensor<Cuda>; 2]>,
        room: usize,
    ) -> Option<Self> {
        // An empty cache starts in f32, the type the op-by-op path writes keys and values in on
        // CUDA (RoPE's output, the projection's).
        let kv_dtype = kv.first().map_or(DType::F32, |first| first[0].dtype);
        let kv_float = Float::of(kv_dtype)?;
        let [heads, kv_heads, d] = model.heads;
        // Attention reads a key row as 8 lanes' 16-byte vectors.
        if !d.is_multiple_of(8 * 16 / kv_dtype.size()) {
            return None;
        }
        let embed = Matrix::new(model.embed, kv_float)?;
        let linear = |l| Linear::new(l, kv_float);
        let gain = |g| Some(Buffer::new(float(g)));
        let blocks = model
            .blocks
            .into_iter()
            .map(|b| b.take(gain, linear))
            .collect::<Option<Vec<Block>>>()?;
        // One launch reads q, k and v, one the gate and up: each set held alike.
        let alike = |ls: &[Linear]| ls.iter().all(|l| l.matrix.kind == ls[0].matrix.kind);
        if !blocks.iter().all(|b| alike(&b.qkv) && alike(&b.gate_up)) {
            return None;
        }
        let intermediate = blocks.first()?.gate_up[0].out;
        let head = linear(model.head)?;
        // The products read the norms' gains 16 bytes at a time.
        let norm = Buffer::new(float(model.norm));
        let gains = blocks.iter().flat_map(|b| [&b.attn_norm, &b.mlp_norm]);
        if !gains.chain([&norm]).all(Buffer::aligned) {
            return None;
        }
        // A packed product stages its whole input in shared memory.
        let widest = model.hidden.max(intermediate).max(heads * d);
        let too_wide = blocks
            .iter()
            .flat_map(|b| [&b.qkv[0], &b.o, &b.gate_up[0], &b.down])
            .chain([&head])
            .any(|l| l.matrix.kind.staged(widest) > l.matrix.kernels.staging);
        if too_wide {
            return None;
        }
        let like = &norm.tensor;
        let len = cached_positions::<Cuda>(&kv, blocks.len())?;
        let capacity = first_capacity(len, room);
        let queue = Queue::of(like);
        let buffer = |shape: Vec<usize>, dtype| empty(like, Shape::from(shape), dtype);
        let f32 = |n: usize| Buffer::new(buffer(vec![n], DType::F32));
        let fresh = || Buffer::new(kv_buffer(like, [kv_heads, capacity, d], kv_dtype));
        let cache = if kv.is_empty() {
            blocks.iter().map(|_| [fresh(), fresh()]).collect()
        } else {
            kv.into_iter()
                .map(|[k, v]| {
                    let copy = |t: FloatTensor<Cuda>| {
                        let src = float(t);
                        let shape = src.meta.shape();
                        if shape.num_dims() != 4
                            || [shape[1], shape[2], shape[3]] != [kv_heads, len, d]
                            || src.dtype != kv_dtype
                        {
                            return None;
                        }
                        let dst = fresh();
                        copy_rows(
                            queue,
                            src.dtype,
                            (pointer(&src), len),
                            (dst.at, capacity),
                            [kv_heads, len, d],
                        )?;
                        Some(dst)
                    };
                    Some([copy(k)?, copy(v)?])
                })
                .collect::<Option<Vec<_>>>()?
        };
        let inv_freq = TensorData::new(model.inv_freq, [d / 2]);
        let inv_freq = BurnTensor::<Cuda, 1>::from_data(inv_freq, &like.device);
        let scratch = Scratch {
            h: f32(model.hidden),
            q: f32(heads * d),
            k: f32(kv_heads * d),
            v: f32(kv_heads * d),
            attn: f32(heads * d),
            mlp: f32(intermediate),
            logits: f32(head.out),
            scores: f32(heads * capacity),
            step: Buffer::new(buffer(vec![2], DType::I32)),
        };
        Some(Session {
            queue,
            kv_dtype,
            embed,
            blocks,
            norm,
            head,
            cache,
            inv_freq: Buffer::new(float(primitive(inv_freq))),
            scratch,
            hidden: model.hidden,
            intermediate,
            heads: model.heads,
            eps: model.eps,
            scale: model.scale,
            len,
            capacity,
            graph: None,
            graph_refused: false,
            overlap: Cell::new(
                super::compute_capability(queue.device()).0 >= 9
                    && std::env::var_os("LORAFORGE_DECODE_PDL").is_none_or(|v| v != "0"),
            ),
            spoilt: Cell::new(false),
        })
    }

    /// `y0 = norm(x) W0ᵀ (+ bias) (+ residual)`, and as many more segments as `rest` holds (≤ 2)
    /// written to their own outputs, in one launch; `norm` is the RMSNorm's gain folded in
    /// before the product, if any.
    fn linear(
        &self,
        (x, norm, cols): (&Buffer, Option<&Buffer>, usize),
        first: (&Linear, Option<&Buffer>, &Buffer),
        rest: &[(&Linear, &Buffer)],
    ) {
        let (l0, residual, y0) = first;
        let kind = l0.matrix.kind;
        let rows = l0.matrix.rows_a_task();
        let mut args = self.input(x, norm, cols);
        l0.matrix.push(&mut args);
        args.addresses(&[l0.bias(), residual.map_or(0, |r| r.at), y0.at]);
        args.int(l0.out);
        let mut tasks = l0.out.div_ceil(rows);
        for i in 0..2 {
            match rest.get(i) {
                Some((l, y)) => {
                    l.matrix.push(&mut args);
                    args.addresses(&[l.bias(), y.at]);
                    args.int(l.out);
                    tasks += l.out.div_ceil(rows);
                }
                None => {
                    Matrix::push_none(kind, &mut args);
                    args.addresses(&[0, 0]);
                    args.int(0);
                }
            }
        }
        let kernel = &l0.matrix.kernels.linear;
        self.launch_product(kernel, &l0.matrix, tasks, cols, args);
    }

    /// Queues `kernel`, a product of `matrix`'s kind over `cols` inputs, `tasks` tasks of its
    /// tile's rows.
    fn launch_product(
        &self,
        kernel: &CudaFunction,
        matrix: &Matrix,
        tasks: usize,
        cols: usize,
        args: Args,
    ) {
        let kernels = matrix.kernels;
        let threads = u32_of(kernels.tile.threads);
        let staged = u32_of(matrix.kind.staged(cols));
        let blocks = kernels.blocks(matrix.kind, tasks);
        self.launch(kernel, (u32_of(blocks), 1, 1), threads, staged, args);
    }

    /// Queues one of the step's kernels, each of which waits for the kernel before it before
    /// reading what that one writes (`decode.cu`): overlapped with that kernel's end where the
    /// device allows it (`overlap`).
    fn launch(
        &self,
        kernel: &CudaFunction,
        grid: (u32, u32, u32),
        threads: u32,
        shared: u32,
        mut args: Args,
    ) {
        if self.spoilt.get() {
            return;
        }
        if self.overlap.get() {
            let overlapped = self
                .queue
                .launch_overlapped(kernel, grid, threads, shared, &mut args);
            let Err(e) = overlapped else {
                return;
            };
            eprintln!(
                "note: the driver refused an overlapped launch ({e:?}); the decode step's kernels are launched the usual way"
            );
            self.overlap.set(false);
            // Inside a capture the refusal has spoilt it: `step` captures again without.
            if self.capturing() {
                self.spoilt.set(true);
                return;
            }
        }
        self.queue.launch(kernel, grid, threads, shared, args);
    }

    /// Whether the session's stream is capturing a graph.
    fn capturing(&self) -> bool {
        // SAFETY: the stream is CubeCL's, alive as long as the session.
        let status = unsafe { driver::stream::is_capturing(self.queue.stream()) };
        status.is_ok_and(|s| s != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    /// A product's first arguments: its input, the RMSNorm gain folded in (null for none), ε and
    /// the input's width.
    fn input(&self, x: &Buffer, norm: Option<&Buffer>, cols: usize) -> Args {
        let mut args = Args::default();
        args.addresses(&[x.at, norm.map_or(0, |n| n.at)]);
        args.float(self.eps);
        args.int(cols);
        args
    }

    /// Doubles the positions the cache holds (keys, values and the scores' scratch), copying
    /// what it holds.
    fn grow(&mut self) {
        // The graph names the buffers about to be freed.
        self.graph = None;
        let [heads, kv_heads, d] = self.heads;
        let capacity = self.capacity * 2;
        let like = &self.norm.tensor;
        for pair in &mut self.cache {
            for old in pair.iter_mut() {
                let new = Buffer::new(kv_buffer(like, [kv_heads, capacity, d], self.kv_dtype));
                copy_rows(
                    self.queue,
                    self.kv_dtype,
                    (old.at, self.capacity),
                    (new.at, capacity),
                    [kv_heads, self.len, d],
                )
                .expect("copy the cache into its larger buffer");
                *old = new;
            }
        }
        self.scratch.scores = Buffer::new(empty(like, Shape::from([heads * capacity]), DType::F32));
        self.capacity = capacity;
    }

    fn block(&self, i: usize) {
        let b = &self.blocks[i];
        let s = &self.scratch;
        let [heads, kv_heads, d] = self.heads;
        let k = b.qkv[0].matrix.kernels;
        let [q, kp, vp] = &b.qkv;
        self.linear(
            (&s.h, Some(&b.attn_norm), self.hidden),
            (q, None, &s.q),
            &[(kp, &s.k), (vp, &s.v)],
        );
        let [kc, vc] = &self.cache[i];
        let mut args = Args::default();
        args.addresses(&[s.q.at, s.k.at, s.v.at, kc.at, vc.at]);
        args.addresses(&[self.inv_freq.at, s.step.at]);
        for n in [heads, kv_heads, d, self.capacity] {
            args.int(n);
        }
        self.launch(
            &k.rope_append,
            (u32_of(heads + kv_heads), 1, 1),
            u32_of(d / 2),
            0,
            args,
        );
        let mut args = Args::default();
        args.addresses(&[s.q.at, kc.at, vc.at, s.attn.at, s.scores.at, s.step.at]);
        for n in [heads, kv_heads, d, self.capacity] {
            args.int(n);
        }
        args.float(self.scale);
        self.launch(&k.attend, (u32_of(heads), 1, 1), 256, 0, args);
        self.linear((&s.attn, None, heads * d), (&b.o, Some(&s.h), &s.h), &[]);
        let [gate, up] = &b.gate_up;
        let mut args = self.input(&s.h, Some(&b.mlp_norm), self.hidden);
        gate.matrix.push(&mut args);
        up.matrix.push(&mut args);
        args.addresses(&[s.mlp.at]);
        args.int(self.intermediate);
        let tasks = self.intermediate.div_ceil(gate.matrix.rows_a_task());
        let kernel = &gate.matrix.kernels.gated;
        self.launch_product(kernel, &gate.matrix, tasks, self.hidden, args);
        let mlp = (&s.mlp, None, self.intermediate);
        self.linear(mlp, (&b.down, Some(&s.h), &s.h), &[]);
    }
}

impl Session {
    /// Queues one step's launches: the token's embedding, every block, the head.
    fn queue_step(&self) {
        let s = &self.scratch;
        let mut args = Args::default();
        self.embed.push(&mut args);
        args.addresses(&[s.step.at]);
        args.int(self.hidden);
        args.addresses(&[s.h.at]);
        self.queue.launch(
            &self.embed.kernels.embed,
            (u32_of(self.hidden.div_ceil(256)), 1, 1),
            256,
            0,
            args,
        );
        for i in 0..self.blocks.len() {
            self.block(i);
        }
        let h = (&s.h, Some(&self.norm), self.hidden);
        self.linear(h, (&self.head, None, &s.logits), &[]);
    }

    /// A step's launches captured into a graph, or the driver's reason for refusing (the step
    /// then launches them one by one).
    fn capture(&self) -> Result<Graph, driver::DriverError> {
        let stream = self.queue.stream();
        let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        // SAFETY: the stream is CubeCL's for these buffers; while it captures, this thread
        // queues only the step's launches on it, and the capture is ended before returning.
        unsafe {
            self.spoilt.set(false);
            driver::stream::begin_capture(stream, mode)?;
            self.queue_step();
            let graph = driver::stream::end_capture(stream);
            if self.spoilt.replace(false) {
                if let Ok(graph) = graph {
                    let _ = driver::graph::destroy(graph);
                }
                return Err(driver::DriverError(
                    CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
                ));
            }
            let graph = graph?;
            let exec = driver::graph::instantiate(graph, CUgraphInstantiate_flags_enum(0));
            let _ = driver::graph::destroy(graph);
            exec.map(Graph)
        }
    }
}

impl Session {
    /// Runs token `id` at the next position (the step's graph) and returns the logits.
    fn step(&mut self, id: u32) -> Vec<f32> {
        if self.len == self.capacity {
            self.grow();
        }
        let stream = self.queue.stream();
        let step = [id as i32, self.len as i32];
        // SAFETY: `step` outlives the copy (the step waits for the stream before returning).
        unsafe {
            driver::memcpy_htod_async(self.scratch.step.at, &step, stream)
                .expect("copy the step's token and position");
        }
        if self.graph.is_none() && !self.graph_refused {
            let overlapping = self.overlap.get();
            let mut captured = self.capture();
            if captured.is_err() && overlapping && !self.overlap.get() {
                // An overlapped launch was refused inside the capture: once more without.
                captured = self.capture();
            }
            match captured {
                Ok(graph) => self.graph = Some(graph),
                Err(e) => {
                    eprintln!(
                        "note: the decode step could not be captured as a CUDA graph ({e:?}); its kernels are launched one by one"
                    );
                    self.graph_refused = true;
                }
            }
        }
        match &self.graph {
            // SAFETY: the graph's launches read and write the session's buffers, alive as long
            // as the graph (it is dropped when the cache grows, before any buffer is).
            Some(graph) => unsafe {
                driver::graph::launch(graph.0, stream).expect("launch the decode step's graph");
            },
            None => self.queue_step(),
        }
        self.len += 1;
        self.logits()
    }

    /// The head's output, copied back once the queued work has run.
    fn logits(&self) -> Vec<f32> {
        let stream = self.queue.stream();
        let mut logits = vec![0f32; self.head.out];
        // SAFETY: `logits` holds `head.out` f32s, the buffer's size; the copy is queued after
        // the product on the same stream and waited for before `logits` is read.
        unsafe {
            driver::memcpy_dtoh_async(&mut logits, self.scratch.logits.at, stream)
                .expect("copy the logits");
            driver::stream::synchronize(stream).expect("wait for the decode step");
        }
        logits
    }
}

impl DecodeSession<Cuda> for Session {
    /// One id runs as a step (its launches replayed as a graph), more as a prompt (`prefill.rs`).
    fn run(&mut self, ids: &[u32]) -> Vec<f32> {
        match ids {
            [id] => self.step(*id),
            _ => self.prompt(ids),
        }
    }

    fn into_kv(self: Box<Self>) -> Vec<[FloatTensor<Cuda>; 2]> {
        let wrap = |t: Tensor| primitive(inner::<Cuda, 4>(into_fusion(t)).narrow(2, 0, self.len));
        self.cache
            .iter()
            .map(|[k, v]| [wrap(k.tensor.clone()), wrap(v.tensor.clone())])
            .collect()
    }
}

/// A block's keys or values, `[1, kv_heads, capacity, head_dim]` (the rank Burn's cache holds).
fn kv_buffer(like: &Tensor, [heads, capacity, d]: [usize; 3], dtype: DType) -> Tensor {
    empty(like, Shape::from([1, heads, capacity, d]), dtype)
}

/// Copies the first `len` rows of each of `heads` heads from `src` (`from_rows` rows a head) to
/// `dst` (`to_rows` a head), rows of `d` values of `dtype`.
fn copy_rows(
    queue: Queue,
    dtype: DType,
    (from, from_rows): (u64, usize),
    (to, to_rows): (u64, usize),
    [heads, len, d]: [usize; 3],
) -> Option<()> {
    let row = d * dtype.size();
    for h in 0..heads {
        // SAFETY: both ranges lie inside their buffers (`len` is at most either's rows a head),
        // which live until the copies, queued on the stream that orders their other work, run.
        unsafe {
            driver::memcpy_dtod_async(
                to + (h * to_rows * row) as u64,
                from + (h * from_rows * row) as u64,
                len * row,
                queue.stream(),
            )
            .ok()?;
        }
    }
    Some(())
}
