//! The decode session's prompt pass: a prompt's tokens through every block at once on the
//! session's own buffers, each product one cuBLAS GEMM (`cublas::gemm_rows`), the rest the
//! step's kernels over a row a token (`decode.cu`'s last section). Op by op, an 8B model's
//! prompt took 37-79 ms on an H200 at 53 tokens and 40 ms at 530: Burn's host work for a few
//! dozen ops a block, not the GPU's (bench/NOTES.md, sessions 22-25).
//!
//! ```text
//! H = embed(ids)
//! per block:  A = rmsnorm(H);  Q, K, V = A Wqᵀ + bq, ...         (GEMMs, biases added)
//!             Q, K = rope(Q, K);  cache += K, V                   rope_append, a row a token
//!             O = softmax(Q Kᵀ · scale, causal) V                 attend, a row a token
//!             H += O Woᵀ;  A = rmsnorm(H)                          (GEMM onto H)
//!             H += (silu(A Wgᵀ) ⊙ A Wuᵀ) Wdᵀ                       (GEMMs, silu_mul, GEMM onto H)
//! logits = the step's head over H's last row
//! ```
//!
//! A packed matrix is dequantized a slab of rows at a time into one buffer ([`SLAB_BYTES`], small
//! enough to stay in the GPU's L2 cache between the dequantization and the GEMM that reads it).

use burn::tensor::{DType, Shape};
use cudarc::driver::result as driver;

use super::super::cublas::gemm_rows;
use super::super::dequant::{Packing, dequantize_rows};
use super::super::kernel::{Args, empty, u32_of};
use super::super::qgemm::{self, qgemm};
use super::{Block, Buffer, Kind, Linear, Session};

/// Tokens a prompt pass takes at most (`Session::prompt` cuts longer prompts).
pub const ROWS: usize = 256;

/// Bytes a pass's scores (`rows · heads · capacity` floats) may take: fewer rows a pass where
/// the cache holds many positions (a long chat).
const SCORES_BYTES: usize = 256 << 20;

/// Bytes of a packed matrix's dequantized slab: a quarter of an H100's or H200's 50 MiB L2.
/// `LORAFORGE_PROMPT_SLAB=BYTES` overrides it, for measuring others (and, small, for checking
/// the slabs' offsets on a tiny model).
const SLAB_BYTES: usize = 12 << 20;

