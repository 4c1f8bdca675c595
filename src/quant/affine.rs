//! MLX affine quantization: groups of `group_size` consecutive elements along a row,
//! `w = scale * q + bias` with `q` in `[0, 2^bits)`, each row packed as one little-endian,
//! LSB-first bit stream of u32 words.

use rayon::prelude::*;

/// Code widths (bits per element) that can be packed and dequantized.
pub const SUPPORTED_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];

/// Parts of a quantized matrix that don't fit together as MLX lays them out.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct LayoutError(pub String);

/// A `[rows, cols]` matrix held packed; dequantized on demand, row by row.
#[derive(Debug, Clone)]
pub struct QuantizedMatrix {
    /// Rows of the matrix (a linear's output size).
    pub rows: usize,
    /// Columns of the matrix (a linear's input size); a multiple of `group_size`.
    pub cols: usize,
    /// Bits per code, one of [`SUPPORTED_BITS`].
    pub bits: u32,
    /// Consecutive elements along a row that share one scale and bias.
    pub group_size: usize,
    /// `rows * cols * bits / 32` words.
    pub packed: Vec<u32>,
    /// `rows * cols / group_size` each.
    pub scales: Vec<f32>,
    /// Per-group offset added after scaling; `rows * cols / group_size` of them.
    pub biases: Vec<f32>,
}

impl QuantizedMatrix {
    /// Checks that the parts fit together as MLX lays them out.
    pub fn new(
        rows: usize,
        cols: usize,
        bits: u32,
        group_size: usize,
        packed: Vec<u32>,
        scales: Vec<f32>,
        biases: Vec<f32>,
    ) -> Result<Self, LayoutError> {
        if !SUPPORTED_BITS.contains(&bits) {
            return Err(LayoutError(format!(
                "{bits}-bit quantization is not supported (supported: {SUPPORTED_BITS:?})"
            )));
        }
        if group_size == 0
            || !cols.is_multiple_of(group_size)
            || !(cols * bits as usize).is_multiple_of(32)
        {
            return Err(LayoutError(format!(
                "row length {cols} does not divide into groups of {group_size} packed at {bits} bits"
            )));
        }
        let words = rows * cols * bits as usize / 32;
        let groups = rows * cols / group_size;
        if packed.len() != words || scales.len() != groups || biases.len() != groups {
            return Err(LayoutError(format!(
                "a [{rows}, {cols}] matrix at {bits} bits, group {group_size} needs {words} packed words and {groups} scales/biases, found {}, {} and {}",
                packed.len(),
                scales.len(),
                biases.len()
            )));
        }
        Ok(QuantizedMatrix {
            rows,
            cols,
            bits,
            group_size,
            packed,
            scales,
            biases,
        })
    }

    /// u32 words holding one packed row (`cols * bits / 32`).
    pub fn words_per_row(&self) -> usize {
        self.cols * self.bits as usize / 32
    }

    /// Bytes held in memory (packed words plus f32 scales and biases).
    pub fn size_bytes(&self) -> usize {
        self.packed.len() * 4 + (self.scales.len() + self.biases.len()) * 4
    }

    /// The integer code of element `col` of row `row`.
    pub fn code(&self, row: usize, col: usize) -> u32 {
        let words = &self.packed[row * self.words_per_row()..(row + 1) * self.words_per_row()];
        read_bits(words, col * self.bits as usize, self.bits)
    }

