//! Eight codes of an MLX-packed row as eight AVX2 lanes (x86-64 with AVX2), what the CPU's
//! packed products unpack from: 4 bits, one word broadcast and shifted by 0, 4, .., 28; 8 bits,
//! eight bytes widened; 2 bits, half a word shifted by 0, 2, .., 14.

use std::arch::x86_64::*;

use super::QuantizedMatrix;

/// Whether `m`'s codes come eight at a time in whole groups at a width [`codes`] reads, and the
/// CPU has AVX2 and FMA.
pub fn fit(m: &QuantizedMatrix) -> bool {
    matches!(m.bits, 2 | 4 | 8)
        && m.group_size.is_multiple_of(8)
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
}

/// Codes `8v .. 8v + 8` of the `BITS`-bit row at `words`, as i32 lanes.
///
/// # Safety
/// The CPU has AVX2; the codes lie within the row's words.
#[target_feature(enable = "avx2")]
#[inline]
pub unsafe fn codes<const BITS: usize>(words: *const u32, v: usize) -> __m256i {
    // SAFETY: the caller's: the codes lie within the row.
    unsafe {
        match BITS {
            4 => {
                let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
                let w = _mm256_set1_epi32(*words.add(v) as i32);
                _mm256_and_si256(_mm256_srlv_epi32(w, shifts), _mm256_set1_epi32(0xf))
            }
            8 => _mm256_cvtepu8_epi32(_mm_loadl_epi64(words.add(2 * v).cast())),
            _ => {
                let half = (v % 2) as i32 * 16;
                let shifts = _mm256_add_epi32(
                    _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14),
                    _mm256_set1_epi32(half),
                );
                let w = _mm256_set1_epi32(*words.add(v / 2) as i32);
                _mm256_and_si256(_mm256_srlv_epi32(w, shifts), _mm256_set1_epi32(0x3))
            }
        }
    }
}

/// Row `row` of `m` dequantized into `out` (`m.cols` long), eight codes at a time: the same
/// `scale · q + bias` as [`QuantizedMatrix::dequantize_row`], rounded the same way (a multiply,
/// then an add).
///
/// # Safety
/// [`fit`] holds for `m`; the row exists.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dequantize_row(m: &QuantizedMatrix, row: usize, out: &mut [f32]) {
    // SAFETY: as the caller's.
    unsafe {
        match m.bits {
            4 => dequantize::<4>(m, row, out),
            8 => dequantize::<8>(m, row, out),
            _ => dequantize::<2>(m, row, out),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dequantize<const BITS: usize>(m: &QuantizedMatrix, row: usize, out: &mut [f32]) {
    assert_eq!(out.len(), m.cols, "a row's values");
    let words = m.packed[row * m.words_per_row()..].as_ptr();
    let groups = m.cols / m.group_size;
    let vectors = m.group_size / 8;
    for g in 0..groups {
        let at = row * groups + g;
        let (scale, bias) = (_mm256_set1_ps(m.scales[at]), _mm256_set1_ps(m.biases[at]));
        for v in g * vectors..(g + 1) * vectors {
            // SAFETY: vector `v` of the row lies within its words, and `8v + 8 <= cols`.
            unsafe {
                let q = _mm256_cvtepi32_ps(codes::<BITS>(words, v));
                let values = _mm256_add_ps(_mm256_mul_ps(q, scale), bias);
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * v), values);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::affine::random_matrix;

    #[test]
    fn rows_dequantize_bit_for_bit_as_the_scalar_path() {
        for bits in [2u32, 4, 8] {
            for group in [8, 16, 32] {
                let m = random_matrix(3, 96, bits, group, u64::from(bits) + group as u64);
                if !fit(&m) {
                    return; // a CPU without AVX2: nothing to compare
                }
                for row in 0..m.rows {
                    let (mut want, mut got) = (vec![0f32; m.cols], vec![0f32; m.cols]);
                    m.dequantize_row(row, &mut want);
                    // SAFETY: `fit` holds; the row exists.
                    unsafe { dequantize_row(&m, row, &mut got) };
                    assert_eq!(got, want, "{bits} bits, groups of {group}, row {row}");
                }
            }
        }
    }
}
