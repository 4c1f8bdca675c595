// The decode step's kernels (`decode.rs`): one token of a Llama-shaped model in six launches a
// block, every buffer allocated once, instead of the few dozen Burn ops a block that left an 8B
// model's step host-bound on an H200 (bench/NOTES.md, sessions 24 and 25).
//
//   h   = embed(id)
//   q,k,v = a Wqᵀ + bq, a Wkᵀ + bk, a Wvᵀ + bv,  a = rmsnorm(h) ⊙ w    linear (three segments)
//   q,k = rope(q, k) at position p; K[p], V[p] = k, v                  rope_append
//   o   = softmax(q Kᵀ · scale) V   (each query head on its group's key head)   attend
//   h  += o Woᵀ                                                        linear (residual)
//   m   = silu(a Wgᵀ) ⊙ a Wuᵀ,  a = rmsnorm(h) ⊙ w                     gated
//   h  += m Wdᵀ                                                        linear (residual)
//   logits = rmsnorm(h) W_headᵀ                                        linear
//
// Each RMSNorm is folded into the product after it (see "The products" below).
// A matrix is dense (bf16 or f32 `[n, cols]`) or MLX-affine packed (`qgemv.cu` has the math):
// `DENSE_T` picks the one a module is compiled for (`-DDENSE_T=bf16|float`, or `-DBITS=2|4|8`
// with `-DSCALE_T=bf16|float` for packed ones). As the op-by-op path casts a GEMM's input to
// its weight's dtype, a dense bf16 matrix reads its input rounded to bf16: x ⊙ gain where the
// norm is folded in, before the 1/rms scale (the op-by-op path rounds rmsnorm(x) ⊙ gain: the
// same size of error, not the same values); a packed one reads it in f32 (where the op-by-op
// path, with bf16 scales, rounds it). Both within the device check's bf16 tolerance. Sums are
// f32.
// The keys and values are held as `KV_T` (bf16 or f32, `-DKV_T`), `[kv_heads][capacity][d]`.

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;
typedef u16 bf16;

__device__ __forceinline__ float load(const bf16* p) { return __uint_as_float((u32)*p << 16); }
__device__ __forceinline__ float load(const float* p) { return *p; }

// Round to nearest even, as a cast to bf16 does.
__device__ __forceinline__ float round_bf16(float x) {
    u32 u = __float_as_uint(x);
    u += 0x7fffu + ((u >> 16) & 1u);
    return __uint_as_float(u & 0xffff0000u);
}