    /// Dequantizes one row into `out` (`cols` long): eight codes at a time where the CPU has
    /// AVX2 and the width allows (`lanes.rs`), the same values either way.
    #[inline(always)]
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let wpr = self.words_per_row();
        let words = &self.packed[row * wpr..(row + 1) * wpr];
        let groups_per_row = self.cols / self.group_size;
        #[cfg(target_arch = "x86_64")]
        if super::lanes::fit(self.bits, self.group_size) {
            let groups = row * groups_per_row..(row + 1) * groups_per_row;
            let (scales, biases) = (&self.scales[groups.clone()], &self.biases[groups]);
            // SAFETY: `fit` checked the CPU and the width; the slices are the row's.
            unsafe { super::lanes::dequantize_row(self.bits, words, scales, biases, out) };
            return;
        }
        let bits = self.bits as usize;
        // Whole words a group (2-bit groups of 8 fill half a word: read code by code).
        let whole = (self.group_size * bits).is_multiple_of(32);
        for (g, chunk) in out.chunks_exact_mut(self.group_size).enumerate() {
            let scale = self.scales[row * groups_per_row + g];
            let bias = self.biases[row * groups_per_row + g];
            let first_bit = g * self.group_size * bits;
            match self.bits {
                4 if whole => dequant_words::<4>(&words[first_bit / 32..], scale, bias, chunk),
                8 if whole => dequant_words::<8>(&words[first_bit / 32..], scale, bias, chunk),
                2 if whole => dequant_words::<2>(&words[first_bit / 32..], scale, bias, chunk),
                _ => {
                    for (i, v) in chunk.iter_mut().enumerate() {
                        let q = read_bits(words, first_bit + i * bits, self.bits);
                        *v = scale * q as f32 + bias;
                    }
                }
            }
        }
    }

    /// Dequantizes rows `start..end` into a new row-major buffer.
    pub fn dequantize_rows(&self, start: usize, end: usize) -> Vec<f32> {
        let mut out = vec![0f32; (end - start) * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(i, row)| self.dequantize_row(start + i, row));
        out
    }

    /// The whole matrix dequantized, `[rows, cols]` row-major f32.
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_rows(0, self.rows)
    }

    /// The dense transpose, `[cols, rows]` row-major: what `x · Wᵀ` wants as its right-hand
    /// side, so the GEMM gets a contiguous operand instead of copying a transposed view.
    pub fn dequantize_transposed(&self) -> Vec<f32> {
        const BLOCK: usize = 64;
        let mut out = vec![0f32; self.rows * self.cols];
        // Blocks of output rows (= input columns) in parallel; each dequantizes its rows of W
        // for the block's column range and writes them down the block's columns.
        out.par_chunks_mut(BLOCK * self.rows)
            .enumerate()
            .for_each(|(block, chunk)| {
                let c0 = block * BLOCK;
                let width = chunk.len() / self.rows;
                let mut row = vec![0f32; self.cols];
                for r in 0..self.rows {
                    self.dequantize_row(r, &mut row);
                    for (j, v) in row[c0..c0 + width].iter().enumerate() {
                        chunk[j * self.rows + r] = *v;
                    }
                }
            });
        out
    }

    /// Rows `start..start + len` as a matrix of their own (each row is packed, scaled and
    /// offset on its own, so this is a copy of their words, scales and biases).
    pub fn row_range(&self, start: usize, len: usize) -> Self {
        let (wpr, gpr) = (self.words_per_row(), self.cols / self.group_size);
        QuantizedMatrix {
            rows: len,
            packed: self.packed[start * wpr..(start + len) * wpr].to_vec(),
            scales: self.scales[start * gpr..(start + len) * gpr].to_vec(),
            biases: self.biases[start * gpr..(start + len) * gpr].to_vec(),
            ..*self
        }
    }

    /// The same codes, scales and biases with each code in `bits` ≥ [`Self::bits`] bits (a
    /// 3-bit Q3_K matrix in 4-bit words, say, for kernels whose codes never straddle a word):
    /// it dequantizes to the same values, bit for bit.
    pub fn widened(&self, bits: u32) -> Self {
        assert!(
            bits >= self.bits,
            "{} bits do not hold {}-bit codes",
            bits,
            self.bits
        );
        let (from, to) = (self.words_per_row(), self.cols * bits as usize / 32);
        let mut packed = vec![0u32; self.rows * to];
        packed
            .par_chunks_mut(to)
            .zip(self.packed.par_chunks(from))
            .for_each(|(wide, row)| {
                for c in 0..self.cols {
                    let code = read_bits(row, c * self.bits as usize, self.bits);
                    write_bits(wide, c * bits as usize, bits, code);
                }
            });
        QuantizedMatrix {
            bits,
            packed,
            scales: self.scales.clone(),
            biases: self.biases.clone(),
            ..*self
        }
    }

    /// Reorders whole rows: row `i` of the result is row `order[i]` of `self`.
    pub fn permute_rows(&self, order: &[usize]) -> Self {
        let wpr = self.words_per_row();
        let gpr = self.cols / self.group_size;
        let mut out = self.clone();
        for (dst, &src) in order.iter().enumerate() {
            out.packed[dst * wpr..(dst + 1) * wpr]
                .copy_from_slice(&self.packed[src * wpr..(src + 1) * wpr]);
            out.scales[dst * gpr..(dst + 1) * gpr]
                .copy_from_slice(&self.scales[src * gpr..(src + 1) * gpr]);
            out.biases[dst * gpr..(dst + 1) * gpr]
                .copy_from_slice(&self.biases[src * gpr..(src + 1) * gpr]);
        }
        out
    }
}

