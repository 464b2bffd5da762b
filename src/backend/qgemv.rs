//! Matrix-vector products straight from GGUF quantized blocks, for decode: one row of
//! activations against the whole weight matrix, bound by the bytes read. Q4_1 reads 0.625 bytes
//! per weight against dense f32's 4, so a decode step streams ~6x fewer bytes.
//!
//! Block layouts (ggml): Q4_1 = { f16 d, f16 m, u8 qs[16] } for 32 weights, weight j of the block
//! is `d * q_j + m` with q_j the low nibble of qs[j] (j < 16) or the high nibble of qs[j - 16];
//! Q8_0 = { f16 d, i8 qs[32] }, weight j is `d * qs[j]`.
//!
//! The inner loops are plain Rust compiled for AVX-512 / AVX2 / generic by `simd::dispatch`;
//! rows are split across the thread pool.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

const QK: usize = 32;

/// A (rows, cols) weight matrix kept in its quantized blocks, with the block scales widened to
/// f32 at load (so the inner loop needs no f16 conversion).
pub struct QMatrix {
    kind: Kind,
    rows: usize,
    cols: usize,
    /// (rows * cols / 32): each block's scale d
    scales: Vec<f32>,
    /// (rows * cols / 32): each block's offset m (Q4_1 only)
    mins: Vec<f32>,
    /// the quantized values: 16 bytes of nibbles per Q4_1 block, 32 i8 per Q8_0 block
    quants: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Q4_1,
    Q8_0,
}

impl QMatrix {
    /// The matrix of a 2-D Q4_1 or Q8_0 tensor; None for other types (they decode through f32).
    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<Option<Self>> {
        let (kind, block_bytes) = match t.dtype() {
            GgmlDType::Q4_1 => (Kind::Q4_1, 20),
            GgmlDType::Q8_0 => (Kind::Q8_0, 34),
            _ => return Ok(None),
        };
        let (rows, cols) = t.shape().dims2()?;
        if cols % QK != 0 {
            return Ok(None);
        }
        let data = t.data()?;
        if data.len() != rows * cols / QK * block_bytes {
            candle_core::bail!(
                "qgemv: {kind:?} tensor ({rows}, {cols}) has {} bytes",
                data.len()
            )
        }
        let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        let n_blocks = rows * cols / QK;
        let mut m = Self {
            kind,
            rows,
            cols,
            scales: Vec::with_capacity(n_blocks),
            mins: Vec::new(),
            quants: Vec::with_capacity(n_blocks * (block_bytes - 2)),
        };
        for block in data.chunks_exact(block_bytes) {
            m.scales.push(f16_at(block, 0));
            match kind {
                Kind::Q4_1 => {
                    m.mins.push(f16_at(block, 2));
                    m.quants.extend_from_slice(&block[4..20]);
                }
                Kind::Q8_0 => m.quants.extend_from_slice(&block[2..34]),
            }
        }
        Ok(Some(m))
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn bytes(&self) -> usize {
        self.quants.len() + 4 * (self.scales.len() + self.mins.len())
    }

    /// out = W x. x: (cols), out: (rows).
    pub fn gemv(&self, x: &[f32], out: &mut [f32]) {
        assert_eq!(
            x.len(),
            self.cols,
            "qgemv: x has {} values, want {}",
            x.len(),
            self.cols
        );
        assert_eq!(
            out.len(),
            self.rows,
            "qgemv: out has {} values, want {}",
            out.len(),
            self.rows
        );
        let nb = self.cols / QK;
        let qbytes = match self.kind {
            Kind::Q4_1 => 16,
            Kind::Q8_0 => 32,
        };
        // Q4_1's offset term needs the sum of x over each block, the same for every row.
        let block_sums: Vec<f32> = x.chunks(QK).map(|c| c.iter().sum()).collect();
        const ROWS_PER_TASK: usize = 64;
        out.par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .for_each(|(task, out)| {
                let first = task * ROWS_PER_TASK;
                for (i, o) in out.iter_mut().enumerate() {
                    let r = first + i;
                    let quants = &self.quants[r * nb * qbytes..][..nb * qbytes];
                    let scales = &self.scales[r * nb..][..nb];
                    *o = match self.kind {
                        Kind::Q4_1 => {
                            q4_1_row_dot(quants, scales, &self.mins[r * nb..][..nb], x, &block_sums)
                        }
                        Kind::Q8_0 => q8_0_row_dot(quants, scales, x),
                    };
                }
            });
    }

    /// The weights as f32, for tests: (rows, cols) row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = Vec::with_capacity(self.rows * self.cols);
        match self.kind {
            Kind::Q4_1 => {
                for ((qs, &d), &m) in self.quants.chunks(16).zip(&self.scales).zip(&self.mins) {
                    w.extend(qs.iter().map(|b| d * (b & 15) as f32 + m));
                    w.extend(qs.iter().map(|b| d * (b >> 4) as f32 + m));
                }
            }
            Kind::Q8_0 => {
                for (qs, &d) in self.quants.chunks(32).zip(&self.scales) {
                    w.extend(qs.iter().map(|&b| d * (b as i8) as f32));
                }
            }
        }
        w
    }
}

