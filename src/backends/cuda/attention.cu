// Flash attention, forward and backward, on bf16 tensor cores with f32 accumulation.
//
// Compiled at run time by NVRTC (`flash.rs`) once per head dimension, `-DHEAD_DIM=d` (a multiple
// of 16 up to 128, or of 32 up to 256). `to_bf16` first copies the operands that are re-read
// tile by tile (K and V; scale·Q and dO in the backward pass) to contiguous bf16
// `[batch·heads][rows][D]` (K and V at their own head count: with grouped-query attention,
// `group` consecutive query heads read one kv head), which the kernels stream into shared memory
// with `cp.async`, double-buffered. The queries (and dO in the dQ kernel), read once per block,
// come straight from the f32 tensors (past 128 columns, staged in shared memory first). Outputs
// are contiguous f32.
//
// The math, per (batch, head), with S = scale · Q Kᵀ + mask, the mask -inf where a query does not
// see a key. Query i sees keys start(i) ..= past + i: the causal rule (past = keys − seq cached
// keys), and for packed rows, which hold several examples back to back, nothing before its own
// example's first position start(i) (FlashAttention's varlen). No mask tensor exists: the rule is
// applied to the tiles that need it, from `starts` ([batch][seq], f32; null for plain rows,
// where start(i) = 0).
//
//   forward   (one block per BLOCK_ROWS queries, keys in tiles of 64):
//               m = running row max, l = running Σ exp(S − m), O = running Σ exp(S − m) V
//               out = O / l        lse = m + log l   (natural log, what the caller keeps)
//   backward  D = rowsum(dO ⊙ out) (computed by the caller), P = exp(S − lse):
//     dq kernel   (one block per BLOCK_ROWS queries, keys in tiles of 32):
//               dP = dO Vᵀ    dS = P ⊙ (dP − D)    dQ = scale · dS K
//     dkdv kernel (one block per BLOCK_ROWS keys, queries in tiles of 32):
//               Sᵀ = K (scale·Q)ᵀ    Pᵀ = exp(Sᵀ − lse)    dV = Pᵀ dO
//               dPᵀ = V dOᵀ          dSᵀ = Pᵀ ⊙ (dPᵀ − D)   dK = dSᵀ (scale·Q)
//
// Every exp(S − c) (c = m or lse, once per row) is 2^(S·log2 e − c·log2 e): one FFMA and one ex2
// per score, as FlashAttention 2 does; S, m and lse themselves stay in natural units. Most tiles
// see no mask at all (every key of the tile visible to every query of the warp): those skip it,
// and only the tiles on the diagonal, at an example's start or past the last key or query add
// it. Tiles that no query of a block sees (before its first query's example, after its last
// query) are not visited at all.
//
// Each warp owns 16 rows (queries, or keys in dkdv); the scores never leave its registers. Past
// 128 columns two warps share each 16 rows (SPLIT), each accumulating half of the output's
// columns, and both compute the rows' scores whole. Every product is `mma.sync.m16n8k16` (bf16
// in, f32 out), whose fragments are (g = lane / 4, t = lane % 4):
//   A 16×16, four 32-bit registers of two bf16:  a0 (row g,   cols 2t, 2t+1)
//                                                a1 (row g+8, cols 2t, 2t+1)
//                                                a2 (row g,   cols 2t+8, 2t+9)
//                                                a3 (row g+8, cols 2t+8, 2t+9)
//   B 16×8:                                      b0 (rows 2t, 2t+1, col g)   b1 (rows 2t+8, 2t+9, col g)
//   C 16×8, four f32:                            c0, c1 (row g, cols 2t, 2t+1)   c2, c3 (row g+8, ...)
// so the C fragments of two adjacent 8-column tiles are, packed to bf16, the A fragment of their
// 16 columns: P goes from one product into the next without leaving registers. A B operand
// `B[k][n] = M[n][k]` (Kᵀ in Q Kᵀ) is two adjacent bf16 of row n of the staged M; one with
// `B[k][n] = M[k][n]` (V in P V) is read by `ldmatrix.trans`, which hands each lane exactly
// b0/b1 from the row-major tile.

#ifndef HEAD_DIM
#error "compile with -DHEAD_DIM=<d>"
#endif

#define D HEAD_DIM
#define THREADS 256 // 8 warps
// Blocks an SM should hold, so registers are capped at 65536 / (THREADS · MIN_BLOCKS). Two at
// d <= 64, where the kernels fit 128 registers without spilling (NVRTC, sm_90) and the second
// block hides the first's memory waits: 1B steps 3.5% faster on an H200 (bench/NOTES.md). At
// d = 128 the same cap spills 300-1200 bytes a thread and the 8B step was 9% slower.
#define MIN_BLOCKS (D <= 64 ? 2 : 1)
#define ROW (D + 8) // row stride (bf16 elements) of a staged [rows][D] tile: +8 spreads the banks
// Warps that share one group of 16 rows, each accumulating COLS of the output's columns: two past
// 128, where a warp's 16 rows of f32 accumulators (two such in the backward) would not fit its
// registers. The pair computes the rows' scores twice (1.5x the forward's tensor-core work, 1.5x
// the dK/dV kernel's) rather than trade partial sums through shared memory at every tile.
#define SPLIT (D > 128 ? 2 : 1)
#define COLS (D / SPLIT)
#define BLOCK_ROWS (128 / SPLIT) // queries (keys in the dK/dV kernel) a block: 16 a warp group

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;

