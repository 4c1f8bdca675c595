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

/// Encodes a row-major tensor (rows a multiple of 256 long) as Q4_K or Q6_K super-blocks, the
/// inverse of the layouts above. Scales come from each group's range, not from ggml's
/// iterative search (`make_qkx2_quants`): a valid file of slightly larger error, which
/// `ggml_k`'s tests bound and gguf-py decodes as we do.
pub fn encode(kind: GgmlType, values: &[f32]) -> Vec<u8> {
    let (_, block_bytes) = kind.block();
    let mut out = Vec::with_capacity(values.len() / QK_K * block_bytes);
    for x in values.chunks_exact(QK_K) {
        match kind {
            GgmlType::Q4_K => encode_q4_k(x, &mut out),
            GgmlType::Q6_K => encode_q6_k(x, &mut out),
            k => unreachable!("{k:?}: only Q4_K and Q6_K are written"),
        }
    }
    out
}

/// The least f16 of at least `x` (`x ≥ 0`): a super-block unit that rounded down would make
/// its largest group's multiple overflow.
fn f16_up(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() < x {
        f16::from_bits(h.to_bits() + 1)
    } else {
        h
    }
}

/// `round(v / step)` clamped to `0..=max` (0 for a zero step).
fn level(v: f32, step: f32, max: u8) -> u8 {
    if step > 0.0 {
        (v / step).round().clamp(0.0, f32::from(max)) as u8
    } else {
        0
    }
}

/// `ceil(v / unit)` clamped to `0..=max` (0 for a zero unit): a group's scale as a multiple of
/// the super-block's, rounded up so that no code of the group is clamped.
fn level_up(v: f32, unit: f32, max: u8) -> u8 {
    if unit > 0.0 {
        (v / unit).ceil().clamp(0.0, f32::from(max)) as u8
    } else {
        0
    }
}

/// Q4_K: per group of 32, codes from `min(x, 0)` up; the groups' minima, then their steps,
/// as 6-bit multiples of the super-block's f16 `dmin` and `d`, each rounded up so that no code
/// is clamped (the error stays within half a step).
fn encode_q4_k(x: &[f32], out: &mut Vec<u8>) {
    let lows: Vec<f32> = x
        .chunks_exact(32)
        .map(|g| -g.iter().fold(0f32, |m, &v| m.min(v)))
        .collect();
    let dmin = f16_up(lows.iter().fold(0f32, |m, &v| m.max(v)) / 63.0);
    let dminf = dmin.to_f32();
    let mins: Vec<u8> = lows.iter().map(|&l| level_up(l, dminf, 63)).collect();
    // Each group's step covers its highest value above the stored minimum.
    let needed: Vec<f32> = x
        .chunks_exact(32)
        .zip(&mins)
        .map(|(g, &m)| {
            let hi = g.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            (hi + dminf * f32::from(m)) / 15.0
        })
        .collect();
    let d = f16_up(needed.iter().fold(0f32, |a, &v| a.max(v)) / 63.0);
    let df = d.to_f32();
    let mut packed = [0u8; 12];
    let mut groups = [(0f32, 0f32); 8];
    for g in 0..8 {
        let (sc, m) = (level_up(needed[g], df, 63), mins[g]);
        groups[g] = (df * f32::from(sc), dminf * f32::from(m));
        if g < 4 {
            packed[g] = sc;
            packed[g + 4] = m;
        } else {
            packed[g + 4] = (sc & 0x0F) | ((m & 0x0F) << 4);
            packed[g - 4] |= (sc >> 4) << 6;
            packed[g] |= (m >> 4) << 6;
        }
    }
    out.extend(d.to_le_bytes());
    out.extend(dmin.to_le_bytes());
    out.extend(packed);
    let mut qs = [0u8; 128];
    for (i, &v) in x.iter().enumerate() {
        let (step, min) = groups[i / 32];
        let q = level(v + min, step, 15);
        let (c, t, j) = (i / 64, i % 64 / 32, i % 32);
        qs[c * 32 + j] |= q << (4 * t);
    }
    out.extend(qs);
}

