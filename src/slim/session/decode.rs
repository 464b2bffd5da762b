//! Decode's choice of what each slim layer attends to: at a stage's boundary the window of
//! the newest queries scores the stage's candidates, proposes its top-K and the overlap gate
//! decides whether the active set switches (bringing pruned blocks back when the budget
//! outgrew the pool); with `decode_select = "layer"` every slim layer makes that choice itself
//! before it attends. The rows a set stands for, found by binary search over the layer's
//! positions.

use std::collections::VecDeque;
use std::ops::Range;

use super::kept_rows::{self, HiddenRows};
use super::SlimSession;
use crate::backend::score::WindowPool;
use crate::kv::policy::{Revived, RowChange};
use crate::slim::schedule::{GateKind, ScoreKind};
use crate::slim::score::ScoredLayer;
use crate::slim::select::{forced_blocks, gate, gate_by_mass, select_top_k};
use crate::Result;

/// One query of a stage's window and, once scored, its block scores.
#[derive(Debug, Clone)]
pub(super) struct WindowQuery {
    q: Vec<f32>,
    scores: Option<Vec<(u32, f32)>>,
}

impl WindowQuery {
    pub(super) fn new(q: &[f32]) -> Self {
        Self {
            q: q.to_vec(),
            scores: None,
        }
    }
}

/// Blocks that leave or join a set going from `before` to `after` (both ascending).
fn changes(before: &[u32], after: &[u32]) -> usize {
    let kept = (before.iter())
        .filter(|b| after.binary_search(b).is_ok())
        .count();
    (before.len() - kept) + (after.len() - kept)
}

/// Queries a slim layer chooses its decode blocks from (`decode_select = "layer"`): the one it
/// is about to attend with. On the default model at decode_keep 0.3 a window of the last 32
/// queries (which keeps blocks the answer has moved past) raised the KL to dense by 20-28%; one
/// of 4 was mixed, +13% and -15% (bench/NOTES.md).
const LAYER_WINDOW: usize = 1;

/// With `decode_select = "layer"`: one slim layer's own choice of the blocks decode attends to.
#[derive(Debug, Clone, Default)]
pub(super) struct LayerChoice {
    /// Blocks this layer attends to, ascending (chosen before it attends, at every step).
    pub(super) active: Vec<u32>,
    /// Prompt blocks with KV at this layer (the candidates).
    pub(super) candidates: usize,
    /// The layer's last `LAYER_WINDOW` queries, with their scores.
    window: VecDeque<WindowQuery>,
}

impl SlimSession {
    /// Decode (or a later turn) at a boundary: stash rows revived at the previous stage, update
    /// the window, propose, gate, and bring back the pruned blocks that became active.
    pub(super) fn reselect(
        &mut self,
        s: usize,
        h: &dyn HiddenRows,
        q: &[f32],
        positions: &[u32],
        kv: &dyn ScoredLayer,
    ) -> Result<Option<RowChange>> {
        let width = self.shape.n_heads * self.shape.head_dim;
        let w = self.cfg.local_window;
        let prompt_len = self.prompt_len as u32;
        // q holds the queries of the last rows only, from row `first` on
        let first = positions.len() - q.len() / width;
        // rows below prompt_len were revived at the previous stage: they stop here
        let (arrived, keep): (Vec<usize>, Vec<usize>) =
            (0..positions.len()).partition(|&r| positions[r] < prompt_len);
        if !arrived.is_empty() {
            let stashed = self.stash(h, positions, &arrived)?;
            self.stages[s].aux.extend(stashed);
        }
        let st = &mut self.stages[s];
        // `keep` is a suffix of the rows (positions ascend): a row before `first` is followed by
        // the `local_window` rows from `first` on, and would leave the window again
        for &r in keep.iter().filter(|&&r| r >= first) {
            let q = &q[(r - first) * width..(r - first + 1) * width];
            st.window.push_back(WindowQuery::new(q));
            while st.window.len() > w {
                st.window.pop_front();
            }
        }
        // candidates: the blocks with KV at this boundary layer
        let mut scores = self.window_scores(s, kv)?;
        let (block_size, gamma, revive) = (self.cfg.block_size, self.cfg.gamma, self.cfg.revive);
        let st = &mut self.stages[s];
        // Pruned blocks come back only into budget the stage's pool cannot fill (a raised
        // ratio); swapping a held block for a pruned one would cost a forward of its rows
        // through the stage for every switch (measured: slim decode fell below dense).
        if !(revive && st.stage.keep_blocks > st.pool.len()) {
            scores.retain(|(b, _)| st.pool.binary_search(b).is_ok());
        }
        let forced = forced_blocks(self.prompt_len, block_size, w);
        let k = self.stage_k(&self.stages[s].stage);
        let st = &mut self.stages[s];
        let proposal = select_top_k(&scores, k, &forced);
        let before = st.active.clone();
        let switched = if scores.len() <= k || proposal.len() != before.len() {
            // every candidate fits the budget, or the budget changed (the ratio moved): no gate
            let all = proposal != st.active;
            st.active = proposal;
            all
        } else {
            match self.cfg.gate {
                GateKind::Blocks => gate(&mut st.active, proposal, gamma),
                GateKind::Mass => gate_by_mass(&mut st.active, proposal, &scores, gamma),
            }
        };
        if switched {
            let kept = before
                .iter()
                .filter(|b| st.active.binary_search(b).is_ok())
                .count();
            self.swaps_this_step += (before.len() - kept) + (st.active.len() - kept);
        }
        let insert = self.revive_active(s)?;
        if insert.is_some() {
            // the rows coming back attend to every row before them from here to the last layer,
            // as in a prefill: a decode set chosen by the newest query leaves them without their
            // own context, and their keys came out worse than none (bench/NOTES.md)
            self.decoding = false;
        }
        Ok((insert.is_some() || !arrived.is_empty()).then_some(RowChange { keep, insert }))
    }

