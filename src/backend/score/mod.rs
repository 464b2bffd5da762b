//! The block-scoring kernels of SlimInfer (arXiv 2508.06447, §"token importance"): how much the
//! local query attends to each prompt block, estimated without an attention matrix. The CPU ops
//! (`cpu_ops`) and SlimInfer's session (`crate::slim::session`) both call them; the f64
//! references are in [`mod@reference`], the representative unit keys of the attention-mass score in
//! [`units`].
//!
//! For each query head h, the local query `q_loc[h]` is the mean of the post-RoPE queries of the
//! last w tokens. Each block is cut into token units of `unit_size` positions; a unit's
//! representative key is the mean of its post-RoPE keys (over the rows present, so a partial or
//! half-pruned unit averages what is left). With GQA, query head h reads KV head
//! `h / (n_heads / n_kv_heads)`, as `repeat_kv` does.
//!
//! ```text
//! unit score  = (1/H) Σ_h |q_loc[h] · k_unit[kv(h)]|
//! block score = max over the block's units
//! ```
//!
//! No softmax and no 1/sqrt(d) scale: neither changes the ranking. Scores are f32.
//!
//! The attention-mass variant ([`block_scores_attention`]) takes, for every window query and
//! head, the softmax over the units' representative keys and sums each block's mass;
//! [`WindowPool`] says how the queries' masses combine.

pub mod reference;
#[cfg(test)]
pub(crate) mod tests;
pub mod units;

use serde::{Deserialize, Serialize};

use super::heads::Heads;
use super::kv_format::{unscale_keys, KvDtype};
pub use reference::{block_scores_attention_reference, block_scores_reference};
pub use units::UnitKeys;

/// Key rows as the scorers read them: f32 (tests, references), or the KV cache's storage
/// (16-bit floats or Q8 groups, Q8 keys divided by a per-channel scale), widened a few rows at a
/// time (no copy of the whole layer per decode step).
#[derive(Debug, Clone, Copy)]
pub enum Keys<'a> {
    F32(&'a [f32]),
    Stored {
        bits: &'a [u16],
        dtype: KvDtype,
        /// the cache's `k_scale` (empty: none)
        channel_scale: &'a [f32],
    },
}

impl Keys<'_> {
    fn len(&self) -> usize {
        match self {
            Keys::F32(k) => k.len(),
            Keys::Stored { bits, dtype, .. } => dtype.values_in(bits.len()),
        }
    }

    /// Call `f` on each row of `width` values in order, until it returns false.
    fn each_row(&self, width: usize, mut f: impl FnMut(&[f32]) -> bool) {
        match *self {
            Keys::F32(k) => {
                for row in k.chunks_exact(width) {
                    if !f(row) {
                        return;
                    }
                }
            }
            Keys::Stored {
                bits,
                dtype,
                channel_scale,
            } => {
                const ROWS: usize = 32;
                let mut buf = vec![0f32; ROWS * width];
                for bits in bits.chunks(dtype.stored_len(ROWS * width)) {
                    let wide = &mut buf[..dtype.values_in(bits.len())];
                    dtype.decode(bits, wide);
                    unscale_keys(wide, channel_scale);
                    for row in wide.chunks_exact(width) {
                        if !f(row) {
                            return;
                        }
                    }
                }
            }
        }
    }
}

impl Heads {
    /// Panics (a caller bug) when the slices do not match the shape; returns w.
    fn check(
        &self,
        q_window: &[f32],
        keys_len: usize,
        positions: &[u32],
        block_size: usize,
        unit_size: usize,
    ) -> usize {
        let Heads {
            n_heads,
            n_kv_heads,
            head_dim,
        } = *self;
        assert!(
            n_heads > 0 && n_kv_heads > 0 && head_dim > 0 && n_heads.is_multiple_of(n_kv_heads),
            "slim::block_scores: bad head shape {self:?}"
        );
        assert!(
            unit_size > 0 && block_size > 0 && block_size.is_multiple_of(unit_size),
            "slim::block_scores: block_size {block_size} is not a positive multiple of unit_size {unit_size}"
        );
        let q_row = n_heads * head_dim;
        assert!(
            !q_window.is_empty() && q_window.len().is_multiple_of(q_row),
            "slim::block_scores: q_window has {} values, expected (w >= 1, {q_row})",
            q_window.len()
        );
        assert_eq!(
            keys_len,
            positions.len() * n_kv_heads * head_dim,
            "slim::block_scores: keys has {} values, expected ({}, {})",
            keys_len,
            positions.len(),
            n_kv_heads * head_dim
        );
        q_window.len() / q_row
    }
}

/// Block scores for the prompt rows among `keys`.
///
/// q_window: (w, n_heads*head_dim) post-RoPE queries of the last w tokens, row-major.
/// keys: (n, n_kv_heads*head_dim) post-RoPE keys, row-major, with positions (n), strictly
/// increasing. Rows belong to block `pos / block_size` and unit `pos / unit_size`. Only rows with
/// position < prompt_len are scored (generated tokens are never candidates).
///
/// Returns `(block_id, score)` for every block that has at least one row, in increasing block id.
///
/// One pass over the keys: a unit's key sum is accumulated while its rows stream by and scored
/// when the unit ends, so the cost is O(n · n_kv_heads · head_dim) + O(n_units · n_heads · head_dim),
/// with O(n_kv_heads · head_dim) scratch.
///
/// Panics when the slice lengths disagree with `shape`, or `block_size` is not a positive multiple
/// of `unit_size` (caller bugs). Positions out of order are caught in debug builds.
pub fn block_scores(
    q_window: &[f32],
    keys: &[f32],
    positions: &[u32],
    prompt_len: usize,
    shape: Heads,
    block_size: usize,
    unit_size: usize,
) -> Vec<(u32, f32)> {
    let keys = Keys::F32(keys);
    block_scores_of(
        q_window, keys, positions, prompt_len, shape, block_size, unit_size,
    )
}

