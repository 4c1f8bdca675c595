//! `y = x · deq(W)ᵀ` and `dx = dy · deq(W)` on the host for many rows of `x` (training, prompt
//! processing): `W` is dequantized one tile of [`TILE_ROWS`] rows at a time into a small reused
//! buffer, and matrixmultiply's sgemm multiplies that tile straight into (or out of) the tile's
//! columns of the output through strides. The dense `W` never exists, so a quantized base costs
//! no transient dense copy per layer, and no large fresh buffer is zeroed per call.

use matrixmultiply::sgemm;

use super::QuantizedMatrix;

/// Weight rows per tile: 256 rows of a 2048-wide matrix is 2 MiB, which stays in L2/L3 while
/// sgemm streams the activations past it.
const TILE_ROWS: usize = 256;

/// `x`: `[n, cols]` row-major → `y = x · deq(W)ᵀ`: `[n, rows]`.
pub fn forward(m: &QuantizedMatrix, x: &[f32], n: usize) -> Vec<f32> {
    assert_eq!(x.len(), n * m.cols, "x must be [n, cols]");
    let mut y = vec![0f32; n * m.rows];
    for_each_tile(m, |start, rows, tile| {
        // y[:, start..start+rows] = x · tileᵀ, tileᵀ[k, j] = tile[j * cols + k].
        // SAFETY: every pointer/stride pair addresses inside `x`, `tile` or `y` (bounds above).
        unsafe {
            sgemm(
                n,
                m.cols,
                rows,
                1.0,
                x.as_ptr(),
                m.cols as isize,
                1,
                tile.as_ptr(),
                1,
                m.cols as isize,
                0.0,
                y.as_mut_ptr().add(start),
                m.rows as isize,
                1,
            );
        }
    });
    y
}

/// `dy`: `[n, rows]` row-major → `dx = dy · deq(W)`: `[n, cols]`, summed tile by tile.
pub fn input_grad(m: &QuantizedMatrix, dy: &[f32], n: usize) -> Vec<f32> {
    assert_eq!(dy.len(), n * m.rows, "dy must be [n, rows]");
    let mut dx = vec![0f32; n * m.cols];
    for_each_tile(m, |start, rows, tile| {
        // dx += dy[:, start..start+rows] · tile.
        // SAFETY: as in `forward`.
        unsafe {
            sgemm(
                n,
                rows,
                m.cols,
                1.0,
                dy.as_ptr().add(start),
                m.rows as isize,
                1,
                tile.as_ptr(),
                m.cols as isize,
                1,
                1.0,
                dx.as_mut_ptr(),
                m.cols as isize,
                1,
            );
        }
    });
    dx
}

/// Calls `f(start, rows, tile)` with rows `start..start + rows` of `W` dequantized into `tile`
/// (`[rows, cols]` row-major).
fn for_each_tile(m: &QuantizedMatrix, mut f: impl FnMut(usize, usize, &[f32])) {
    let mut tile = vec![0f32; TILE_ROWS.min(m.rows) * m.cols];
    for start in (0..m.rows).step_by(TILE_ROWS) {
        let rows = TILE_ROWS.min(m.rows - start);
        for (r, out) in tile.chunks_exact_mut(m.cols).take(rows).enumerate() {
            m.dequantize_row(start + r, out);
        }
        f(start, rows, &tile[..rows * m.cols]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize::quantize;

    /// A 4-bit matrix taller than one tile (so the tiling is exercised) and its dequantized form.
    fn matrix() -> (QuantizedMatrix, Vec<f32>) {
        let (rows, cols) = (TILE_ROWS + 37, 128);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let m = quantize(&values, rows, cols, 4, 64).unwrap();
        let dense = m.dequantize();
        (m, dense)
    }

    fn activations(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 104729) % 997) as f32 / 498.5 - 1.0)
            .collect()
    }

    #[test]
    fn forward_and_input_grad_equal_the_dense_products() {
        let (m, w) = matrix();
        let n = 45;
        let x = activations(n * m.cols);
        let y = forward(&m, &x, n);
        let dy = activations(n * m.rows);
        let dx = input_grad(&m, &dy, n);
        for t in 0..n {
            for r in [0, 100, TILE_ROWS, m.rows - 1] {
                let want: f64 = (0..m.cols)
                    .map(|k| x[t * m.cols + k] as f64 * w[r * m.cols + k] as f64)
                    .sum();
                assert!((y[t * m.rows + r] as f64 - want).abs() < 1e-4, "y[{t},{r}]");
            }
            for k in [0, 63, m.cols - 1] {
                let want: f64 = (0..m.rows)
                    .map(|r| dy[t * m.rows + r] as f64 * w[r * m.cols + k] as f64)
                    .sum();
                assert!(
                    (dx[t * m.cols + k] as f64 - want).abs() < 1e-4,
                    "dx[{t},{k}]"
                );
            }
        }
    }
}