__device__ __forceinline__ void store(bf16* p, float x) {
    *p = (bf16)(__float_as_uint(round_bf16(x)) >> 16);
}
__device__ __forceinline__ void store(float* p, float x) { *p = x; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Programmatic dependent launch (sm_90 and later; `decode.rs` launches the step's kernels so):
// a kernel may start while the one before it in the stream still runs, so its blocks are
// scheduled and its first weight loads issued meanwhile. Each kernel lets the next start at
// once, and waits for the one before it to finish (its writes visible) before reading anything
// a kernel writes: before that wait, only the frozen weights are read. Launched the usual way,
// both are no-ops. What a kernel writes is read through plain pointers, never `__restrict__`
// ones (their no-alias promise lets NVVM move loads across the wait's asm, which it is not
// handed) or `__ldg` (invariant loads): the SASS showed attention's query loads above ACQBULK.
// A step's token and position (`step`) are written by the host before the step, not by a
// kernel.
__device__ __forceinline__ void let_next_start() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
__device__ __forceinline__ void wait_for_previous() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// The products. A launch's rows are split into tasks of R consecutive rows of one matrix (or of
// two, for gate and up), and each output row is summed by one thread at the end (`run`):
// - dense rows: a block a task, its THREADS threads splitting each row's columns 16 bytes at a
//   time, x loaded once for the R rows (and both matrices), the partial sums added in shared
//   memory. An 8B model in bf16 on an H200 (ncu, session 25): gate/up at 4.2 TB/s, the other
//   products at 3.3 TB/s, of the card's 4.8.
// - packed rows: a warp a task, x staged in shared memory once a block, the blocks as many as the
//   device holds at once, their warps taking one task after another (below).
//
// A product may fold in the RMSNorm before it: given the norm's gain, it reads x ⊙ gain,
// accumulates Σ x² alongside (each block reads all of x), and scales its sums by
// 1 / √(Σ x² / cols + ε) at the end: rmsnorm(x) W ᵀ = (x ⊙ gain) Wᵀ / rms(x).

#ifndef R
#error "compile with -DR=<output rows a task: a block's (dense) or a warp's (packed)>"
#endif
#ifndef THREADS
#error "compile with -DTHREADS=<threads a block of the products>"
#endif

// Loads x[c, c + N) into xs, times the norm's gain when there is one (adding the x² to ss).
template <int N>
__device__ __forceinline__ void load_x(const float* x, const float* __restrict__ gain,
                                       int c, float (&xs)[N], float& ss) {
#pragma unroll
    for (int j = 0; j < N; j += 4) {
        const float4 v = *reinterpret_cast<const float4*>(x + c + j);
        xs[j] = v.x, xs[j + 1] = v.y, xs[j + 2] = v.z, xs[j + 3] = v.w;
    }
    if (gain) {
#pragma unroll
        for (int j = 0; j < N; j += 4) {
            const float4 g = __ldg(reinterpret_cast<const float4*>(gain + c + j));
            const float gs[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                ss = fmaf(xs[j + i], xs[j + i], ss);
                xs[j + i] *= gs[i];
            }
        }
    }
}

// A task: R rows (fewer at a matrix's end) of M matrices from row `first`, in segment `seg` of
// the launch. `Mat` is the matrix type (`Matrix`, packed or dense, below).
template <int M, class Mat = struct Matrix>
struct Task {
    Mat m[M];
    int first, rows, seg;
};

#if defined(BITS)
#define PER_WORD (32 / BITS)
#ifndef SCALE_T
#error "packed matrices need -DSCALE_T=bf16|float"
#endif
typedef SCALE_T scale_t;
// The prompt pass's GEMMs read the matrix dequantized to its scales' type (`dequant.cu`).
typedef scale_t gemm_t;
// A packed matrix: words [n][cols / PER_WORD], scales and biases [n][cols >> gshift] (groups
// of 2^gshift codes).
struct Matrix {
    const u32* words;
    const scale_t* scales;
    const scale_t* biases;
    int gshift;
};

// Codes become floats without a conversion instruction: OR-ing a code that sits in the low 23
// bits into 2²³'s bit pattern gives the float 2²³ + code · 2^lo, and subtracting 2²³ leaves
// code · 2^lo exactly. Codes above bit 23 are shifted down by HI first. The x values are
// scaled by 2^-lo beforehand (once a block), so each product is code · x with its usual
// rounding (MLX's qmv scales x by 1/16ᵏ the same way). Per code: one LOP3, one FADD, one FFMA.
#define HI ((23 / BITS) * BITS)
__host__ __device__ constexpr int code_shift(int j) {
    return j * BITS + BITS <= 23 ? j * BITS : j * BITS - HI;
}

// A packed task: R rows taken by one warp, each lane a chunk of 4 words of each row at a time
// (16 bytes; the warp's loads of a row coalesced), the next chunk's words, scales and biases
// loaded while the current one is summed (`fetch` into one of two `Chunk`s, `accumulate` from
// the other), so that 2 · R · M loads of 16 bytes are in flight a lane. A chunk lies in one
// group. x, read by every row, is staged once a block in shared memory, loaded coalesced:
// scaled for the codes (above) and by the norm's gain, with each chunk's Σ x beside it, its
// float4s swizzled (float4 j of chunk c at j ^ SWIZZLE(c)) so that the 8 lanes of a 16-byte
// shared load phase, reading float4 j of chunks c .. c + 7, hit distinct banks. A launch has a
// warp a task (a block every R · THREADS / 32 rows, each staging x), whose first two chunks are
// fetched before x is staged, so that the weights' first loads wait beside the staging instead
// of after it. A grid of as many blocks as the device holds, warps taking tasks in fixed turns,
// was slower (session 26: 2.26 tasks a warp left a third of the run to the warps holding a
// third). Session 25 measured what the 4-bit products of an 8B model do
// without these: x read by each thread from global memory 32 columns at a time, 0.5 TB/s; a word
// a lane, 0.5-0.9 TB/s; staged, 4 words a lane, one load a row in flight, 0.70 TB/s (1.07 for
// gate and up).
#define CHUNK (4 * PER_WORD)
#define F (CHUNK / 4)
// F float4s a chunk: 4 at 8 bits (two chunks a phase share a key), 8 or 16 below.
#define SWIZZLE(c) (((c) / (F >= 8 ? 1 : 8 / F)) % F)

// 2²³'s bit pattern, read back from shared memory (`stage_x` writes it) so that the compiler
// cannot see it is a constant: each code's LOP3 then takes its mask as the immediate and the
// pattern from this one register. With both known, the pattern was the immediate and every
// mask a register rebuilt by a move before each use (session 26's SASS: a move for every two
// codes).
__shared__ u32 magic_slot;

// Stages x (⊙ gain) into xs [cols] and each chunk's Σ into csum [cols / CHUNK]; returns
// 1 / rms(x) with a gain (1 without).
__device__ __forceinline__ float stage_x(const float* x,
                                         const float* __restrict__ gain, float eps, int cols,
                                         float* xs, float* csum) {
    __shared__ float partial[THREADS / 32];
    if (threadIdx.x == 0) magic_slot = 0x4B000000u;
    float ss = 0.0f;
    // Thread t takes float4s t, t + THREADS, ...: F consecutive threads share a chunk (THREADS
    // is a multiple of F), and sum it by shuffles, every lane of a warp taking part in each
    // round (those past the end with zeros).
    for (int base = 0; base < cols / 4; base += THREADS) {
        const int f = base + threadIdx.x;
        float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (f < cols / 4) load_x(x, gain, f * 4, v, ss);
        const int c = f / F, j = f % F;
        float4 scaled;
        float* out = reinterpret_cast<float*>(&scaled);
        float sum = 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            sum += v[i];
            out[i] = v[i] * __uint_as_float((u32)(127 - code_shift((j * 4 + i) % PER_WORD)) << 23);
        }
        if (f < cols / 4) reinterpret_cast<float4*>(xs)[c * F + (j ^ SWIZZLE(c))] = scaled;
#pragma unroll
        for (int o = F / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
        if (j == 0 && f < cols / 4) csum[c] = sum;
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (!gain) return 1.0f;
    ss = 0.0f;
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) ss += partial[w];
    return rsqrtf(ss / (float)cols + eps);
}

// Σ code · x over word w (PER_WORD codes) against the staged, scaled x.
__device__ __forceinline__ float word_dot(u32 w, const float* xs, u32 magic) {
    const u32 hi = w >> HI;
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < PER_WORD; ++j) {
        const u32 part = j * BITS + BITS <= 23 ? w : hi;
        const u32 mask = ((1u << BITS) - 1) << code_shift(j);
        dot = fmaf(__uint_as_float((part & mask) | magic) - 8388608.0f, xs[j], dot);
    }
    return dot;
}

// The words of R rows of M matrices at one chunk, with each row's group scale and bias (zeros
// for rows past the task's end and chunks past the row's, which then add nothing).
template <int M>
struct Chunk {
    uint4 w[M][R];
    float scale[M][R], bias[M][R];
};

// Loads chunk c of the task's rows into k. Every load is made (rows past the task's end read
// its last row, chunks past the row's end its last chunk), its scale and bias zeroed instead:
// no branch around each load. The first chunks (EARLY) by plain loads, not `__ldg`: NVVM moves
// those freely, and sank them below `wait_for_previous` (`run`), where they were to be in
// flight already.
template <bool EARLY = false, int M>
__device__ __forceinline__ void fetch(const Task<M>& t, int c, int chunks, int cols,
                                      Chunk<M>& k) {
    const bool in = c < chunks;
    const int cc = in ? c : chunks - 1;
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const bool live = in && r < t.rows;
            const int row = t.first + min(r, t.rows - 1);
            const uint4* words = reinterpret_cast<const uint4*>(t.m[i].words) + (row * chunks + cc);
            k.w[i][r] = EARLY ? *words : __ldg(words);
            const int g = t.m[i].gshift;
            const int at = row * (cols >> g) + ((cc * CHUNK) >> g);
            const float scale = load(t.m[i].scales + at), bias = load(t.m[i].biases + at);
            k.scale[i][r] = live ? scale : 0.0f;
            k.bias[i][r] = live ? bias : 0.0f;
        }
}

