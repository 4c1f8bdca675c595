//! GGUF blocks mapped onto the MLX affine layout, so a GGUF base stays quantized in memory.
//!
//! Every 32-element block type is affine with group 32:
//! - Q4_1: f16 `d`, f16 `m`, 16 bytes of nibbles, `w = d*q + m`; byte j holds element j in its
//!   low nibble and element j+16 in its high nibble.
//! - Q4_0: f16 `d`, 16 bytes of nibbles, `w = d*(q - 8)`: scale `d`, bias `-8d`.
//! - Q5_1 and Q5_0: as Q4_1 and Q4_0 (Q5_0 centred on 16) with each code's fifth bit in 4 bytes
//!   `qh` after the scale(s), bit j for element j: scale `d`, bias `m` or `-16d`.
//! - Q8_0: f16 `d`, 32 signed bytes, `w = d*q`: code `q+128`, scale `d`, bias `-128d`.
//!
//! The K-quants map onto affine groups in `ggml_k.rs`; IQ4_NL and IQ4_XS, whose levels are not
//! evenly spaced, are read as floats (`ggml_iq4.rs`).
//!
//! The products are exact in f32 (an f16 times a code of at most 8 bits), so dequantizing the
//! affine form gives bit-for-bit the values ggml's own dequantization gives.

use half::f16;

use super::affine::{QuantizedMatrix, write_bits};
use crate::io::gguf::GgmlType;

const GROUP: usize = 32;

/// Converts a quantized GGUF tensor of shape `[rows, cols]` into the affine layout (the
/// K-quants through `ggml_k.rs`). Returns `None` for the float types, which are read densely
/// instead.
pub fn to_affine(kind: GgmlType, rows: usize, cols: usize, data: &[u8]) -> Option<QuantizedMatrix> {
    let (bits, block_bytes) = match kind {
        GgmlType::Q4_0 => (4u32, 18),
        GgmlType::Q4_1 => (4, 20),
        GgmlType::Q8_0 => (8, 34),
        GgmlType::Q5_0 => (5, 22),
        GgmlType::Q5_1 => (5, 24),
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return None,
        GgmlType::IQ4_NL | GgmlType::IQ4_XS => return None,
        k => return super::ggml_k::to_affine(k, rows, cols, data),
    };
    let n_blocks = rows * cols / GROUP;
    let mut packed = vec![0u32; rows * cols * bits as usize / 32];
    let mut scales = Vec::with_capacity(n_blocks);
    let mut biases = Vec::with_capacity(n_blocks);
    let words_per_block = GROUP * bits as usize / 32;
    for (b, block) in data.chunks_exact(block_bytes).take(n_blocks).enumerate() {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let words = &mut packed[b * words_per_block..(b + 1) * words_per_block];
        match kind {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let centre = if bits == 5 { 16.0 } else { 8.0 };
                let (bias, rest) = match kind {
                    GgmlType::Q4_1 | GgmlType::Q5_1 => (
                        f16::from_le_bytes([block[2], block[3]]).to_f32(),
                        &block[4..],
                    ),
                    _ => (-centre * d, &block[2..]),
                };
                // Q5's fifth bits, bit j for element j, in 4 bytes before the nibbles.
                let (high, qs) = match bits {
                    5 => (
                        u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]),
                        &rest[4..20],
                    ),
                    _ => (0, &rest[..16]),
                };
                let code = |nibble: u8, j: usize| u32::from(nibble) | (((high >> j) & 1) << 4);
                let bits = bits as usize;
                for (j, &byte) in qs.iter().enumerate() {
                    write_bits(words, j * bits, bits as u32, code(byte & 0x0F, j));
                    write_bits(words, (j + 16) * bits, bits as u32, code(byte >> 4, j + 16));
                }
                scales.push(d);
                biases.push(bias);
            }
            GgmlType::Q8_0 => {
                for (j, &byte) in block[2..34].iter().enumerate() {
                    write_bits(words, j * 8, 8, (i32::from(byte as i8) + 128) as u32);
                }
                scales.push(d);
                biases.push(-128.0 * d);
            }
            _ => unreachable!(),
        }
    }
    Some(
        QuantizedMatrix::new(rows, cols, bits, GROUP, packed, scales, biases)
            .expect("GGUF block geometry always fits the affine layout"),
    )
}

