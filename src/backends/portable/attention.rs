//! Flash attention written once in CubeCL (`#[cube]`), so it runs on every CubeCL runtime:
//! Vulkan (SPIR-V), Metal (MSL), WebGPU (WGSL), CUDA. The algorithm of the CUDA kernels
//! (`backends/cuda/attention.cu`) and of `ops/attention.rs`, in f32 without tensor cores:
//!
//! ```text
//! forward, one query per unit, keys in tiles of K and V staged in shared memory:
//!     s_j = (q · scale) · k_j      (keys start(i) ..= past + i only)
//!     s_j = cap · tanh(s_j / cap)  (Gemma 2's soft-cap, when set)
//!     m' = max(m, max_j s_j)   acc = acc · e^(m − m') + Σ_j e^(s_j − m') v_j   l likewise
//!     out = acc / l            lse = m + ln l
//! dQ, one query per unit, the same tiles:
//!     p_j = e^(s_j − lse)   ds_j = p_j (dO · v_j − D)   dq = scale · Σ_j ds_j k_j
//!     (soft-capped: ds_j · (1 − tanh²(s_j / cap)), the raw score's gradient)
//! dK, dV, one key per unit, tiles of queries (and every query head the kv head serves):
//!     dv = Σ_i p_i dO_i      dk = Σ_i ds_i (q_i · scale)
//! ```
//!
//! `D = rowsum(dO ⊙ O)` comes in computed. Nothing of size `seq × keys` exists; the rule of which
//! keys a query sees ([`crate::ops::visibility`]) is applied per key, with packed rows' first
//! keys read from `starts` (`[rows, seq]` f32) and a sliding window's first key `past + i + 1 −
//! window` as a lower bound. Shared memory stays within 32 KiB a cube (Metal's
//! limit): a tile holds `TILE_FLOATS / d` rows of K and as many of V (16 KiB each).

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::zeros_client;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::empty;

/// Floats of one shared-memory tile (16 KiB); two tiles a cube.
const TILE_FLOATS: usize = 4096;
/// Queries per cube in the forward and dQ kernels, keys per cube in the dK/dV kernel.
const UNITS: u32 = 64;
/// The largest head dimension: each unit keeps a few rows of `d` floats in registers.
pub const MAX_HEAD_DIM: usize = 128;

/// Below this, the scores' running maximum starts (WGSL has no `-inf` literal).
const FLOOR: f32 = -1.0e30;

/// What a call's scores are beside `scale · q kᵀ`: a sliding window (0 for none) and Gemma 2's
/// soft-cap.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// Keys a query sees, itself included; 0 for all.
    pub window: u32,
    /// `cap · tanh(s / cap)`, when set.
    pub softcap: Option<f32>,
}

impl Rule {
    /// The kernels' arguments for the soft-cap: the cap (1 when unset) and whether it applies.
    fn cap(self) -> (f32, bool) {
        (self.softcap.unwrap_or(1.0), self.softcap.is_some())
    }
}

/// The shapes of one call: `q` `[batch, heads, seq, d]`, `k`/`v` `[batch, kv_heads, keys, d]`.
struct Layout {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    keys: usize,
    d: usize,
}

impl Layout {
    fn new<R: CubeRuntime>(q: &CubeTensor<R>, k: &CubeTensor<R>) -> Self {
        let [batch, heads, seq, d] = q.meta.shape().dims::<4>();
        let [_, kv_heads, keys, _] = k.meta.shape().dims::<4>();
        Layout {
            batch,
            heads,
            kv_heads,
            seq,
            keys,
            d,
        }
    }

    /// One cube per `UNITS` of `rows` (queries or keys) per batch row and head of `heads`.
    fn cubes(&self, rows: usize, heads: usize) -> CubeCount {
        CubeCount::Static(
            rows.div_ceil(UNITS as usize) as u32,
            (self.batch * heads) as u32,
            1,
        )
    }

    /// Rows of `d` floats in one shared-memory tile.
    fn tile_rows(&self) -> usize {
        TILE_FLOATS / self.d
    }
}