// acc[i][r] += scale · Σ code · x + bias · Σ x over chunk c of row r of matrix i, x read from
// its staged copy (chunk 0's for a chunk past the end, whose scales and biases are zeros).
template <int M>
__device__ __forceinline__ void accumulate(const Chunk<M>& k, int c, int chunks,
                                           const float* csum, u32 magic, float (&acc)[M][R]) {
    extern __shared__ float4 staged[];
    c = c < chunks ? c : 0;
    float xc[CHUNK];
#pragma unroll
    for (int j = 0; j < F; ++j) {
        const float4 v = staged[c * F + (j ^ SWIZZLE(c))];
        xc[4 * j] = v.x, xc[4 * j + 1] = v.y, xc[4 * j + 2] = v.z, xc[4 * j + 3] = v.w;
    }
    const float xsum = csum[c];
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const u32 ws[4] = {k.w[i][r].x, k.w[i][r].y, k.w[i][r].z, k.w[i][r].w};
            float dot = 0.0f;
#pragma unroll
            for (int q = 0; q < 4; ++q) dot += word_dot(ws[q], xc + q * PER_WORD, magic);
            acc[i][r] = fmaf(k.scale[i][r], dot, fmaf(k.bias[i][r], xsum, acc[i][r]));
        }
}

// Runs a launch's `tasks` tasks (`at(t)` gives task t), a warp a task, over rmsnorm?(x), handing
// each output row's results to `emit(task, r, out)` (out[i]: matrix i's row task.first + r).
// Needs (cols + cols / CHUNK) floats of dynamic shared memory.
template <int M, class At, class Emit>
__device__ __forceinline__ void run(int tasks, At at, Emit emit, const float* x,
                                    const float* __restrict__ gain, float eps, int cols) {
    extern __shared__ float4 staged[];
    float* xs = reinterpret_cast<float*>(staged);
    float* csum = xs + cols;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int chunks = cols / CHUNK;
    // The warp's task (a launch has one for every warp but the last block's spare ones), its
    // first two chunks in flight while the kernel before finishes and x is staged.
    const int t = blockIdx.x * (THREADS / 32) + warp;
    const Task<M> task = at(min(t, tasks - 1));
    let_next_start();
    Chunk<M> a, b;
    fetch<true>(task, lane, chunks, cols, a);
    fetch<true>(task, lane + 32, chunks, cols, b);
    wait_for_previous();
    const float inv = stage_x(x, gain, eps, cols, xs, csum);
    if (t >= tasks) return;
    const u32 magic = *reinterpret_cast<volatile u32*>(&magic_slot);
    float acc[M][R];
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[i][r] = 0.0f;
    for (int c = lane; c < chunks; c += 64) {
        accumulate(a, c, chunks, csum, magic, acc);
        fetch(task, c + 64, chunks, cols, a);
        accumulate(b, c + 32, chunks, csum, magic, acc);
        fetch(task, c + 96, chunks, cols, b);
    }
    float out[M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int i = 0; i < M; ++i) {
            const float v = warp_sum(acc[i][r]);
            if (lane == r) out[i] = v * inv;
        }
    if (lane < task.rows) emit(task, lane, out);
}