/// Q6_K: per group of 16, a signed step that puts the group's largest magnitude at code ±31;
/// the steps as int8 multiples of the super-block's f16 `d`.
fn encode_q6_k(x: &[f32], out: &mut Vec<u8>) {
    let steps: Vec<f32> = x
        .chunks_exact(16)
        .map(|g| g.iter().fold(0f32, |m, v| m.max(v.abs())) / 31.0)
        .collect();
    let d = f16_up(steps.iter().fold(0f32, |m, &s| m.max(s)) / 127.0);
    let df = d.to_f32();
    let scales: Vec<i8> = steps.iter().map(|&s| level_up(s, df, 127) as i8).collect();
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for (i, &v) in x.iter().enumerate() {
        let step = df * f32::from(scales[i / 16]);
        let q = if step > 0.0 {
            ((v / step).round().clamp(-32.0, 31.0) + 32.0) as u8
        } else {
            32
        };
        let (h, within) = (i / 128, i % 128);
        let (t, j) = (within / 64, within % 64);
        ql[h * 64 + j] |= (q & 0x0F) << (4 * t);
        qh[h * 32 + within % 32] |= (q >> 4) << (2 * (within / 32));
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(scales.iter().map(|&s| s as u8));
    out.extend(d.to_le_bytes());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Written super-blocks read back (through the reader that `tests/suite/gguf_kquants.rs`
    /// checks against gguf-py) within half a step of each group, plus the f16 rounding of the
    /// super-block scales; a zero block stays zero.
    #[test]
    fn written_k_quants_read_back_within_their_steps() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (rows, cols) = (3, 512);
        let mut values: Vec<f32> = (0..rows * cols)
            .map(|i| rng.random_range(-1.0..1.0) * if i % 97 == 0 { 4.0 } else { 0.05 })
            .collect();
        values[..256].fill(0.0);
        for kind in [GgmlType::Q4_K, GgmlType::Q6_K] {
            let bytes = encode(kind, &values);
            assert_eq!(bytes.len(), rows * cols / QK_K * kind.block().1);
            let back = to_affine(kind, rows, cols, &bytes).unwrap().dequantize();
            let (bits, group) = layout(kind).unwrap();
            // A group's step: its range over 15 codes (Q4_K, from min(x, 0), whose stored
            // minimum may sit up to a unit of the minima lower), or max|x| over 31 (Q6_K);
            // stored as a multiple of the super-block's unit (the largest step over 63 or 127),
            // rounded up: the error is within half a step plus half a unit.
            let range_of = |g: &[f32]| {
                let lo = g.iter().fold(0f32, |m, &v| m.min(v));
                let hi = g.iter().fold(0f32, |m, &v| m.max(v));
                let amax = g.iter().fold(0f32, |m, v| m.max(v.abs()));
                if bits == 4 {
                    (hi - lo, -lo)
                } else {
                    (amax, 0.0)
                }
            };
            let (codes, multiples) = if bits == 4 {
                (15.0, 63.0)
            } else {
                (31.0, 127.0)
            };
            for (want, got) in values.chunks(QK_K).zip(back.chunks(QK_K)) {
                let ranges: Vec<(f32, f32)> = want.chunks(group).map(range_of).collect();
                let min_unit = ranges.iter().fold(0f32, |m, r| m.max(r.1)) / 63.0;
                let steps: Vec<f32> = ranges.iter().map(|r| (r.0 + min_unit) / codes).collect();
                let unit = steps.iter().fold(0f32, |m, &s| m.max(s)) / multiples;
                for (g, (w, b)) in want.chunks(group).zip(got.chunks(group)).enumerate() {
                    let bound = 0.5 * (steps[g] + unit) * 1.01 + 1e-7;
                    for (w, b) in w.iter().zip(b) {
                        assert!(
                            (w - b).abs() <= bound,
                            "{kind:?} group {g}: {w} read back as {b} (bound {bound})"
                        );
                    }
                }
            }
            assert!(
                back[..256].iter().all(|&v| v == 0.0),
                "{kind:?}: zeros stay zero"
            );
        }
    }
}
