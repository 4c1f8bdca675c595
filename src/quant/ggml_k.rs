//! GGUF's K-quants (super-blocks of 256 elements) mapped exactly onto affine groups, so a
//! Q4_K_M or Q6_K file stays quantized in memory without requantizing (the layouts are ggml's
//! `block_q*_K`, read as gguf-py's `quants.py` reads them):
//!
//! ```text
//! Q2_K  84 B: scales[16] (sc | m << 4), qs[64] (2-bit), d, dmin   16 groups of 16: d·sc·q − dmin·m
//! Q3_K 110 B: hmask[32], qs[64] (2-bit), scales[12] (6-bit), d    16 of 16: d·(sc − 32)·(q − 4·!h)
//! Q4_K 144 B: d, dmin, scales[12] (6-bit sc, m), qs[128]          8 of 32: d·sc·q − dmin·m
//! Q5_K 176 B: d, dmin, scales[12], qh[32], qs[128]                8 of 32: the same, 5-bit q
//! Q6_K 210 B: ql[128], qh[64], scales[16] (i8), d                 16 of 16: d·sc·(q − 32)
//! ```
//!
//! As affine groups (`w = scale · c + bias`, `c ≥ 0`): scale `d·sc` and bias `−dmin·m`, or for
//! the symmetric types the code shifted up (`c = q + 4`, `q + 32`) with bias `−4·scale`,
//! `−32·scale`. Every product is exact in f32 (an f16 times a scale of at most 8 bits times a
//! code of at most 6: at most 24 significant bits), so `scale · c + bias` rounds once, as ggml's
//! `d·q − m` does: the values are bit-for-bit ggml's, but for the sign of zero (ggml's `d·0`
//! with a negative `d` is −0; ours +0). `tests/suite/gguf_kquants.rs` checks them against
//! gguf-py.

use half::f16;

use super::affine::{QuantizedMatrix, write_bits};
use crate::io::gguf::GgmlType;

/// Elements of one super-block.
const QK_K: usize = 256;

/// `(bits, group size)` of the affine layout a K-quant maps onto; `None` for other types.
pub fn layout(kind: GgmlType) -> Option<(u32, usize)> {
    Some(match kind {
        GgmlType::Q2_K => (2, 16),
        GgmlType::Q3_K => (3, 16),
        GgmlType::Q4_K => (4, 32),
        GgmlType::Q5_K => (5, 32),
        GgmlType::Q6_K => (6, 16),
        _ => return None,
    })
}

/// The `[rows, cols]` K-quant tensor `data` in the affine layout; `None` for other types.
/// `cols` is a multiple of 256 (the reader checks the row's block geometry).
pub fn to_affine(kind: GgmlType, rows: usize, cols: usize, data: &[u8]) -> Option<QuantizedMatrix> {
    let (bits, group) = layout(kind)?;
    let (_, block_bytes) = kind.block();
    let n_blocks = rows * cols / QK_K;
    let words_per_block = QK_K * bits as usize / 32;
    let mut packed = vec![0u32; n_blocks * words_per_block];
    let mut scales = Vec::with_capacity(rows * cols / group);
    let mut biases = Vec::with_capacity(rows * cols / group);
    let mut codes = [0u8; QK_K];
    for (b, block) in data.chunks_exact(block_bytes).take(n_blocks).enumerate() {
        let groups = decode_block(kind, block, &mut codes);
        for (scale, bias) in groups {
            scales.push(scale);
            biases.push(bias);
        }
        let words = &mut packed[b * words_per_block..(b + 1) * words_per_block];
        for (i, &c) in codes.iter().enumerate() {
            write_bits(words, i * bits as usize, bits, u32::from(c));
        }
    }
    Some(
        QuantizedMatrix::new(rows, cols, bits, group, packed, scales, biases)
            .expect("K-quant super-blocks always fit the affine layout"),
    )
}