/// `(out, lse)`: `softmax(scale · q kᵀ)` over the visible keys times `v`, and each query's
/// log-sum-exp of its scores, `[batch, heads, seq, 1]`. `starts`: packed rows' first keys,
/// `[batch, 1, 1, seq]` f32.
pub fn forward<R: CubeRuntime>(
    [q, k, v]: [CubeTensor<R>; 3],
    starts: Option<CubeTensor<R>>,
    scale: f32,
    rule: Rule,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let (cap, capped) = rule.cap();
    let l = Layout::new(&q, &k);
    let [q, k, v] = [q, k, v].map(into_contiguous);
    let packed = starts.is_some();
    let starts = starts_or_placeholder(starts, &q);
    let out = empty(&q, Shape::new([l.batch, l.heads, l.seq, l.d]), DType::F32);
    let lse = empty(&q, Shape::new([l.batch, l.heads, l.seq, 1]), DType::F32);
    let cubes = l.cubes(l.seq, l.heads);
    forward_kernel::launch::<R>(
        &q.client.clone(),
        cubes,
        CubeDim::new_1d(UNITS),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        starts.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        l.seq as u32,
        l.keys as u32,
        l.heads as u32,
        l.kv_heads as u32,
        scale,
        rule.window,
        cap,
        l.d,
        l.tile_rows(),
        packed,
        capped,
    );
    (out, lse)
}

/// `(dq, dk, dv)` of [`forward`] from `d_out`, its `lse` and `delta = rowsum(d_out ⊙ out)`
/// (`[batch, heads, seq, 1]`).
pub fn backward<R: CubeRuntime>(
    [q, k, v, d_out, lse, delta]: [CubeTensor<R>; 6],
    starts: Option<CubeTensor<R>>,
    scale: f32,
    rule: Rule,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let (cap, capped) = rule.cap();
    let l = Layout::new(&q, &k);
    let [q, k, v, d_out, lse, delta] = [q, k, v, d_out, lse, delta].map(into_contiguous);
    let packed = starts.is_some();
    let starts = starts_or_placeholder(starts, &q);
    let client = q.client.clone();
    let dq = empty(&q, Shape::new([l.batch, l.heads, l.seq, l.d]), DType::F32);
    let dk = empty(
        &q,
        Shape::new([l.batch, l.kv_heads, l.keys, l.d]),
        DType::F32,
    );
    let dv = empty(
        &q,
        Shape::new([l.batch, l.kv_heads, l.keys, l.d]),
        DType::F32,
    );
    let args = || [&q, &k, &v, &starts, &d_out, &lse, &delta].map(|t| t.clone().into_tensor_arg());
    let [qa, ka, va, sa, oa, la, da] = args();
    dq_kernel::launch::<R>(
        &client,
        l.cubes(l.seq, l.heads),
        CubeDim::new_1d(UNITS),
        qa,
        ka,
        va,
        sa,
        oa,
        la,
        da,
        dq.clone().into_tensor_arg(),
        l.seq as u32,
        l.keys as u32,
        l.heads as u32,
        l.kv_heads as u32,
        scale,
        rule.window,
        cap,
        l.d,
        l.tile_rows(),
        packed,
        capped,
    );
    let [qa, ka, va, sa, oa, la, da] = args();
    dkdv_kernel::launch::<R>(
        &client,
        l.cubes(l.keys, l.kv_heads),
        CubeDim::new_1d(UNITS),
        qa,
        ka,
        va,
        sa,
        oa,
        la,
        da,
        dk.clone().into_tensor_arg(),
        dv.clone().into_tensor_arg(),
        l.seq as u32,
        l.keys as u32,
        l.heads as u32,
        l.kv_heads as u32,
        scale,
        rule.window,
        cap,
        l.d,
        l.tile_rows() / 2,
        packed,
        capped,
    );
    (dq, dk, dv)
}

/// `starts` contiguous, or one zero the kernels never read (a launch needs every argument).
fn starts_or_placeholder<R: CubeRuntime>(
    starts: Option<CubeTensor<R>>,
    like: &CubeTensor<R>,
) -> CubeTensor<R> {
    match starts {
        Some(s) => into_contiguous(s),
        None => zeros_client(
            like.client.clone(),
            like.device.clone(),
            Shape::new([1]),
            DType::F32,
        ),
    }
}

/// The first key query `i` of batch row `b` sees: its example's start for packed rows, else 0.
#[cube]
fn first_key(
    starts: &Tensor<f32>,
    b: usize,
    i: usize,
    seq: usize,
    #[comptime] packed: bool,
) -> usize {
    let mut first = 0usize;
    if packed {
        first = u32::cast_from(starts[b * seq + i]) as usize;
    }
    first
}

/// The last row a cube starting at row `first` covers, of `n`.
#[cube]
fn last_of(first: usize, n: usize) -> usize {
    let mut end = first + CUBE_DIM_X as usize;
    if end > n {
        end = n;
    }
    end - 1
}

