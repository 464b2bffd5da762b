//! The activation rows of a prefill GEMM, quantized once per product like the decode GEMV's one
//! row (`qgemv::activation`): 8 bits per value, one f32 scale per 32-value block (ggml's Q8_0
//! rounding), with the block sums the weight offsets need.

use rayon::prelude::*;

use crate::backend::qgemv::activation::quantize_blocks;
use crate::backend::qgemv::QK;

/// x[i, 32 b + j] ≈ d[i, b] * q[i, 32 b + j] for `rows` rows of `cols` values.
pub struct Q8Rows {
    pub rows: usize,
    pub cols: usize,
    /// (rows, cols) quantized values in [-127, 127]
    pub q: Vec<i8>,
    /// (rows, cols / 32) block scales
    pub d: Vec<f32>,
    /// (rows, cols / 32) Σ q over the block
    pub sum: Vec<i32>,
    /// (rows, cols / 32) d * Σ q: the block's sum of x as the integer path sees it
    pub dsum: Vec<f32>,
    /// (rows, cols / 32, 2) d * Σ q over each half of 16 values
    pub dsum16: Vec<f32>,
}

/// Rows quantized per parallel task: enough work (~100 µs) to be worth a task.
const ROWS_PER_TASK: usize = 64;

impl Q8Rows {
    /// Quantize x: (rows, cols), cols a multiple of 32.
    pub fn quantize(x: &[f32], cols: usize) -> Self {
        assert!(
            cols.is_multiple_of(QK) && x.len().is_multiple_of(cols.max(1)),
            "q8 rows: {} values in rows of {cols}",
            x.len()
        );
        let rows = x.len() / cols;
        let nb = cols / QK;
        let mut out = Self {
            rows,
            cols,
            q: vec![0; rows * cols],
            d: vec![0.0; rows * nb],
            sum: vec![0; rows * nb],
            dsum: vec![0.0; rows * nb],
            dsum16: vec![0.0; 2 * rows * nb],
        };
        let blocks = ROWS_PER_TASK * nb;
        out.q
            .par_chunks_mut(ROWS_PER_TASK * cols)
            .zip(x.par_chunks(ROWS_PER_TASK * cols))
            .zip(out.d.par_chunks_mut(blocks))
            .zip(out.sum.par_chunks_mut(blocks))
            .zip(out.dsum.par_chunks_mut(blocks))
            .zip(out.dsum16.par_chunks_mut(2 * blocks))
            .for_each(|(((((q, x), d), sum), dsum), dsum16)| {
                quantize_blocks(x, q, d, sum, dsum, dsum16)
            });
        out
    }

    pub fn blocks(&self) -> usize {
        self.cols / QK
    }

    /// The values the integer path multiplies with, (rows, cols) as f32 (for tests).
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .chunks_exact(QK)
            .zip(&self.d)
            .flat_map(|(qb, &d)| qb.iter().map(move |&q| d * q as f32))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::qgemv::activation::Q8Row;

    #[test]
    fn each_row_is_quantized_like_the_decode_row() {
        let cols = 96;
        let rows = 2 * ROWS_PER_TASK + 3; // several tasks, the last one short
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013 * (1 + i % 7) as f32)
            .collect();
        let many = Q8Rows::quantize(&x, cols);
        for r in 0..rows {
            let one = Q8Row::quantize(&x[r * cols..][..cols]);
            assert_eq!(many.q[r * cols..][..cols], one.q[..], "row {r}");
            assert_eq!(many.d[r * 3..][..3], one.d[..], "row {r}");
            assert_eq!(many.sum[r * 3..][..3], one.sum[..], "row {r}");
            assert_eq!(many.dsum[r * 3..][..3], one.dsum[..], "row {r}");
            assert_eq!(many.dsum16[r * 6..][..6], one.dsum16[..], "row {r}");
        }
    }
}
