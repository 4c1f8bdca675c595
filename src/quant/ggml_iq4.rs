//! GGUF's IQ4_NL and IQ4_XS read as floats. Their 4-bit codes index 16 fixed levels that are not
//! evenly spaced (`LEVELS`, ggml's `kvalues_iq4nl`), so no affine group holds them exactly: a
//! base stored so loads dense (`model.quantize` requantizes it for QLoRA).
//!
//! - IQ4_NL: blocks of 32, an f16 `d` and 16 bytes; byte j holds element j in its low nibble and
//!   element j+16 in its high one: `w = d · LEVELS[q]`.
//! - IQ4_XS: super-blocks of 256, an f16 `d`, 8 six-bit scales (`scales_h`: 2 high bits each in
//!   a u16; `scales_l`: 4 low bits each in 4 bytes) and 128 bytes laid out as IQ4_NL's per 32:
//!   `w = d · (scale − 32) · LEVELS[q]`.
//!
//! Each value is ggml's `dequantize_row_iq4_nl`/`_xs` product in f32, the same value bit for bit.

use half::f16;

use crate::io::gguf::GgmlType;

/// ggml's `kvalues_iq4nl`.
const LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// The values of an IQ4_NL or IQ4_XS tensor's whole blocks `data`; `None` for other types.
pub fn values(kind: GgmlType, data: &[u8]) -> Option<Vec<f32>> {
    if !matches!(kind, GgmlType::IQ4_NL | GgmlType::IQ4_XS) {
        return None;
    }
    let (per_block, block_bytes) = kind.block();
    let mut out = Vec::with_capacity(data.len() / block_bytes * per_block);
    for block in data.chunks_exact(block_bytes) {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        match kind {
            GgmlType::IQ4_NL => thirty_two(d, &block[2..18], &mut out),
            GgmlType::IQ4_XS => {
                let high = u16::from_le_bytes([block[2], block[3]]);
                for (i, qs) in block[8..136].chunks_exact(16).enumerate() {
                    let low = (block[4 + i / 2] >> (4 * (i % 2))) & 0x0F;
                    let scale = i32::from(low) | ((i32::from(high >> (2 * i)) & 3) << 4);
                    thirty_two(d * (scale - 32) as f32, qs, &mut out);
                }
            }
            _ => unreachable!("checked above"),
        }
    }
    Some(out)
}

/// The 32 values of 16 bytes of IQ4_NL nibbles at scale `d`.
fn thirty_two(d: f32, qs: &[u8], out: &mut Vec<f32>) {
    out.extend(
        qs.iter()
            .map(|q| d * f32::from(LEVELS[usize::from(q & 0x0F)])),
    );
    out.extend(
        qs.iter()
            .map(|q| d * f32::from(LEVELS[usize::from(q >> 4)])),
    );
}