/// Reads a GGUF tensor held as floats (F32, F16, BF16; IQ4_NL and IQ4_XS, dequantized) as f32.
pub fn float_values(kind: GgmlType, data: &[u8]) -> Option<Vec<f32>> {
    let raw = crate::io::RawTensor {
        name: "",
        dtype: match kind {
            GgmlType::F32 => crate::io::RawDtype::F32,
            GgmlType::F16 => crate::io::RawDtype::F16,
            GgmlType::BF16 => crate::io::RawDtype::BF16,
            GgmlType::IQ4_NL | GgmlType::IQ4_XS => return super::ggml_iq4::values(kind, data),
            _ => return None,
        },
        shape: &[],
        bytes: data,
    };
    raw.to_f32().ok()
}

/// Encodes a row-major float tensor (rows a multiple of the block's length) as GGML `kind`: the
/// 32-element types the way ggml's reference quantizers do (`quantize_row_q8_0_ref`,
/// `_q4_0_ref`, `_q4_1_ref`: scales computed in f32, stored as f16); Q4_K and Q6_K as
/// [`super::ggml_k::encode`] does.
pub fn encode(kind: GgmlType, values: &[f32]) -> Vec<u8> {
    match kind {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let mut out = Vec::with_capacity(values.len() / GROUP * kind.block().1);
            for block in values.chunks_exact(GROUP) {
                encode_block(kind, block, &mut out);
            }
            out
        }
        GgmlType::Q4_K | GgmlType::Q6_K => super::ggml_k::encode(kind, values),
        k => unreachable!("{k:?} is read, never written (export::GgufType does not offer it)"),
    }
}

fn encode_block(kind: GgmlType, x: &[f32], out: &mut Vec<u8>) {
    let inverse = |d: f32| if d != 0.0 { 1.0 / d } else { 0.0 };
    match kind {
        GgmlType::Q8_0 => {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = inverse(d);
            out.extend(f16::from_f32(d).to_le_bytes());
            out.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
        }
        GgmlType::Q4_0 => {
            // The signed value of largest magnitude maps to -8.
            let max = x
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = max / -8.0;
            let id = inverse(d);
            out.extend(f16::from_f32(d).to_le_bytes());
            let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
            out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
        }
        GgmlType::Q4_1 => {
            let (min, max) = x
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                });
            let d = (max - min) / 15.0;
            let id = inverse(d);
            out.extend(f16::from_f32(d).to_le_bytes());
            out.extend(f16::from_f32(min).to_le_bytes());
            let q = |v: f32| (((v - min) * id + 0.5) as i8).min(15) as u8;
            out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
        }
        _ => unreachable!("{kind:?} is not a block type encode() writes"),
    }
}

