//! Block scores of SlimInfer (arXiv 2508.06447, §"token importance"): how much the local query
//! attends to each prompt block, estimated without an attention matrix.
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

use rayon::prelude::*;

use crate::backend::kv_format::unscale_keys;
use crate::kv::{KvDtype, LayerKv};
use crate::slim::schedule::WindowPool;

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

impl<'a> Keys<'a> {
    /// The keys a layer's cache holds.
    pub fn of(kv: &'a LayerKv) -> Self {
        Keys::Stored {
            bits: &kv.k,
            dtype: kv.dtype,
            channel_scale: &kv.k_scale,
        }
    }
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

/// Attention head layout of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl HeadShape {
    /// Query heads per KV head.
    fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Panics (a caller bug) when the slices do not match the shape; returns w.
    fn check(
        &self,
        q_window: &[f32],
        keys_len: usize,
        positions: &[u32],
        block_size: usize,
        unit_size: usize,
    ) -> usize {
        let HeadShape {
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
    shape: HeadShape,
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
    shape: HeadShape,
    block_size: usize,
    unit_size: usize,
) -> Vec<(u32, f32)> {
    let w = shape.check(q_window, keys.len(), positions, block_size, unit_size);
    let HeadShape {
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

/// The same scores computed the naive way, in f64, straight from the definition: group rows by
/// block and unit, average, dot, mean over heads, max over units. Positions need not be sorted.
/// For tests and as the CPU reference of any faster kernel.
pub fn block_scores_reference(
    q_window: &[f32],
    keys: &[f32],
    positions: &[u32],
    prompt_len: usize,
    shape: HeadShape,
    block_size: usize,
    unit_size: usize,
) -> Vec<(u32, f32)> {
    use std::collections::BTreeMap;
    let w = shape.check(q_window, keys.len(), positions, block_size, unit_size);
    let HeadShape {
        n_heads,
        n_kv_heads,
        head_dim,
    } = shape;
    let group = n_heads / n_kv_heads;

    // q_loc[h][d] = mean over the w rows.
    let q_loc: Vec<Vec<f64>> = (0..n_heads)
        .map(|h| {
            (0..head_dim)
                .map(|d| {
                    (0..w)
                        .map(|t| q_window[t * n_heads * head_dim + h * head_dim + d] as f64)
                        .sum::<f64>()
                        / w as f64
                })
                .collect()
        })
        .collect();

    let units = prompt_units(positions, prompt_len, unit_size);

    let mut blocks: BTreeMap<u32, f64> = BTreeMap::new();
    for (unit, rows) in &units {
        let mut head_sum = 0.0;
        for (h, q) in q_loc.iter().enumerate() {
            let kv = h / group;
            let mut dot = 0.0;
            for (d, &qd) in q.iter().enumerate() {
                let k_mean = rows
                    .iter()
                    .map(|&i| keys[i * n_kv_heads * head_dim + kv * head_dim + d] as f64)
                    .sum::<f64>()
                    / rows.len() as f64;
                dot += qd * k_mean;
            }
            head_sum += dot.abs();
        }
        let score = head_sum / n_heads as f64;
        let block = (unit * unit_size / block_size) as u32;
        let best = blocks.entry(block).or_insert(f64::NEG_INFINITY);
        *best = best.max(score);
    }
    blocks.into_iter().map(|(b, s)| (b, s as f32)).collect()
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

/// Unit id -> indices of the prompt rows in it, for the reference implementations.
fn prompt_units(
    positions: &[u32],
    prompt_len: usize,
    unit_size: usize,
) -> std::collections::BTreeMap<usize, Vec<usize>> {
    let mut units: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, &pos) in positions.iter().enumerate() {
        if (pos as usize) < prompt_len {
            units.entry(pos as usize / unit_size).or_default().push(i);
        }
    }
    units
}

/// [`block_scores_attention`] the naive way, in f64: group rows into units, average, and for
/// every window query and head take the softmax over units; sum each block's mass. For tests.
pub fn block_scores_attention_reference(
    q_window: &[f32],
    keys: &[f32],
    positions: &[u32],
    prompt_len: usize,
    shape: HeadShape,
    block_size: usize,
    unit_size: usize,
) -> Vec<(u32, f32)> {
    use std::collections::BTreeMap;
    let w = shape.check(q_window, keys.len(), positions, block_size, unit_size);
    let HeadShape {
        n_heads,
        n_kv_heads,
        head_dim,
    } = shape;
    let group = n_heads / n_kv_heads;
    let units = prompt_units(positions, prompt_len, unit_size);
    let kv_row = n_kv_heads * head_dim;
    let mean_key = |rows: &[usize], kv: usize, d: usize| {
        rows.iter()
            .map(|&r| keys[r * kv_row + kv * head_dim + d] as f64)
            .sum::<f64>()
            / rows.len() as f64
    };
    let mut blocks: BTreeMap<u32, f64> = BTreeMap::new();
    for t in 0..w {
        for h in 0..n_heads {
            let q = &q_window[(t * n_heads + h) * head_dim..][..head_dim];
            let logits: Vec<(usize, f64)> = units
                .iter()
                .map(|(&u, rows)| {
                    let dot: f64 = (0..head_dim)
                        .map(|d| q[d] as f64 * mean_key(rows, h / group, d))
                        .sum();
                    (u, dot / (head_dim as f64).sqrt())
                })
                .collect();
            let max = logits.iter().map(|l| l.1).fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = logits.iter().map(|l| (l.1 - max).exp()).sum();
            for (u, l) in logits {
                *blocks
                    .entry((u * unit_size / block_size) as u32)
                    .or_default() += (l - max).exp() / total / (w * n_heads) as f64;
            }
        }
    }
    blocks.into_iter().map(|(b, s)| (b, s as f32)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Max pooling: per block, the largest over the window's queries of its reference score
    /// for that query alone.
    #[test]
    fn max_pooled_attention_scores_are_the_best_querys() {
        let mut rng = Rng(0x3A9_F00D);
        let shape = HeadShape {
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
        };
        let len = 517;
        let pos = positions(&mut rng, len, 7, 5);
        let keys = rng.vec(pos.len() * shape.n_kv_heads * shape.head_dim);
        let w = 5;
        let q = rng.vec(w * shape.n_heads * shape.head_dim);
        let units = UnitKeys::new(Keys::F32(&keys), &pos, len, shape, 64, 8);
        let got = units.attention_scores(&q, WindowPool::Max);
        let mut want: Vec<(u32, f32)> = Vec::new();
        for row in q.chunks_exact(shape.n_heads * shape.head_dim) {
            let one = block_scores_attention_reference(row, &keys, &pos, len, shape, 64, 8);
            if want.is_empty() {
                want = one;
            } else {
                for (acc, (b, v)) in want.iter_mut().zip(one) {
                    assert_eq!(acc.0, b);
                    acc.1 = acc.1.max(v);
                }
            }
        }
        assert_close(&got, &want, "max-pooled attention scores");
        let mean = units.attention_scores(&q, WindowPool::Mean);
        assert!(got.iter().zip(&mean).all(|(m, a)| m.1 >= a.1 - 1e-6));
    }

    #[test]
    fn attention_scores_match_their_reference_and_sum_to_one() {
        let mut rng = Rng(0x51A7_C0DE);
        for (shape, len) in [
            (
                HeadShape {
                    n_heads: 9,
                    n_kv_heads: 3,
                    head_dim: 64,
                },
                517,
            ),
            (
                HeadShape {
                    n_heads: 4,
                    n_kv_heads: 1,
                    head_dim: 24,
                },
                130,
            ),
        ] {
            let pos = positions(&mut rng, len, 7, 5);
            let keys = rng.vec(pos.len() * shape.n_kv_heads * shape.head_dim);
            let q = rng.vec(4 * shape.n_heads * shape.head_dim);
            let got = block_scores_attention(&q, &keys, &pos, len, shape, 64, 8);
            let want = block_scores_attention_reference(&q, &keys, &pos, len, shape, 64, 8);
            assert_close(&got, &want, "attention scores");
            let total: f32 = got.iter().map(|s| s.1).sum();
            assert!((total - 1.0).abs() < 1e-4, "block masses sum to {total}");
        }
    }

    #[test]
    fn attention_scores_of_a_window_are_the_mean_of_each_querys() {
        // the decode path keeps per-query scores and averages them (slim::session)
        let mut rng = Rng(0xC0FF_EE11);
        let shape = HeadShape {
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
        };
        let pos = positions(&mut rng, 300, 5, 3);
        let keys = rng.vec(pos.len() * shape.n_kv_heads * shape.head_dim);
        let width = shape.n_heads * shape.head_dim;
        let q = rng.vec(5 * width);
        let whole = block_scores_attention(&q, &keys, &pos, 300, shape, 64, 8);
        let mut mean: Vec<(u32, f32)> = whole.iter().map(|&(b, _)| (b, 0.0)).collect();
        for one in q.chunks(width) {
            let sc = block_scores_attention(one, &keys, &pos, 300, shape, 64, 8);
            for (m, (b, v)) in mean.iter_mut().zip(sc) {
                assert_eq!(m.0, b);
                m.1 += v / 5.0;
            }
        }
        assert_close(&mean, &whole, "mean of per-query scores");
    }

    /// Small deterministic generator (xorshift64*), uniform in [-1, 1).
    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn f32(&mut self) -> f32 {
            (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next_u64() % n
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.f32()).collect()
        }
    }

    fn assert_close(got: &[(u32, f32)], want: &[(u32, f32)], what: &str) {
        let ids = |v: &[(u32, f32)]| v.iter().map(|p| p.0).collect::<Vec<_>>();
        assert_eq!(ids(got), ids(want), "{what}: block ids");
        for (&(b, g), &(_, r)) in got.iter().zip(want) {
            assert!(
                (g - r).abs() <= 1e-4 * r.abs().max(1e-3),
                "{what}: block {b}: got {g}, reference {r}"
            );
        }
    }

    /// Positions 0..len with random gaps (as after pruning some blocks / rows), then
    /// `generated` positions past `prompt_len`.
    #[test]
    fn stored_keys_score_as_their_widened_f32_values() {
        let mut rng = Rng(0xF16);
        let shape = HeadShape {
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
        };
        let len = 701; // rows not a multiple of the 32-row widening batch
        let pos = positions(&mut rng, len, 5, 9);
        let keys = rng.vec(pos.len() * shape.n_kv_heads * shape.head_dim);
        let q = rng.vec(3 * shape.n_heads * shape.head_dim);
        for dtype in [KvDtype::F16, KvDtype::Bf16, KvDtype::Q8] {
            let mut kv = LayerKv::new(dtype);
            kv.append(&keys, &keys, &pos).unwrap();
            assert_eq!(kv.k_scale.is_empty(), dtype != KvDtype::Q8);
            let wide = kv.keys_f32();
            let stored = Keys::of(&kv);
            let got = block_scores_of(&q, stored, &pos, len, shape, 64, 8);
            let want = block_scores(&q, &wide, &pos, len, shape, 64, 8);
            assert_eq!(got, want, "{dtype:?} paper scores");
            let got = block_scores_attention_of(&q, stored, &pos, len, shape, 64, 8);
            let want = block_scores_attention(&q, &wide, &pos, len, shape, 64, 8);
            assert_eq!(got, want, "{dtype:?} attention scores");
        }
    }

    fn positions(rng: &mut Rng, prompt_len: usize, drop_every: u64, generated: usize) -> Vec<u32> {
        let mut p: Vec<u32> = (0..prompt_len as u32)
            .filter(|_| drop_every == 0 || rng.below(drop_every) != 0)
            .collect();
        // Drop a few whole 64-blocks too.
        let dropped_blocks: Vec<u32> = (0..3)
            .map(|_| rng.below(prompt_len as u64 / 64 + 1) as u32)
            .collect();
        p.retain(|&x| !dropped_blocks.contains(&(x / 64)) || x == 0);
        p.extend((0..generated as u32).map(|g| prompt_len as u32 + 3 + g));
        p
    }

    #[test]
    fn fast_scores_match_the_reference_on_random_inputs() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let shapes = [
            HeadShape {
                n_heads: 9,
                n_kv_heads: 3,
                head_dim: 64,
            },
            HeadShape {
                n_heads: 4,
                n_kv_heads: 1,
                head_dim: 13,
            },
            HeadShape {
                n_heads: 2,
                n_kv_heads: 2,
                head_dim: 7,
            },
        ];
        for shape in shapes {
            for (prompt_len, drop_every, generated, w) in [
                (1000, 0, 0, 4),
                (517, 5, 9, 4),
                (131, 2, 3, 1),
                (70, 0, 5, 3),
            ] {
                for (block_size, unit_size) in [(64, 8), (24, 6), (8, 8)] {
                    let pos = positions(&mut rng, prompt_len, drop_every, generated);
                    let q = rng.vec(w * shape.n_heads * shape.head_dim);
                    let k = rng.vec(pos.len() * shape.n_kv_heads * shape.head_dim);
                    let what = format!(
                        "{shape:?} len {prompt_len} drop 1/{drop_every} gen {generated} w {w} \
                         block {block_size}/{unit_size}"
                    );
                    let got = block_scores(&q, &k, &pos, prompt_len, shape, block_size, unit_size);
                    let want = block_scores_reference(
                        &q, &k, &pos, prompt_len, shape, block_size, unit_size,
                    );
                    assert!(!want.is_empty());
                    assert_close(&got, &want, &what);
                }
            }
        }
    }

    #[test]
    fn rows_past_prompt_len_are_not_scored() {
        let shape = HeadShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
        };
        let mut rng = Rng(7);
        let pos: Vec<u32> = (0..200).collect();
        let q = rng.vec(4 * 8);
        let k = rng.vec(200 * 4);
        let all = block_scores(&q, &k, &pos, 200, shape, 64, 8);
        let cut = block_scores(&q, &k, &pos, 100, shape, 64, 8);
        assert_eq!(
            all.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![0, 1, 2, 3]
        );
        assert_eq!(cut.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(cut[0], all[0], "block 0 is untouched by the cut");
        // Block 1 is scored only from positions 64..100 (units 8..12, the last one partial).
        let only_prompt = block_scores(&q, &k[..100 * 4], &pos[..100], 100, shape, 64, 8);
        assert_eq!(cut, only_prompt);
    }

    #[test]
    fn unit_key_is_a_mean_and_block_takes_the_max_unit() {
        // One head, head_dim 1, q = 1: a unit's score is |mean of its keys|.
        let shape = HeadShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 1,
        };
        let pos: Vec<u32> = (0..8).collect();
        let k = [1.0, 3.0, -2.0, -2.0, 0.5, 0.5, 0.5, 0.5]; // units of 2: |2|, |-2|, .5, .5
        let s = block_scores(&[1.0], &k, &pos, 8, shape, 4, 2);
        assert_eq!(s, vec![(0, 2.0), (1, 0.5)]);
    }

    #[test]
    fn gqa_maps_query_heads_to_their_kv_head() {
        // 4 query heads over 2 KV heads, head_dim 1: heads 0,1 read kv 0; heads 2,3 read kv 1.
        let shape = HeadShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 1,
        };
        let q = [1.0, 1.0, 0.0, 0.0];
        let k = [5.0, 100.0]; // one row: kv0 = 5, kv1 = 100
        let s = block_scores(&q, &k, &[0], 1, shape, 8, 8);
        assert_eq!(s, vec![(0, (5.0 + 5.0) / 4.0)]);
    }

    #[test]
    fn local_query_is_the_mean_of_the_window() {
        let shape = HeadShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 2,
        };
        let q = [1.0, 0.0, 3.0, 0.0]; // mean (2, 0)
        let k = [1.0, 9.0];
        assert_eq!(block_scores(&q, &k, &[5], 6, shape, 8, 8), vec![(0, 2.0)]);
    }

    #[test]
    fn no_prompt_rows_gives_no_scores() {
        let shape = HeadShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 2,
        };
        assert!(block_scores(&[1.0, 1.0], &[], &[], 10, shape, 8, 8).is_empty());
        assert!(block_scores(&[1.0, 1.0], &[1.0, 1.0], &[10], 10, shape, 8, 8).is_empty());
    }

    #[test]
    #[should_panic(expected = "keys has")]
    fn mismatched_keys_are_a_caller_bug() {
        let shape = HeadShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 2,
        };
        block_scores(&[1.0, 1.0], &[1.0], &[0], 10, shape, 8, 8);
    }
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
    shape: HeadShape,
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
    shape: HeadShape,
    block_size: usize,
    unit_size: usize,
) -> Vec<(u32, f32)> {
    shape.check(q_window, keys.len(), positions, block_size, unit_size);
    UnitKeys::new(keys, positions, prompt_len, shape, block_size, unit_size)
        .attention_scores(q_window, WindowPool::Mean)
}

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
