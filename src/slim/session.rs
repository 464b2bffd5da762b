//! SlimInfer inside the forward: the `LayerPolicy` that prunes prompt rows at stage boundaries
//! during prefill and keeps each stage's active block set up to date during decode.
//!
//! Prefill: after the layer just before a stage starts, score the prompt blocks that layer still
//! holds from its post-RoPE keys and its last `local_window` queries (`slim::score`), keep the top-K
//! (the sink block and the last block forced), and gather those rows with their positions. Later
//! layers compute, and cache, only the kept rows. Rows at positions >= `prompt_len` (generated
//! tokens, later turns) are never pruned.
//!
//! Decode: at the same boundaries, the newest queries join a window of the last `local_window`
//! queries seen there; the window proposes a top-K among the stage's candidates (the blocks that
//! have KV at the boundary layer), and the overlap gate (gamma) decides whether the active set
//! switches. K is the stage's `decode_blocks` (`decode_keep` times its prefill blocks; all of
//! them by default); the first active set is chosen in prefill from the same scores as the
//! pool. Layers of the stage attend to the active blocks plus every token past the prompt.
//!
//! Revival (reading (a) of sliminfer.md §1.8, LazyLLM's aux cache), on by default: when prefill
//! drops a block at a stage, its hidden states at the stage's input are kept. When the stage's
//! budget later exceeds the blocks it holds (the person raised the ratio mid-conversation), the
//! proposal may choose pruned blocks: their rows rejoin the forward in front of the new token at
//! that boundary, run through the stage's layers (attending causally to what those layers hold)
//! and leave their KV behind; at the next boundary they leave the forward again and become that
//! stage's candidates. Each block is revived at most once per stage. Swaps within a full budget
//! stay among the blocks that have KV: reviving there costs a forward of 64 rows through the
//! stage per switch and measured slower than dense decode, and it did not bring back the facts
//! prefill lost (bench/NOTES.md). With `revive = false` a raised ratio cannot grow a stage past
//! the blocks prefill kept (reading (b)).

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::backend::with_f32;
use crate::kv::LayerKv;
use crate::model::llama::{ActiveBlocks, LayerPolicy, RowChange};
use crate::slim::schedule::{GateKind, ScoreKind, ScoreLayers, WindowPool};
use crate::slim::schedule::{SlimConfig, Stage};
use crate::slim::score::{block_scores_of, HeadShape, Keys, UnitKeys};
use crate::slim::select::{forced_blocks, gate, gate_by_mass, kept_rows, select_top_k};
use crate::Result;

/// State of one stage across a conversation.
#[derive(Debug, Clone)]
struct StageState {
    stage: Stage,
    /// Blocks whose rows have KV at this stage's layers (chosen in prefill), ascending.
    pool: Vec<u32>,
    /// Blocks the stage's layers attend to now, ascending (a subset of `pool`).
    active: Vec<u32>,
    /// The last `local_window` queries seen at the boundary layer, each (n_heads * hd), with
    /// each query's own block scores once computed (attention scoring pools per-query scores,
    /// by `window_pool`, so a decode step scores only its new query).
    window: VecDeque<WindowQuery>,
    /// Decode: the boundary layer's unit keys, with the prompt rows they were built from.
    units: Option<(usize, UnitKeys)>,
    /// Candidates without KV here (pruned at this stage): their hidden states at the stage's
    /// input, by block. Filled only when revival is on.
    aux: BTreeMap<u32, AuxBlock>,
}

/// One query of a stage's window and, once scored, its block scores.
#[derive(Debug, Clone)]
struct WindowQuery {
    q: Vec<f32>,
    scores: Option<Vec<(u32, f32)>>,
}

impl WindowQuery {
    fn new(q: &[f32]) -> Self {
        Self {
            q: q.to_vec(),
            scores: None,
        }
    }
}

/// The hidden states of one pruned block at a stage's input.
#[derive(Debug, Clone)]
struct AuxBlock {
    /// (rows, hidden)
    hidden: Vec<f32>,
    positions: Vec<u32>,
}