__device__ __forceinline__ float element(const Matrix& m, int n, int c, int cols) {
    const u32 word = m.words[(i64)n * (cols / PER_WORD) + c / PER_WORD];
    const float q = (float)((word >> ((c % PER_WORD) * BITS)) & ((1u << BITS) - 1));
    const i64 g = (i64)n * (cols >> m.gshift) + (c >> m.gshift);
    return load(m.scales + g) * q + load(m.biases + g);
}
#define MATRIX_PARAMS(i) const u32 *words##i, const scale_t *scales##i, const scale_t *qbias##i, int gshift##i
#define MATRIX(i) Matrix{words##i, scales##i, qbias##i, gshift##i}
#elif defined(DENSE_T)
typedef DENSE_T dense_t;
// The prompt pass's GEMMs read the matrix as it is held.
typedef dense_t gemm_t;
struct Matrix {
    const dense_t* w;
};

// R rows of M matrices from row n0 times x, 16 bytes of each row (8 bf16 or 4 f32 values) a
// thread at a time; a bf16 row reads x rounded to bf16, as the op-by-op path casts a GEMM's
// input to its weight's dtype.
template <int M>
__device__ __forceinline__ void rows_dot(const Matrix (&m)[M], int n0, int rows,
                                         const float* x, const float* __restrict__ gain,
                                         int cols,
                                         float (&acc)[M][R], float& ss) {
    constexpr int V = 16 / sizeof(dense_t);
    for (int c = threadIdx.x * V; c < cols; c += THREADS * V) {
        float xs[V];
        load_x(x, gain, c, xs, ss);
        if constexpr (sizeof(dense_t) == 2) {
#pragma unroll
            for (int j = 0; j < V; ++j) xs[j] = round_bf16(xs[j]);
        }
        uint4 w[M][R];
#pragma unroll
        for (int i = 0; i < M; ++i)
#pragma unroll
            for (int r = 0; r < R; ++r)
                if (r < rows) w[i][r] = __ldg(reinterpret_cast<const uint4*>(m[i].w + (i64)(n0 + r) * cols + c));
#pragma unroll
        for (int i = 0; i < M; ++i)
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (r >= rows) break;
                const u32 ws[4] = {w[i][r].x, w[i][r].y, w[i][r].z, w[i][r].w};
                if constexpr (sizeof(dense_t) == 2) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        acc[i][r] = fmaf(__uint_as_float(ws[j] << 16), xs[2 * j], acc[i][r]);
                        acc[i][r] = fmaf(__uint_as_float(ws[j] & 0xffff0000u), xs[2 * j + 1], acc[i][r]);
                    }
                } else {
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][r] = fmaf(__uint_as_float(ws[j]), xs[j], acc[i][r]);
                }
            }
    }
}

