// The prompt pass's product with a packed matrix, read packed (`qgemm.rs`):
//
//   y[n, r] (+)= Σ_c x[n, c] · W[r, c],   W[r, c] = bf16(scales[r, c / group] · q[r, c] + biases[r, c / group])
//
// for up to 64 of a prompt's rows n a launch row (grid.z), W an MLX-affine packed matrix with
// bf16 scales and biases (`dequant.cu` has the layout: q[r, w·k + j] = (words[r, w] >> j·BITS) &
// (2^BITS − 1)), x bf16, sums f32. Each W value is rounded to bf16 as `dequant.cu` writes it, so
// the sums are the slab path's (dequantize, then cuBLAS) up to their order.
//
// On tensor cores, `mma.sync.m16n8k16` (bf16 in, f32 sums) with A = 16 rows of W and B = 8 rows
// of x (as columns), so the weights are the operand read once and the prompt's few rows the
// narrow side. A warp computes 16 rows of W against all 64 tokens over one part of the inputs
// (grid.y: a split-K, the parts summed by `sum_splits` in `decode.cu`, or written straight to y
// with one part).
//
// The inputs' order within a product is free as long as A and B agree: lane (g, t) of a warp
// (g = lane / 4, t = lane % 4) holds A's k slots 2t, 2t+1, 2t+8, 2t+9 of rows g and g+8, and
// B's same slots of column g. Here lane t's slots at k-step s of a span are the span's inputs
// t·CHUNK + 4s + {0, 1, 2, 3}: so each lane reads its rows' codes as one 16-byte load of 4
// words (CHUNK codes, in one group), and x's matching inputs 16 bytes at a time.

#ifndef BITS
#error "compile with -DBITS=<2, 4 or 8>"
#endif

typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;

#define PER_WORD (32 / BITS)
// Codes a lane reads of a row at a time (4 words), inputs a warp covers with them (4 lanes),
// and the k-steps of 16 they feed (4 inputs a lane a step).
#define CHUNK (4 * PER_WORD)
#define SPAN (4 * CHUNK)
#define STEPS (CHUNK / 4)
// Token tiles of 8: 64 tokens a launch row.
#define TILES 8
#define WARPS 4

__device__ __forceinline__ float load(const u16* p) { return __uint_as_float((u32)*p << 16); }

// Codes j and j+1 of a lane's 4 words (j even, within one word), dequantized and paired.
__device__ __forceinline__ u32 pair(const uint4& w, int j, float scale, float bias) {
    const u32 word = (&w.x)[j / PER_WORD];
    const int shift = (j % PER_WORD) * BITS;
    const u32 mask = (1u << BITS) - 1;
    const float lo = scale * (float)((word >> shift) & mask) + bias;
    const float hi = scale * (float)((word >> (shift + BITS)) & mask) + bias;
    return pack_bf16(lo, hi);
}

// Grid (⌈out / (16·WARPS)⌉, parts, ⌈rows / 64⌉), WARPS·32 threads. `cols` and `cols / parts` are
// multiples of SPAN; `group` a multiple of CHUNK. With one part, y[n·ldy + r] gets the sum
// (added when `accumulate`); with more, part p's sums go to y[p·rows·out + n·out + r].
extern "C" __global__ void __launch_bounds__(WARPS * 32)
    qgemm(const u16* __restrict__ x, const u32* __restrict__ words, const u16* __restrict__ scales,
          const u16* __restrict__ biases, float* __restrict__ y, int rows, int out, int cols,
          int group, int ldy, int accumulate) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int r0 = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * 16;
    if (r0 >= out) return;
    const int n0 = blockIdx.z * (TILES * 8);
    const int tiles = min(TILES, (rows - n0 + 7) / 8);
    const int part = cols / gridDim.y;
    const int first = blockIdx.y * part;
    const int words_per_row = cols / PER_WORD, groups = cols / group;
    // This lane's two rows of W (rows past the matrix read row 0 and are not written) and the
    // x row of its column in each tile (past the prompt: none, its B operand zero).
    const int ra = r0 + g < out ? r0 + g : 0, rb = r0 + g + 8 < out ? r0 + g + 8 : 0;
    const u16* xs[TILES];
#pragma unroll
    for (int j = 0; j < TILES; ++j) {
        const int n = n0 + 8 * j + g;
        xs[j] = n < rows ? x + (i64)n * cols : nullptr;
    }
    float acc[TILES][4];
#pragma unroll
    for (int j = 0; j < TILES; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

    for (int k0 = first; k0 < first + part; k0 += SPAN) {
        const int c = k0 + t * CHUNK;
        const uint4 wa = *reinterpret_cast<const uint4*>(words + (i64)ra * words_per_row + c / PER_WORD);
        const uint4 wb = *reinterpret_cast<const uint4*>(words + (i64)rb * words_per_row + c / PER_WORD);
        const float sa = load(scales + (i64)ra * groups + c / group);
        const float ba = load(biases + (i64)ra * groups + c / group);
        const float sb = load(scales + (i64)rb * groups + c / group);
        const float bb = load(biases + (i64)rb * groups + c / group);
#pragma unroll
        for (int s = 0; s < STEPS; s += 2) {
            // x's inputs c + 4s .. c + 4s + 8 of each tile's column: k-steps s and s + 1.
            uint4 xv[TILES];
#pragma unroll
            for (int j = 0; j < TILES; ++j) {
                xv[j] = make_uint4(0, 0, 0, 0);
                if (j < tiles && xs[j] != nullptr)
                    xv[j] = *reinterpret_cast<const uint4*>(xs[j] + c + 4 * s);
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int j4 = 4 * (s + h);
                const u32 a0 = pair(wa, j4, sa, ba), a1 = pair(wb, j4, sb, bb);
                const u32 a2 = pair(wa, j4 + 2, sa, ba), a3 = pair(wb, j4 + 2, sb, bb);
#pragma unroll
                for (int j = 0; j < TILES; ++j) {
                    if (j < tiles) {
                        const u32 b0 = h == 0 ? xv[j].x : xv[j].z;
                        const u32 b1 = h == 0 ? xv[j].y : xv[j].w;
                        mma(acc[j], a0, a1, a2, a3, b0, b1);
                    }
                }
            }
        }
    }
    // C fragments: acc[j][0..1] at W row g, tokens 2t and 2t+1 of tile j; [2..3] at row g + 8.
#pragma unroll
    for (int j = 0; j < TILES; ++j) {
        if (j >= tiles) continue;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = r0 + g + (e >> 1) * 8, n = n0 + 8 * j + 2 * t + (e & 1);
            if (r >= out || n >= rows) continue;
            if (gridDim.y == 1) {
                float* at = y + (i64)n * ldy + r;
                *at = accumulate ? *at + acc[j][e] : acc[j][e];
            } else {
                y[((i64)blockIdx.y * rows + n) * out + r] = acc[j][e];
            }
        }
    }
}