    /// Block scores of stage `s`'s window. Attention-mass scores pool per-query scores (mean or
    /// max, `window_pool`), which are kept: a step computes only its new queries' (a full
    /// recount only when the layer's blocks changed). The paper's score pools the queries first
    /// and is recomputed.
    fn window_scores(&mut self, s: usize, kv: &dyn ScoredLayer) -> Result<Vec<(u32, f32)>> {
        if self.cfg.score != ScoreKind::Attention {
            let q: Vec<f32> = (self.stages[s].window.iter())
                .flat_map(|wq| wq.q.iter().copied())
                .collect();
            return self.score(&q, kv);
        }
        let mut window = std::mem::take(&mut self.stages[s].window);
        let pooled = self.pooled_scores(&mut window, kv);
        self.stages[s].window = window;
        pooled
    }

    /// Attention-mass block scores of the prompt blocks `kv` holds, pooled over `window` by
    /// `window_pool`. Scores each query once (kept in the window).
    fn pooled_scores(
        &self,
        window: &mut VecDeque<WindowQuery>,
        kv: &dyn ScoredLayer,
    ) -> Result<Vec<(u32, f32)>> {
        let req = self.request(false);
        for wq in window.iter_mut().rev() {
            if wq.scores.is_some() {
                break;
            }
            wq.scores = Some(kv.block_scores(&wq.q, &req)?);
        }
        let newest: Vec<u32> = (window.back().and_then(|wq| wq.scores.as_ref()))
            .map(|sc| sc.iter().map(|&(b, _)| b).collect())
            .unwrap_or_default();
        let same_blocks = |sc: &[(u32, f32)]| {
            sc.len() == newest.len() && sc.iter().zip(&newest).all(|(a, b)| a.0 == *b)
        };
        for wq in window.iter_mut() {
            if !wq.scores.as_deref().is_some_and(same_blocks) {
                wq.scores = Some(kv.block_scores(&wq.q, &req)?);
            }
        }
        let n = window.len().max(1) as f32;
        let mut pooled: Vec<(u32, f32)> = newest.iter().map(|&b| (b, 0.0)).collect();
        for sc in window.iter().filter_map(|wq| wq.scores.as_ref()) {
            for (acc, &(_, v)) in pooled.iter_mut().zip(sc) {
                match self.cfg.window_pool {
                    WindowPool::Mean => acc.1 += v / n,
                    WindowPool::Max => acc.1 = acc.1.max(v),
                }
            }
        }
        Ok(pooled)
    }

