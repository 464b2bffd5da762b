//! Choosing the prompt blocks a stage keeps (SlimInfer, arXiv 2508.06447): top-K by score with the
//! always-kept blocks, the overlap-aware gate that decode uses before swapping KV blocks, and the
//! row indices to gather once the blocks are chosen.
//!
//! Block ids are `position / block_size` over original positions. Every block list here is sorted
//! ascending and free of duplicates, so kept rows stay in positional order (which keeps the
//! causal mask trivial).

/// Top-k block ids by score among `scores`, always including the `forced` ids that are present in
/// `scores` (they count toward k); ties broken by lower id; result sorted ascending. If
/// `k >= scores.len()`, all ids.
///
/// When more forced ids are present than k, all of them are returned (the result is longer than
/// k); [`crate::slim::schedule::SlimConfig::resolve`] never asks for fewer blocks than are forced.
/// NaN scores rank below every number.
pub fn select_top_k(scores: &[(u32, f32)], k: usize, forced: &[u32]) -> Vec<u32> {
    if k >= scores.len() {
        let mut all: Vec<u32> = scores.iter().map(|&(b, _)| b).collect();
        all.sort_unstable();
        all.dedup();
        return all;
    }
    let mut chosen: Vec<u32> = scores
        .iter()
        .map(|&(b, _)| b)
        .filter(|b| forced.contains(b))
        .collect();
    chosen.sort_unstable();
    chosen.dedup();
    let rest = k.saturating_sub(chosen.len());
    if rest > 0 {
        let key = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s };
        let mut others: Vec<(u32, f32)> = scores
            .iter()
            .copied()
            .filter(|(b, _)| chosen.binary_search(b).is_err())
            .collect();
        // Highest score first; among equal scores, the lower id.
        let by_rank =
            |a: &(u32, f32), b: &(u32, f32)| key(b.1).total_cmp(&key(a.1)).then(a.0.cmp(&b.0));
        if rest < others.len() {
            others.select_nth_unstable_by(rest - 1, by_rank);
            others.truncate(rest);
        }
        chosen.extend(others.iter().map(|&(b, _)| b));
        chosen.sort_unstable();
    }
    chosen
}

/// Blocks on each side of a block whose scores make its neighbourhood in [`local_contrast`].
pub const CONTRAST_RADIUS: usize = 4;

/// Each block's score over the median score of the blocks around it (`radius` on each side, by
/// block id, itself included): how much it stands out from its neighbourhood. The
/// attention-mass score falls with distance from the question, so a relevant block far back
/// can rank below every recent block and still stand out among its neighbours.
pub fn local_contrast(scores: &[(u32, f32)], radius: usize) -> Vec<(u32, f32)> {
    let mut by_id: Vec<(u32, f32)> = scores.to_vec();
    by_id.sort_by_key(|&(b, _)| b);
    let mut near: Vec<f32> = Vec::with_capacity(2 * radius + 1);
    (0..by_id.len())
        .map(|i| {
            near.clear();
            let lo = i.saturating_sub(radius);
            let hi = (i + radius + 1).min(by_id.len());
            near.extend(by_id[lo..hi].iter().map(|&(_, s)| s));
            near.sort_by(f32::total_cmp);
            let median = near[near.len() / 2].max(f32::MIN_POSITIVE);
            (by_id[i].0, by_id[i].1 / median)
        })
        .collect()
}

/// A stage's `k` blocks: the forced ones, then the best by score, and `share` of the budget
/// left after the forced blocks by [`local_contrast`] among the blocks not chosen yet. Sorted
/// ascending. `share = 0` is [`select_top_k`].
pub fn select_blocks(scores: &[(u32, f32)], k: usize, forced: &[u32], share: f32) -> Vec<u32> {
    if share <= 0.0 || k >= scores.len() {
        return select_top_k(scores, k, forced);
    }
    let n_forced = (scores.iter()).filter(|(b, _)| forced.contains(b)).count();
    let free = k.saturating_sub(n_forced);
    let by_contrast = ((free as f32 * share).round() as usize).min(free);
    let mut chosen = select_top_k(scores, k - by_contrast, forced);
    let rest: Vec<(u32, f32)> = local_contrast(scores, CONTRAST_RADIUS)
        .into_iter()
        .filter(|(b, _)| chosen.binary_search(b).is_err())
        .collect();
    chosen.extend(select_top_k(&rest, by_contrast, &[]));
    chosen.sort_unstable();
    chosen
}