// The block's sums: on return, thread r < R of the block holds acc[i][r] summed over the block's
// threads in acc[i][0] ... (every i), and the block's Σ x² in ss.
template <int M>
__device__ __forceinline__ void block_sum(float (&acc)[M][R], float& ss) {
    __shared__ float partial[THREADS / 32][M * R + 1];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float v = warp_sum(acc[i][r]);
            if (lane == 0) partial[warp][i * R + r] = v;
        }
    ss = warp_sum(ss);
    if (lane == 0) partial[warp][M * R] = ss;
    __syncthreads();
    if (threadIdx.x < R) {
        ss = 0.0f;
        for (int w = 0; w < THREADS / 32; ++w) ss += partial[w][M * R];
#pragma unroll
        for (int i = 0; i < M; ++i) {
            float v = 0.0f;
            for (int w = 0; w < THREADS / 32; ++w) v += partial[w][i * R + threadIdx.x];
            acc[i][0] = v;
        }
    }
}


// Runs a launch's `tasks` tasks (`at(t)` gives task t), a block a task, over rmsnorm?(x),
// handing each output row's results to `emit(task, r, out)` (out[i]: matrix i's row task.first
// + r), from thread r of the block.
template <int M, class At, class Emit>
__device__ __forceinline__ void run(int tasks, At at, Emit emit, const float* x,
                                    const float* __restrict__ gain, float eps, int cols) {
    let_next_start();
    wait_for_previous();
    for (int t = blockIdx.x; t < tasks; t += gridDim.x) {
        const Task<M> task = at(t);
        float acc[M][R], ss = 0.0f;
#pragma unroll
        for (int i = 0; i < M; ++i)
#pragma unroll
            for (int r = 0; r < R; ++r) acc[i][r] = 0.0f;
        rows_dot(task.m, task.first, task.rows, x, gain, cols, acc, ss);
        block_sum(acc, ss);
        const int r = threadIdx.x;
        if (r < task.rows) {
            const float inv = gain ? rsqrtf(ss / (float)cols + eps) : 1.0f;
            float out[M];
#pragma unroll
            for (int i = 0; i < M; ++i) out[i] = acc[i][0] * inv;
            emit(task, r, out);
        }
        __syncthreads();  // block_sum's shared sums are the next task's
    }
}

__device__ __forceinline__ float element(const Matrix& m, int n, int c, int cols) {
    return load(m.w + (i64)n * cols + c);
}
#define MATRIX_PARAMS(i) const dense_t *w##i
#define MATRIX(i) Matrix{w##i}
#else
#error "compile with -DDENSE_T=bf16|float or -DBITS=2|4|8"
#endif

#ifndef KV_T
#error "compile with -DKV_T=bf16|float"
#endif
typedef KV_T kv_t;