/// One super-block's 256 codes into `codes`, and its groups' `(scale, bias)` in order.
fn decode_block(kind: GgmlType, b: &[u8], codes: &mut [u8; QK_K]) -> Vec<(f32, f32)> {
    let half = |at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    match kind {
        GgmlType::Q2_K => {
            let (scales, qs) = (&b[..16], &b[16..80]);
            let (d, dmin) = (half(80), half(82));
            // Element h·128 + s·32 + j is bits 2s of byte h·32 + j.
            for (i, c) in codes.iter_mut().enumerate() {
                let (h, s, j) = (i / 128, i % 128 / 32, i % 32);
                *c = (qs[h * 32 + j] >> (2 * s)) & 3;
            }
            let groups = scales.iter().map(|&sm| {
                let (sc, m) = (f32::from(sm & 0x0F), f32::from(sm >> 4));
                (d * sc, -(dmin * m))
            });
            groups.collect()
        }
        GgmlType::Q3_K => {
            let (hmask, qs, packed_scales) = (&b[..32], &b[32..96], &b[96..108]);
            let d = half(108);
            for (i, c) in codes.iter_mut().enumerate() {
                let (h, s, j) = (i / 128, i % 128 / 32, i % 32);
                let low = (qs[h * 32 + j] >> (2 * s)) & 3;
                // The high bit set means no offset: q = low; clear means q = low − 4. As a
                // code c = q + 4: low + 4 or low.
                let high = (hmask[j] >> (i / 32)) & 1;
                *c = low + 4 * high;
            }
            (0..16)
                .map(|g| {
                    let low = (packed_scales[g % 8] >> (4 * (g / 8))) & 0x0F;
                    let high = (packed_scales[8 + g % 4] >> (2 * (g / 4))) & 0x03;
                    let scale = d * f32::from(((low | (high << 4)) as i8) - 32);
                    (scale, -4.0 * scale)
                })
                .collect()
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (d, dmin) = (half(0), half(2));
            let packed_scales = &b[4..16];
            let (qh, qs) = if kind == GgmlType::Q5_K {
                (Some(&b[16..48]), &b[48..176])
            } else {
                (None, &b[16..144])
            };
            // Element c·64 + t·32 + j is nibble t of byte c·32 + j (and, in Q5_K, bit i / 32 of
            // qh[j] above it).
            for (i, code) in codes.iter_mut().enumerate() {
                let (c, t, j) = (i / 64, i % 64 / 32, i % 32);
                let low = (qs[c * 32 + j] >> (4 * t)) & 0x0F;
                let high = qh.map_or(0, |qh| (qh[j] >> (i / 32)) & 1);
                *code = low | (high << 4);
            }
            (0..8)
                .map(|g| {
                    let (sc, m) = scale_min_k4(g, packed_scales);
                    (d * f32::from(sc), -(dmin * f32::from(m)))
                })
                .collect()
        }
        GgmlType::Q6_K => {
            let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
            let d = half(208);
            // Element h·128 + t·64 + j (j < 64): nibble t of ql[h·64 + j]; its high two bits
            // are bits 2s of qh[h·32 + j % 32], s = (t·64 + j) / 32.
            for (i, c) in codes.iter_mut().enumerate() {
                let (h, within) = (i / 128, i % 128);
                let (t, j) = (within / 64, within % 64);
                let low = (ql[h * 64 + j] >> (4 * t)) & 0x0F;
                let s = within / 32;
                let high = (qh[h * 32 + within % 32] >> (2 * s)) & 3;
                *c = low | (high << 4);
            }
            let groups = scales.iter().map(|&sc| {
                let scale = d * f32::from(sc as i8);
                (scale, -32.0 * scale)
            });
            groups.collect()
        }
        _ => unreachable!("layout() admits only the K-quants"),
    }
}

/// Group `g`'s 6-bit scale and minimum from Q4_K's and Q5_K's 12 packed bytes (ggml's
/// `get_scale_min_k4`).
fn scale_min_k4(g: usize, q: &[u8]) -> (u8, u8) {
    if g < 4 {
        (q[g] & 63, q[g + 4] & 63)
    } else {
        let sc = (q[g + 4] & 0x0F) | ((q[g - 4] >> 6) << 4);
        let m = (q[g + 4] >> 4) | ((q[g] >> 6) << 4);
        (sc, m)
    }
}
