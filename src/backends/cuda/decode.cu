// The decode step's kernels (`decode.rs`): one token of a Llama-shaped model in eight launches
// a block, every buffer allocated once, instead of the few dozen Burn ops a block that left an
// 8B model's step host-bound on an H200 (bench/NOTES.md, session 24).
//
//   h   = embed(id)
//   a   = rmsnorm(h) ⊙ w                                       rms_norm
//   q,k,v = a Wqᵀ + bq, a Wkᵀ + bk, a Wvᵀ + bv                  linear (three segments)
//   q,k = rope(q, k) at position p; K[p], V[p] = k, v          rope_append
//   o   = softmax(q Kᵀ · scale) V   (each query head on its group's key head)   attend
//   h  += o Woᵀ                                                linear (residual)
//   h  += (silu(a Wgᵀ) ⊙ a Wuᵀ) Wdᵀ,  a = rmsnorm(h) ⊙ w       rms_norm, gated, linear
//   logits = rmsnorm(h) W_headᵀ
//
// A matrix is dense (bf16 or f32 `[n, cols]`) or MLX-affine packed (`qgemv.cu` has the math):
// `DENSE_T` picks the one a module is compiled for (`-DDENSE_T=bf16|float`, or `-DBITS=2|4|8`
// with `-DSCALE_T=bf16|float` for packed ones). As in the op-by-op path, a dense bf16 matrix
// reads its input rounded to bf16 (the op-by-op path casts a GEMM's input to the weight's
// dtype); a packed one reads it in f32 (where the op-by-op path, with bf16 scales, rounds it:
// within the device check's bf16 tolerance). Sums are f32. Every product is a GEMV: one warp an output row, its lanes reading the row coalesced once.
// The keys and values are held as `KV_T` (bf16 or f32, `-DKV_T`), `[kv_heads][capacity][d]`.

#define WARPS 4

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

// ---------------------------------------------------------------------------------------------
// R consecutive rows of a matrix times the activation row x: each lane's partial sums (reduced
// by the caller). A warp takes R rows so that each chunk of x, loaded once into registers,
// serves R rows, and R loads of the matrix are in flight at once: the 4-bit products of an 8B
// model went from 10 to 6 ms a token with it on an H200 (bf16 ones stayed near 2 TB/s of the
// card's 4.8; bench/NOTES.md, session 24).

#define R 4

#if defined(BITS)
#define PER_WORD (32 / BITS)
#ifndef SCALE_T
#error "packed matrices need -DSCALE_T=bf16|float"
#endif
typedef SCALE_T scale_t;
// A packed matrix: words [n][cols / PER_WORD], scales and biases [n][cols / group].
struct Matrix {
    const u32* words;
    const scale_t* scales;
    const scale_t* biases;
    int group;
};

// Lanes take 4 consecutive words (16 bytes, 4 · PER_WORD columns) of each row at a time: the
// row's words are a multiple of 4 (`decode.rs` checks). For each word, Σ q·x and Σ x over its
// columns, scaled and offset by its group's scale and bias.
// Lanes take 4 consecutive words (16 bytes, 4 · PER_WORD columns) of each row at a time: the
// row's words are a multiple of 4 (`decode.rs` checks). For each word, Σ q·x and Σ x over its
// columns, scaled and offset by its group's scale and bias.
__device__ __forceinline__ void rows_dot(const Matrix& m, int n0, int rows,
                                         const float* __restrict__ x, int cols, int lane,
                                         float acc[R]) {
    constexpr int COLS = 4 * PER_WORD;
    const int quads = cols / COLS;
    const int groups = cols / m.group;
    for (int q = lane; q < quads; q += 32) {
        const int k0 = q * COLS;
        float xs[COLS];
#pragma unroll
        for (int j = 0; j < COLS; j += 4) {
            const float4 v = *reinterpret_cast<const float4*>(x + k0 + j);
            xs[j] = v.x, xs[j + 1] = v.y, xs[j + 2] = v.z, xs[j + 3] = v.w;
        }
        uint4 w[R];
#pragma unroll
        for (int r = 0; r < R; ++r)
            if (r < rows) w[r] = __ldg(reinterpret_cast<const uint4*>(m.words) + (i64)(n0 + r) * quads + q);
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (r >= rows) break;
            const u32 words[4] = {w[r].x, w[r].y, w[r].z, w[r].w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const i64 g = (i64)(n0 + r) * groups + (k0 + i * PER_WORD) / m.group;
                float dot = 0.0f, sum = 0.0f;
#pragma unroll
                for (int j = 0; j < PER_WORD; ++j) {
                    const float xj = xs[i * PER_WORD + j];
                    dot = fmaf((float)((words[i] >> (j * BITS)) & ((1u << BITS) - 1)), xj, dot);
                    sum += xj;
                }
                acc[r] = fmaf(load(m.scales + g), dot, fmaf(load(m.biases + g), sum, acc[r]));
            }
        }
    }
}