/// How much to scale a budget of `k` blocks for one prompt's `scores`: the number of
/// best-scored blocks (the `forced` ones aside) that hold `coverage` of the score mass, over
/// the budget's own (`k` less the forced blocks present), within `1 ± spread`. Flat scores
/// spread the mass over many blocks and give more than 1; peaked ones less. Negative and NaN
/// scores count as 0; no mass, or no free budget, gives 1.
pub fn budget_factor(
    scores: &[(u32, f32)],
    forced: &[u32],
    k: usize,
    coverage: f32,
    spread: f32,
) -> f32 {
    let mut free: Vec<f32> = (scores.iter())
        .filter(|(b, _)| !forced.contains(b))
        .map(|&(_, s)| if s.is_nan() { 0.0 } else { s.max(0.0) })
        .collect();
    let own = k.saturating_sub(scores.len() - free.len());
    let total: f32 = free.iter().sum();
    if own == 0 || total <= 0.0 {
        return 1.0;
    }
    free.sort_by(|a, b| b.total_cmp(a));
    let mut held = 0.0;
    let mut needed = free.len();
    for (i, s) in free.iter().enumerate() {
        held += s;
        if held >= coverage * total {
            needed = i + 1;
            break;
        }
    }
    (needed as f32 / own as f32).clamp(1.0 - spread, 1.0 + spread)
}

/// |a ∩ b| / max(|a|, 1); both sorted ascending.
pub fn overlap(a: &[u32], b: &[u32]) -> f32 {
    let (mut i, mut j, mut common) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                common += 1;
                i += 1;
                j += 1;
            }
        }
    }
    common as f32 / a.len().max(1) as f32
}

/// Overlap-aware swapping: keep `active` if `overlap(proposal, active) >= gamma`, else replace it.
/// Returns true when it switched. A proposal equal to `active` never switches (also when both
/// are empty); an empty `active` (the first decode step) takes any non-empty proposal.
pub fn gate(active: &mut Vec<u32>, proposal: Vec<u32>, gamma: f32) -> bool {
    if proposal == *active || overlap(&proposal, active) >= gamma {
        return false;
    }
    *active = proposal;
    true
}

/// Overlap-aware swapping weighted by score: keep `active` while it holds at least `gamma` of the
/// score mass of `proposal` (scores of blocks missing from `scores` count as 0), else replace it.
/// Unlike [`gate`], one high-scoring block (a fact the answer needs) can trigger a switch, while
/// churn among low-scoring blocks at the edge of the top-K does not. Returns true when it switched.
pub fn gate_by_mass(
    active: &mut Vec<u32>,
    proposal: Vec<u32>,
    scores: &[(u32, f32)],
    gamma: f32,
) -> bool {
    if proposal == *active {
        return false;
    }
    let score = |b: &u32| {
        scores
            .iter()
            .find(|(id, _)| id == b)
            .map_or(0.0, |&(_, s)| if s.is_nan() { 0.0 } else { s.max(0.0) })
    };
    let total: f32 = proposal.iter().map(score).sum();
    let covered: f32 = (proposal.iter())
        .filter(|b| active.binary_search(b).is_ok())
        .map(score)
        .sum();
    if !active.is_empty() && total > 0.0 && covered >= gamma * total {
        return false;
    }
    *active = proposal;
    true
}