/// Dequantizes codes that never straddle a word (2, 4, 8 bits); `BITS` is a constant so the
/// shifts and masks unroll.
#[inline(always)]
fn dequant_words<const BITS: usize>(words: &[u32], scale: f32, bias: f32, out: &mut [f32]) {
    let per_word = 32 / BITS;
    let mask = (1u32 << BITS) - 1;
    for (word, values) in words.iter().zip(out.chunks_exact_mut(per_word)) {
        for (k, v) in values.iter_mut().enumerate() {
            // Through i32: x86 converts signed ints to floats in one instruction, unsigned ones not.
            *v = scale * (((word >> (k * BITS)) & mask) as i32) as f32 + bias;
        }
    }
}

/// Reads `bits` bits starting at bit `pos` of an LSB-first stream of little-endian words.
fn read_bits(words: &[u32], pos: usize, bits: u32) -> u32 {
    let (w, shift) = (pos / 32, (pos % 32) as u32);
    let mut v = words[w] >> shift;
    if shift + bits > 32 {
        v |= words[w + 1] << (32 - shift);
    }
    v & ((1u32 << bits) - 1)
}

/// Packs one row of codes into MLX's bit stream (`bits` bits each, LSB first).
pub fn pack_codes(codes: &[u32], bits: u32) -> Vec<u32> {
    let mut words = vec![0u32; (codes.len() * bits as usize).div_ceil(32)];
    for (i, &c) in codes.iter().enumerate() {
        write_bits(&mut words, i * bits as usize, bits, c);
    }
    words
}

/// Writes `value` as `bits` bits at bit `pos` (the inverse of `read_bits`).
pub fn write_bits(words: &mut [u32], pos: usize, bits: u32, value: u32) {
    let (w, shift) = (pos / 32, (pos % 32) as u32);
    words[w] |= value << shift;
    if shift + bits > 32 {
        words[w + 1] |= value >> (32 - shift);
    }
}

/// A random `[rows, cols]` matrix at `bits`, groups of `group`, from `seed` (tests).
#[cfg(test)]
pub(crate) fn random_matrix(
    rows: usize,
    cols: usize,
    bits: u32,
    group: usize,
    seed: u64,
) -> QuantizedMatrix {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let codes: Vec<u32> = (0..rows * cols)
        .map(|_| rng.random_range(0..1u32 << bits))
        .collect();
    let groups = rows * cols / group;
    let scales = (0..groups).map(|_| rng.random_range(0.001..0.05)).collect();
    let biases = (0..groups).map(|_| rng.random_range(-0.3..0.3)).collect();
    QuantizedMatrix::new(
        rows,
        cols,
        bits,
        group,
        pack_codes(&codes, bits),
        scales,
        biases,
    )
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequantize_every_bit_width_matches_scale_times_code_plus_bias() {
        for bits in SUPPORTED_BITS {
            let (rows, cols, group) = (3, 64, 32);
            let codes: Vec<u32> = (0..rows * cols)
                .map(|i| ((i * 7 + 3) % (1 << bits)) as u32)
                .collect();
            let packed: Vec<u32> = codes
                .chunks(cols)
                .flat_map(|row| pack_codes(row, bits))
                .collect();
            let scales: Vec<f32> = (0..rows * 2).map(|g| 0.5 + g as f32).collect();
            let biases: Vec<f32> = (0..rows * 2).map(|g| -(g as f32)).collect();
            let m = QuantizedMatrix::new(
                rows,
                cols,
                bits,
                group,
                packed,
                scales.clone(),
                biases.clone(),
            )
            .unwrap();
            let dense = m.dequantize();
            let transposed = m.dequantize_transposed();
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(transposed[c * rows + r], dense[r * cols + c]);
                }
            }
            for r in 0..rows {
                for c in 0..cols {
                    let g = r * 2 + c / group;
                    let want = scales[g] * codes[r * cols + c] as f32 + biases[g];
                    assert_eq!(dense[r * cols + c], want, "bits {bits} row {r} col {c}");
                    assert_eq!(m.code(r, c), codes[r * cols + c]);
                }
            }
        }
    }

    #[test]
    fn four_bit_element_k_sits_in_bits_4k() {
        // docs/formats.md: for 4 bits, element k of a word sits in bits 4k..4k+3.
        let word = 0x7654_3210u32;
        let m =
            QuantizedMatrix::new(1, 32, 4, 32, vec![word, 0, 0, 0], vec![1.0], vec![0.0]).unwrap();
        let row = m.dequantize();
        assert_eq!(&row[..8], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
    }

    #[test]
    fn mismatched_parts_are_rejected_with_sizes() {
        let err =
            QuantizedMatrix::new(2, 64, 4, 64, vec![0; 3], vec![0.0; 2], vec![0.0; 2]).unwrap_err();
        assert!(err.0.contains("needs 16 packed words"), "{}", err.0);
        assert!(QuantizedMatrix::new(1, 64, 7, 64, vec![], vec![], vec![]).is_err());
    }
}
