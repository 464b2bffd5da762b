//! Row-wise ops over (rows, width) f32 buffers: RMSNorm, rotary position embedding from
//! explicit position ids, and the SiLU gate. Rows are independent, so large inputs are split
//! across the thread pool in contiguous row ranges.

use std::ops::Range;

use rayon::prelude::*;

use super::simd;

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

/// Rows per MLP chunk in prefill: (512, 8192) f32 gate/up/product blocks of a 1B model are
/// 16 MB each, and the GEMMs stay large enough to run at full speed.
pub const MLP_ROWS: usize = 512;

/// 0..rows in consecutive ranges of at most `max` (>= 2) rows, and no range of one row unless
/// rows == 1: a one-row input takes the decode GEMV, whose arithmetic is not the GEMM's, so a
/// row's result does not depend on how the rows were cut.
pub fn row_chunks(rows: usize, max: usize) -> impl Iterator<Item = Range<usize>> {
    debug_assert!(max >= 2);
    let mut starts: Vec<usize> = (0..rows).step_by(max).collect();
    if rows > 1 && rows % max == 1 {
        // the last range would hold one row: it takes the previous range's last row too
        *starts.last_mut().expect("rows > 1") -= 1;
    }
    let ends: Vec<usize> = starts.iter().skip(1).copied().chain([rows]).collect();
    starts.into_iter().zip(ends).map(|(a, b)| a..b)
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

/// Positions whose cos/sin the rotary table holds (Llama 3.1's 128k context); later positions
/// of a longer context are computed when used.
const ROPE_TABLE_POSITIONS: usize = 1 << 17;
/// Values of each of the cos and sin tables at most (64 MiB each): a head width read from a
/// model file cannot make the table larger.
const ROPE_TABLE_VALUES: usize = 1 << 24;

/// Rotary position embedding: within each head, pair i < rope_dim/2 is rotated by
/// position * inv_freq[i], with inv_freq[i] = theta^(-2i / rope_dim) / freq_factor[i] (llama.cpp
/// divides the angle by `rope_freqs.weight`'s factor) and positions divided by a linear scaling
/// factor. Pair i is (x[2i], x[2i+1]) in the normal layout and (x[i], x[i + rope_dim/2]) in the
/// NEOX one ([`RopeLayout`]). <https://arxiv.org/abs/2104.09864>
pub struct Rope {
    /// (table positions, rope_dim / 2)
    cos: Vec<f32>,
    /// (table positions, rope_dim / 2)
    sin: Vec<f32>,
    /// Angle per position of each pair, and the linear scaling of positions.
    inv_freq: Vec<f64>,
    pos_scale: f64,
    half: usize,
    head_dim: usize,
    layout: RopeLayout,
    max_positions: usize,
}

/// What RoPE needs to know of a model; the model converts its hyper-parameters into it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeParams {
    /// Values per head.
    pub head_dim: usize,
    /// The first `rope_dim` values of each head rotate; the rest pass through.
    pub rope_dim: usize,
    /// Base of the rotation frequencies.
    pub theta: f32,
    /// Positions are divided by this factor (linear scaling) when it is positive; 1: none.
    pub linear_scaling: f32,
    pub layout: RopeLayout,
}

/// Which pairs of a head's values RoPE rotates together: pair i is `(x[2i], x[2i + 1])` in the
/// normal (GPT-J / Meta LLaMA) layout and `(x[i], x[i + rope_dim / 2])` in the NEOX ("rotate
/// half") one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    Normal,
    Neox,
}