/// SlimInfer's per-conversation state; lives as long as the KV cache it pruned.
#[derive(Debug, Clone)]
pub struct SlimSession {
    cfg: SlimConfig,
    shape: HeadShape,
    n_layers: usize,
    /// Tokens of the prompt that was pruned: positions below this are prompt blocks.
    prompt_len: usize,
    stages: Vec<StageState>,
    /// True until the first forward (the prompt's prefill) has passed its last boundary.
    prefilling: bool,
    /// True once the first forward has run through every layer: from then on slim layers
    /// attend to their stage's active blocks only (the prefill attends to every kept row).
    decoding: bool,
    /// Block changes (in + out) of the active sets in the current step.
    swaps_this_step: usize,
    /// Blocks brought back (per stage) since the last `take_revived`.
    revived: usize,
    /// Prefill with `score_layers = "stage"`: block scores summed over the layers since the
    /// last boundary (block id → sum), and how many layers were added.
    acc: BTreeMap<u32, f32>,
    acc_layers: usize,
}

impl SlimSession {
    /// A session for a prompt of `prompt_len` tokens that starts at position 0.
    pub fn new(cfg: &SlimConfig, n_layers: usize, shape: HeadShape, prompt_len: usize) -> Self {
        let stages = cfg
            .resolve(n_layers, prompt_len)
            .into_iter()
            .map(|stage| StageState {
                stage,
                pool: Vec::new(),
                active: Vec::new(),
                window: VecDeque::new(),
                units: None,
                aux: BTreeMap::new(),
            })
            .collect();
        Self {
            cfg: cfg.clone(),
            shape,
            n_layers,
            prompt_len,
            stages,
            prefilling: true,
            decoding: false,
            swaps_this_step: 0,
            revived: 0,
            acc: BTreeMap::new(),
            acc_layers: 0,
        }
    }