/// [`block_scores`] over keys in any storage.
pub fn block_scores_of(
    q_window: &[f32],
    keys: Keys,
    positions: &[u32],
    prompt_len: usize,
    shape: Heads,
    block_size: usize,
    unit_size: usize,
) -> Vec<(u32, f32)> {
    let w = shape.check(q_window, keys.len(), positions, block_size, unit_size);
    let Heads {
        n_heads,
        n_kv_heads,
        head_dim,
    } = shape;
    let (q_row, k_row, group) = (n_heads * head_dim, n_kv_heads * head_dim, shape.group());
    debug_assert!(
        positions.windows(2).all(|p| p[0] < p[1]),
        "slim::block_scores: positions not strictly increasing"
    );

    // q_loc: (n_heads, head_dim), the mean of the w query rows. The 1/w and the 1/n_heads of the
    // head mean are folded into one scale applied to each unit's score.
    let mut q_loc = vec![0f32; q_row];
    for row in q_window.chunks_exact(q_row) {
        q_loc.iter_mut().zip(row).for_each(|(a, &b)| *a += b);
    }
    let q_scale = 1.0 / (w as f32 * n_heads as f32);

    // Sum of the current unit's key rows: (n_kv_heads, head_dim).
    let mut k_sum = vec![0f32; k_row];
    let mut unit_rows = 0usize;
    let mut cur_unit = usize::MAX;
    let mut out: Vec<(u32, f32)> = Vec::new();

    // Score the unit held in k_sum and fold it into its block's max.
    let flush = |k_sum: &mut [f32], rows: usize, unit: usize, out: &mut Vec<(u32, f32)>| {
        let mut s = 0f32;
        for (h, q) in q_loc.chunks_exact(head_dim).enumerate() {
            let kv = h / group;
            s += dot(q, &k_sum[kv * head_dim..(kv + 1) * head_dim]).abs();
        }
        // |q_mean · k_mean| = |q_sum · k_sum| / (w · rows); averaged over heads.
        let score = s * q_scale / rows as f32;
        let block = (unit * unit_size / block_size) as u32;
        match out.last_mut() {
            Some((b, best)) if *b == block => *best = best.max(score),
            _ => out.push((block, score)),
        }
        k_sum.fill(0.0);
    };

    let mut pos_iter = positions.iter();
    keys.each_row(k_row, |row| {
        let pos = *pos_iter.next().expect("checked: a position per row") as usize;
        if pos >= prompt_len {
            return false; // positions increase: every later row is generated too
        }
        let unit = pos / unit_size;
        if unit != cur_unit {
            if unit_rows > 0 {
                flush(&mut k_sum, unit_rows, cur_unit, &mut out);
            }
            cur_unit = unit;
            unit_rows = 0;
        }
        k_sum.iter_mut().zip(row).for_each(|(a, &b)| *a += b);
        unit_rows += 1;
        true
    });
    if unit_rows > 0 {
        flush(&mut k_sum, unit_rows, cur_unit, &mut out);
    }
    out
}

/// A variant measured against the paper's score on the small default model (bench/NOTES.md):
/// each of the w window queries, in each head, attends over the units' representative keys
/// (softmax of q·k_unit/√d), so every query and head contributes a distribution of equal weight
/// instead of a raw magnitude; a block's score is the attention mass of its units, averaged over
/// queries and heads. Same inputs and output as [`block_scores`].
pub fn block_scores_attention(
    q_window: &[f32],
    keys: &[f32],
    positions: &[u32],
    prompt_len: usize,
    shape: Heads,
    block_size: usize,
    unit_size: usize,
) -> Vec<(u32, f32)> {
    let keys = Keys::F32(keys);
    block_scores_attention_of(
        q_window, keys, positions, prompt_len, shape, block_size, unit_size,
    )
}

/// [`block_scores_attention`] over keys in any storage.
pub fn block_scores_attention_of(
    q_window: &[f32],
    keys: Keys,
    positions: &[u32],
    prompt_len: usize,
    shape: Heads,
    block_size: usize,
    unit_size: usize,
) -> Vec<(u32, f32)> {
    shape.check(q_window, keys.len(), positions, block_size, unit_size);
    UnitKeys::new(keys, positions, prompt_len, shape, block_size, unit_size)
        .attention_scores(q_window, WindowPool::Mean)
}

/// How the attention-mass scores of a stage's window queries combine into a block's score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowPool {
    /// The mean over the queries.
    Mean,
    /// The largest over the queries.
    Max,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators so the compiler can vectorise the reduction.
    let mut acc = [0f32; 8];
    let (a8, a_tail) = a.split_at(a.len() - a.len() % 8);
    let (b8, b_tail) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}
