//! The representative key of each token unit of the prompt, and the attention-mass block scores
//! of window queries over them.

use rayon::prelude::*;

use super::{dot, HeadShape, Keys, WindowPool};

/// The representative key of every token unit of the prompt (the mean of its post-RoPE keys),
/// with each unit's block: what the attention-mass score compares queries with. Decode keeps
/// it per boundary layer while that layer's prompt rows stay the same.
#[derive(Debug, Clone)]
pub struct UnitKeys {
    shape: HeadShape,
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
        shape: HeadShape,
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

    /// Attention-mass block scores of the queries `q_window` ((w, n_heads * head_dim)), pooled
    /// over the queries by `pool`.
    pub fn attention_scores(&self, q_window: &[f32], pool: WindowPool) -> Vec<(u32, f32)> {
        match pool {
            WindowPool::Mean => self.attention_scores_mean(q_window),
            WindowPool::Max => self.attention_scores_max(q_window),
        }
    }

    /// Per block, the largest over the queries of the block's head-averaged attention mass.
    fn attention_scores_max(&self, q_window: &[f32]) -> Vec<(u32, f32)> {
        let HeadShape {
            n_heads, head_dim, ..
        } = self.shape;
        let unit_block = &self.block;
        let n_units = unit_block.len();
        let mut probs = vec![0f32; n_units];
        // one query's attention mass per unit, averaged over heads
        let mut mass = vec![0f32; n_units];
        let mut out: Vec<(u32, f32)> = Vec::new();
        for row in q_window.chunks_exact(n_heads * head_dim) {
            mass.fill(0.0);
            for (h, q) in row.chunks_exact(head_dim).enumerate() {
                self.unit_attention(q, h, &mut probs);
                for (m, p) in mass.iter_mut().zip(&probs) {
                    *m += p / n_heads as f32;
                }
            }
            let (mut u0, mut i) = (0, 0);
            while u0 < n_units {
                let b = unit_block[u0];
                let u1 = u0 + unit_block[u0..].iter().take_while(|&&x| x == b).count();
                let v: f32 = mass[u0..u1].iter().sum();
                match out.get_mut(i) {
                    Some(slot) => slot.1 = slot.1.max(v),
                    None => out.push((b, v)),
                }
                (u0, i) = (u1, i + 1);
            }
        }
        out
    }

    /// Head `h`'s attention of the query `q` over the units (softmax of q·k_unit/√d) in `probs`.
    fn unit_attention(&self, q: &[f32], h: usize, probs: &mut [f32]) {
        let HeadShape {
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
        let HeadShape {
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
        let unit_block = &self.block;
        let mut out: Vec<(u32, f32)> = Vec::new();
        let mut u0 = 0;
        while u0 < n_units {
            let b = unit_block[u0];
            let u1 = u0 + unit_block[u0..].iter().take_while(|&&x| x == b).count();
            let per_head =
                (0..n_heads).map(|h| mass[h * n_units + u0..h * n_units + u1].iter().sum::<f32>());
            out.push((b, per_head.sum::<f32>() / n_heads as f32));
            u0 = u1;
        }
        out
    }
}