// y_i = rmsnorm?(x) W_iᵀ (+ bias_i) (+ residual_i) for up to three matrices read by one launch
// (q, k and v share theirs): the tasks cover the first matrix's rows, R at a time, then the
// second's, then the third's. A null gain, bias or residual is left out; residual may be y
// itself (h += o Woᵀ).
extern "C" __global__ void __launch_bounds__(THREADS)
    linear(const float* x, const float* __restrict__ gain, float eps, int cols,
           MATRIX_PARAMS(0), const float* bias0, const float* residual0, float* y0, int n0,
           MATRIX_PARAMS(1), const float* bias1, float* y1, int n1, MATRIX_PARAMS(2),
           const float* bias2, float* y2, int n2) {
    const int t0 = (n0 + R - 1) / R, t1 = (n1 + R - 1) / R, t2 = (n2 + R - 1) / R;
    const auto at = [&](int t) {
        Task<1> task;
        task.seg = t < t0 ? 0 : t < t0 + t1 ? 1 : 2;
        task.m[0] = task.seg == 0 ? MATRIX(0) : task.seg == 1 ? MATRIX(1) : MATRIX(2);
        task.first = (t - (task.seg == 0 ? 0 : task.seg == 1 ? t0 : t0 + t1)) * R;
        task.rows = min(R, (task.seg == 0 ? n0 : task.seg == 1 ? n1 : n2) - task.first);
        return task;
    };
    const auto emit = [&](const Task<1>& task, int r, const float (&out)[1]) {
        const int row = task.first + r;
        const float* bias = task.seg == 0 ? bias0 : task.seg == 1 ? bias1 : bias2;
        float* y = task.seg == 0 ? y0 : task.seg == 1 ? y1 : y2;
        float v = out[0];
        if (bias) v += bias[row];
        if (task.seg == 0 && residual0) v += residual0[row];
        y[row] = v;
    };
    run<1>(t0 + t1 + t2, at, emit, x, gain, eps, cols);
}

// y = silu(a W_gᵀ) ⊙ (a W_uᵀ), a = rmsnorm(x) ⊙ gain: a task takes R gate rows and the same up
// rows.
extern "C" __global__ void __launch_bounds__(THREADS)
    gated(const float* x, const float* __restrict__ gain, float eps, int cols,
          MATRIX_PARAMS(0), MATRIX_PARAMS(1), float* y, int n_out) {
    const auto at = [&](int t) {
        Task<2> task;
        task.m[0] = MATRIX(0), task.m[1] = MATRIX(1);
        task.first = t * R, task.rows = min(R, n_out - task.first), task.seg = 0;
        return task;
    };
    const auto emit = [&](const Task<2>& task, int r, const float (&out)[2]) {
        const float g = out[0], u = out[1];
        y[task.first + r] = g / (1.0f + expf(-g)) * u;
    };
    run<2>((n_out + R - 1) / R, at, emit, x, gain, eps, cols);
}

// The step's token and position are read from `step` ({id, position}, written before each
// step), not passed by value, so that a step's launches are the same every step and replay as
// one CUDA graph (`decode.rs`). Not `__restrict__`: the compiler would then read it through the
// read-only cache before the kernel's wait, safe only while no kernel ever writes it.

// Row t of y = row ids[t] of the matrix (the embedding lookup), in f32; a step passes `step` as
// `ids` (its token first), the prompt pass its tokens, a row of blocks each (grid.y).
extern "C" __global__ void embed(MATRIX_PARAMS(0), const int* ids, int cols, float* y) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    let_next_start();
    wait_for_previous();
    if (c < cols) y[(i64)t * cols + c] = element(MATRIX(0), ids[t], c, cols);
}

