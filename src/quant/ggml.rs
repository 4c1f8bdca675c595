//! GGUF blocks mapped onto the MLX affine layout, so a GGUF base stays quantized in memory.
//!
//! Every supported block type is affine with group 32 (DESIGN §4):
//! - Q4_1: f16 `d`, f16 `m`, 16 bytes of nibbles, `w = d*q + m`; byte j holds element j in its
//!   low nibble and element j+16 in its high nibble.
//! - Q4_0: f16 `d`, 16 bytes of nibbles, `w = d*(q - 8)`: scale `d`, bias `-8d`.
//! - Q8_0: f16 `d`, 32 signed bytes, `w = d*q`: code `q+128`, scale `d`, bias `-128d`.
//!
//! The products are exact in f32 (an f16 times a code of at most 8 bits), so dequantizing the
//! affine form gives bit-for-bit the values ggml's own dequantization gives.

use half::f16;

use super::affine::{QuantizedMatrix, write_bits};
use crate::io::gguf::GgmlType;

const GROUP: usize = 32;

/// Converts a quantized GGUF tensor of shape `[rows, cols]` into the affine layout.
/// Returns `None` for the float types, which are read densely instead.
pub fn to_affine(kind: GgmlType, rows: usize, cols: usize, data: &[u8]) -> Option<QuantizedMatrix> {
    let (bits, block_bytes) = match kind {
        GgmlType::Q4_0 => (4u32, 18),
        GgmlType::Q4_1 => (4, 20),
        GgmlType::Q8_0 => (8, 34),
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return None,
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
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let (bias, qs) = if kind == GgmlType::Q4_1 {
                    (
                        f16::from_le_bytes([block[2], block[3]]).to_f32(),
                        &block[4..20],
                    )
                } else {
                    (-8.0 * d, &block[2..18])
                };
                for (j, &byte) in qs.iter().enumerate() {
                    write_bits(words, j * 4, 4, u32::from(byte & 0x0F));
                    write_bits(words, (j + 16) * 4, 4, u32::from(byte >> 4));
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

/// Reads a float GGUF tensor (F32, F16, BF16) as f32.
pub fn float_values(kind: GgmlType, data: &[u8]) -> Option<Vec<f32>> {
    let raw = crate::io::RawTensor {
        name: "",
        dtype: match kind {
            GgmlType::F32 => crate::io::RawDtype::F32,
            GgmlType::F16 => crate::io::RawDtype::F16,
            GgmlType::BF16 => crate::io::RawDtype::BF16,
            _ => return None,
        },
        shape: &[],
        bytes: data,
    };
    raw.to_f32().ok()
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
}