    /// The resolved stages (empty when nothing is pruned).
    pub fn stages(&self) -> Vec<Stage> {
        self.stages.iter().map(|s| s.stage).collect()
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Take the number of active-set block changes since the last call.
    pub fn take_swaps(&mut self) -> usize {
        std::mem::take(&mut self.swaps_this_step)
    }

    /// Take the number of (block, stage) revivals since the last call.
    pub fn take_revived(&mut self) -> usize {
        std::mem::take(&mut self.revived)
    }

    /// Bytes of hidden states kept for revival.
    pub fn aux_bytes(&self) -> usize {
        let floats: usize = (self.stages.iter())
            .flat_map(|st| st.aux.values())
            .map(|b| b.hidden.len())
            .sum();
        floats * std::mem::size_of::<f32>()
    }

    /// Apply a new keep ratio to later decode steps of this conversation. Without revival,
    /// budgets are capped at the blocks that have KV (the pool): rows pruned in prefill have no
    /// KV to grow back into. With it, a larger budget brings pruned blocks back.
    pub fn set_keep_ratio(&mut self, keep_ratio: f32) {
        self.cfg.keep_ratio = keep_ratio;
        let resolved = self.cfg.resolve(self.n_layers, self.prompt_len);
        let revive = self.cfg.revive;
        for (st, new) in self.stages.iter_mut().zip(resolved) {
            st.stage.keep_blocks = if revive {
                new.keep_blocks
            } else {
                new.keep_blocks.min(st.pool.len().max(1))
            };
            st.stage.decode_blocks = new.decode_blocks.min(st.stage.keep_blocks);
        }
    }

    /// The stage whose layers include `layer`.
    fn stage_of(&self, layer: usize) -> Option<&StageState> {
        self.stages
            .iter()
            .rev()
            .find(|s| s.stage.start_layer <= layer)
    }

    /// Index of the stage that starts right after `layer`.
    fn boundary_after(&self, layer: usize) -> Option<usize> {
        self.stages
            .iter()
            .position(|s| s.stage.start_layer == layer + 1)
    }

    fn score(&self, q_window: &[f32], kv: &LayerKv) -> Vec<(u32, f32)> {
        let (keys, pos, bs, us) = (
            Keys::of(kv),
            &kv.positions,
            self.cfg.block_size,
            self.cfg.unit_size,
        );
        match self.cfg.score {
            ScoreKind::Paper => {
                block_scores_of(q_window, keys, pos, self.prompt_len, self.shape, bs, us)
            }
            ScoreKind::Attention => UnitKeys::new(keys, pos, self.prompt_len, self.shape, bs, us)
                .attention_scores(q_window, self.cfg.window_pool),
        }
    }

    /// Prefill at a boundary: choose the stage's blocks and the rows that go on; keep the
    /// dropped rows' hidden states for revival.
    fn prune(
        &mut self,
        s: usize,
        h: &Tensor,
        q: &[f32],
        positions: &[u32],
        kv: &LayerKv,
    ) -> Result<Vec<usize>> {
        let width = self.shape.n_heads * self.shape.head_dim;
        let rows = positions.len();
        let w = self.cfg.local_window.min(rows);
        let q_window = &q[(rows - w) * width..];
        let scores = match self.cfg.score_layers {
            ScoreLayers::Boundary => self.score(q_window, kv),
            ScoreLayers::Stage => {
                self.accumulate(q_window, kv);
                let n = self.acc_layers.max(1) as f32;
                self.acc_layers = 0;
                std::mem::take(&mut self.acc)
                    .into_iter()
                    .map(|(b, sum)| (b, sum / n))
                    .collect()
            }
        };
        let forced = forced_blocks(self.prompt_len, self.cfg.block_size, self.cfg.local_window);
        let stage = self.stages[s].stage;
        let blocks = select_top_k(&scores, stage.keep_blocks, &forced);
        let keep = kept_rows(positions, self.prompt_len, &blocks, self.cfg.block_size);
        // decode's first active set: the best `decode_blocks` of the kept blocks, same scores
        let kept_scores: Vec<(u32, f32)> = (scores.iter())
            .filter(|(b, _)| blocks.binary_search(b).is_ok())
            .copied()
            .collect();
        let active = select_top_k(&kept_scores, stage.decode_blocks, &forced);
        if self.cfg.revive && keep.len() < rows {
            let dropped = complement(&keep, rows);
            self.stages[s].aux = self.stash(h, positions, &dropped)?;
        }
        let st = &mut self.stages[s];
        st.window = q_window.chunks(width).map(WindowQuery::new).collect();
        st.pool = blocks;
        st.active = active;
        Ok(keep)
    }

    /// Add this layer's block scores (from its last `local_window` queries) to the stage's sums.
    fn accumulate(&mut self, q_window: &[f32], kv: &LayerKv) {
        for (b, score) in self.score(q_window, kv) {
            *self.acc.entry(b).or_insert(0.0) += score;
        }
        self.acc_layers += 1;
    }

    /// Hidden states of rows `rows` (ascending) of h, grouped by block.
    fn stash(
        &self,
        h: &Tensor,
        positions: &[u32],
        rows: &[usize],
    ) -> Result<BTreeMap<u32, AuxBlock>> {
        let hidden = h.dims2()?.1;
        let bs = self.cfg.block_size as u32;
        let h = h.contiguous()?;
        let mut out: BTreeMap<u32, AuxBlock> = BTreeMap::new();
        with_f32(&h, |h| {
            for &r in rows {
                let block = out.entry(positions[r] / bs).or_insert(AuxBlock {
                    hidden: Vec::new(),
                    positions: Vec::new(),
                });
                block
                    .hidden
                    .extend_from_slice(&h[r * hidden..(r + 1) * hidden]);
                block.positions.push(positions[r]);
            }
        })?;
        Ok(out)
    }

    /// Decode (or a later turn) at a boundary: stash rows revived at the previous stage, update
    /// the window, propose, gate, and bring back the pruned blocks that became active.
    fn reselect(
        &mut self,
        s: usize,
        h: &Tensor,
        q: &[f32],
        positions: &[u32],
        kv: &LayerKv,
    ) -> Result<Option<RowChange>> {
        let width = self.shape.n_heads * self.shape.head_dim;
        let w = self.cfg.local_window;
        let prompt_len = self.prompt_len as u32;
        // rows below prompt_len were revived at the previous stage: they stop here
        let (arrived, keep): (Vec<usize>, Vec<usize>) =
            (0..positions.len()).partition(|&r| positions[r] < prompt_len);
        if !arrived.is_empty() {
            let stashed = self.stash(h, positions, &arrived)?;
            self.stages[s].aux.extend(stashed);
        }
        let st = &mut self.stages[s];
        for &r in &keep {
            st.window
                .push_back(WindowQuery::new(&q[r * width..(r + 1) * width]));
            while st.window.len() > w {
                st.window.pop_front();
            }
        }
        // candidates: the blocks with KV at this boundary layer
        let mut scores = self.window_scores(s, kv);
        let (block_size, gamma, revive) = (self.cfg.block_size, self.cfg.gamma, self.cfg.revive);
        let st = &mut self.stages[s];
        // Pruned blocks come back only into budget the stage's pool cannot fill (a raised
        // ratio); swapping a held block for a pruned one would cost a forward of its rows
        // through the stage for every switch (measured: slim decode fell below dense).
        if !(revive && st.stage.keep_blocks > st.pool.len()) {
            scores.retain(|(b, _)| st.pool.binary_search(b).is_ok());
        }
        let forced = forced_blocks(self.prompt_len, block_size, w);
        let proposal = select_top_k(&scores, st.stage.decode_blocks, &forced);
        let before = st.active.clone();
        let switched = if scores.len() <= st.stage.decode_blocks || proposal.len() != before.len() {
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
        Ok((insert.is_some() || !arrived.is_empty()).then_some(RowChange { keep, insert }))
    }

    /// Block scores of stage `s`'s window. Attention-mass scores pool per-query scores (mean or
    /// max, `window_pool`), which are kept: a step computes only its new queries' (a full recount only when
    /// the layer's blocks changed). The paper's score pools the queries first and is recomputed.
    fn window_scores(&mut self, s: usize, kv: &LayerKv) -> Vec<(u32, f32)> {
        if self.cfg.score != ScoreKind::Attention {
            let q: Vec<f32> = (self.stages[s].window.iter())
                .flat_map(|wq| wq.q.iter().copied())
                .collect();
            return self.score(&q, kv);
        }
        // the boundary layer's unit keys change only when its prompt rows do (revival)
        let prompt_rows = kv
            .positions
            .partition_point(|&p| (p as usize) < self.prompt_len);
        let units = match self.stages[s].units.take() {
            Some((rows, units)) if rows == prompt_rows => units,
            _ => UnitKeys::new(
                Keys::of(kv),
                &kv.positions,
                self.prompt_len,
                self.shape,
                self.cfg.block_size,
                self.cfg.unit_size,
            ),
        };
        let mut window = std::mem::take(&mut self.stages[s].window);
        for wq in window.iter_mut().rev() {
            if wq.scores.is_some() {
                break;
            }
            wq.scores = Some(units.attention_scores(&wq.q, WindowPool::Mean));
        }
        let newest: Vec<u32> = (window.back().and_then(|wq| wq.scores.as_ref()))
            .map(|sc| sc.iter().map(|&(b, _)| b).collect())
            .unwrap_or_default();
        let same_blocks = |sc: &[(u32, f32)]| {
            sc.len() == newest.len() && sc.iter().zip(&newest).all(|(a, b)| a.0 == *b)
        };
        for wq in window.iter_mut() {
            if !wq.scores.as_deref().is_some_and(same_blocks) {
                wq.scores = Some(units.attention_scores(&wq.q, WindowPool::Mean));
            }
        }
        self.stages[s].units = Some((prompt_rows, units));
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
        self.stages[s].window = window;
        pooled
    }

    /// Move the active blocks of stage `s` that have no KV there out of the aux store and into
    /// the pool; their rows, to run through the stage's layers.
    fn revive_active(&mut self, s: usize) -> Result<Option<(Tensor, Vec<u32>)>> {
        let st = &mut self.stages[s];
        let missing: Vec<u32> = (st.active.iter())
            .filter(|b| st.pool.binary_search(b).is_err())
            .copied()
            .collect();
        if missing.is_empty() {
            return Ok(None);
        }
        let (mut hidden, mut positions) = (Vec::new(), Vec::new());
        for b in &missing {
            let Some(block) = st.aux.remove(b) else {
                continue; // a candidate with neither KV nor hidden states cannot happen; skip it
            };
            hidden.extend(block.hidden);
            positions.extend(block.positions);
            st.pool.push(*b);
            self.revived += 1;
        }
        st.pool.sort_unstable();
        st.active.retain(|b| st.pool.binary_search(b).is_ok());
        if positions.is_empty() {
            return Ok(None);
        }
        let (rows, width) = (positions.len(), hidden.len() / positions.len());
        let hidden = Tensor::from_vec(hidden, (rows, width), &Device::Cpu)?;
        Ok(Some((hidden, positions)))
    }
}

/// 0..n without the ascending indices `keep`.
fn complement(keep: &[usize], n: usize) -> Vec<usize> {
    let mut k = keep.iter().peekable();
    (0..n)
        .filter(|i| {
            if k.peek() == Some(&i) {
                k.next();
                false
            } else {
                true
            }
        })
        .collect()
}

impl LayerPolicy for SlimSession {
    fn key_ranges(&self, layer: usize, kv: &LayerKv) -> Vec<Range<usize>> {
        let Some(st) = self.stage_of(layer) else {
            return vec![0..kv.len()];
        };
        if !self.decoding || st.active.len() >= st.pool.len() {
            return vec![0..kv.len()]; // every cached block of this stage is active
        }
        // Rows are sorted by position: each active block, and the rows past the prompt, are
        // one run of rows, found by binary search (no pass over every row per layer and step).
        let row_of = |pos: usize| kv.positions.partition_point(|&p| (p as usize) < pos);
        let bs = self.cfg.block_size;
        let blocks = (st.active.iter())
            .map(|&b| b as usize * bs..((b as usize + 1) * bs).min(self.prompt_len));
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

    fn active_blocks(&self, layer: usize) -> Option<ActiveBlocks<'_>> {
        let i = self
            .stages
            .iter()
            .rposition(|s| s.stage.start_layer <= layer)?;
        let end = (self.stages.get(i + 1)).map_or(self.n_layers, |s| s.stage.start_layer);
        let st = &self.stages[i];
        Some(ActiveBlocks {
            // the set decode attends to; key_ranges reads every row while active == pool
            blocks: &st.active,
            stage_layers: st.stage.start_layer..end,
            block_size: self.cfg.block_size,
            prompt_len: self.prompt_len,
        })
    }

    fn after_layer(
        &mut self,
        layer: usize,
        h: &Tensor,
        q: &[f32],
        positions: &[u32],
        kv: &LayerKv,
    ) -> Result<Option<RowChange>> {
        if layer + 1 == self.n_layers {
            self.decoding = true;
        }
        let Some(s) = self.boundary_after(layer) else {
            if self.prefilling
                && self.cfg.score_layers == ScoreLayers::Stage
                && !self.stages.is_empty()
            {
                let width = self.shape.n_heads * self.shape.head_dim;
                let w = self.cfg.local_window.min(positions.len());
                self.accumulate(&q[(positions.len() - w) * width..], kv);
            }
            return Ok(None);
        };
        if self.prefilling {
            let keep = self.prune(s, h, q, positions, kv)?;
            if s + 1 == self.stages.len() {
                self.prefilling = false;
            }
            Ok((keep.len() < positions.len()).then(|| RowChange::keep(keep)))
        } else {
            self.reselect(s, h, q, positions, kv)
        }
    }
}
