// Dequantization of an MLX-affine packed matrix (`src/model/device_quant.rs` has the layout):
//
//   q[r, w·k + j] = (words[r, w] >> (j·BITS)) & (2^BITS − 1)        k = 32 / BITS codes a word
//   W[r, c]       = scales[r, c / group] · q[r, c] + biases[r, c / group]
//
// in one pass: each thread reads one packed word and its group's scale and bias, and writes its
// k values in bf16 (what the GEMM reads; the scales and biases are then bf16 too, as MLX stores
// them) or f32 (f32 scales and biases). A word never straddles a group (the group is a
// multiple of k). Compiled by NVRTC (`src/gpu/dequant.rs`) with -DBITS=2, 4 or 8.

#ifndef BITS
#error "compile with -DBITS=<2, 4 or 8>"
#endif

#define PER_WORD (32 / BITS)
#define THREADS 256

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;

__device__ __forceinline__ void store(u16* dst, const float* v) {
    u32* pairs = reinterpret_cast<u32*>(dst);
#pragma unroll
    for (int j = 0; j < PER_WORD; j += 2) pairs[j / 2] = pack_bf16(v[j], v[j + 1]);
}

__device__ __forceinline__ float load(const u16* src) {
    return __uint_as_float((u32)*src << 16);
}

__device__ __forceinline__ float load(const float* src) { return *src; }

__device__ __forceinline__ void store(float* dst, const float* v) {
#pragma unroll
    for (int j = 0; j < PER_WORD; ++j) dst[j] = v[j];
}

// Word i (of `words_per_row` a row) to its k values in out ([rows][words_per_row · k]).
template <typename Out>
__device__ __forceinline__ void dequantize(const u32* words, const Out* scales,
                                           const Out* biases, Out* out, i64 n_words,
                                           int words_per_row, int group) {
    const i64 i = (i64)blockIdx.x * THREADS + threadIdx.x;
    if (i >= n_words) return;
    const i64 row = i / words_per_row;
    const int col = (int)(i % words_per_row) * PER_WORD;
    const int groups = words_per_row * PER_WORD / group;
    const float scale = load(scales + row * groups + col / group);
    const float bias = load(biases + row * groups + col / group);
    const u32 word = words[i];
    float v[PER_WORD];
#pragma unroll
    for (int j = 0; j < PER_WORD; ++j) {
        v[j] = scale * (float)((word >> (j * BITS)) & ((1u << BITS) - 1)) + bias;
    }
    store(out + i * PER_WORD, v);
}

// Grid ⌈n_words / THREADS⌉, for a bf16 output (bf16 scales and biases) and for an f32 one.
extern "C" __global__ void __launch_bounds__(THREADS)
    dequantize_bf16(const u32* __restrict__ words, const u16* __restrict__ scales,
                    const u16* __restrict__ biases, u16* __restrict__ out, i64 n_words,
                    int words_per_row, int group) {
    dequantize(words, scales, biases, out, n_words, words_per_row, group);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    dequantize_f32(const u32* __restrict__ words, const float* __restrict__ scales,
                   const float* __restrict__ biases, float* __restrict__ out, i64 n_words,
                   int words_per_row, int group) {
    dequantize(words, scales, biases, out, n_words, words_per_row, group);
}
