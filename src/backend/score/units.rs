//! The representative key of each token unit of the prompt, and the attention-mass block scores
//! of window queries over them.

use std::ops::Range;

use rayon::prelude::*;

use super::{dot, Keys, WindowPool};
use crate::backend::heads::Heads;
use crate::backend::simd;

/// The representative key of every token unit of the prompt (the mean of its post-RoPE keys),
/// with each unit's block: what the attention-mass score compares queries with. Decode keeps
/// it per boundary layer while that layer's prompt rows stay the same.
#[derive(Debug, Clone)]
pub struct UnitKeys {
    shape: Heads,
    /// (n_units, n_kv_heads * head_dim)
    keys: Vec<f32>,
    /// block id of each unit, ascending
    block: Vec<u32>,
}

impl UnitKeys {
    pub fn new(
        keys: Keys,
        positions: &[u32],
        prompt_len: usize,
        shape: Heads,
        block_size: usize,
        unit_size: usize,
    ) -> Self {
        let k_row = shape.n_kv_heads * shape.head_dim;
        let mut unit_keys: Vec<f32> = Vec::new();
        let mut unit_block: Vec<u32> = Vec::new();
        let (mut cur, mut rows) = (usize::MAX, 0usize);
        let mut pos_iter = positions.iter();
        keys.each_row(k_row, |row| {
            let pos = *pos_iter.next().expect("checked: a position per row") as usize;
            if pos >= prompt_len {
                return false;
            }
            if pos / unit_size != cur {
                if rows > 0 {
                    let start = unit_keys.len() - k_row;
                    unit_keys[start..]
                        .iter_mut()
                        .for_each(|x| *x /= rows as f32);
                }
                cur = pos / unit_size;
                rows = 0;
                unit_keys.extend(std::iter::repeat_n(0.0, k_row));
                unit_block.push((pos / block_size) as u32);
            }
            let start = unit_keys.len() - k_row;
            unit_keys[start..]
                .iter_mut()
                .zip(row)
                .for_each(|(a, &b)| *a += b);
            rows += 1;
            true
        });
        if rows > 0 {
            let start = unit_keys.len() - k_row;
            unit_keys[start..]
                .iter_mut()
                .for_each(|x| *x /= rows as f32);
        }
        Self {
            shape,
            keys: unit_keys,
            block: unit_block,
        }
    }

    /// Unit keys computed elsewhere (a backend's [`crate::backend::ops::Ops::unit_keys`]):
    /// (n_units, n_kv_heads * head_dim) and each unit's block id, ascending.
    pub fn from_parts(shape: Heads, keys: Vec<f32>, block: Vec<u32>) -> Self {
        assert_eq!(
            keys.len(),
            block.len() * shape.n_kv_heads * shape.head_dim,
            "UnitKeys::from_parts: keys do not match the units"
        );
        Self { shape, keys, block }
    }

    /// The paper's block scores over the units: the largest over a block's units of the mean
    /// over heads of |q_loc · k_unit|, q_loc the mean of the window's queries (what
    /// [`super::block_scores`] computes from the rows).
    pub fn paper_scores(&self, q_window: &[f32]) -> Vec<(u32, f32)> {
        let Heads {
            n_heads, head_dim, ..
        } = self.shape;
        let (q_row, k_row, group) = (n_heads * head_dim, self.k_row(), self.shape.group());
        let w = q_window.len() / q_row;
        let mut q_loc = vec![0f32; q_row];
        for row in q_window.chunks_exact(q_row) {
            q_loc.iter_mut().zip(row).for_each(|(a, &b)| *a += b);
        }
        let scale = 1.0 / (w.max(1) as f32 * n_heads as f32);
        let mut out: Vec<(u32, f32)> = Vec::new();
        for (key, &block) in self.keys.chunks_exact(k_row).zip(&self.block) {
            let s: f32 = (q_loc.chunks_exact(head_dim).enumerate())
                .map(|(h, q)| dot(q, &key[(h / group) * head_dim..][..head_dim]).abs())
                .sum();
            let score = s * scale;
            match out.last_mut() {
                Some((b, best)) if *b == block => *best = best.max(score),
                _ => out.push((block, score)),
            }
        }
        out
    }

    fn k_row(&self) -> usize {
        self.shape.n_kv_heads * self.shape.head_dim
    }

    /// Attention-mass block scores of the queries `q_window` ((w, n_heads * head_dim)), pooled
    /// over the queries by `pool`.
    pub fn attention_scores(&self, q_window: &[f32], pool: WindowPool) -> Vec<(u32, f32)> {
        let one_query = q_window.len() == self.shape.n_heads * self.shape.head_dim;
        match pool {
            // one query's mean is its max, and the max path's GEMM is the faster (decode)
            WindowPool::Mean if !one_query => self.attention_scores_mean(q_window),
            _ => self.attention_scores_max(q_window),
        }
    }