/// The first key a query at position `last` (its own key) sees: `first`, or later where a
/// window of `window` keys (0: none) starts after it.
#[cube]
fn window_start(first: usize, last: usize, window: u32) -> usize {
    let mut lo = first;
    let w = window as usize;
    if w > 0 && last + 1 > w && last + 1 - w > lo {
        lo = last + 1 - w;
    }
    lo
}

/// `cap · tanh(s / cap)` where `capped`, else `s`.
#[cube]
fn capped_score(s: f32, cap: f32, #[comptime] capped: bool) -> f32 {
    let mut out = s;
    if capped {
        out = (s / cap).tanh() * cap;
    }
    out
}

/// The soft-cap's derivative at the raw score `s`, `1 − tanh²(s / cap)`, where `capped`.
#[cube]
fn cap_slope(s: f32, cap: f32, #[comptime] capped: bool) -> f32 {
    let mut slope = 1.0f32;
    if capped {
        let t = (s / cap).tanh();
        slope = 1.0 - t * t;
    }
    slope
}

/// `a · b` over `d` floats, `a` in registers and `b` from shared memory at `offset`.
#[cube]
fn dot(a: &Array<f32>, b: &SharedMemory<f32>, offset: usize, #[comptime] d: usize) -> f32 {
    let mut sum = 0.0f32;
    #[unroll]
    for c in 0..d {
        sum += a[c] * b[offset + c];
    }
    sum
}

/// `acc += w · b[offset ..]` over `d` floats.
#[cube]
fn add_scaled(
    acc: &mut Array<f32>,
    w: f32,
    b: &SharedMemory<f32>,
    offset: usize,
    #[comptime] d: usize,
) {
    #[unroll]
    for c in 0..d {
        acc[c] += w * b[offset + c];
    }
}

/// `d` zeros, an accumulator in registers.
#[cube]
fn zeros(#[comptime] d: usize) -> Array<f32> {
    let mut row = Array::<f32>::new(d);
    #[unroll]
    for c in 0..d {
        row[c] = 0.0;
    }
    row
}

/// `d` floats of `src` from `offset` times `mul` (zeros where `active` is false).
#[cube]
fn load_row(
    src: &Tensor<f32>,
    offset: usize,
    mul: f32,
    active: bool,
    #[comptime] d: usize,
) -> Array<f32> {
    let mut row = Array::<f32>::new(d);
    #[unroll]
    for c in 0..d {
        let mut x = 0.0f32;
        if active {
            x = src[offset + c] * mul;
        }
        row[c] = x;
    }
    row
}

/// `rows` rows of `d` floats of `src` from row `first` of the matrix at `base` into `tile`,
/// times `mul`; zeros past row `end`. Every unit of the cube takes part.
#[cube]
fn stage(
    src: &Tensor<f32>,
    tile: &mut SharedMemory<f32>,
    base: usize,
    first: usize,
    end: usize,
    mul: f32,
    #[comptime] rows: usize,
    #[comptime] d: usize,
) {
    let mut idx = UNIT_POS_X as usize;
    while idx < rows * d {
        let row = first + idx / d;
        let mut x = 0.0f32;
        if row < end {
            x = src[base + row * d + idx % d] * mul;
        }
        tile[idx] = x;
        idx += CUBE_DIM_X as usize;
    }
}

/// What the forward and dQ kernels know of their cube of queries (`CUBE_POS_X`) of one batch
/// row and head (`CUBE_POS_Y`), and of this unit's query `i`.
#[derive(CubeType)]
struct QueryBlock {
    keys: usize,
    /// Whether the unit has a query (the last cube of a row may be short).
    active: bool,
    /// `i`'s position in `lse` and `delta` (`[batch, heads, seq]`).
    row: usize,
    /// Where `i`'s row of `d` floats starts in `q`, `out`, `d_out` and `dq`.
    q_row: usize,
    /// Where the kv head's keys start in `k` and `v`.
    kv_base: usize,
    /// The keys `i` sees: `lo ..= hi`.
    lo: usize,
    hi: usize,
    /// The first key tile any query of the cube sees, and the last key any sees.
    first_tile: usize,
    last_key: usize,
}

