// Rotary position embedding of `[batch, heads, seq, d]` rows, Hugging Face's rotate-half layout
// (`src/model/rope.rs`), in one pass. For j < d/2, with c, s the tables' row for (batch, t):
//
//   out[j]       = x[j]       · c[j]       − sign · x[j + d/2] · s[j]
//   out[j + d/2] = x[j + d/2] · c[j + d/2] + sign · x[j]       · s[j + d/2]
//
// sign = 1 rotates forward; −1 is the transpose (the backward pass). One thread per pair; x and
// out are strided (their last dimension contiguous), so a projection's `[batch, seq, heads, d]`
// output is read in place and a gradient can be written in that order. Compiled by NVRTC
// (`src/gpu/rope.rs`).

#define THREADS 256

typedef long long i64;

// Grid (⌈seq · d/2 / THREADS⌉, batch · heads): one (batch, head) per block row, so only the
// position and the pair are divided out per thread, in 32 bits (64-bit division is a long
// instruction sequence).
extern "C" __global__ void __launch_bounds__(THREADS)
    rope(const float* x, const float* cos, const float* sin, float* out, int heads, int seq,
         int half, int table_rows, i64 x_batch, i64 x_head, i64 x_seq, i64 out_batch,
         i64 out_head, i64 out_seq, float sign) {
    const int i = blockIdx.x * THREADS + threadIdx.x;
    if (i >= seq * half) return;
    const int j = i % half, t = i / half;
    const int h = blockIdx.y % heads, b = blockIdx.y / heads;
    const float* xr = x + b * x_batch + h * x_head + t * x_seq;
    float* o = out + b * out_batch + h * out_head + t * out_seq;
    const i64 table = ((i64)(table_rows == 1 ? 0 : b) * seq + t) * 2 * half;
    const float x1 = xr[j], x2 = xr[j + half];
    o[j] = x1 * cos[table + j] - sign * x2 * sin[table + j];
    o[j + half] = x2 * cos[table + j + half] + sign * x1 * sin[table + j + half];
}
