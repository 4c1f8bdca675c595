//! Eight codes of an MLX-packed row as eight AVX2 lanes (x86-64 with AVX2), what the CPU's
//! packed products unpack from: 4 bits, one word broadcast and shifted by 0, 4, .., 28; 8 bits,
//! eight bytes widened; 2 bits, half a word shifted by 0, 2, .., 14.

use std::arch::x86_64::*;

/// Whether codes of `bits` bits in groups of `group` come eight at a time in whole groups at a
/// width [`codes`] reads, and the CPU has AVX2 and FMA.
pub fn fit(bits: u32, group: usize) -> bool {
    matches!(bits, 2 | 4 | 8)
        && group.is_multiple_of(8)
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

/// One row dequantized into `out`, eight codes at a time: `words` its `bits`-bit codes,
/// `scales` and `biases` its groups' (`out.len() / scales.len()` codes each). The same
/// `scale · q + bias` as `QuantizedMatrix::dequantize_row`'s word path, rounded the same way (a
/// multiply, then an add).
///
/// # Safety
/// [`fit`] holds for `bits` and the group; `words` holds the row's codes.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dequantize_row(
    bits: u32,
    words: &[u32],
    scales: &[f32],
    biases: &[f32],
    out: &mut [f32],
) {
    // SAFETY: as the caller's.
    unsafe {
        match bits {
            4 => dequantize::<4>(words, scales, biases, out),
            8 => dequantize::<8>(words, scales, biases, out),
            _ => dequantize::<2>(words, scales, biases, out),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dequantize<const BITS: usize>(
    words: &[u32],
    scales: &[f32],
    biases: &[f32],
    out: &mut [f32],
) {
    assert!(words.len() * 32 >= out.len() * BITS && biases.len() == scales.len());
    let vectors = out.len() / scales.len() / 8;
    for (g, (&scale, &bias)) in scales.iter().zip(biases).enumerate() {
        let (scale, bias) = (_mm256_set1_ps(scale), _mm256_set1_ps(bias));
        for v in g * vectors..(g + 1) * vectors {
            // SAFETY: vector `v` lies within the row's words (asserted) and `8v + 8 <= out.len()`.
            unsafe {
                let q = _mm256_cvtepi32_ps(codes::<BITS>(words.as_ptr(), v));
                let values = _mm256_add_ps(_mm256_mul_ps(q, scale), bias);
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * v), values);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantizedMatrix;
    use crate::quant::affine::pack_codes;

    #[test]
    fn rows_dequantize_to_scale_times_code_plus_bias() {
        let (rows, cols) = (3, 96);
        for bits in [2u32, 4, 8] {
            for group in [8, 16, 32] {
                if !fit(bits, group) {
                    return; // a CPU without AVX2: nothing to compare
                }
                let codes: Vec<u32> = (0..rows * cols)
                    .map(|i| ((i * 29 + 3) % (1 << bits)) as u32)
                    .collect();
                let groups = rows * cols / group;
                let scales: Vec<f32> = (0..groups).map(|g| 0.013 * (g as f32 + 0.7)).collect();
                let biases: Vec<f32> = (0..groups).map(|g| 0.31 - 0.057 * g as f32).collect();
                let want: Vec<f32> = (0..rows * cols)
                    .map(|i| scales[i / group] * codes[i] as f32 + biases[i / group])
                    .collect();
                let words = pack_codes(&codes, bits);
                let m = QuantizedMatrix::new(rows, cols, bits, group, words, scales, biases);
                let m = m.unwrap();
                // Through the matrix (which takes this path) and straight.
                assert_eq!(m.dequantize(), want, "{bits} bits, groups of {group}");
                let (wpr, gpr) = (m.words_per_row(), cols / group);
                for row in 0..rows {
                    let mut got = vec![0f32; cols];
                    // SAFETY: `fit` holds; the slices are the row's.
                    unsafe {
                        dequantize_row(
                            bits,
                            &m.packed[row * wpr..][..wpr],
                            &m.scales[row * gpr..][..gpr],
                            &m.biases[row * gpr..][..gpr],
                            &mut got,
                        )
                    };
                    assert_eq!(got, want[row * cols..][..cols], "{bits} bits, row {row}");
                }
            }
        }
    }
}