impl RopeParams {
    /// The angle per position of each rotated pair: theta^(-2i / rope_dim), divided by Llama
    /// 3's per-frequency factor when the model has them.
    pub fn inv_freq(&self, freq_factors: Option<&[f32]>) -> Vec<f64> {
        (0..self.rope_dim / 2)
            .map(|i| {
                let base = 1.0 / (self.theta as f64).powf(2.0 * i as f64 / self.rope_dim as f64);
                let factor = freq_factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0) as f64;
                base / factor
            })
            .collect()
    }

    /// What positions are multiplied by: 1 / the linear scaling factor (1 without one),
    /// divided in f32 as the tables always were.
    pub fn pos_scale(&self) -> f64 {
        match self.linear_scaling {
            f if f > 0.0 => (1.0 / f) as f64,
            _ => 1.0,
        }
    }

    /// cos and sin of positions 0..positions, (positions, inv_freq.len()) each.
    pub fn tables(&self, inv_freq: &[f64], positions: usize) -> (Vec<f32>, Vec<f32>) {
        let pos_scale = self.pos_scale();
        let mut cos = Vec::with_capacity(positions * inv_freq.len());
        let mut sin = Vec::with_capacity(positions * inv_freq.len());
        for p in 0..positions {
            for f in inv_freq {
                let angle = p as f64 * pos_scale * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }
}

impl Rope {
    /// `freq_factors`: Llama-3 style per-frequency divisors (`rope_freqs.weight`), if the model has them.
    pub fn new(spec: &RopeParams, freq_factors: Option<&[f32]>, max_positions: usize) -> Self {
        let half = spec.rope_dim / 2;
        let inv_freq = spec.inv_freq(freq_factors);
        // The context length comes from the model file: the table stops at ROPE_TABLE_POSITIONS
        // and `apply` computes the angles of later positions the same way, row by row.
        let table = max_positions
            .min(ROPE_TABLE_POSITIONS)
            .min(ROPE_TABLE_VALUES / half.max(1));
        let (cos, sin) = spec.tables(&inv_freq, table);
        Self {
            cos,
            sin,
            inv_freq,
            pos_scale: spec.pos_scale(),
            half,
            head_dim: spec.head_dim,
            layout: spec.layout,
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
                let (mut far_cos, mut far_sin) = (Vec::new(), Vec::new());
                for (row, &p) in x.chunks_mut(width).zip(pos) {
                    let (cos, sin) = if (p as usize + 1) * self.half <= self.cos.len() {
                        let at = p as usize * self.half;
                        (&self.cos[at..][..self.half], &self.sin[at..][..self.half])
                    } else {
                        far_cos.clear();
                        far_sin.clear();
                        for f in &self.inv_freq {
                            let angle = p as f64 * self.pos_scale * f;
                            far_cos.push(angle.cos() as f32);
                            far_sin.push(angle.sin() as f32);
                        }
                        (&far_cos[..], &far_sin[..])
                    };
                    for head in row.chunks_mut(self.head_dim) {
                        rotate_head(head, cos, sin, self.layout);
                    }
                }
            });
        Ok(())
    }
}

/// Rotate one head by the angles of cos, sin (one per rotated pair) in `layout`.
pub fn rotate_head(head: &mut [f32], cos: &[f32], sin: &[f32], layout: RopeLayout) {
    match layout {
        RopeLayout::Normal => rotate_adjacent(head, cos, sin),
        RopeLayout::Neox => rotate_halves(head, cos, sin),
    }
}

/// Normal layout: rotate the pairs (head[2i], head[2i+1]) by the angles of cos, sin (half).
fn rotate_adjacent(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (i, (c, s)) in cos.iter().zip(sin).enumerate() {
        let (a, b) = (head[2 * i], head[2 * i + 1]);
        head[2 * i] = a * c - b * s;
        head[2 * i + 1] = a * s + b * c;
    }
}