#define NEG_INF (-__int_as_float(0x7f800000))
#define LOG2E 1.4426950408889634f

__device__ __forceinline__ u32 shared_address(const void* p) {
    u32 a;
    asm("{ .reg .u64 x; cvta.to.shared.u64 x, %1; cvt.u32.u64 %0, x; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ u32 lds(const u16* p) { return *reinterpret_cast<const u32*>(p); }

// 2^x in one instruction (MUFU.EX2); a result below 2^-126 flushes to 0, as a probability that
// small may. 2^-inf = 0.
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float row_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

__device__ __forceinline__ float row_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// 16 bytes from global to shared memory, asynchronously; zeros when !valid.
__device__ __forceinline__ void cp_async(u16* dst, const u16* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_address(dst)),
                 "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }

// Waits until at most `pending` committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(pending));
}

// Rows r0..r0+ROWS of a contiguous bf16 [n][D] matrix into `dst` ([ROWS][ROW]), zeros past
// row n; queued with cp.async (the caller commits and waits).
template <int ROWS>
__device__ __forceinline__ void load_tile(u16* dst, const u16* src, int r0, int n) {
    for (int i = threadIdx.x; i < ROWS * D / 8; i += THREADS) {
        const int r = i / (D / 8), c = i % (D / 8) * 8;
        const bool valid = r0 + r < n;
        cp_async(dst + r * ROW + c, src + (i64)(valid ? r0 + r : 0) * D + c, valid);
    }
}

// The double-buffered stream of two row tiles (K and V, or scale·Q and dO): queues tile `it + 1`
// of `tiles` (rows next_row.. of the [n][D] matrices a and b, if it exists) into the buffer tile
// `it - 1` used, then waits for tile `it`. The caller syncs the block after using a tile, before
// the next call overwrites its buffer.
template <int ROWS>
__device__ __forceinline__ void advance(u16* a_tiles, u16* b_tiles, const u16* a, const u16* b,
                                        int it, int tiles, int next_row, int n) {
    if (it + 1 < tiles) {
        const int next = (it + 1) & 1;
        load_tile<ROWS>(a_tiles + next * ROWS * ROW, a, next_row, n);
        load_tile<ROWS>(b_tiles + next * ROWS * ROW, b, next_row, n);
    }
    cp_commit();
    cp_wait<1>();
    __syncthreads();
}

// 4 bytes from global to shared memory, asynchronously; zero when !valid.
__device__ __forceinline__ void cp_async4(float* dst, const float* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(shared_address(dst)),
                 "l"(src), "r"(valid ? 4 : 0));
}

// The A fragments of rows r, r+8 (r = a warp's first row + g) of a [n][D] f32 matrix, times
// `mul`.
__device__ __forceinline__ void rows_a(u32 (*a)[4], const float* src, i64 rs, int r, int n,
                                       float mul, int t) {
    const float* p0 = src + (i64)r * rs;
    const float* p1 = src + (i64)(r + 8) * rs;
    const bool in0 = r < n, in1 = r + 8 < n;
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
        const int col = c * 16 + 2 * t;
        a[c][0] = in0 ? pack_bf16(p0[col] * mul, p0[col + 1] * mul) : 0u;
        a[c][1] = in1 ? pack_bf16(p1[col] * mul, p1[col + 1] * mul) : 0u;
        a[c][2] = in0 ? pack_bf16(p0[col + 8] * mul, p0[col + 9] * mul) : 0u;
        a[c][3] = in1 ? pack_bf16(p1[col + 8] * mul, p1[col + 9] * mul) : 0u;
    }
}

#if D > 128
// The A operand of `mul_rows`, a warp's 16 rows: past 128 columns they stay in a staged
// [rows][ROW] tile and each product reads them 16 columns at a time (held, they would take 64
// registers, and the dQ kernel holds two).
struct RowsA {
    const u16* tile;
    int row;
};

// A warp's 16 rows (from `row`) of a staged [rows][ROW] tile as an A operand.
__device__ __forceinline__ void tile_rows(RowsA& a, const u16* tile, int row, int, int) {
    a.tile = tile;
    a.row = row;
}

// The block's rows r0..r0+BLOCK_ROWS of an f32 matrix (row stride rs), times `mul`, staged as
// bf16 in `tile` ([BLOCK_ROWS][ROW], zeros past row n) by the whole block; `a` gets the warp's
// 16 from `row`. The tile is read after the caller's next __syncthreads.
__device__ __forceinline__ void global_rows(RowsA& a, u16* tile, const float* src, i64 rs, int r0,
                                            int row, int n, float mul, int, int) {
    for (int i = threadIdx.x; i < BLOCK_ROWS * D / 4; i += THREADS) {
        const int r = i / (D / 4), c = i % (D / 4) * 4;
        uint2 x = make_uint2(0u, 0u);
        if (r0 + r < n) {
            const float4 f = *reinterpret_cast<const float4*>(src + (i64)(r0 + r) * rs + c);
            x = make_uint2(pack_bf16(f.x * mul, f.y * mul), pack_bf16(f.z * mul, f.w * mul));
        }
        *reinterpret_cast<uint2*>(tile + r * ROW + c) = x;
    }
    tile_rows(a, tile, row, 0, 0);
}