crate::backend::simd::dispatch! {
    /// Σ over a row's Q4_1 blocks of d·(q · x_block) + m·Σx_block. Per-lane accumulators across
    /// blocks: one horizontal sum per row, not per block.
    pub fn q4_1_row_dot(quants: &[u8], scales: &[f32], mins: &[f32], x: &[f32], block_sums: &[f32]) -> f32 {
        let mut acc = [0.0f32; 16];
        for ((qs, &d), xb) in quants.chunks_exact(16).zip(scales).zip(x.chunks_exact(QK)) {
            for j in 0..16 {
                acc[j] += d * ((qs[j] & 15) as f32 * xb[j] + (qs[j] >> 4) as f32 * xb[j + 16]);
            }
        }
        let mut off = [0.0f32; 8];
        let mut pairs = mins.chunks_exact(8).zip(block_sums.chunks_exact(8));
        for (m, s) in &mut pairs {
            for j in 0..8 {
                off[j] += m[j] * s[j];
            }
        }
        let tail: f32 = mins.chunks_exact(8).remainder().iter().zip(block_sums.chunks_exact(8).remainder()).map(|(m, s)| m * s).sum();
        acc.iter().sum::<f32>() + off.iter().sum::<f32>() + tail
    }
}

crate::backend::simd::dispatch! {
    /// Σ over a row's Q8_0 blocks of d·(q · x_block), with per-lane accumulators.
    pub fn q8_0_row_dot(quants: &[u8], scales: &[f32], x: &[f32]) -> f32 {
        let mut acc = [0.0f32; 32];
        for ((qs, &d), xb) in quants.chunks_exact(32).zip(scales).zip(x.chunks_exact(QK)) {
            for j in 0..32 {
                acc[j] += d * ((qs[j] as i8) as f32 * xb[j]);
            }
        }
        acc.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn check(dtype: GgmlDType, rows: usize, cols: usize) {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2)
            .collect();
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let m = QMatrix::from_qtensor(&q).unwrap().unwrap();
        let deq = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            m.dequantize(),
            deq,
            "our reading of the blocks equals candle's"
        );
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 31 % 97) as f32 / 97.0 - 0.5) * 2.0)
            .collect();
        let mut out = vec![0.0; rows];
        m.gemv(&x, &mut out);
        for r in 0..rows {
            let want: f64 = (0..cols)
                .map(|c| deq[r * cols + c] as f64 * x[c] as f64)
                .sum();
            assert!(
                (out[r] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                "row {r}: {} vs {want}",
                out[r]
            );
        }
    }

    #[test]
    fn q4_1_gemv_matches_the_dequantized_product() {
        check(GgmlDType::Q4_1, 131, 96);
    }

    #[test]
    fn q8_0_gemv_matches_the_dequantized_product() {
        check(GgmlDType::Q8_0, 67, 160);
    }
}