// ---------------------------------------------------------------------------------------------
// RoPE (rotate_half layout) of q's `heads` and k's `kv_heads` heads at position step[1] + t for
// row t (grid.y: one row for a step, the prompt's tokens for the prompt pass), in place for q;
// k rotated and v copied into the caches' row of that position. One block a head and row, d/2
// threads, thread i rotating the pair (i, i + d/2) with angle pos · inv_freq[i].
extern "C" __global__ void rope_append(float* q, const float* k, const float* v, kv_t* kc,
                                       kv_t* vc,
                                       const float* __restrict__ inv_freq,
                                       const int* step, int heads, int kv_heads,
                                       int d, int capacity) {
    let_next_start();
    wait_for_previous();
    const int h = blockIdx.x, t = blockIdx.y, i = threadIdx.x, half = d / 2, pos = step[1] + t;
    const float angle = (float)pos * inv_freq[i];
    const float c = cosf(angle), s = sinf(angle);
    if (h < heads) {
        float* x = q + ((i64)t * heads + h) * d;
        const float a = x[i], b = x[i + half];
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
        return;
    }
    const int kh = h - heads;
    const i64 row = ((i64)t * kv_heads + kh) * d;
    const float a = k[row + i], b = k[row + i + half];
    kv_t* krow = kc + ((i64)kh * capacity + pos) * d;
    kv_t* vrow = vc + ((i64)kh * capacity + pos) * d;
    store(krow + i, a * c - b * s);
    store(krow + i + half, b * c + a * s);
    store(vrow + i, v[row + i]);
    store(vrow + i + half, v[row + i + half]);
}

// The 16-byte vector `raw` of a key or value row as KV values.
#define KV_V (16 / (int)sizeof(kv_t))
__device__ __forceinline__ void unpack(uint4 raw, float (&v)[KV_V]) {
    const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if constexpr (sizeof(kv_t) == 4) {
            v[i] = __uint_as_float(w[i]);
        } else {
            v[2 * i] = __uint_as_float(w[i] << 16);
            v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    }
}

// o[h] = softmax(q[h] · K[g]ᵀ · scale) V[g] over the first len = step[1] + 1 + t cached
// positions for row t (grid.y; each of the prompt pass's rows sees the keys up to its own),
// g = h / (heads / kv_heads). One block of 256 threads a query head and row; the scores go
// through `scores` ([rows][heads][capacity] f32 scratch). Every row is read 16 bytes a load:
// - scores: 8 lanes a position, lane i taking the row's vectors i, i + 8, ... against the query's
//   same values held in registers, so a warp has 4 positions and the block 32 in flight;
// - values: a thread a vector of the row's d / KV_V, the block's threads split into
//   256 / (d / KV_V) ways, each way summing every ways-th position, then the ways added up.
// Needs d a multiple of 8 · KV_V (`decode.rs` checks). Session 26's kernel, a warp a position's
// score and a thread a column of the values, took 10.9 µs a block at ~100 positions of an 8B
// model (H200); a thread a position, 14.2.
extern "C" __global__ void __launch_bounds__(256)
    attend(const float* q, const kv_t* kc, const kv_t* vc, float* o, float* scores,
           const int* step, int heads, int kv_heads, int d, int capacity,
           float scale) {
    constexpr int MAX_LOADS = 256 / (8 * KV_V);  // a lane's vectors of a key row (d ≤ 256)
    let_next_start();
    wait_for_previous();
    const int t = blockIdx.y, len = step[1] + 1 + t;
    __shared__ float partial[8];
    __shared__ float acc[256 * KV_V];
    const int h = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = h / (heads / kv_heads);
    const i64 head = (i64)t * heads + h;
    const float* qh = q + head * d;
    const uint4* keys = reinterpret_cast<const uint4*>(kc + (i64)g * capacity * d);
    const uint4* values = reinterpret_cast<const uint4*>(vc + (i64)g * capacity * d);
    float* s = scores + head * capacity;
    const int sub = lane & 7, slot = lane >> 3, loads = d / (8 * KV_V), vecs = d / KV_V;
    float qr[MAX_LOADS][KV_V];
#pragma unroll
    for (int u = 0; u < MAX_LOADS; ++u)
#pragma unroll
        for (int e = 0; e < KV_V; ++e) qr[u][e] = u < loads ? qh[(sub + 8 * u) * KV_V + e] : 0.0f;
    float m = -3.402823466e38f;
    for (int j0 = warp * 4; j0 < len; j0 += 32) {
        const int j = j0 + slot, row = min(j, len - 1);
        float dot = 0.0f;
#pragma unroll
        for (int u = 0; u < MAX_LOADS; ++u) {
            if (u < loads) {
                float k[KV_V];
                unpack(keys[(i64)row * vecs + sub + 8 * u], k);
#pragma unroll
                for (int e = 0; e < KV_V; ++e) dot = fmaf(qr[u][e], k[e], dot);
            }
        }
#pragma unroll
        for (int x = 4; x > 0; x >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, x);
        dot *= scale;
        if (j < len) {
            if (sub == 0) s[j] = dot;
            m = fmaxf(m, dot);
        }
    }
    m = warp_max(m);
    if (lane == 0) partial[warp] = m;
    __syncthreads();
    m = partial[0];
    for (int w = 1; w < 8; ++w) m = fmaxf(m, partial[w]);
    __syncthreads();
    float total = 0.0f;
    for (int j = threadIdx.x; j < len; j += 256) {
        const float e = expf(s[j] - m);
        s[j] = e;
        total += e;
    }
    total = warp_sum(total);
    if (lane == 0) partial[warp] = total;
    __syncthreads();
    total = 0.0f;
    for (int w = 0; w < 8; ++w) total += partial[w];
    const int ways = 256 / vecs, vec = threadIdx.x % vecs, way = threadIdx.x / vecs;
    float sum[KV_V];
#pragma unroll
    for (int e = 0; e < KV_V; ++e) sum[e] = 0.0f;
    if (way < ways)
        for (int j = way; j < len; j += ways) {
            float v[KV_V];
            unpack(values[(i64)j * vecs + vec], v);
            const float p = s[j];
#pragma unroll
            for (int e = 0; e < KV_V; ++e) sum[e] = fmaf(p, v[e], sum[e]);
        }
#pragma unroll
    for (int e = 0; e < KV_V; ++e) acc[way * d + vec * KV_V + e] = sum[e];
    __syncthreads();
    if (threadIdx.x < d) {
        float out = 0.0f;
        for (int w = 0; w < ways; ++w) out += acc[w * d + threadIdx.x];
        o[head * d + threadIdx.x] = out / total;
    }
}