__device__ __forceinline__ float element(const Matrix& m, int n, int c, int cols) {
    const u32 word = m.words[(i64)n * (cols / PER_WORD) + c / PER_WORD];
    const float q = (float)((word >> ((c % PER_WORD) * BITS)) & ((1u << BITS) - 1));
    const i64 g = (i64)n * (cols / m.group) + c / m.group;
    return load(m.scales + g) * q + load(m.biases + g);
}
#define MATRIX_PARAMS(i) const u32 *words##i, const scale_t *scales##i, const scale_t *qbias##i, int group##i
#define MATRIX(i) Matrix{words##i, scales##i, qbias##i, group##i}
#elif defined(DENSE_T)
typedef DENSE_T dense_t;
struct Matrix {
    const dense_t* w;
};

// Lanes take 16 bytes of each row at a time (8 bf16 or 4 f32 values); a bf16 row reads x
// rounded to bf16, as the op-by-op path casts a GEMM's input to its weight's dtype.
__device__ __forceinline__ void rows_dot(const Matrix& m, int n0, int rows,
                                         const float* __restrict__ x, int cols, int lane,
                                         float acc[R]) {
    constexpr int V = 16 / sizeof(dense_t);
    for (int c = lane * V; c < cols; c += 32 * V) {
        float xs[V];
#pragma unroll
        for (int j = 0; j < V; j += 4) {
            const float4 v = *reinterpret_cast<const float4*>(x + c + j);
            xs[j] = v.x, xs[j + 1] = v.y, xs[j + 2] = v.z, xs[j + 3] = v.w;
        }
        if constexpr (sizeof(dense_t) == 2) {
#pragma unroll
            for (int j = 0; j < V; ++j) xs[j] = round_bf16(xs[j]);
        }
        uint4 w[R];
#pragma unroll
        for (int r = 0; r < R; ++r)
            if (r < rows) w[r] = __ldg(reinterpret_cast<const uint4*>(m.w + (i64)(n0 + r) * cols + c));
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (r >= rows) break;
            const u32 ws[4] = {w[r].x, w[r].y, w[r].z, w[r].w};
            if constexpr (sizeof(dense_t) == 2) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    acc[r] = fmaf(__uint_as_float(ws[j] << 16), xs[2 * j], acc[r]);
                    acc[r] = fmaf(__uint_as_float(ws[j] & 0xffff0000u), xs[2 * j + 1], acc[r]);
                }
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[r] = fmaf(__uint_as_float(ws[j]), xs[j], acc[r]);
            }
        }
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

// ---------------------------------------------------------------------------------------------
// y_i = x W_iᵀ (+ bias_i) (+ residual_i) for up to three matrices read by one launch (q, k and v
// share theirs): warp t takes rows R·t.. of the first matrix's ⌈n0 / R⌉ row groups, then the
// second's, then the third's. A null bias or residual is left out; residual may be y itself
// (h += o Woᵀ).
extern "C" __global__ void __launch_bounds__(WARPS * 32)
    linear(const float* __restrict__ x, int cols, MATRIX_PARAMS(0), const float* bias0,
           const float* residual0, float* y0, int n0, MATRIX_PARAMS(1), const float* bias1,
           float* y1, int n1, MATRIX_PARAMS(2), const float* bias2, float* y2, int n2) {
    const int lane = threadIdx.x & 31;
    int t = blockIdx.x * WARPS + (threadIdx.x >> 5);
    const int t0 = (n0 + R - 1) / R, t1 = (n1 + R - 1) / R, t2 = (n2 + R - 1) / R;
    Matrix m;
    const float* bias;
    const float* residual = nullptr;
    float* y;
    int n;
    if (t < t0) {
        m = MATRIX(0), bias = bias0, residual = residual0, y = y0, n = n0;
    } else if ((t -= t0) < t1) {
        m = MATRIX(1), bias = bias1, y = y1, n = n1;
    } else if ((t -= t1) < t2) {
        m = MATRIX(2), bias = bias2, y = y2, n = n2;
    } else {
        return;
    }
    const int first = t * R, rows = min(R, n - first);
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.0f;
    rows_dot(m, first, rows, x, cols, lane, acc);
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const float v = warp_sum(acc[r]);
        if (lane == 0 && r < rows) {
            float out = v;
            if (bias) out += bias[first + r];
            if (residual) out += residual[first + r];
            y[first + r] = out;
        }
    }
}