#[cube]
fn query_block(
    starts: &Tensor<f32>,
    seq: u32,
    keys: u32,
    heads: u32,
    kv_heads: u32,
    window: u32,
    #[comptime] d: usize,
    #[comptime] tile_keys: usize,
    #[comptime] packed: bool,
) -> QueryBlock {
    let seq = seq as usize;
    let keys = keys as usize;
    let past = keys - seq;
    let bh = CUBE_POS_Y as usize;
    let b = bh / heads as usize;
    let kv = b * kv_heads as usize + (bh % heads as usize) / (heads / kv_heads) as usize;
    let first_query = CUBE_POS_X as usize * CUBE_DIM_X as usize;
    let i = first_query + UNIT_POS_X as usize;
    let active = i < seq;
    let mut lo = 0usize;
    if active {
        lo = window_start(first_key(starts, b, i, seq, packed), past + i, window);
    }
    let cube_lo = window_start(
        first_key(starts, b, first_query, seq, packed),
        past + first_query,
        window,
    );
    QueryBlock {
        keys,
        active,
        row: bh * seq + i,
        q_row: (bh * seq + i) * d,
        kv_base: kv * keys * d,
        lo,
        hi: past + i,
        first_tile: cube_lo / tile_keys * tile_keys,
        last_key: past + last_of(first_query, seq),
    }
}

/// Keys `tile ..` and their values, `rows` of each, into the two tiles (zeros past the last key).
#[cube]
fn stage_keys(
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    k_tile: &mut SharedMemory<f32>,
    v_tile: &mut SharedMemory<f32>,
    block: &QueryBlock,
    tile: usize,
    #[comptime] rows: usize,
    #[comptime] d: usize,
) {
    stage(k, k_tile, block.kv_base, tile, block.keys, 1.0, rows, d);
    stage(v, v_tile, block.kv_base, tile, block.keys, 1.0, rows, d);
}

#[cube(launch)]
fn forward_kernel(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    starts: &Tensor<f32>,
    out: &mut Tensor<f32>,
    lse: &mut Tensor<f32>,
    seq: u32,
    keys: u32,
    heads: u32,
    kv_heads: u32,
    scale: f32,
    window: u32,
    cap: f32,
    #[comptime] d: usize,
    #[comptime] tile_keys: usize,
    #[comptime] packed: bool,
    #[comptime] capped: bool,
) {
    let block = query_block(
        starts, seq, keys, heads, kv_heads, window, d, tile_keys, packed,
    );
    let query = load_row(q, block.q_row, scale, block.active, d);
    let mut acc = zeros(d);
    let mut m = f32::new(FLOOR);
    let mut l = 0.0f32;
    let mut scores = Array::<f32>::new(tile_keys);
    let mut k_tile = SharedMemory::<f32>::new(tile_keys * d);
    let mut v_tile = SharedMemory::<f32>::new(tile_keys * d);

    let mut tile = block.first_tile;
    while tile <= block.last_key {
        stage_keys(k, v, &mut k_tile, &mut v_tile, &block, tile, tile_keys, d);
        sync_cube();
        if block.active {
            let mut tile_max = m;
            for j in 0..tile_keys {
                let key = tile + j;
                let mut s = f32::new(FLOOR);
                if key >= block.lo && key <= block.hi {
                    s = capped_score(dot(&query, &k_tile, j * d, d), cap, capped);
                }
                scores[j] = s;
                if s > tile_max {
                    tile_max = s;
                }
            }
            let correction = (m - tile_max).exp();
            l *= correction;
            #[unroll]
            for c in 0..d {
                acc[c] *= correction;
            }
            m = tile_max;
            for j in 0..tile_keys {
                let key = tile + j;
                if key >= block.lo && key <= block.hi {
                    let p = (scores[j] - m).exp();
                    l += p;
                    add_scaled(&mut acc, p, &v_tile, j * d, d);
                }
            }
        }
        sync_cube();
        tile += tile_keys;
    }
    if block.active {
        #[unroll]
        for c in 0..d {
            out[block.q_row + c] = acc[c] / l;
        }
        lse[block.row] = m + l.ln();
    }
}

