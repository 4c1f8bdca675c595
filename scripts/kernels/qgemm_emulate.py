#!/usr/bin/env python3
"""Emulates `src/backends/cuda/qgemm.cu` lane by lane on the CPU, against x · Wᵀ in float64.

Each warp's mma.sync.m16n8k16 is assembled from what every lane holds under the PTX ISA's bf16
fragment layouts (A: rows g and g+8, k slots 2t, 2t+1, 2t+8, 2t+9; B: the same k slots of
column g), with the kernel's permutation of the inputs (lane t's slots at k-step s of a span
are inputs t·CHUNK + 4s + 0..3), its guards (rows past the matrix, tokens past the prompt) and
its split-K parts summed as `sum_splits` does. Run it after changing the kernel's indexing:
`.venv-ref/bin/python scripts/kernels/qgemm_emulate.py` (numpy; a few seconds). Session 29:
within 6e-8 at 2, 4 and 8 bits, one and two parts; then the H200's `bench check` agreed.
"""
import numpy as np
rng = np.random.default_rng(0)
def bf16(a):
    a = np.asarray(a, np.float32).copy(); u = a.view(np.uint32)
    u += 0x7FFF + ((u >> 16) & 1); u &= 0xFFFF0000; return u.view(np.float32)
def run(BITS, rows, out, cols, group, parts, accumulate):
    PW = 32 // BITS; CHUNK = 4 * PW; SPAN = 4 * CHUNK; STEPS = CHUNK // 4; TILES = 8
    q = rng.integers(0, 2**BITS, size=(out, cols)).astype(np.uint32)
    words = np.zeros((out, cols // PW), np.uint32)
    for j in range(PW): words |= q[:, j::PW] << (j * BITS)
    scales = bf16(rng.standard_normal((out, cols // group)) * 0.1)
    biases = bf16(rng.standard_normal((out, cols // group)) * 0.1)
    x = bf16(rng.standard_normal((rows, cols)))
    W = bf16(np.repeat(scales, group, 1) * q + np.repeat(biases, group, 1))
    y0 = rng.standard_normal((rows, out)).astype(np.float32)
    want = x.astype(np.float64) @ W.T.astype(np.float64) + (y0 if accumulate else 0)
    y = y0.copy(); partbuf = np.zeros((parts, rows, out), np.float32)
    part = cols // parts
    def code(r, c):  # dequantized bf16 W value from words, as the kernel computes it
        w = words[r, c // PW]; sh = (c % PW) * BITS
        return bf16(np.float32(scales[r, c // group]) * np.float32((w >> sh) & (2**BITS - 1)) + np.float32(biases[r, c // group]))
    for bz in range((rows + 63) // 64):
        n0 = bz * 64; tiles = min(TILES, (rows - n0 + 7) // 8)
        for p in range(parts):
            first = p * part
            for r0 in range(0, out, 16):
                acc = np.zeros((TILES, 16, 8), np.float64)  # C tile [row, col]
                for k0 in range(first, first + part, SPAN):
                    for st in range(STEPS):
                        # assemble A (16x16) and B (16x8) from what each lane holds
                        A = np.zeros((16, 16)); Bm = np.zeros((TILES, 16, 8))
                        for lane in range(32):
                            g, t = lane >> 2, lane & 3
                            c = k0 + t * CHUNK
                            ra = r0 + g if r0 + g < out else 0; rb = r0 + g + 8 if r0 + g + 8 < out else 0
                            vals = [c + 4 * st + e for e in range(4)]
                            # a0:(g,2t),(g,2t+1) a1:(g+8,..) a2:(g,2t+8..) a3:(g+8,2t+8..)
                            A[g, 2*t], A[g, 2*t+1] = code(ra, vals[0]), code(ra, vals[1])
                            A[g+8, 2*t], A[g+8, 2*t+1] = code(rb, vals[0]), code(rb, vals[1])
                            A[g, 2*t+8], A[g, 2*t+9] = code(ra, vals[2]), code(ra, vals[3])
                            A[g+8, 2*t+8], A[g+8, 2*t+9] = code(rb, vals[2]), code(rb, vals[3])
                            for j in range(tiles):
                                n = n0 + 8 * j + g
                                if n < rows:
                                    Bm[j, 2*t, g], Bm[j, 2*t+1, g] = x[n, vals[0]], x[n, vals[1]]
                                    Bm[j, 2*t+8, g], Bm[j, 2*t+9, g] = x[n, vals[2]], x[n, vals[3]]
                        for j in range(tiles): acc[j] += A @ Bm[j]
                for j in range(tiles):
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        for e in range(4):
                            r = r0 + g + (e >> 1) * 8; n = n0 + 8 * j + 2 * t + (e & 1)
                            if r >= out or n >= rows: continue
                            v = acc[j, g + (e >> 1) * 8, 2 * t + (e & 1)]
                            if parts == 1: y[n, r] = y[n, r] + v if accumulate else v
                            else: partbuf[p, n, r] = v
    if parts > 1:
        s = partbuf.sum(0); y = y + s if accumulate else s
    err = np.abs(y - want).max() / np.abs(want).max()
    print(f"bits {BITS} rows {rows} out {out} cols {cols} group {group} parts {parts} acc {accumulate}: {err:.2e}")
    assert err < 1e-5
run(4, 13, 40, 256, 64, 1, True)
run(4, 70, 32, 256, 32, 2, False)
run(8, 9, 16, 128, 64, 2, True)
run(2, 5, 24, 512, 64, 1, False)