// acc[j] += A · Mᵀ for the 8-row groups j of a staged [8·TILES][ROW] tile M (B[k][n] = M[n][k]).
template <int TILES>
__device__ __forceinline__ void mul_rows(float (*acc)[4], const RowsA& a, const u16* m, int g,
                                         int t) {
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
        const u16* p = a.tile + (a.row + g) * ROW + c * 16 + 2 * t;
        const u32 a0 = lds(p), a1 = lds(p + 8 * ROW), a2 = lds(p + 8), a3 = lds(p + 8 * ROW + 8);
#pragma unroll
        for (int j = 0; j < TILES; ++j) {
            const u16* row = m + (j * 8 + g) * ROW + c * 16 + 2 * t;
            mma(acc[j], a0, a1, a2, a3, lds(row), lds(row + 8));
        }
    }
}
#else
// The A operand of `mul_rows`, a warp's 16 rows, as fragments in registers.
struct RowsA {
    u32 f[D / 16][4];
};

// The A fragments of a warp's 16 rows (from `row`) of a staged [rows][ROW] tile.
__device__ __forceinline__ void tile_rows(RowsA& a, const u16* tile, int row, int g, int t) {
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
        const u16* p = tile + (row + g) * ROW + c * 16 + 2 * t;
        a.f[c][0] = lds(p);
        a.f[c][1] = lds(p + 8 * ROW);
        a.f[c][2] = lds(p + 8);
        a.f[c][3] = lds(p + 8 * ROW + 8);
    }
}

// The A fragments of the warp's 16 rows r0 + row.. of an f32 matrix (row stride rs), times
// `mul` (zeros past row n), read straight from it; `tile` is not used.
__device__ __forceinline__ void global_rows(RowsA& a, u16*, const float* src, i64 rs, int r0,
                                            int row, int n, float mul, int g, int t) {
    rows_a(a.f, src, rs, r0 + row + g, n, mul, t);
}

// acc[j] += A · Mᵀ for the 8-row groups j of a staged [8·TILES][ROW] tile M (B[k][n] = M[n][k]).
template <int TILES>
__device__ __forceinline__ void mul_rows(float (*acc)[4], const RowsA& a, const u16* m, int g,
                                         int t) {
#pragma unroll
    for (int j = 0; j < TILES; ++j) {
#pragma unroll
        for (int c = 0; c < D / 16; ++c) {
            const u16* row = m + (j * 8 + g) * ROW + c * 16 + 2 * t;
            mma(acc[j], a.f[c][0], a.f[c][1], a.f[c][2], a.f[c][3], lds(row), lds(row + 8));
        }
    }
}
#endif