/// NEOX layout: rotate the pairs (head[i], head[i + half]) by the angles of cos, sin (half).
fn rotate_halves(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (lo, hi) = head.split_at_mut(half);
    for (((a, b), c), s) in lo.iter_mut().zip(&mut hi[..half]).zip(cos).zip(sin) {
        let (x, y) = (*a, *b);
        *a = x * c - y * s;
        *b = x * s + y * c;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two heads of 8 values a row.
    const N_HEADS: usize = 2;

    fn spec(layout: RopeLayout, linear_scaling: f32) -> RopeParams {
        RopeParams {
            head_dim: 8,
            rope_dim: 6, // the last two values of each head are not rotated
            theta: 500_000.0,
            linear_scaling,
            layout,
        }
    }

    /// Rotate (rows, 2 heads of 8) by the formula: pair i of a head at position p turns by
    /// p / linear * theta^(-2i / rope_dim) / factor[i].
    fn closed_form(x: &[f32], positions: &[u32], s: &RopeParams, factors: &[f32]) -> Vec<f32> {
        let linear = s.linear_scaling as f64;
        let half = s.rope_dim / 2;
        let mut out = x.to_vec();
        for (row, &p) in out.chunks_mut(N_HEADS * s.head_dim).zip(positions) {
            for head in row.chunks_mut(s.head_dim) {
                for (i, &factor) in factors.iter().enumerate().take(half) {
                    let inv = (s.theta as f64).powf(-2.0 * i as f64 / s.rope_dim as f64);
                    let angle = p as f64 / linear * inv / factor as f64;
                    let (a, b) = match s.layout {
                        RopeLayout::Normal => (2 * i, 2 * i + 1),
                        RopeLayout::Neox => (i, i + half),
                    };
                    let (x, y) = (head[a] as f64, head[b] as f64);
                    head[a] = (x * angle.cos() - y * angle.sin()) as f32;
                    head[b] = (x * angle.sin() + y * angle.cos()) as f32;
                }
            }
        }
        out
    }

    fn check(layout: RopeLayout, linear_scaling: f32, factors: Option<&[f32]>) {
        let s = spec(layout, linear_scaling);
        let positions = [0u32, 1, 7, 33, 63];
        let x: Vec<f32> = (0..positions.len() * 16)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let mut got = x.clone();
        Rope::new(&s, factors, 64)
            .apply(&mut got, &positions)
            .unwrap();
        let expect = closed_form(&x, &positions, &s, factors.unwrap_or(&[1.0; 3]));
        for (i, (g, e)) in got.iter().zip(&expect).enumerate() {
            assert!((g - e).abs() < 1e-5, "{layout:?} value {i}: {g} vs {e}");
        }
    }

    #[test]
    fn normal_rope_rotates_adjacent_pairs_by_the_closed_form_angle() {
        check(RopeLayout::Normal, 1.0, None);
    }

    #[test]
    fn neox_rope_rotates_the_two_halves_by_the_closed_form_angle() {
        check(RopeLayout::Neox, 1.0, None);
    }

    /// Llama 3.1's `rope_freqs.weight`: llama.cpp divides each pair's angle by its factor.
    #[test]
    fn freq_factors_divide_each_pairs_angle() {
        check(RopeLayout::Normal, 1.0, Some(&[1.0, 2.5, 8.0]));
        check(RopeLayout::Neox, 1.0, Some(&[1.0, 2.5, 8.0]));
    }

    #[test]
    fn linear_scaling_divides_positions_by_the_factor() {
        check(RopeLayout::Normal, 4.0, Some(&[1.0, 2.5, 8.0]));
        check(RopeLayout::Neox, 4.0, None);
    }

    /// A context longer than the table (the length is the model file's word): positions past
    /// the table are rotated by the same angles, computed when used, and the table stays small.
    #[test]
    fn positions_past_the_table_rotate_by_the_closed_form_angle() {
        let s = spec(RopeLayout::Neox, 2.0);
        let context = ROPE_TABLE_POSITIONS + 100;
        let rope = Rope::new(&s, None, context);
        assert_eq!(rope.max_positions(), context);
        assert_eq!(rope.cos.len(), ROPE_TABLE_POSITIONS * 3);
        let positions = [
            5u32,
            ROPE_TABLE_POSITIONS as u32 - 1,
            ROPE_TABLE_POSITIONS as u32,
            context as u32 - 1,
        ];
        let x: Vec<f32> = (0..positions.len() * 16)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let mut got = x.clone();
        rope.apply(&mut got, &positions).unwrap();
        let expect = closed_form(&x, &positions, &s, &[1.0; 3]);
        for (i, (g, e)) in got.iter().zip(&expect).enumerate() {
            assert!((g - e).abs() < 1e-4, "value {i}: {g} vs {e}");
        }
        assert!(rope.apply(&mut got, &[context as u32]).is_err());
    }
}