    /// `decode_select = "layer"`, before slim layer `layer` attends: its newest query joins its
    /// window (in the first forward, the prompt's last; later, the newest row past the prompt),
    /// the window proposes the layer's top-K among the blocks it holds, and the gate decides.
    /// The set applies from this step's attention on (a prefill attends to every row).
    pub(super) fn choose_for_layer(
        &mut self,
        layer: usize,
        q: &[f32],
        positions: &[u32],
        kv: &dyn ScoredLayer,
    ) -> Result<()> {
        let first_forward = !self.decoding;
        let Some(st) = self.stage_of(layer) else {
            return Ok(());
        };
        let k = st.stage.decode_blocks;
        if k >= st.pool.len() && !st.pool.is_empty() {
            // every block with KV here fits the set: nothing to choose, nothing to score
            let Some(choice) = self.layers.get(layer) else {
                return Ok(());
            };
            if choice.active != st.pool {
                let swaps = changes(&choice.active, &st.pool);
                let every = st.pool.clone();
                if !first_forward {
                    self.swaps_this_step += swaps;
                }
                let choice = &mut self.layers[layer];
                choice.candidates = every.len();
                choice.active = every;
            }
            return Ok(());
        }
        let Some(mut choice) = self.layers.get_mut(layer).map(std::mem::take) else {
            return Ok(());
        };
        let width = self.shape.n_heads * self.shape.head_dim;
        let w = LAYER_WINDOW;
        // q holds the queries of the last rows only, from row `first` on (the engine passes all)
        let first = positions.len().saturating_sub(q.len() / width);
        let rows: Vec<usize> = if first_forward {
            (positions.len().saturating_sub(w).max(first)..positions.len()).collect()
        } else {
            (first..positions.len())
                .filter(|&r| positions[r] as usize >= self.prompt_len)
                .collect()
        };
        for r in rows {
            let q = &q[(r - first) * width..(r - first + 1) * width];
            (choice.window).push_back(WindowQuery::new(q));
            while choice.window.len() > w {
                choice.window.pop_front();
            }
        }
        let scores = self.pooled_scores(&mut choice.window, kv);
        let scores = match scores {
            Ok(scores) => scores,
            Err(e) => {
                self.layers[layer] = choice;
                return Err(e);
            }
        };
        let forced = forced_blocks(self.prompt_len, self.cfg.block_size, self.cfg.local_window);
        let proposal = select_top_k(&scores, k, &forced);
        let before = choice.active.clone();
        let switched = if before.is_empty() || proposal.len() != before.len() {
            choice.active = proposal;
            choice.active != before
        } else {
            match self.cfg.gate {
                GateKind::Blocks => gate(&mut choice.active, proposal, self.cfg.gamma),
                GateKind::Mass => {
                    gate_by_mass(&mut choice.active, proposal, &scores, self.cfg.gamma)
                }
            }
        };
        if switched && !first_forward {
            self.swaps_this_step += changes(&before, &choice.active);
        }
        choice.candidates = scores.len();
        self.layers[layer] = choice;
        Ok(())
    }

    /// The rows of `kv` that decode attends to with the prompt blocks `active`: each block, and
    /// the rows past the prompt, as runs of rows found by binary search (rows are sorted by
    /// position; no pass over every row per layer and step).
    pub(super) fn rows_of(&self, active: &[u32], kv: &dyn ScoredLayer) -> Vec<Range<usize>> {
        let row_of = |pos: usize| kv.positions().partition_point(|&p| (p as usize) < pos);
        let bs = self.cfg.block_size;
        let blocks =
            (active.iter()).map(|&b| b as usize * bs..((b as usize + 1) * bs).min(self.prompt_len));
        let after_prompt = std::iter::once(self.prompt_len..usize::MAX);
        let mut ranges: Vec<Range<usize>> = Vec::new();
        for span in blocks.chain(after_prompt) {
            let rows = row_of(span.start)..row_of(span.end);
            if rows.is_empty() {
                continue;
            }
            match ranges.last_mut() {
                Some(r) if r.end == rows.start => r.end = rows.end,
                _ => ranges.push(rows),
            }
        }
        ranges
    }

    /// Move the active blocks of stage `s` that have no KV there out of the aux store and into
    /// the pool; their rows, to run through the stage's layers.
    fn revive_active(&mut self, s: usize) -> Result<Option<(Revived, Vec<u32>)>> {
        let st = &mut self.stages[s];
        let missing: Vec<u32> = (st.active.iter())
            .filter(|b| st.pool.binary_search(b).is_err())
            .copied()
            .collect();
        if missing.is_empty() {
            return Ok(None);
        }
        let mut blocks = Vec::new();
        for b in &missing {
            let Some(block) = st.aux.remove(b) else {
                continue; // a candidate with neither KV nor hidden states cannot happen; skip it
            };
            blocks.push(block);
            st.pool.push(*b);
            self.revived += 1;
        }
        st.pool.sort_unstable();
        st.active.retain(|b| st.pool.binary_search(b).is_ok());
        kept_rows::revived(blocks)
    }
}