#[cube(launch)]
fn dq_kernel(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    starts: &Tensor<f32>,
    d_out: &Tensor<f32>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dq: &mut Tensor<f32>,
    seq: u32,
    keys: u32,
    heads: u32,
    kv_heads: u32,
    scale: f32,
    window: u32,
    cap: f32,
    #[comptime] d: usize,
    #[comptime] tile_keys: usize,
    #[comptime] packed: bool,
    #[comptime] capped: bool,
) {
    let block = query_block(
        starts, seq, keys, heads, kv_heads, window, d, tile_keys, packed,
    );
    let query = load_row(q, block.q_row, scale, block.active, d);
    let grad = load_row(d_out, block.q_row, 1.0, block.active, d);
    let mut row_lse = 0.0f32;
    let mut row_delta = 0.0f32;
    if block.active {
        row_lse = lse[block.row];
        row_delta = delta[block.row];
    }
    let mut acc = zeros(d);
    let mut k_tile = SharedMemory::<f32>::new(tile_keys * d);
    let mut v_tile = SharedMemory::<f32>::new(tile_keys * d);

    let mut tile = block.first_tile;
    while tile <= block.last_key {
        stage_keys(k, v, &mut k_tile, &mut v_tile, &block, tile, tile_keys, d);
        sync_cube();
        if block.active {
            for j in 0..tile_keys {
                let key = tile + j;
                if key >= block.lo && key <= block.hi {
                    let s = dot(&query, &k_tile, j * d, d);
                    let p = (capped_score(s, cap, capped) - row_lse).exp();
                    let ds = p * (dot(&grad, &v_tile, j * d, d) - row_delta);
                    add_scaled(&mut acc, ds * cap_slope(s, cap, capped), &k_tile, j * d, d);
                }
            }
        }
        sync_cube();
        tile += tile_keys;
    }
    if block.active {
        #[unroll]
        for c in 0..d {
            dq[block.q_row + c] = acc[c] * scale;
        }
    }
}

#[cube(launch)]
fn dkdv_kernel(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    starts: &Tensor<f32>,
    d_out: &Tensor<f32>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    dk: &mut Tensor<f32>,
    dv: &mut Tensor<f32>,
    seq: u32,
    keys: u32,
    heads: u32,
    kv_heads: u32,
    scale: f32,
    window: u32,
    cap: f32,
    #[comptime] d: usize,
    #[comptime] tile_queries: usize,
    #[comptime] packed: bool,
    #[comptime] capped: bool,
) {
    let seq = seq as usize;
    let keys = keys as usize;
    let past = keys - seq;
    let kv = CUBE_POS_Y as usize;
    let b = kv / kv_heads as usize;
    let group = (heads / kv_heads) as usize;
    let first_key_of_cube = CUBE_POS_X as usize * CUBE_DIM_X as usize;
    let j = first_key_of_cube + UNIT_POS_X as usize;
    let active = j < keys;
    let last_key = last_of(first_key_of_cube, keys);

    let k_row = (kv * keys + j) * d;
    let key = load_row(k, k_row, 1.0, active, d);
    let value = load_row(v, k_row, 1.0, active, d);
    let mut dk_acc = zeros(d);
    let mut dv_acc = zeros(d);
    let mut q_tile = SharedMemory::<f32>::new(tile_queries * d);
    let mut o_tile = SharedMemory::<f32>::new(tile_queries * d);

    // The first query that sees any key of this cube (a query sees keys up to past + i).
    let mut first_query = 0usize;
    if first_key_of_cube > past {
        first_query = first_key_of_cube - past;
    }
    for g in 0..group {
        let bh = b * heads as usize + (kv % kv_heads as usize) * group + g;
        let q_base = bh * seq * d;
        let mut tile = first_query / tile_queries * tile_queries;
        while tile < seq {
            // Queries never see keys before their example's start, which never decreases:
            // once a tile starts past this cube's keys, so do all later ones.
            if first_key(starts, b, tile, seq, packed) > last_key {
                break;
            }
            // Nor, under a window, once the tile's first query's window starts past them.
            if window > 0 && tile + past >= last_key + window as usize {
                break;
            }
            stage(q, &mut q_tile, q_base, tile, seq, scale, tile_queries, d);
            stage(d_out, &mut o_tile, q_base, tile, seq, 1.0, tile_queries, d);
            sync_cube();
            if active {
                for t in 0..tile_queries {
                    let i = tile + t;
                    let first =
                        window_start(first_key(starts, b, i, seq, packed), past + i, window);
                    if i < seq && j <= past + i && j >= first {
                        let row = bh * seq + i;
                        let s = dot(&key, &q_tile, t * d, d);
                        let p = (capped_score(s, cap, capped) - lse[row]).exp();
                        add_scaled(&mut dv_acc, p, &o_tile, t * d, d);
                        let ds = p * (dot(&value, &o_tile, t * d, d) - delta[row]);
                        add_scaled(
                            &mut dk_acc,
                            ds * cap_slope(s, cap, capped),
                            &q_tile,
                            t * d,
                            d,
                        );
                    }
                }
            }
            sync_cube();
            tile += tile_queries;
        }
    }
    if active {
        #[unroll]
        for c in 0..d {
            dk[k_row + c] = dk_acc[c];
            dv[k_row + c] = dv_acc[c];
        }
    }
}