// y = silu(x W_gᵀ) ⊙ (x W_uᵀ): R gate rows and the same up rows a warp.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
    gated(const float* __restrict__ x, int cols, MATRIX_PARAMS(0), MATRIX_PARAMS(1), float* y,
          int n_out) {
    const int lane = threadIdx.x & 31;
    const int first = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * R;
    if (first >= n_out) return;
    const int rows = min(R, n_out - first);
    float g[R], u[R];
#pragma unroll
    for (int r = 0; r < R; ++r) g[r] = u[r] = 0.0f;
    rows_dot(MATRIX(0), first, rows, x, cols, lane, g);
    rows_dot(MATRIX(1), first, rows, x, cols, lane, u);
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const float gr = warp_sum(g[r]), ur = warp_sum(u[r]);
        if (lane == 0 && r < rows) y[first + r] = gr / (1.0f + expf(-gr)) * ur;
    }
}

// y = row `id` of the matrix (the embedding lookup), in f32.
extern "C" __global__ void embed(MATRIX_PARAMS(0), int id, int cols, float* y) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < cols) y[c] = element(MATRIX(0), id, c, cols);
}

// ---------------------------------------------------------------------------------------------
// y = x / √(mean(x²) + ε) ⊙ w over one row of n; one block of 1024 threads.
extern "C" __global__ void __launch_bounds__(1024)
    rms_norm(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
             int n, float eps) {
    __shared__ float partial[32];
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss = fmaf(x[i], x[i], ss);
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.0f;
        t = warp_sum(t);
        if (threadIdx.x == 0) partial[0] = t;
    }
    __syncthreads();
    const float inv = 1.0f / sqrtf(partial[0] / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = x[i] * inv * w[i];
}

// RoPE (rotate_half layout) of q's `heads` and k's `kv_heads` heads at position `pos`, in
// place for q; k rotated and v copied into the caches' row `pos`. One block a head, d/2
// threads, thread i rotating the pair (i, i + d/2) with angle pos · inv_freq[i].
extern "C" __global__ void rope_append(float* q, const float* __restrict__ k,
                                       const float* __restrict__ v, kv_t* kc, kv_t* vc,
                                       const float* __restrict__ inv_freq, int pos, int heads,
                                       int kv_heads, int d, int capacity) {
    const int h = blockIdx.x, i = threadIdx.x, half = d / 2;
    const float angle = (float)pos * inv_freq[i];
    const float c = cosf(angle), s = sinf(angle);
    if (h < heads) {
        float* x = q + (i64)h * d;
        const float a = x[i], b = x[i + half];
        x[i] = a * c - b * s;
        x[i + half] = b * c + a * s;
        return;
    }
    const int kh = h - heads;
    const float* x = k + (i64)kh * d;
    const float a = x[i], b = x[i + half];
    kv_t* krow = kc + ((i64)kh * capacity + pos) * d;
    kv_t* vrow = vc + ((i64)kh * capacity + pos) * d;
    store(krow + i, a * c - b * s);
    store(krow + i + half, b * c + a * s);
    store(vrow + i, v[(i64)kh * d + i]);
    store(vrow + i + half, v[(i64)kh * d + i + half]);
}

// o[h] = softmax(q[h] · K[g]ᵀ · scale) V[g] over the first `len` cached positions, g = h / (heads
// / kv_heads). One block of 256 threads a query head; the scores go through `scores` ([heads]
// [capacity] f32 scratch).
extern "C" __global__ void __launch_bounds__(256)
    attend(const float* __restrict__ q, const kv_t* __restrict__ kc,
           const kv_t* __restrict__ vc, float* __restrict__ o, float* __restrict__ scores,
           int heads, int kv_heads, int d, int len, int capacity, float scale) {
    __shared__ float partial[8];
    __shared__ float acc[256];
    const int h = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = h / (heads / kv_heads);
    const float* qh = q + (i64)h * d;
    const kv_t* keys = kc + (i64)g * capacity * d;
    const kv_t* values = vc + (i64)g * capacity * d;
    float* s = scores + (i64)h * capacity;
    for (int j = warp; j < len; j += 8) {
        float dot = 0.0f;
        for (int c = lane; c < d; c += 32) dot = fmaf(qh[c], load(keys + (i64)j * d + c), dot);
        dot = warp_sum(dot);
        if (lane == 0) s[j] = dot * scale;
    }
    __syncthreads();
    float m = -3.402823466e38f;
    for (int j = threadIdx.x; j < len; j += 256) m = fmaxf(m, s[j]);
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
    // Threads split as `ways` groups of d columns; each group sums every ways-th position.
    const int ways = 256 / d;
    const int c = threadIdx.x % d, way = threadIdx.x / d;
    float sum = 0.0f;
    if (way < ways)
        for (int j = way; j < len; j += ways) sum = fmaf(s[j], load(values + (i64)j * d + c), sum);
    acc[threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x < d) {
        float out = 0.0f;
        for (int w = 0; w < ways; ++w) out += acc[w * d + threadIdx.x];
        o[(i64)h * d + threadIdx.x] = out / total;
    }
}