fn slab_bytes() -> usize {
    std::env::var("LORAFORGE_PROMPT_SLAB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SLAB_BYTES)
}

/// One pass's buffers, `rows` tokens.
struct Pass {
    rows: usize,
    /// The type the GEMMs read their inputs in (`a`'s, the slab's).
    gemm: DType,
    ids: Buffer,
    h: Buffer,
    /// The GEMMs' input (a norm's output, the heads' outputs, the MLP's gated values).
    a: Buffer,
    q: Buffer,
    k: Buffer,
    v: Buffer,
    o: Buffer,
    gate: Buffer,
    up: Buffer,
    scores: Buffer,
    /// A packed matrix's dequantized rows; `None` for dense matrices.
    slab: Option<Buffer>,
    /// The slab's bytes a matrix's rows are dequantized in.
    slab_bytes: usize,
    /// `qgemm`'s parts of a split product (`sum_splits` adds them up); `None` where none splits.
    part: Option<Buffer>,
    /// How packed matrices are read, decided once a pass (the variables read once).
    reading: Reading,
    /// Warps that keep the device's loads in flight (`qgemm::parts`): 8 a multiprocessor.
    warps: usize,
}

impl Session {
    /// Runs `ids` at the next positions, in passes of up to [`ROWS`] tokens, and returns the
    /// logits after the last; a step a token where the blocks' GEMMs would read their inputs in
    /// different types (one pass shares one input buffer).
    pub(super) fn prompt(&mut self, ids: &[u32]) -> Vec<f32> {
        let Some(dtype) = self.gemm_input() else {
            let logits = ids.iter().map(|&id| self.step(id)).last();
            return logits.expect("tokens to run");
        };
        while self.len + ids.len() > self.capacity {
            self.grow();
        }
        let scores_a_row = self.heads[0] * self.capacity * 4;
        let rows = (SCORES_BYTES / scores_a_row).clamp(1, ROWS);
        let logits = ids.chunks(rows).map(|c| self.pass(c, dtype)).last();
        logits.expect("tokens to run")
    }

    /// The one type every block's GEMMs read their input in, if they share one.
    fn gemm_input(&self) -> Option<DType> {
        let mut linears = self.blocks.iter().flat_map(|b| self.products(b));
        let first = gemm_dtype(linears.next()?.0.matrix.kind);
        linears
            .all(|(l, _)| gemm_dtype(l.matrix.kind) == first)
            .then_some(first)
    }

    /// A block's products with the inputs each reads.
    fn products<'a>(&self, b: &'a Block) -> [(&'a Linear, usize); 7] {
        let [q, k, v] = &b.qkv;
        let [gate, up] = &b.gate_up;
        let attention = self.heads[0] * self.heads[2];
        let (hidden, intermediate) = (self.hidden, self.intermediate);
        [
            (q, hidden),
            (k, hidden),
            (v, hidden),
            (&b.o, attention),
            (gate, hidden),
            (up, hidden),
            (&b.down, intermediate),
        ]
    }

    /// Runs `ids` (at most [`ROWS`], the cache with room for them) in one pass whose GEMMs read
    /// `dtype`, and returns the logits after the last.
    fn pass(&mut self, ids: &[u32], dtype: DType) -> Vec<f32> {
        let pass = self.buffers(ids.len(), dtype);
        let ids: Vec<i32> = ids.iter().map(|&id| id as i32).collect();
        let step = [ids[0], self.len as i32];
        let stream = self.queue.stream();
        // SAFETY: both host arrays outlive the copies (the logits' copy below waits for the
        // stream), and each buffer holds what is copied into it.
        unsafe {
            driver::memcpy_htod_async(pass.ids.at, &ids, stream).expect("copy the prompt's ids");
            driver::memcpy_htod_async(self.scratch.step.at, &step, stream)
                .expect("copy the prompt's first position");
        }
        self.embed_rows(&pass);
        for i in 0..self.blocks.len() {
            self.prompt_block(i, &pass);
        }
        // The head reads the last row, through the step's product (the final norm folded in).
        let row = self.hidden * 4;
        // SAFETY: both ranges lie in their buffers, alive until the stream has run the copy.
        unsafe {
            driver::memcpy_dtod_async(
                self.scratch.h.at,
                pass.h.at + ((pass.rows - 1) * row) as u64,
                row,
                stream,
            )
            .expect("copy the prompt's last row");
        }
        let s = &self.scratch;
        let h = (&s.h, Some(&self.norm), self.hidden);
        self.linear(h, (&self.head, None, &s.logits), &[]);
        self.len += pass.rows;
        self.logits()
    }

    /// Buffers for a pass of `rows` tokens whose GEMMs read `gemm`.
    fn buffers(&self, rows: usize, gemm: DType) -> Pass {
        let [heads, kv_heads, d] = self.heads;
        let like = &self.norm.tensor;
        let buffer = |n: usize, dtype| Buffer::new(empty(like, Shape::from([n]), dtype));
        let widest = self.hidden.max(heads * d).max(self.intermediate);
        // Room for any matrix's slab: at least a row of the widest.
        let products = self.blocks.iter().flat_map(|b| self.products(b));
        let reading = Reading::of_environment();
        // A slab where a packed matrix is not read packed.
        let packed = products.clone().any(|(l, cols)| {
            matches!(l.matrix.kind, Kind::Packed { .. }) && !reading.fused(l, cols)
        });
        let slab_bytes = slab_bytes();
        let slab = packed.then(|| buffer((slab_bytes / gemm.size()).max(widest), gemm));
        let warps = 8 * super::super::multiprocessors(self.queue.device());
        // The parts' room for the widest split.
        let parts = products
            .map(|(l, cols)| reading.part_floats(l, cols, rows, warps))
            .max()
            .unwrap_or(0);
        Pass {
            rows,
            gemm,
            ids: buffer(rows, DType::I32),
            h: buffer(rows * self.hidden, DType::F32),
            a: buffer(rows * widest, gemm),
            q: buffer(rows * heads * d, DType::F32),
            k: buffer(rows * kv_heads * d, DType::F32),
            v: buffer(rows * kv_heads * d, DType::F32),
            o: buffer(rows * heads * d, DType::F32),
            gate: buffer(rows * self.intermediate, DType::F32),
            up: buffer(rows * self.intermediate, DType::F32),
            scores: buffer(rows * heads * self.capacity, DType::F32),
            slab,
            slab_bytes,
            part: (parts > 0).then(|| buffer(parts, DType::F32)),
            reading,
            warps,
        }
    }

    /// `pass.h` = the embeddings of the pass's tokens.
    fn embed_rows(&self, pass: &Pass) {
        let mut args = Args::default();
        self.embed.push(&mut args);
        args.addresses(&[pass.ids.at]);
        args.int(self.hidden);
        args.addresses(&[pass.h.at]);
        let grid = (u32_of(self.hidden.div_ceil(256)), u32_of(pass.rows), 1);
        self.queue
            .launch(&self.embed.kernels.embed, grid, 256, 0, args);
    }

    /// Block `i` over the pass's rows.
    fn prompt_block(&self, i: usize, pass: &Pass) {
        let b = &self.blocks[i];
        let [heads, kv_heads, d] = self.heads;
        let k = b.qkv[0].matrix.kernels;
        let rows = pass.rows;
        self.norm_rows(pass, &b.attn_norm);
        let [q, kp, vp] = &b.qkv;
        for (l, y) in [(q, &pass.q), (kp, &pass.k), (vp, &pass.v)] {
            self.product(pass, l, self.hidden, y, false);
        }
        let [kc, vc] = &self.cache[i];
        let mut args = Args::default();
        args.addresses(&[pass.q.at, pass.k.at, pass.v.at, kc.at, vc.at]);
        args.addresses(&[self.inv_freq.at, self.scratch.step.at]);
        for n in [heads, kv_heads, d, self.capacity] {
            args.int(n);
        }
        let grid = (u32_of(heads + kv_heads), u32_of(rows), 1);
        self.queue
            .launch(&k.rope_append, grid, u32_of(d / 2), 0, args);
        let mut args = Args::default();
        let s = &self.scratch;
        args.addresses(&[
            pass.q.at,
            kc.at,
            vc.at,
            pass.o.at,
            pass.scores.at,
            s.step.at,
        ]);
        for n in [heads, kv_heads, d, self.capacity] {
            args.int(n);
        }
        args.float(self.scale);
        let grid = (u32_of(heads), u32_of(rows), 1);
        self.queue.launch(&k.attend, grid, 256, 0, args);
        self.elementwise(&k.to_gemm, &[pass.o.at, pass.a.at], rows * heads * d);
        self.product(pass, &b.o, heads * d, &pass.h, true);
        self.norm_rows(pass, &b.mlp_norm);
        let [gate, up] = &b.gate_up;
        self.product(pass, gate, self.hidden, &pass.gate, false);
        self.product(pass, up, self.hidden, &pass.up, false);
        let gated = [pass.gate.at, pass.up.at, pass.a.at];
        self.elementwise(&k.silu_mul, &gated, rows * self.intermediate);
        self.product(pass, &b.down, self.intermediate, &pass.h, true);
    }

    /// `pass.a` = rmsnorm(`pass.h`) ⊙ `gain`, a row a token.
    fn norm_rows(&self, pass: &Pass, gain: &Buffer) {
        let kernels = self.blocks[0].qkv[0].matrix.kernels;
        let mut args = Args::default();
        args.addresses(&[pass.h.at, gain.at]);
        args.float(self.eps);
        args.int(self.hidden);
        args.addresses(&[pass.a.at]);
        let grid = (u32_of(pass.rows), 1, 1);
        self.queue.launch(&kernels.rmsnorm_rows, grid, 256, 0, args);
    }

    /// Queues an elementwise kernel over `n` values: its buffers' addresses, then `n`.
    fn elementwise(&self, kernel: &cudarc::driver::CudaFunction, addresses: &[u64], n: usize) {
        let mut args = Args::default();
        args.addresses(addresses);
        args.int(n);
        let grid = (u32_of(n.div_ceil(256)), 1, 1);
        self.queue.launch(kernel, grid, 256, 0, args);
    }

    /// `y = pass.a · Wᵀ (+ bias)` over `cols` inputs, or added onto `y` when `accumulate`.
    fn product(&self, pass: &Pass, l: &Linear, cols: usize, y: &Buffer, accumulate: bool) {
        let m = &l.matrix;
        let gemm = gemm_dtype(m.kind);
        match m.kind {
            Kind::Dense(_) => {
                let w = m.buffers[0].at;
                self.gemm(pass, [w, y.at], [l.out, cols], l.out, accumulate);
            }
            Kind::Packed { bits, .. } => {
                let [words, scales, biases] = [0, 1, 2].map(|j| m.buffers[j].at);
                let layout = packing(l, cols, bits);
                if pass.reading.fused(l, cols) {
                    let dims = [pass.rows, l.out, cols];
                    let p = pass.reading.parts(pass.rows, l.out, cols, bits, pass.warps);
                    let part = pass.part.as_ref().filter(|_| p > 1);
                    let to = part.map_or(y.at, |part| part.at);
                    let operands = [pass.a.at, words, scales, biases, to];
                    qgemm(self.queue, operands, dims, layout, l.out, accumulate, p);
                    if let Some(part) = part {
                        self.sum_parts(pass.rows, [part.at, y.at], l.out, p, accumulate);
                    }
                } else {
                    let slab = pass.slab.as_ref().expect("a slab for packed matrices");
                    // A row's bytes of words, and of scales (or biases).
                    let row_words = (layout.words_per_row * 4) as u64;
                    let row_scales = ((cols >> m.group.trailing_zeros()) * gemm.size()) as u64;
                    // Rows a slab holds.
                    let step = (pass.slab_bytes / (cols * gemm.size())).max(1);
                    for first in (0..l.out).step_by(step) {
                        let (rows, at) = (step.min(l.out - first), first as u64);
                        let parts = [words + at * row_words, scales + at * row_scales];
                        let parts = [parts[0], parts[1], biases + at * row_scales, slab.at];
                        dequantize_rows(self.queue, gemm, parts, rows, layout);
                        let y = y.at + at * 4;
                        self.gemm(pass, [slab.at, y], [rows, cols], l.out, accumulate);
                    }
                }
            }
        }
        if let Some(bias) = &l.bias {
            let kernel = &m.kernels.add_bias;
            let mut args = Args::default();
            args.addresses(&[y.at, bias.at]);
            args.int(l.out);
            args.int(pass.rows * l.out);
            let grid = (u32_of((pass.rows * l.out).div_ceil(256)), 1, 1);
            self.queue.launch(kernel, grid, 256, 0, args);
        }
    }

    /// `y[r, c] (+)= Σ_p part[p][r, c]` over `rows` tokens and `out` columns, on raw device
    /// addresses `[part, y]` (`y` with `out` floats a row, as `qgemm` writes it).
    fn sum_parts(
        &self,
        rows: usize,
        [part, y]: [u64; 2],
        out: usize,
        parts: usize,
        accumulate: bool,
    ) {
        let kernel = &self.blocks[0].qkv[0].matrix.kernels.sum_splits;
        let n = rows * out;
        let mut args = Args::default();
        args.addresses(&[part, y]);
        for v in [out, out, n, parts, usize::from(accumulate)] {
            args.int(v);
        }
        let grid = (u32_of(n.div_ceil(256)), 1, 1);
        self.queue.launch(kernel, grid, 256, 0, args);
    }

    /// `y = pass.a · wᵀ` over `cols` inputs and `out` outputs, `y` with `ldy` floats a row, or
    /// added onto it when `accumulate`: one cuBLAS GEMM (its own kernels fill the GPU at a
    /// prompt's few rows: splitting the inputs measured slower, bench/NOTES.md session 29).
    fn gemm(
        &self,
        pass: &Pass,
        [w, y]: [u64; 2],
        [out, cols]: [usize; 2],
        ldy: usize,
        accumulate: bool,
    ) {
        let operands = [pass.a.at, w, y];
        gemm_rows(
            self.queue,
            pass.gemm,
            operands,
            [pass.rows, out, cols],
            ldy,
            accumulate,
        );
    }
}

/// The type a matrix's GEMM reads: a dense matrix's own, a packed one's scales' (`gemm_t` in
/// `decode.cu`).
fn gemm_dtype(kind: Kind) -> DType {
    let float = match kind {
        Kind::Dense(t) | Kind::Packed { scales: t, .. } => t,
    };
    match float {
        super::Float::Bf16 => DType::BF16,
        super::Float::F32 => DType::F32,
    }
}

/// `l`'s packing over `cols` inputs at `bits`.
fn packing(l: &Linear, cols: usize, bits: u32) -> Packing {
    Packing {
        bits,
        group: l.matrix.group,
        words_per_row: cols * bits as usize / 32,
    }
}

/// How a pass reads its packed matrices: `LORAFORGE_PROMPT_FUSED=0` keeps the slabs and
/// `LORAFORGE_PROMPT_SPLITS=N` sets `qgemm`'s parts (for comparisons), read once a pass so that
/// its buffers and its products agree.
#[derive(Clone, Copy)]
struct Reading {
    fused: bool,
    asked_parts: Option<usize>,
}

impl Reading {
    fn of_environment() -> Self {
        Reading {
            fused: std::env::var_os("LORAFORGE_PROMPT_FUSED").is_none_or(|v| v != "0"),
            asked_parts: std::env::var("LORAFORGE_PROMPT_SPLITS")
                .ok()
                .and_then(|v| v.parse().ok()),
        }
    }

    /// Whether `qgemm` reads `l` packed (its words 16-byte aligned, its layout one it takes).
    fn fused(self, l: &Linear, cols: usize) -> bool {
        let Kind::Packed { bits, .. } = l.matrix.kind else {
            return false;
        };
        let scales = gemm_dtype(l.matrix.kind);
        self.fused
            && l.matrix.buffers[0].aligned()
            && qgemm::supports(packing(l, cols, bits), scales, cols)
    }

    /// `qgemm`'s parts for a product of `rows` tokens ([`qgemm::parts`]).
    fn parts(self, rows: usize, out: usize, cols: usize, bits: u32, warps: usize) -> usize {
        qgemm::parts(rows, out, cols, bits, warps, self.asked_parts)
    }

    /// Floats of `pass.part` a product of `l` over `cols` inputs and `rows` tokens needs:
    /// `qgemm`'s parts where it reads `l` in more than one.
    fn part_floats(self, l: &Linear, cols: usize, rows: usize, warps: usize) -> usize {
        match l.matrix.kind {
            Kind::Packed { bits, .. } if self.fused(l, cols) => {
                let p = self.parts(rows, l.out, cols, bits, warps);
                if p > 1 { p * rows * l.out } else { 0 }
            }
            _ => 0,
        }
    }
}
