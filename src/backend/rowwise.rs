//! Row-wise ops over (rows, width) f32 buffers: RMSNorm, rotary position embedding from
//! explicit position ids, and the SiLU gate. Rows are independent, so large inputs are split
//! across the thread pool in contiguous row ranges.

use rayon::prelude::*;

use super::simd;
use crate::model::gguf::{ModelSpec, RopeScaling};

/// Rows per parallel task: small enough to balance two cores, large enough to amortise a task.
const ROWS_PER_TASK: usize = 64;

/// out = RMSNorm(x) * weight, row by row. x, out: (rows, width); weight: (width).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let width = weight.len();
    out.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(x.par_chunks(width * ROWS_PER_TASK))
        .for_each(|(o, x)| {
            for (o, x) in o.chunks_mut(width).zip(x.chunks(width)) {
                simd::rms_norm_row(x, weight, eps, o);
            }
        });
}

/// out = silu(gate) * up, with gate and up side by side in each row of `gate_up` (the output
/// of a fused gate/up layer): gate_up (rows, 2 width) -> out (rows, width).
pub fn silu_mul_joined(gate_up: &[f32], width: usize, out: &mut [f32]) {
    out.par_chunks_mut(width * ROWS_PER_TASK)
        .zip(gate_up.par_chunks(2 * width * ROWS_PER_TASK))
        .for_each(|(o, gu)| {
            for (o, gu) in o.chunks_mut(width).zip(gu.chunks(2 * width)) {
                let (g, u) = gu.split_at(width);
                simd::silu_mul_row(g, u, o);
            }
        });
}

/// Rotary position embedding, GGUF/llama.cpp "normal" layout: within each head, the pairs
/// (x[2i], x[2i+1]) for i < rope_dim/2 are rotated by position * inv_freq[i].
/// <https://arxiv.org/abs/2104.09864>
pub struct Rope {
    /// (max_positions, rope_dim / 2)
    cos: Vec<f32>,
    /// (max_positions, rope_dim / 2)
    sin: Vec<f32>,
    half: usize,
    head_dim: usize,
    max_positions: usize,
}

impl Rope {
    /// `freq_factors`: Llama-3 style per-frequency divisors (`rope_freqs.weight`), if the model has them.
    pub fn new(spec: &ModelSpec, freq_factors: Option<&[f32]>, max_positions: usize) -> Self {
        let half = spec.rope_dim / 2;
        let pos_scale = match spec.rope_scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear(f) if f > 0.0 => 1.0 / f,
            RopeScaling::Linear(_) => 1.0,
        };
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let base =
                    1.0 / (spec.rope_theta as f64).powf(2.0 * i as f64 / spec.rope_dim as f64);
                let factor = freq_factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0) as f64;
                base / factor
            })
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let angle = p as f64 * pos_scale as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self {
            cos,
            sin,
            half,
            head_dim: spec.head_dim,
            max_positions,
        }
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Rotate, in place, every head of every row. x: (rows, n_heads * head_dim); positions: (rows).
    pub fn apply(&self, x: &mut [f32], positions: &[u32]) -> candle_core::Result<()> {
        let rows = positions.len();
        if rows == 0 {
            return Ok(());
        }
        let width = x.len() / rows;
        if width * rows != x.len() || !width.is_multiple_of(self.head_dim) {
            candle_core::bail!(
                "rope: buffer of {} floats is not ({rows}, k*{})",
                x.len(),
                self.head_dim
            )
        }
        if let Some(&p) = positions
            .iter()
            .find(|&&p| p as usize >= self.max_positions)
        {
            candle_core::bail!(
                "rope: position {p} is beyond the table of {}",
                self.max_positions
            )
        }
        x.par_chunks_mut(width * ROWS_PER_TASK)
            .zip(positions.par_chunks(ROWS_PER_TASK))
            .for_each(|(x, pos)| {
                for (row, &p) in x.chunks_mut(width).zip(pos) {
                    let cos = &self.cos[p as usize * self.half..][..self.half];
                    let sin = &self.sin[p as usize * self.half..][..self.half];
                    for head in row.chunks_mut(self.head_dim) {
                        for i in 0..self.half {
                            let (a, b) = (head[2 * i], head[2 * i + 1]);
                            head[2 * i] = a * cos[i] - b * sin[i];
                            head[2 * i + 1] = a * sin[i] + b * cos[i];
                        }
                    }
                }
            });
        Ok(())
    }
}