// ---------------------------------------------------------------------------------------------
// The prompt pass (`decode/prefill.rs`): a prompt's tokens through every block at once, the
// products as cuBLAS GEMMs over `gemm_t` inputs (the matrix's type; packed matrices dequantized
// a slab of rows at a time by `dequant.cu`), the same `embed`, `rope_append` and `attend` as a step over one
// row a token (grid.y), and these between them, in the op-by-op path's roundings: each writes
// its result in `gemm_t`, the type the op-by-op path casts a GEMM's input to. These are launched
// the usual way, never overlapped (they do not wait, and read through `__restrict__`).

// y[row] = x[row] / rms(x[row]) ⊙ gain, one block of 256 threads a row.
extern "C" __global__ void __launch_bounds__(256)
    rmsnorm_rows(const float* __restrict__ x, const float* __restrict__ gain, float eps, int cols,
                 gemm_t* __restrict__ y) {
    __shared__ float partial[8];
    const i64 row = (i64)blockIdx.x * cols;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += 256) ss = fmaf(x[row + c], x[row + c], ss);
    ss = warp_sum(ss);
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    ss = 0.0f;
#pragma unroll
    for (int w = 0; w < 8; ++w) ss += partial[w];
    const float inv = rsqrtf(ss / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += 256) store(y + row + c, x[row + c] * inv * gain[c]);
}

// y = silu(g) ⊙ u over n values.
extern "C" __global__ void silu_mul(const float* __restrict__ g, const float* __restrict__ u,
                                    gemm_t* __restrict__ y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) store(y + i, g[i] / (1.0f + expf(-g[i])) * u[i]);
}

// y[row] += bias over rows of n values (total values in all).
extern "C" __global__ void add_bias(float* __restrict__ y, const float* __restrict__ bias, int n,
                                    int total) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) y[i] += bias[i % n];
}

// y = x over n values, in the GEMM's input type.
extern "C" __global__ void to_gemm(const float* __restrict__ x, gemm_t* __restrict__ y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) store(y + i, x[i]);
}

// y[r, c] (+)= Σ_s part[s][r, c] over a split product's `splits` parts of rows × cols floats
// each (`qgemm.cu`'s), in the order of the parts; y has ldy floats a row.
extern "C" __global__ void sum_splits(const float* __restrict__ part, float* __restrict__ y,
                                      int cols, int ldy, int n, int splits, int accumulate) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += part[(i64)s * n + i];
    float* at = y + (i64)(i / cols) * ldy + i % cols;
    *at = accumulate ? *at + sum : sum;
}