    /// Per block, the largest over the queries of the block's head-averaged attention mass.
    ///
    /// Each task takes one KV head and a few window queries: the logits of the query heads that
    /// read that KV head against every unit come from one GEMM (prefill scores every prompt
    /// token, `prefill_unit_size = 1`), then each (query, head) row's softmax is summed
    /// per block. The blocks' masses are reduced over heads and pooled over queries at the end.
    fn attention_scores_max(&self, q_window: &[f32]) -> Vec<(u32, f32)> {
        let Heads {
            n_heads,
            n_kv_heads,
            head_dim,
        } = self.shape;
        let group = self.shape.group();
        let q_row = n_heads * head_dim;
        let w = q_window.len() / q_row;
        let n_units = self.block.len();
        if n_units == 0 || w == 0 {
            return Vec::new();
        }
        let runs = self.block_runs();
        let n_blocks = runs.len();
        const QUERIES: usize = 8;
        let tasks: Vec<(usize, usize)> = (0..n_kv_heads)
            .flat_map(|g| (0..w).step_by(QUERIES).map(move |r0| (g, r0)))
            .collect();
        let scale = 1.0 / (head_dim as f32).sqrt();
        let k_row = n_kv_heads * head_dim;
        let per_task: Vec<(usize, Vec<f32>)> = tasks
            .into_par_iter()
            .map(|(g, r0)| {
                let rows = QUERIES.min(w - r0);
                let m = rows * group;
                // lhs: (m, head_dim), row (r, j) = query r0 + r's head g * group + j, scaled
                let mut lhs = vec![0f32; m * head_dim];
                for r in 0..rows {
                    for j in 0..group {
                        let h = g * group + j;
                        let src = &q_window[(r0 + r) * q_row + h * head_dim..][..head_dim];
                        let dst = &mut lhs[(r * group + j) * head_dim..][..head_dim];
                        dst.iter_mut().zip(src).for_each(|(d, &x)| *d = x * scale);
                    }
                }
                let mut logits = vec![0f32; m * n_units];
                // SAFETY: lhs is (m, head_dim) row-major; the rhs element (d, u) is unit u's
                // key channel g * head_dim + d, at keys[u * k_row + g * head_dim + d], inside
                // keys (n_units, k_row); logits is (m, n_units) row-major.
                unsafe {
                    gemm::gemm(
                        m,
                        n_units,
                        head_dim,
                        logits.as_mut_ptr(),
                        1,
                        n_units as isize,
                        false,
                        lhs.as_ptr(),
                        1,
                        head_dim as isize,
                        self.keys.as_ptr().add(g * head_dim),
                        k_row as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                let mut out = vec![0f32; m * n_blocks];
                for (row, dst) in logits.chunks_mut(n_units).zip(out.chunks_mut(n_blocks)) {
                    let (_, sum, _) = simd::softmax_block_row(row, n_units, f32::NEG_INFINITY, 0.0);
                    let inv = 1.0 / sum;
                    for (d, (_, units)) in dst.iter_mut().zip(&runs) {
                        *d = row[units.clone()].iter().sum::<f32>() * inv;
                    }
                }
                (r0, out)
            })
            .collect();
        // per_query[r * n_blocks + i]: query r's attention on block i, summed over heads
        let mut per_query = vec![0f32; w * n_blocks];
        for (r0, out) in per_task {
            for (i, src) in out.chunks(n_blocks).enumerate() {
                let r = r0 + i / group;
                let dst = &mut per_query[r * n_blocks..][..n_blocks];
                dst.iter_mut().zip(src).for_each(|(d, &x)| *d += x);
            }
        }
        let mut best = vec![f32::NEG_INFINITY; n_blocks];
        for query in per_query.chunks(n_blocks) {
            for (b, &v) in best.iter_mut().zip(query) {
                *b = b.max(v / n_heads as f32);
            }
        }
        runs.into_iter().map(|(b, _)| b).zip(best).collect()
    }

    /// Each block with the range of its units (units are in block order).
    fn block_runs(&self) -> Vec<(u32, Range<usize>)> {
        let mut runs: Vec<(u32, Range<usize>)> = Vec::new();
        for (u, &b) in self.block.iter().enumerate() {
            match runs.last_mut() {
                Some((last, units)) if *last == b => units.end = u + 1,
                _ => runs.push((b, u..u + 1)),
            }
        }
        runs
    }

    /// Head `h`'s attention of the query `q` over the units (softmax of q·k_unit/√d) in `probs`.
    fn unit_attention(&self, q: &[f32], h: usize, probs: &mut [f32]) {
        let Heads {
            n_kv_heads,
            head_dim,
            ..
        } = self.shape;
        let (k_row, kv) = (n_kv_heads * head_dim, h / self.shape.group());
        let scale = 1.0 / (head_dim as f32).sqrt();
        for (u, l) in probs.iter_mut().enumerate() {
            *l = dot(q, &self.keys[u * k_row + kv * head_dim..][..head_dim]) * scale;
        }
        let max = probs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = probs
            .iter_mut()
            .map(|l| {
                *l = (*l - max).exp();
                *l
            })
            .sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }

    /// Per block, its head-averaged attention mass averaged over the queries.
    fn attention_scores_mean(&self, q_window: &[f32]) -> Vec<(u32, f32)> {
        let Heads {
            n_heads, head_dim, ..
        } = self.shape;
        let w = q_window.len() / (n_heads * head_dim);
        let n_units = self.block.len();
        // mass: (n_heads, n_units), each head's attention averaged over the window queries; the
        // heads in parallel (in decode every slim layer scores its query here, between two
        // parallel sections, and on the engine thread alone the pool's workers would fall asleep)
        let mut mass = vec![0f32; n_heads * n_units];
        mass.par_chunks_mut(n_units.max(1))
            .enumerate()
            .for_each(|(h, mass)| {
                let mut probs = vec![0f32; n_units];
                for q in q_window.chunks_exact(n_heads * head_dim) {
                    self.unit_attention(&q[h * head_dim..][..head_dim], h, &mut probs);
                    for (m, p) in mass.iter_mut().zip(&probs) {
                        *m += p / w as f32;
                    }
                }
            });
        (self.block_runs().into_iter())
            .map(|(b, units)| {
                let per_head =
                    (0..n_heads).map(|h| mass[h * n_units..][units.clone()].iter().sum::<f32>());
                (b, per_head.sum::<f32>() / n_heads as f32)
            })
            .collect()
    }
}
