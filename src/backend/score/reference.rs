//! The block scores computed the naive way, in f64, straight from their definitions: the CPU
//! reference of the kernels in [`super`] (tests, `ops_reference`, the GPU checks).

use crate::backend::heads::Heads;

/// The same scores computed the naive way, in f64, straight from the definition: group rows by
/// block and unit, average, dot, mean over heads, max over units. Positions need not be sorted.
/// For tests and as the CPU reference of any faster kernel.
pub fn block_scores_reference(
    q_window: &[f32],
    keys: &[f32],
    positions: &[u32],
    prompt_len: usize,
    shape: Heads,
    block_size: usize,
    unit_size: usize,
) -> Vec<(u32, f32)> {
    use std::collections::BTreeMap;
    let w = shape.check(q_window, keys.len(), positions, block_size, unit_size);
    let Heads {
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

/// [`super::block_scores_attention`] the naive way, in f64: group rows into units, average, and for
/// every window query and head take the softmax over units; sum each block's mass. For tests.
pub fn block_scores_attention_reference(
    q_window: &[f32],
    keys: &[f32],
    positions: &[u32],
    prompt_len: usize,
    shape: Heads,
    block_size: usize,
    unit_size: usize,
) -> Vec<(u32, f32)> {
    use std::collections::BTreeMap;
    let w = shape.check(q_window, keys.len(), positions, block_size, unit_size);
    let Heads {
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
