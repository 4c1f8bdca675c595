// The product of a few rows of activations with an MLX-affine packed matrix, read packed
// (decoding: one to eight rows a step), instead of dequantizing the whole matrix first:
//
//   y[m, n] = Σ_k x[m, k] · W[n, k],   W[n, k] = s[n, g] · q[n, k] + b[n, g],   g = k / group
//           = Σ_g ( s[n, g] · Σ_{k∈g} q[n, k] · x[m, k]  +  b[n, g] · Σ_{k∈g} x[m, k] )
//
// (`dequant.cu` has the packing.) One warp per output n: its lanes take consecutive packed
// words of row n (each word PER_WORD codes of one group), so the warp reads the row's words
// coalesced once, and for each of the M activation rows accumulates the word's dot product in
// f32; a shuffle reduction then sums the lanes. The activations (f32) are small and re-read by
// every warp from L1/L2. The weight is read once a step: bits/8 bytes a weight plus its group's
// scale and bias, where dequantize-then-GEMV wrote and read 4 bytes a weight more.
// Compiled by NVRTC (`qgemv.rs`) with -DBITS=2, 4 or 8.

#ifndef BITS
#error "compile with -DBITS=<2, 4 or 8>"
#endif

#define PER_WORD (32 / BITS)
#define WARPS 4
#define MAX_ROWS 8

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ float load(const u16* src) {
    return __uint_as_float((u32)*src << 16);
}

__device__ __forceinline__ float load(const float* src) { return *src; }

// x: [rows][cols] f32; words: [n_out][cols / PER_WORD]; scales, biases: [n_out][cols / group];
// y: [rows][n_out] f32. Grid ⌈n_out / WARPS⌉ blocks of WARPS warps.
template <typename Scale>
__device__ __forceinline__ void qgemv(const float* __restrict__ x, const u32* __restrict__ words,
                                      const Scale* __restrict__ scales,
                                      const Scale* __restrict__ biases, float* __restrict__ y,
                                      int rows, int cols, int n_out, int group) {
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (n >= n_out) return;
    const int words_per_row = cols / PER_WORD;
    const int groups = cols / group;
    const u32* row = words + (long long)n * words_per_row;
    float acc[MAX_ROWS];
#pragma unroll
    for (int m = 0; m < MAX_ROWS; ++m) acc[m] = 0.0f;
    for (int w = lane; w < words_per_row; w += 32) {
        const u32 word = row[w];
        const int k0 = w * PER_WORD;
        const int g = k0 / group;
        const float s = load(scales + (long long)n * groups + g);
        const float b = load(biases + (long long)n * groups + g);
        float q[PER_WORD];
#pragma unroll
        for (int j = 0; j < PER_WORD; ++j) q[j] = (float)((word >> (j * BITS)) & ((1u << BITS) - 1));
#pragma unroll
        for (int m = 0; m < MAX_ROWS; ++m) {
            if (m < rows) {
                const float* xm = x + (long long)m * cols + k0;
                float dot = 0.0f, sum = 0.0f;
#pragma unroll
                for (int j = 0; j < PER_WORD; ++j) {
                    dot = fmaf(q[j], xm[j], dot);
                    sum += xm[j];
                }
                acc[m] = fmaf(s, dot, fmaf(b, sum, acc[m]));
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MAX_ROWS; ++m) {
        if (m < rows) {
            float v = acc[m];
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
            if (lane == 0) y[(long long)m * n_out + n] = v;
        }
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
    qgemv_bf16(const float* x, const u32* words, const u16* scales, const u16* biases, float* y,
               int rows, int cols, int n_out, int group) {
    qgemv(x, words, scales, biases, y, rows, cols, n_out, group);
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
    qgemv_f32(const float* x, const u32* words, const float* scales, const float* biases,
              float* y, int rows, int cols, int n_out, int group) {
    qgemv(x, words, scales, biases, y, rows, cols, n_out, group);
}