/// Indices (into `positions`) of rows to keep: rows with position >= prompt_len (generated /
/// later-turn tokens) always; prompt rows whose block id (pos / block_size) is in `blocks`
/// (sorted).
pub fn kept_rows(
    positions: &[u32],
    prompt_len: usize,
    blocks: &[u32],
    block_size: usize,
) -> Vec<usize> {
    debug_assert!(
        blocks.windows(2).all(|b| b[0] < b[1]),
        "slim::kept_rows: blocks not sorted"
    );
    positions
        .iter()
        .enumerate()
        .filter(|&(_, &pos)| {
            let pos = pos as usize;
            pos >= prompt_len || blocks.binary_search(&((pos / block_size) as u32)).is_ok()
        })
        .map(|(i, _)| i)
        .collect()
}

/// The blocks that are always kept for a prompt of prompt_len tokens: the first block (attention
/// sink) and the block(s) holding the last `local_window` prompt tokens (the last row feeds the LM
/// head, and these rows' queries are the local query). Sorted ascending; empty for an empty
/// prompt; at most three blocks when `local_window <= block_size`.
pub fn forced_blocks(prompt_len: usize, block_size: usize, local_window: usize) -> Vec<u32> {
    if prompt_len == 0 || block_size == 0 {
        return Vec::new();
    }
    let first_local = prompt_len - local_window.clamp(1, prompt_len);
    let (lo, hi) = (first_local / block_size, (prompt_len - 1) / block_size);
    let mut out = vec![0u32];
    out.extend((lo.max(1)..=hi).map(|b| b as u32));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mass_gate_switches_for_one_heavy_block_but_not_for_light_churn() {
        let scores: Vec<(u32, f32)> = (0..20)
            .map(|b| (b, if b == 7 { 0.5 } else { 0.02 }))
            .collect();
        let mut active: Vec<u32> = (10..20).collect();
        // swapping one light block for another: covered 9 x 0.02 of 10 x 0.02 = 0.9
        let light: Vec<u32> = (9..19).collect();
        assert!(!gate_by_mass(&mut active, light, &scores, 0.9));
        assert_eq!(active, (10..20).collect::<Vec<_>>());
        // one heavy block (7) in the proposal: covered 0.18 of 0.68
        let heavy: Vec<u32> = [7].into_iter().chain(11..20).collect();
        assert!(gate_by_mass(&mut active, heavy.clone(), &scores, 0.9));
        assert_eq!(active, heavy);
        // the block-count gate keeps the old set for the same change (overlap 0.9)
        let mut by_count: Vec<u32> = (10..20).collect();
        assert!(!gate(&mut by_count, heavy, 0.9));
    }

    fn scores(v: &[f32]) -> Vec<(u32, f32)> {
        v.iter().enumerate().map(|(i, &s)| (i as u32, s)).collect()
    }

    #[test]
    fn top_k_picks_the_highest_scores_sorted_by_id() {
        let s = scores(&[0.1, 0.9, 0.3, 0.8, 0.2, 0.7]);
        assert_eq!(select_top_k(&s, 3, &[]), vec![1, 3, 5]);
        assert_eq!(select_top_k(&s, 1, &[]), vec![1]);
        assert_eq!(select_top_k(&s, 0, &[]), Vec::<u32>::new());
    }

    #[test]
    fn top_k_keeps_forced_blocks_inside_the_budget() {
        let s = scores(&[0.1, 0.9, 0.3, 0.8, 0.2, 0.7]);
        // Forced 0 and 4 take two of the four slots; the best two others are 1 and 3.
        assert_eq!(select_top_k(&s, 4, &[0, 4]), vec![0, 1, 3, 4]);
        // Forced ids absent from the scores are ignored and do not use up the budget.
        assert_eq!(select_top_k(&s, 2, &[42]), vec![1, 3]);
        // More forced than k: all forced are kept.
        assert_eq!(select_top_k(&s, 1, &[0, 4]), vec![0, 4]);
        // Duplicated forced ids count once.
        assert_eq!(select_top_k(&s, 3, &[4, 4]), vec![1, 3, 4]);
    }

    #[test]
    fn top_k_with_k_at_least_len_returns_all() {
        let s = vec![(7, 0.0), (2, 1.0), (9, 0.5)];
        assert_eq!(select_top_k(&s, 3, &[]), vec![2, 7, 9]);
        assert_eq!(select_top_k(&s, 10, &[2]), vec![2, 7, 9]);
    }

    #[test]
    fn top_k_breaks_ties_by_lower_id() {
        let s = scores(&[0.5, 0.5, 0.5, 0.5, 0.9]);
        assert_eq!(select_top_k(&s, 3, &[]), vec![0, 1, 4]);
        let sparse = vec![(3, 1.0), (8, 2.0), (10, 1.0), (12, 1.0)];
        assert_eq!(select_top_k(&sparse, 2, &[]), vec![3, 8]);
    }

    #[test]
    fn top_k_ranks_nan_last() {
        let s = scores(&[f32::NAN, 0.1, 0.2]);
        assert_eq!(select_top_k(&s, 2, &[]), vec![1, 2]);
    }

    #[test]
    fn top_k_matches_a_full_sort() {
        // A pseudo-random score list with many ties, against sort-then-take.
        let s: Vec<(u32, f32)> = (0..300u32)
            .map(|i| (i * 2, ((i * 7919) % 37) as f32))
            .collect();
        for k in [0, 1, 5, 64, 150, 299] {
            let mut sorted = s.clone();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut want: Vec<u32> = sorted[..k].iter().map(|p| p.0).collect();
            want.sort_unstable();
            assert_eq!(select_top_k(&s, k, &[]), want, "k = {k}");
        }
    }

    #[test]
    fn overlap_is_the_shared_fraction_of_the_first_set() {
        assert_eq!(overlap(&[1, 2, 3, 4], &[2, 4, 6]), 0.5);
        assert_eq!(overlap(&[], &[1]), 0.0);
        assert_eq!(overlap(&[1, 2], &[1, 2]), 1.0);
    }

    fn changed(n: u32, changed: u32) -> (Vec<u32>, Vec<u32>) {
        let active: Vec<u32> = (0..n).collect();
        // Replace the last `changed` ids with ids the active set does not hold.
        let proposal: Vec<u32> = (0..n - changed).chain(1000..1000 + changed).collect();
        (active, proposal)
    }

    #[test]
    fn gate_keeps_the_active_set_for_an_identical_proposal() {
        let (mut active, _) = changed(128, 0);
        let same = active.clone();
        assert!(!gate(&mut active, same.clone(), 0.9));
        assert!(!gate(&mut active, same.clone(), 1.0));
        assert_eq!(active, same);
        let mut empty = Vec::new();
        assert!(!gate(&mut empty, Vec::new(), 0.9));
    }

    #[test]
    fn gate_ignores_one_changed_block_of_128() {
        let (mut active, proposal) = changed(128, 1);
        assert!((overlap(&proposal, &active) - 0.992).abs() < 1e-3);
        let before = active.clone();
        assert!(!gate(&mut active, proposal, 0.9));
        assert_eq!(active, before);
    }

    #[test]
    fn gate_switches_when_13_of_128_blocks_change() {
        let (mut active, proposal) = changed(128, 13);
        assert!((overlap(&proposal, &active) - 0.898).abs() < 1e-3);
        assert!(gate(&mut active, proposal.clone(), 0.9));
        assert_eq!(active, proposal);
    }

    #[test]
    fn gate_takes_the_first_proposal() {
        let mut active = Vec::new();
        assert!(gate(&mut active, vec![0, 3, 5], 0.9));
        assert_eq!(active, vec![0, 3, 5]);
    }

    #[test]
    fn kept_rows_keeps_generated_rows_and_rows_of_kept_blocks() {
        // Prompt of 20 tokens in blocks of 4; rows of block 1 already pruned; 3 generated rows.
        let positions: Vec<u32> = [0, 1, 2, 3, 8, 9, 10, 11, 12, 16, 19, 20, 21, 22].to_vec();
        let rows = kept_rows(&positions, 20, &[0, 3], 4);
        // Block 0 -> rows 0..4; block 3 (12..16) -> row 8; generated 20.. -> rows 11..14.
        assert_eq!(rows, vec![0, 1, 2, 3, 8, 11, 12, 13]);
        assert_eq!(kept_rows(&positions, 20, &[], 4), vec![11, 12, 13]);
    }

    #[test]
    fn flat_scores_widen_the_budget_and_peaked_ones_narrow_it() {
        let forced = [0, 9];
        // ten blocks, two forced (their scores do not count), k = 6: 4 of the budget's own
        let flat: Vec<(u32, f32)> = (0..10).map(|b| (b, 1.0)).collect();
        // 0.8 of the 8 free blocks' mass needs 7 of them (6.4 rounded up): 7/4, capped at 1.5
        assert_eq!(budget_factor(&flat, &forced, 6, 0.8, 0.5), 1.5);
        assert_eq!(budget_factor(&flat, &forced, 6, 0.8, 0.9), 1.75);
        let mut peaked = flat.clone();
        peaked[3].1 = 100.0;
        // a forced block's score is ignored; one block holds 100 of 107: needs 1 of 4,
        // floored at 1 - 0.5
        peaked[0].1 = 1000.0;
        assert_eq!(budget_factor(&peaked, &forced, 6, 0.8, 0.5), 0.5);
        assert_eq!(budget_factor(&peaked, &forced, 6, 0.8, 0.9), 0.25);
        // the budget's own mass: exactly 4 needed gives 1
        let mut four = flat.clone();
        for b in [2, 4, 6, 8] {
            four[b].1 = 10.0;
        }
        assert_eq!(budget_factor(&four, &forced, 6, 0.8, 0.5), 1.0);
        // no free budget, or no mass, leaves it alone; NaN counts as nothing
        assert_eq!(budget_factor(&flat, &forced, 2, 0.8, 0.5), 1.0);
        let none: Vec<(u32, f32)> = (0..10).map(|b| (b, f32::NAN)).collect();
        assert_eq!(budget_factor(&none, &forced, 6, 0.8, 0.5), 1.0);
        assert_eq!(budget_factor(&flat, &forced, 6, 0.8, 0.0), 1.0);
    }

    #[test]
    fn forced_blocks_cover_the_sink_and_the_local_window() {
        assert_eq!(forced_blocks(1, 64, 4), vec![0]);
        assert_eq!(forced_blocks(63, 64, 4), vec![0]);
        assert_eq!(forced_blocks(64, 64, 4), vec![0]);
        // Tokens 61..65: blocks 0 and 1.
        assert_eq!(forced_blocks(65, 64, 4), vec![0, 1]);
        // Tokens 126..130 straddle blocks 1 and 2.
        assert_eq!(forced_blocks(130, 64, 4), vec![0, 1, 2]);
        assert_eq!(forced_blocks(132, 64, 4), vec![0, 2]);
        assert_eq!(forced_blocks(0, 64, 4), Vec::<u32>::new());
        // A window longer than the prompt covers the whole prompt.
        assert_eq!(forced_blocks(10, 4, 100), vec![0, 1, 2]);
    }
    #[test]
    fn contrast_finds_a_block_that_stands_out_among_falling_scores() {
        // scores rise toward the end (recency); block 2 stands out among its neighbours
        let mut scores: Vec<(u32, f32)> = (0..20u32).map(|b| (b, 0.01 * (b + 1) as f32)).collect();
        scores[2].1 = 0.08;
        let contrast = local_contrast(&scores, CONTRAST_RADIUS);
        let best = (contrast.iter())
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        assert_eq!(best.0, 2);
        // by score alone, 4 blocks past the forced last one are the recent ones
        assert_eq!(select_top_k(&scores, 5, &[19]), vec![15, 16, 17, 18, 19]);
        // a quarter of the free budget by contrast brings block 2 in, in place of the 4th best
        assert_eq!(
            select_blocks(&scores, 5, &[19], 0.25),
            vec![2, 16, 17, 18, 19]
        );
        assert_eq!(
            select_blocks(&scores, 5, &[19], 0.0),
            select_top_k(&scores, 5, &[19])
        );
        assert_eq!(select_blocks(&scores, 30, &[19], 0.5).len(), 20);
    }
}
