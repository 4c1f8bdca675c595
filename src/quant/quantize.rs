//! The MLX affine quantizer (mlx 0.32, CPU), reproduced bit for bit so that a base quantized on
//! load (QLoRA) is the same model `mlx_lm.convert -q` would make. Per group, in f32:
//!
//! ```text
//! edge  = min if |min| > |max| else max
//! scale = ±max((max − min) / (2^bits − 1), 1e-7)      negative unless |min| > |max|
//! q0    = round(edge / scale);  if q0 ≠ 0: scale = edge / q0, bias = edge   else bias = 0
//! q     = clamp(round((w − bias) / scale), 0, 2^bits − 1)
//! ```
//!
//! Rounding is half to even, as mlx's `round` (`rint`): ties are rare in f32 weights but common in
//! bf16 ones, where rounding half away from zero changed about one code in 500 (measured on a
//! bf16 conversion against `mlx_lm.convert --dtype bfloat16 -q`). The `q0` step makes zero
//! exactly representable; the short description in docs/formats.md leaves it out.

use rayon::prelude::*;

use super::affine::{LayoutError, QuantizedMatrix, write_bits};

/// Quantizes a row-major `[rows, cols]` matrix.
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u32,
    group_size: usize,
) -> Result<QuantizedMatrix, LayoutError> {
    if w.len() != rows * cols {
        return Err(LayoutError(format!(
            "{} values for a [{rows}, {cols}] matrix",
            w.len()
        )));
    }
    // Validates the geometry before any work.
    let words_per_row = cols * bits as usize / 32;
    let groups_per_row = cols / group_size.max(1);
    QuantizedMatrix::new(0, cols, bits, group_size, vec![], vec![], vec![])?;
    let n_bins = ((1u32 << bits) - 1) as f32;
    let per_row: Vec<(Vec<u32>, Vec<f32>, Vec<f32>)> = w
        .par_chunks(cols)
        .map(|row| {
            let mut words = vec![0u32; words_per_row];
            let mut scales = Vec::with_capacity(groups_per_row);
            let mut biases = Vec::with_capacity(groups_per_row);
            for (g, group) in row.chunks_exact(group_size).enumerate() {
                let (min, max) = group
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                        (lo.min(v), hi.max(v))
                    });
                let min_is_edge = min.abs() > max.abs();
                let magnitude = ((max - min) / n_bins).max(1e-7);
                let mut scale = if min_is_edge { magnitude } else { -magnitude };
                let edge = if min_is_edge { min } else { max };
                let q0 = (edge / scale).round_ties_even();
                let bias = if q0 != 0.0 {
                    scale = edge / q0;
                    edge
                } else {
                    0.0
                };
                for (i, &v) in group.iter().enumerate() {
                    let q = ((v - bias) / scale).round_ties_even().clamp(0.0, n_bins) as u32;
                    write_bits(&mut words, (g * group_size + i) * bits as usize, bits, q);
                }
                scales.push(scale);
                biases.push(bias);
            }
            (words, scales, biases)
        })
        .collect();
    let mut packed = Vec::with_capacity(rows * words_per_row);
    let mut scales = Vec::with_capacity(rows * groups_per_row);
    let mut biases = Vec::with_capacity(rows * groups_per_row);
    for (w, s, b) in per_row {
        packed.extend(w);
        scales.extend(s);
        biases.extend(b);
    }
    QuantizedMatrix::new(rows, cols, bits, group_size, packed, scales, biases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_exact_and_error_is_within_one_step() {
        let w: Vec<f32> = (0..128)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let mut w = w;
        w[5] = 0.0;
        let q = quantize(&w, 2, 64, 4, 32).unwrap();
        let back = q.dequantize();
        assert_eq!(back[5], 0.0);
        for (g, chunk) in w.chunks(32).enumerate() {
            let step = q.scales[g].abs();
            for (i, v) in chunk.iter().enumerate() {
                assert!(
                    (back[g * 32 + i] - v).abs() <= step * 1.0001,
                    "group {g} element {i}"
                );
            }
        }
    }
}