// acc[dn] += X · M[:, col0 + 8·dn ..] for the warp's COLS columns from col0, where X is
// [16][16·CHUNKS] given as C fragments x[2·CHUNKS][4], and M a staged row-major
// [16·CHUNKS][ROW] tile (B[k][n] = M[k][n], read by ldmatrix.trans: lanes
// 0-15 address rows k0..k0+15 at column n0, lanes 16-31 the same rows at n0 + 8, and the four
// registers come back as b0, b1 of columns n0.. and b0, b1 of columns n0+8..).
template <int CHUNKS>
__device__ __forceinline__ void mul_cols(float (*acc)[4], const float (*x)[4], const u16* m,
                                         int col0, int lane) {
#pragma unroll
    for (int kk = 0; kk < CHUNKS; ++kk) {
        const u32 a0 = pack_bf16(x[2 * kk][0], x[2 * kk][1]);
        const u32 a1 = pack_bf16(x[2 * kk][2], x[2 * kk][3]);
        const u32 a2 = pack_bf16(x[2 * kk + 1][0], x[2 * kk + 1][1]);
        const u32 a3 = pack_bf16(x[2 * kk + 1][2], x[2 * kk + 1][3]);
        const u16* base = m + (kk * 16 + lane % 16) * ROW + col0 + (lane / 16) * 8;
#pragma unroll
        for (int dn = 0; dn < COLS / 8; dn += 2) {
            u32 b0, b1, b2, b3;
            asm volatile(
                "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                : "r"(shared_address(base + dn * 8)));
            mma(acc[dn], a0, a1, a2, a3, b0, b1);
            mma(acc[dn + 1], a0, a1, a2, a3, b2, b3);
        }
    }
}

// What the queries of one batch row see: keys start(query) ..= past + query, where start is 0 for
// plain rows (`starts` null) and the first position of the query's example for packed rows
// (non-decreasing along the row; past = 0 there); with a sliding window (> 0) only the `window`
// keys up to past + query, itself included.
struct Mask {
    const float* starts;
    int past, seq, keys, window;

    __device__ __forceinline__ int start(int query) const {
        return starts ? (int)starts[query] : 0;
    }

    // What it adds at (query, key): -inf where the query does not see the key or past the last
    // key; 0 on rows past the last query. PACKED is `starts != null`, known at compile time.
    template <bool PACKED>
    __device__ __forceinline__ float bias(int query, int key) const {
        if (key >= keys) return NEG_INF;
        if (query >= seq) return 0.f;
        const bool seen = key <= past + query && (!PACKED || key >= (int)starts[query]) &&
                          (window == 0 || key > past + query - window);
        return seen ? 0.f : NEG_INF;
    }

    // Whether it adds 0 at every query q_lo..q_hi and key k_lo..k_hi, all of them real: q_lo sees
    // k_hi by the causal rule, q_hi < seq (so k_hi ≤ past + q_lo < keys too), and q_hi's example
    // starts at or before k_lo (starts grow along the row, so every query's does).
    // With a window, q_hi sees k_lo too.
    __device__ __forceinline__ bool none(int q_lo, int q_hi, int k_lo, int k_hi) const {
        return q_hi < seq && k_hi <= past + q_lo && start(q_hi) <= k_lo &&
               (window == 0 || k_lo > past + q_hi - window);
    }

    // The key tiles (of TILE keys) that the BLOCK_ROWS queries from q0 may see: from the first
    // query's example start (or its window's first key) to the last query's causal end. Returns
    // the first; `tiles` gets the count.
    template <int TILE>
    __device__ __forceinline__ int key_tiles(int q0, int& tiles) const {
        const int lo = window == 0 ? start(q0) : max(start(q0), max(0, past + q0 - window + 1));
        const int first = lo / TILE;
        const int end = min(keys, past + min(q0 + BLOCK_ROWS, seq));
        tiles = (end + TILE - 1) / TILE - first;
        return first;
    }

    // The first query at or after `from` whose example starts after key `key` (seq if none):
    // the end of the queries that may see `key`.
    __device__ __forceinline__ int queries_seeing(int from, int key) const {
        if (!starts) return seq;
        int lo = from, hi = seq;
        while (lo < hi) {
            const int mid = (lo + hi) / 2;
            if ((int)starts[mid] <= key) lo = mid + 1;
            else hi = mid;
        }
        return lo;
    }
};

// s = cap · tanh(s / cap) on a warp's C fragments (Gemma 2's soft-capped scores).
template <int TILES>
__device__ __forceinline__ void soft_cap(float (*s)[4], float cap) {
    const float inv = 1.f / cap;
#pragma unroll
    for (int j = 0; j < TILES; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = cap * tanhf(s[j][e] * inv);
}

// The soft-cap's derivative 1 − t² at a capped score s (t = s / cap), 1 without a cap; 0 where
// the mask made the score -inf.
__device__ __forceinline__ float cap_slope(float s, float cap) {
    if (cap == 0.f) return 1.f;
    const float t = s / cap;
    return fmaxf(0.f, 1.f - t * t);
}

// s += the mask on a warp's C fragments s[j] (rows r and r + 8, columns c0 + j·8 + 2t, +1):
// rows are queries and columns keys, or with KEY_ROWS (the dK/dV kernel's Sᵀ) the other way.
template <int TILES, bool KEY_ROWS, bool PACKED>
__device__ __forceinline__ void add_mask_as(float (*s)[4], const Mask& mask, int r, int c0,
                                            int t) {
#pragma unroll
    for (int j = 0; j < TILES; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int c = c0 + j * 8 + 2 * t + e;
            s[j][e] += KEY_ROWS ? mask.bias<PACKED>(c, r) : mask.bias<PACKED>(r, c);
            s[j][2 + e] += KEY_ROWS ? mask.bias<PACKED>(c, r + 8) : mask.bias<PACKED>(r + 8, c);
        }
    }
}

// One branch on packing per tile, not one per score (which also keeps the registers down).
template <int TILES, bool KEY_ROWS>
__device__ __forceinline__ void add_mask(float (*s)[4], const Mask& mask, int r, int c0, int t) {
    if (mask.starts) add_mask_as<TILES, KEY_ROWS, true>(s, mask, r, c0, t);
    else add_mask_as<TILES, KEY_ROWS, false>(s, mask, r, c0, t);
}

// The C fragments of rows (r, r+8), the warp's COLS columns from col0, written to a contiguous
// [n][D] f32 matrix, times `mul`.
__device__ __forceinline__ void store_rows(float* dst, const float (*acc)[4], int r, int n,
                                           int col0, float mul0, float mul1, int t) {
#pragma unroll
    for (int dn = 0; dn < COLS / 8; ++dn) {
        const int col = col0 + dn * 8 + 2 * t;
        if (r < n) *reinterpret_cast<float2*>(dst + (i64)r * D + col) =
            make_float2(acc[dn][0] * mul0, acc[dn][1] * mul0);
        if (r + 8 < n) *reinterpret_cast<float2*>(dst + (i64)(r + 8) * D + col) =
            make_float2(acc[dn][2] * mul1, acc[dn][3] * mul1);
    }
}

template <int N>
__device__ __forceinline__ void zero(float (*acc)[4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// dst (bf16, contiguous [batch·heads][n][D]) = src (f32 [batch, heads, n, D], strided) · mul.
// Grid (⌈n·D / 1024⌉, heads, batch).
extern "C" __global__ void __launch_bounds__(THREADS)
    to_bf16(const float* __restrict__ src, u16* __restrict__ dst, int heads, int n, i64 sb,
            i64 sh, i64 sr, float mul) {
    const i64 i = (i64)blockIdx.x * THREADS + threadIdx.x;
    if (i >= (i64)n * D / 4) return;
    const int r = (int)(i / (D / 4)), c = (int)(i % (D / 4)) * 4;
    const float4 x = *reinterpret_cast<const float4*>(
        src + blockIdx.z * sb + blockIdx.y * sh + (i64)r * sr + c);
    *reinterpret_cast<uint2*>(dst + (((i64)blockIdx.z * heads + blockIdx.y) * n + r) * D + c) =
        make_uint2(pack_bf16(x.x * mul, x.y * mul), pack_bf16(x.z * mul, x.w * mul));
}

// Blocks start in grid order, and the ones that start last should be short: otherwise a few long
// ones run on while the rest of the card idles. Under a causal mask a query block's work grows
// with its index (it sees more keys) and a key block's shrinks, so the row blocks are the grid's
// slowest dimension (z), visited from the longest: the forward and dQ kernels take the last
// query blocks first, the dK/dV kernel the first key blocks.
__device__ __forceinline__ int query_block() {
    return (gridDim.z - 1 - blockIdx.z) * BLOCK_ROWS;
}

// What a forward or dQ block works on: query head h of batch row b, its BLOCK_ROWS queries from
// q0, the kv head they read (grouped-query attention), and the row's mask. Grid (heads, batch,
// blocks).
struct QueryBlock {
    int b, h, q0;
    i64 bh, kv; // (batch, head) and (batch, kv head) indices
    Mask mask;

    __device__ __forceinline__ QueryBlock(const float* starts, int heads, int seq, int keys,
                                          int group, int window)
        : b(blockIdx.y), h(blockIdx.x), q0(query_block()), bh((i64)b * heads + h),
          kv((i64)b * (heads / group) + h / group),
          mask{starts ? starts + (i64)b * seq : nullptr, keys - seq, seq, keys, window} {}
};

#define FWD_KEYS 64

// Grid (heads, batch, ⌈seq / BLOCK_ROWS⌉), the last query blocks (the most keys) first; dynamic
// shared memory: K and V, [2][FWD_KEYS][ROW] each, then (D > 128) the block's scale·Q,
// [BLOCK_ROWS][ROW].
// k, v: bf16 [batch·kv_heads][keys][D], query head h reading kv head h / group (grouped-query
// attention: kv_heads = heads / group). out: [batch, heads, seq, D]; lse: [batch, heads, seq].
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    attention_forward(const float* __restrict__ q, const u16* __restrict__ k,
                      const u16* __restrict__ v, const float* __restrict__ starts,
                      float* __restrict__ out, float* __restrict__ lse, int heads, int seq,
                      int keys, int group, int window, i64 qb, i64 qh, i64 qt, float scale,
                      float softcap) {
    extern __shared__ __align__(16) u16 shared[];
    u16* k_tiles = shared;
    u16* v_tiles = shared + 2 * FWD_KEYS * ROW;
    u16* q_rows = v_tiles + 2 * FWD_KEYS * ROW;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // This warp's first row in the block and first output column.
    const int row = warp / SPLIT * 16, col0 = warp % SPLIT * COLS;
    const QueryBlock blk(starts, heads, seq, keys, group, window);
    const int q0 = blk.q0;
    const i64 bh = blk.bh;
    const Mask& mask = blk.mask;
    q += blk.b * qb + blk.h * qh;
    k += blk.kv * keys * D;
    v += blk.kv * keys * D;
    const int w0 = q0 + row; // this warp's first query
    const int r0 = w0 + g, r1 = r0 + 8;

    int tiles;
    const int first = mask.key_tiles<FWD_KEYS>(q0, tiles);
    load_tile<FWD_KEYS>(k_tiles, k, first * FWD_KEYS, keys);
    load_tile<FWD_KEYS>(v_tiles, v, first * FWD_KEYS, keys);
    cp_commit();

    RowsA qa;
    global_rows(qa, q_rows, q, qt, q0, row, seq, scale, g, t);
    float o[COLS / 8][4];
    zero<COLS / 8>(o);
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    for (int it = 0; it < tiles; ++it) {
        const int k0 = (first + it) * FWD_KEYS;
        const u16* ks = k_tiles + (it & 1) * FWD_KEYS * ROW;
        const u16* vs = v_tiles + (it & 1) * FWD_KEYS * ROW;
        advance<FWD_KEYS>(k_tiles, v_tiles, k, v, it, tiles, k0 + FWD_KEYS, keys);

        float s[FWD_KEYS / 8][4];
        zero<FWD_KEYS / 8>(s);
        // The mask goes in first, as the products' starting value: its loads are in flight
        // under the tensor-core work, and the rest of the tile is one run of code. A soft-cap
        // goes between the products and the mask.
        const bool masked = !mask.none(w0, w0 + 15, k0, k0 + FWD_KEYS - 1);
        if (masked && softcap == 0.f) add_mask<FWD_KEYS / 8, false>(s, mask, r0, k0, t);
        mul_rows<FWD_KEYS / 8>(s, qa, ks, g, t);
        if (softcap > 0.f) {
            soft_cap<FWD_KEYS / 8>(s, softcap);
            if (masked) add_mask<FWD_KEYS / 8, false>(s, mask, r0, k0, t);
        }

        float x0 = NEG_INF, x1 = NEG_INF;
#pragma unroll
        for (int j = 0; j < FWD_KEYS / 8; ++j) {
            x0 = fmaxf(x0, fmaxf(s[j][0], s[j][1]));
            x1 = fmaxf(x1, fmaxf(s[j][2], s[j][3]));
        }
        const float n0 = fmaxf(m0, row_max(x0)), n1 = fmaxf(m1, row_max(x1));
        // The new max in log2 units. A row that has seen no key yet keeps m = -inf; subtracting
        // 0 then keeps exp at 0.
        const float base0 = n0 == NEG_INF ? 0.f : n0 * LOG2E;
        const float base1 = n1 == NEG_INF ? 0.f : n1 * LOG2E;
        const float alpha0 = exp2_approx(fmaf(m0, LOG2E, -base0));
        const float alpha1 = exp2_approx(fmaf(m1, LOG2E, -base1));
        m0 = n0;
        m1 = n1;
        l0 *= alpha0;
        l1 *= alpha1;
#pragma unroll
        for (int dn = 0; dn < COLS / 8; ++dn) {
            o[dn][0] *= alpha0;
            o[dn][1] *= alpha0;
            o[dn][2] *= alpha1;
            o[dn][3] *= alpha1;
        }
#pragma unroll
        for (int j = 0; j < FWD_KEYS / 8; ++j) {
            s[j][0] = exp2_approx(fmaf(s[j][0], LOG2E, -base0));
            s[j][1] = exp2_approx(fmaf(s[j][1], LOG2E, -base0));
            s[j][2] = exp2_approx(fmaf(s[j][2], LOG2E, -base1));
            s[j][3] = exp2_approx(fmaf(s[j][3], LOG2E, -base1));
            l0 += s[j][0] + s[j][1];
            l1 += s[j][2] + s[j][3];
        }
        mul_cols<FWD_KEYS / 16>(o, s, vs, col0, lane);
        __syncthreads(); // the next iteration's loads overwrite the other buffer
    }

    l0 = row_sum(l0);
    l1 = row_sum(l1);
    store_rows(out + bh * seq * D, o, r0, seq, col0, 1.f / l0, 1.f / l1, t);
    if (t == 0 && col0 == 0) {
        if (r0 < seq) lse[bh * seq + r0] = m0 + __logf(l0);
        if (r1 < seq) lse[bh * seq + r1] = m1 + __logf(l1);
    }
}

#define DQ_KEYS 32

// Grid (heads, batch, ⌈seq / BLOCK_ROWS⌉) as in the forward kernel; dynamic shared memory: K and
// V, [2][DQ_KEYS][ROW] each, then (D > 128) the block's scale·Q and dO, [BLOCK_ROWS][ROW] each.
// k, v: bf16 [batch·kv_heads][keys][D] (as in the forward kernel); lse, delta:
// [batch, heads, seq]; dq: [batch, heads, seq, D].
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    attention_backward_dq(const float* __restrict__ q, const u16* __restrict__ k,
                          const u16* __restrict__ v, const float* __restrict__ starts,
                          const float* __restrict__ d_out, const float* __restrict__ lse,
                          const float* __restrict__ delta, float* __restrict__ dq, int heads,
                          int seq, int keys, int group, int window, i64 qb, i64 qh, i64 qt,
                          i64 ob, i64 oh, i64 ot, float scale, float softcap) {
    extern __shared__ __align__(16) u16 shared[];
    u16* k_tiles = shared;
    u16* v_tiles = shared + 2 * DQ_KEYS * ROW;
    u16* q_rows = v_tiles + 2 * DQ_KEYS * ROW;
    u16* o_rows = q_rows + BLOCK_ROWS * ROW;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int row = warp / SPLIT * 16, col0 = warp % SPLIT * COLS;
    const QueryBlock blk(starts, heads, seq, keys, group, window);
    const int q0 = blk.q0;
    const i64 bh = blk.bh;
    const Mask& mask = blk.mask;
    q += blk.b * qb + blk.h * qh;
    d_out += blk.b * ob + blk.h * oh;
    k += blk.kv * keys * D;
    v += blk.kv * keys * D;
    lse += bh * seq;
    delta += bh * seq;
    const int w0 = q0 + row; // this warp's first query
    const int r0 = w0 + g, r1 = r0 + 8;

    int tiles;
    const int first = mask.key_tiles<DQ_KEYS>(q0, tiles);
    load_tile<DQ_KEYS>(k_tiles, k, first * DQ_KEYS, keys);
    load_tile<DQ_KEYS>(v_tiles, v, first * DQ_KEYS, keys);
    cp_commit();

    RowsA qa, da;
    global_rows(qa, q_rows, q, qt, q0, row, seq, scale, g, t);
    global_rows(da, o_rows, d_out, ot, q0, row, seq, 1.f, g, t);
    // −lse in log2 units; -inf on rows past the last query, whose P is then 0.
    const float nl0 = r0 < seq ? -lse[r0] * LOG2E : NEG_INF;
    const float nl1 = r1 < seq ? -lse[r1] * LOG2E : NEG_INF;
    const float dl0 = r0 < seq ? delta[r0] : 0.f, dl1 = r1 < seq ? delta[r1] : 0.f;
    float acc[COLS / 8][4];
    zero<COLS / 8>(acc);

    for (int it = 0; it < tiles; ++it) {
        const int k0 = (first + it) * DQ_KEYS;
        const u16* ks = k_tiles + (it & 1) * DQ_KEYS * ROW;
        const u16* vs = v_tiles + (it & 1) * DQ_KEYS * ROW;
        advance<DQ_KEYS>(k_tiles, v_tiles, k, v, it, tiles, k0 + DQ_KEYS, keys);

        float s[DQ_KEYS / 8][4], dp[DQ_KEYS / 8][4];
        zero<DQ_KEYS / 8>(s);
        zero<DQ_KEYS / 8>(dp);
        mul_rows<DQ_KEYS / 8>(s, qa, ks, g, t);
        if (softcap > 0.f) soft_cap<DQ_KEYS / 8>(s, softcap);
        // Masked before dP exists: fewer registers live.
        if (!mask.none(w0, w0 + 15, k0, k0 + DQ_KEYS - 1))
            add_mask<DQ_KEYS / 8, false>(s, mask, r0, k0, t);
        mul_rows<DQ_KEYS / 8>(dp, da, vs, g, t);
#pragma unroll
        for (int j = 0; j < DQ_KEYS / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                // dS = P ⊙ (dP − D), times the soft-cap's slope (1 − t²).
                const float c0 = cap_slope(s[j][e], softcap);
                const float c1 = cap_slope(s[j][2 + e], softcap);
                s[j][e] = exp2_approx(fmaf(s[j][e], LOG2E, nl0)) * (dp[j][e] - dl0) * c0;
                s[j][2 + e] =
                    exp2_approx(fmaf(s[j][2 + e], LOG2E, nl1)) * (dp[j][2 + e] - dl1) * c1;
            }
        }
        mul_cols<DQ_KEYS / 16>(acc, s, ks, col0, lane);
        __syncthreads();
    }
    store_rows(dq + bh * seq * D, acc, r0, seq, col0, scale, scale, t);
}

#define KV_QUERIES 32

// The lse and D of queries c0..c0 + KV_QUERIES of one head into dst[0, KV_QUERIES) and
// dst[KV_QUERIES, 2·KV_QUERIES), queued with cp.async (the caller commits). Past the last query
// they are 0: those queries' rows of scale·Q and dO are 0 too, so whatever P they get (1 or 0),
// they add nothing to dK or dV.
__device__ __forceinline__ void load_stats(float* dst, const float* lse, const float* delta,
                                           int c0, int seq) {
    const int i = threadIdx.x;
    if (i < 2 * KV_QUERIES) {
        const int query = c0 + i % KV_QUERIES;
        const bool valid = query < seq;
        cp_async4(dst + i, (i < KV_QUERIES ? lse : delta) + (valid ? query : 0), valid);
    }
}

// Grid (kv_heads, batch, ⌈keys / BLOCK_ROWS⌉), the first key blocks (the most queries) first;
// dynamic shared memory: K and V [BLOCK_ROWS][ROW] each, scale·Q and dO [2][KV_QUERIES][ROW]
// each, then the query tile's lse and D, [2][2][KV_QUERIES] f32. k, v: bf16
// [batch·kv_heads][keys][D]; qs (= scale·Q), o (= dO): bf16 [batch·heads][seq][D]; lse, delta:
// [batch, heads, seq]; dk, dv: [batch, kv_heads, keys, D]. A kv head's gradients sum over the
// `group` query heads that read it: the block streams the query tiles of each in turn into the
// same accumulators.
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    attention_backward_dkdv(const u16* __restrict__ qs, const u16* __restrict__ k,
                            const u16* __restrict__ v, const float* __restrict__ starts,
                            const u16* __restrict__ o, const float* __restrict__ lse,
                            const float* __restrict__ delta, float* __restrict__ dk,
                            float* __restrict__ dv, int heads, int seq, int keys, int group,
                            int window, float softcap) {
    extern __shared__ __align__(16) u16 shared[];
    u16* k_rows = shared;
    u16* v_rows = k_rows + BLOCK_ROWS * ROW;
    u16* q_tiles = v_rows + BLOCK_ROWS * ROW;
    u16* o_tiles = q_tiles + 2 * KV_QUERIES * ROW;
    float* stats = reinterpret_cast<float*>(o_tiles + 2 * KV_QUERIES * ROW);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int b = blockIdx.y, k0 = blockIdx.z * BLOCK_ROWS;
    const int past = keys - seq;
    const i64 kv = (i64)b * gridDim.x + blockIdx.x;
    const i64 bh = (i64)b * heads + (i64)blockIdx.x * group; // the group's first query head
    qs += bh * seq * D;
    o += bh * seq * D;
    k += kv * keys * D;
    v += kv * keys * D;
    const Mask mask{starts ? starts + (i64)b * seq : nullptr, past, seq, keys, window};
    lse += bh * seq;
    delta += bh * seq;
    const int w0 = warp / SPLIT * 16; // this warp's first key row within the block
    const int col0 = warp % SPLIT * COLS; // and its first output column
    const int key0 = k0 + w0 + g; // this lane's keys: key0, key0 + 8

    // The first query that may see key k0 is k0 - past; the last, the last one whose example
    // starts at or before the block's last key (and, with a window, whose window still reaches
    // key k0).
    const int first = max(0, k0 - past) / KV_QUERIES * KV_QUERIES;
    const int last = k0 + BLOCK_ROWS - 1;
    const int seeing = mask.queries_seeing(first, last);
    const int end = window == 0 ? seeing : min(seeing, last - past + window);
    const int tiles = first < end ? (end - first + KV_QUERIES - 1) / KV_QUERIES : 0;
    const int steps = tiles * group; // tile it % tiles of query head it / tiles
    load_tile<BLOCK_ROWS>(k_rows, k, k0, keys);
    load_tile<BLOCK_ROWS>(v_rows, v, k0, keys);
    load_tile<KV_QUERIES>(q_tiles, qs, first, seq);
    load_tile<KV_QUERIES>(o_tiles, o, first, seq);
    load_stats(stats, lse, delta, first, seq);
    cp_commit();

    float dk_acc[COLS / 8][4], dv_acc[COLS / 8][4];
    zero<COLS / 8>(dk_acc);
    zero<COLS / 8>(dv_acc);

    for (int it = 0; it < steps; ++it) {
        const int c0 = first + it % tiles * KV_QUERIES;
        const u16* qt = q_tiles + (it & 1) * KV_QUERIES * ROW;
        const u16* ot = o_tiles + (it & 1) * KV_QUERIES * ROW;
        const float* lse_q = stats + (it & 1) * 2 * KV_QUERIES;
        const float* delta_q = lse_q + KV_QUERIES;
        const int next = (it + 1) / tiles, next_c0 = first + (it + 1) % tiles * KV_QUERIES;
        if (it + 1 < steps)
            load_stats(stats + ((it + 1) & 1) * 2 * KV_QUERIES, lse + (i64)next * seq,
                       delta + (i64)next * seq, next_c0, seq);
        advance<KV_QUERIES>(q_tiles, o_tiles, qs + (i64)next * seq * D, o + (i64)next * seq * D,
                            it, steps, next_c0, seq);

        float st[KV_QUERIES / 8][4], dpt[KV_QUERIES / 8][4];
        zero<KV_QUERIES / 8>(st);
        zero<KV_QUERIES / 8>(dpt);
        {
            RowsA ka;
            tile_rows(ka, k_rows, w0, g, t);
            mul_rows<KV_QUERIES / 8>(st, ka, qt, g, t);
        }
        if (softcap > 0.f) soft_cap<KV_QUERIES / 8>(st, softcap);
        // Masked before dPᵀ exists: fewer registers live.
        if (!mask.none(c0, c0 + KV_QUERIES - 1, k0 + w0, k0 + w0 + 15))
            add_mask<KV_QUERIES / 8, true>(st, mask, key0, c0, t);
        {
            RowsA va;
            tile_rows(va, v_rows, w0, g, t);
            mul_rows<KV_QUERIES / 8>(dpt, va, ot, g, t);
        }
#pragma unroll
        for (int j = 0; j < KV_QUERIES / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                // This lane's query in the tile (for both of its keys).
                const int query = j * 8 + 2 * t + e;
                const float lse2 = lse_q[query] * LOG2E, dl = delta_q[query];
                const float c0 = cap_slope(st[j][e], softcap);
                const float c1 = cap_slope(st[j][2 + e], softcap);
                const float p0 = exp2_approx(fmaf(st[j][e], LOG2E, -lse2));
                const float p1 = exp2_approx(fmaf(st[j][2 + e], LOG2E, -lse2));
                st[j][e] = p0;
                st[j][2 + e] = p1;
                dpt[j][e] = p0 * (dpt[j][e] - dl) * c0;
                dpt[j][2 + e] = p1 * (dpt[j][2 + e] - dl) * c1;
            }
        }
        mul_cols<KV_QUERIES / 16>(dv_acc, st, ot, col0, lane);
        mul_cols<KV_QUERIES / 16>(dk_acc, dpt, qt, col0, lane);
        __syncthreads();
    }
    cp_wait<0>(); // when no query sees these keys, the first loads are still in flight
    store_rows(dk + kv * keys * D, dk_acc, key0, keys, col0, 1.f, 1.f, t);
    store_rows(dv + kv * keys * D, dv_acc, key0, keys, col0, 1.f, 1.f, t);
}