/// Reads bytes of `kind` back as f32 (`[rows, cols]` row-major), for measuring what an
/// encoding kept.
pub fn decode(kind: GgmlType, rows: usize, cols: usize, data: &[u8]) -> Vec<f32> {
    float_values(kind, data).unwrap_or_else(|| {
        to_affine(kind, rows, cols, data)
            .expect("a block type")
            .dequantize()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml's reference dequantization of one block, written from the block definitions.
    fn ggml_dequant(kind: GgmlType, block: &[u8]) -> Vec<f32> {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        let mut out = vec![0f32; 32];
        match kind {
            GgmlType::Q4_1 => {
                let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
                for j in 0..16 {
                    out[j] = d * f32::from(block[4 + j] & 0x0F) + m;
                    out[j + 16] = d * f32::from(block[4 + j] >> 4) + m;
                }
            }
            GgmlType::Q4_0 => {
                for j in 0..16 {
                    out[j] = d * (f32::from(block[2 + j] & 0x0F) - 8.0);
                    out[j + 16] = d * (f32::from(block[2 + j] >> 4) - 8.0);
                }
            }
            GgmlType::Q8_0 => {
                for j in 0..32 {
                    out[j] = d * f32::from(block[2 + j] as i8);
                }
            }
            _ => unreachable!(),
        }
        out
    }

    fn block(kind: GgmlType, seed: u8) -> Vec<u8> {
        let (_, len) = kind.block();
        let mut b: Vec<u8> = (0..len as u32)
            .map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed))
            .collect();
        b[..2].copy_from_slice(&f16::from_f32(0.0123 + seed as f32 * 0.001).to_le_bytes());
        if kind == GgmlType::Q4_1 {
            b[2..4].copy_from_slice(&f16::from_f32(-0.2).to_le_bytes());
        }
        b
    }

    #[test]
    fn affine_form_equals_ggml_dequantization_bit_for_bit() {
        for kind in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            // 2 rows of 64 = 4 blocks.
            let blocks: Vec<Vec<u8>> = (0..4).map(|s| block(kind, s * 11)).collect();
            let data: Vec<u8> = blocks.concat();
            let m = to_affine(kind, 2, 64, &data).unwrap();
            let want: Vec<f32> = blocks.iter().flat_map(|b| ggml_dequant(kind, b)).collect();
            assert_eq!(m.dequantize(), want, "{kind:?}");
        }
    }

    #[test]
    fn encoded_blocks_round_trip_within_half_a_step() {
        let values: Vec<f32> = (0..128)
            .map(|i| ((i * 29 % 97) as f32 / 40.0 - 1.1) * if i % 7 == 0 { 3.0 } else { 1.0 })
            .collect();
        for kind in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let bytes = encode(kind, &values);
            assert_eq!(bytes.len(), 4 * kind.block().1, "{kind:?}");
            let back = decode(kind, 2, 64, &bytes);
            let steps = 2f32.powi(if kind == GgmlType::Q8_0 { 7 } else { 4 });
            for (block, (got, want)) in back.chunks(32).zip(values.chunks(32)).enumerate() {
                let range = want.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
                for (g, w) in got.iter().zip(want) {
                    // One quantization step (range / levels) plus f16 rounding of the scale.
                    assert!(
                        (g - w).abs() <= range / steps * 1.01,
                        "{kind:?} block {block}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// The GGUF writer with blocks from our encoder, read back by our reader and decoder.
    #[test]
    fn a_gguf_written_with_encoded_blocks_reads_back() {
        use crate::io::gguf::{GgufFile, Value};
        use crate::io::gguf_write::{GgufTensor, write};

        let path = std::env::temp_dir().join(format!("lf-gguf-write-{}.gguf", std::process::id()));
        let metadata = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("llama.block_count".to_string(), Value::U32(2)),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            ),
        ];
        let tensors = vec![
            GgufTensor {
                name: "norm".into(),
                shape: vec![3],
                kind: GgmlType::F32,
            },
            GgufTensor {
                name: "w".into(),
                shape: vec![2, 32],
                kind: GgmlType::Q8_0,
            },
        ];
        let w: Vec<f32> = (0..64).map(|i| i as f32 / 10.0 - 3.0).collect();
        write(&path, &metadata, &tensors, |i| {
            Ok(match i {
                0 => encode(GgmlType::F32, &[1.0, 2.0, 3.0]),
                _ => encode(GgmlType::Q8_0, &w),
            })
        })
        .unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.get_u64("llama.block_count"), Some(2));
        assert_eq!(
            g.get("tokenizer.ggml.tokens")
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            2
        );
        let info = g.tensor("w").unwrap();
        assert_eq!(info.shape, [2, 32]);
        let back = decode(info.kind, 2, 32, g.data(info));
        assert!(back.iter().zip(&w).all(|(a, b)| (a - b).abs() < 0.03));
        let norm = g.tensor("norm").unwrap();
        assert_eq!(decode(norm.kind, 1, 3, g.data(norm)), [1.0, 2.0, 3.0]);
        std::fs::remove_file(&path).unwrap();
    }
}
