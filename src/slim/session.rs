//! SlimInfer inside the forward: the session that prunes prompt rows at stage boundaries during
//! prefill and keeps each stage's active block set up to date during decode. The forward (on
//! any device) calls it through `prepare_attention` / `attended_rows` / `finish_layer` over its
//! backend's cache ([`ScoredLayer`]: the backend scores, the session chooses on the host).
//!
//! Prefill: after the layer just before a stage starts, score the prompt blocks that layer still
//! holds from its post-RoPE keys and its last `local_window` queries (`slim::score`), keep the top-K
//! (the sink block and the last block forced), and gather those rows with their positions. Later
//! layers compute, and cache, only the kept rows. Rows at positions >= `prompt_len` (generated
//! tokens, later turns) are never pruned.
//!
//! Decode (`decode_select = "stage"`): at the same boundaries, the newest queries join a window of
//! the last `local_window` queries seen there; the window proposes a top-K among the stage's
//! candidates (the blocks that have KV at the boundary layer), and the overlap gate (gamma)
//! decides whether the active set switches. K is the stage's `decode_blocks` (`decode_keep` times
//! its prefill blocks, at least `decode_min_tokens`' blocks); the first active set is chosen in
//! prefill from the same scores as the pool. Layers of the stage attend to the active blocks plus
//! every token past the prompt. With `decode_select = "layer"` (the default) every slim layer
//! makes that choice itself, with the query it is about to attend with (`LayerChoice`), and the
//! stage only keeps the pool.
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

use crate::backend::heads::Heads;
use crate::backend::score::WindowPool;
use crate::kv::policy::RowChange;
use crate::slim::schedule::{DecodeSelect, ScoreLayers};
use crate::slim::schedule::{SlimConfig, Stage};
use crate::slim::score::{ScoreRequest, ScoredLayer};
use crate::slim::select::{budget_factor, forced_blocks, kept_rows, select_blocks, select_top_k};
use crate::Result;

mod decode;
mod kept_rows;
use decode::{LayerChoice, WindowQuery};
use kept_rows::AuxBlock;
pub use kept_rows::{HiddenRows, KeptRows};

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
    /// Candidates without KV here (pruned at this stage): their hidden states at the stage's
    /// input, by block. Filled only when revival is on.
    aux: BTreeMap<u32, AuxBlock>,
    /// The prefill's block scores at this boundary (for [`SlimSession::trace`]).
    prefill_scores: Vec<(u32, f32)>,
}

/// What prefill chose at one stage, for finding where a fact was lost.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageTrace {
    pub start_layer: usize,
    /// Every candidate block's score at the boundary, by block id.
    pub scores: Vec<(u32, f32)>,
    /// The blocks kept (ascending).
    pub pool: Vec<u32>,
}

/// Where pruning stands after a forward: each stage's prefill choice and each slim layer's
/// current decode set (`decode_select = "layer"`; the stage's own set otherwise).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlimTrace {
    pub block_size: usize,
    pub stages: Vec<StageTrace>,
    /// (layer, blocks it attends to in decode), for every slim layer.
    pub decode_sets: Vec<(usize, Vec<u32>)>,
}

/// What decode attends to after [`SlimSession::heal`] brought every pruned block back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterHeal {
    /// Sets of the stage's `decode_blocks`, each slim layer choosing its own among every block
    /// (a follow-up's heal: its new question prefills over every row first).
    DecodeSets,
    /// Every block (an answer healed after its first token: the diagnostics in bench/NOTES.md
    /// found the answer's tokens read outside any set the pruned prompt's scores choose).
    EveryBlock,
}

/// SlimInfer's per-conversation state; lives as long as the KV cache it pruned.
#[derive(Debug, Clone)]
pub struct SlimSession {
    cfg: SlimConfig,
    shape: Heads,
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
    /// `decode_select = "layer"`: each slim layer's own choice, by layer (empty otherwise).
    layers: Vec<LayerChoice>,
}

impl SlimSession {
    /// A session for a prompt of `prompt_len` tokens that starts at position 0.
    pub fn new(cfg: &SlimConfig, n_layers: usize, shape: Heads, prompt_len: usize) -> Self {
        let stages = cfg
            .resolve(n_layers, prompt_len)
            .into_iter()
            .map(|stage| StageState {
                stage,
                pool: Vec::new(),
                active: Vec::new(),
                window: VecDeque::new(),
                aux: BTreeMap::new(),
                prefill_scores: Vec::new(),
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
            layers: match cfg.decode_select {
                DecodeSelect::Layer => vec![LayerChoice::default(); n_layers],
                DecodeSelect::Stage => Vec::new(),
            },
        }
    }

    /// Size of a stage's own active set: its decode budget, or, when every layer chooses its
    /// own, the whole pool (the stage then only manages which blocks have KV).
    fn stage_k(&self, stage: &Stage) -> usize {
        match self.cfg.decode_select {
            DecodeSelect::Stage => stage.decode_blocks,
            DecodeSelect::Layer => stage.keep_blocks,
        }
    }

    /// The resolved stages (empty when nothing is pruned).
    pub fn stages(&self) -> Vec<Stage> {
        self.stages.iter().map(|s| s.stage).collect()
    }

    /// Each stage's prefill scores and pool, and each slim layer's decode set now.
    pub fn trace(&self) -> SlimTrace {
        let stages = (self.stages.iter())
            .map(|st| StageTrace {
                start_layer: st.stage.start_layer,
                scores: st.prefill_scores.clone(),
                pool: st.pool.clone(),
            })
            .collect();
        let first = self
            .stages
            .first()
            .map_or(self.n_layers, |s| s.stage.start_layer);
        let decode_sets = (first..self.n_layers)
            .filter_map(|l| self.decode_set(l).map(|blocks| (l, blocks.to_vec())))
            .collect();
        SlimTrace {
            block_size: self.cfg.block_size,
            stages,
            decode_sets,
        }
    }

    /// The prompt blocks slim layer `layer` attends to in decode now (None before the first
    /// stage): its own choice, or its stage's.
    fn decode_set(&self, layer: usize) -> Option<&[u32]> {
        let i = (self.stages.iter()).rposition(|s| s.stage.start_layer <= layer)?;
        Some(match self.layers.get(layer) {
            Some(choice) => &choice.active,
            None => &self.stages[i].active,
        })
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Tokens per unit when decode scores a layer's blocks (`unit_size`).
    pub fn decode_unit_size(&self) -> usize {
        self.cfg.unit_size
    }

    /// The prompt blocks layer `layer`'s first decode set is likely to hold, ascending: its
    /// stage's `decode_blocks` kept blocks of highest prefill score (the always-kept ones
    /// included); empty before the stage has chosen. A tiered cache keeps these in its fast
    /// tier after the prefill, so that the first step fetches only where the layer's own
    /// query disagrees.
    pub fn likely_decode_blocks(&self, layer: usize) -> Vec<u32> {
        let Some(st) = self.stage_of(layer) else {
            return Vec::new();
        };
        let kept: Vec<(u32, f32)> = (st.prefill_scores.iter())
            .filter(|(b, _)| st.pool.binary_search(b).is_ok())
            .copied()
            .collect();
        let forced = forced_blocks(self.prompt_len, self.cfg.block_size, self.cfg.local_window);
        select_top_k(&kept, st.stage.decode_blocks, &forced)
    }

    /// Take the number of active-set block changes since the last call.
    pub fn take_swaps(&mut self) -> usize {
        std::mem::take(&mut self.swaps_this_step)
    }

    /// (block, stage) pairs brought back since the count was last taken.
    pub fn revived(&self) -> usize {
        self.revived
    }

    /// (block, stage) pairs brought back since the last call, which resets the count.
    pub fn take_revived(&mut self) -> usize {
        std::mem::take(&mut self.revived)
    }

    /// Bytes of hidden states kept for revival.
    pub fn aux_bytes(&self) -> usize {
        (self.stages.iter())
            .flat_map(|st| st.aux.values())
            .map(|b| b.bytes)
            .sum()
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

    /// Bring every prompt block this conversation's prefill pruned back at every stage, on the
    /// next forward: their rows rejoin it in front of its tokens at each boundary (as a raised
    /// ratio brings some back), run through the stage's layers and leave their KV there, so
    /// that a new question reads the whole document. `decode`: what decode attends to after
    /// it: sets of their sizes, each slim layer choosing them among every block, or every
    /// block. Needs revival's hidden states; returns whether any block will come back.
    pub fn heal(&mut self, decode: AfterHeal) -> bool {
        if !self.can_heal() {
            return false;
        }
        let blocks = self.prompt_len.div_ceil(self.cfg.block_size);
        let mut any = false;
        for st in &mut self.stages {
            if st.pool.len() < blocks {
                st.stage.keep_blocks = blocks;
                any = true;
            }
            // a stage that pruned nothing (its floor held the prompt) reads every block too
            if decode == AfterHeal::EveryBlock {
                st.stage.decode_blocks = blocks;
            }
        }
        any
    }

    /// A prompt whose prefill pruned nothing (every stage kept every block: floors over the
    /// prompt, or stages of fraction 1 at a ratio of 1): decode attends to every block from the
    /// answer's first step, as it does after a pruned prompt's heal (`AfterHeal::EveryBlock`),
    /// rather than to sets of `decode_keep`. Nothing changes where something was pruned.
    pub fn attend_whole_prompt(&mut self) {
        let blocks = self.prompt_len.div_ceil(self.cfg.block_size);
        if self.stages.iter().all(|st| st.pool.len() >= blocks) {
            for st in &mut self.stages {
                st.stage.decode_blocks = blocks;
            }
        }
    }

    /// Whether [`Self::heal`] would bring anything back: a stage lacks prompt blocks, and
    /// revival keeps their hidden states.
    pub fn can_heal(&self) -> bool {
        let blocks = self.prompt_len.div_ceil(self.cfg.block_size);
        self.cfg.revive && self.stages.iter().any(|st| st.pool.len() < blocks)
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

    /// How this session asks for block scores: prefill's units (`prefill_unit_size`, the
    /// window pooled by `window_pool`), or decode's (`unit_size`, each query on its own).
    fn request(&self, prefill: bool) -> ScoreRequest {
        let (unit_size, pool) = match prefill {
            true => (self.cfg.prefill_unit_size, self.cfg.window_pool),
            false => (self.cfg.unit_size, WindowPool::Mean),
        };
        ScoreRequest {
            prompt_len: self.prompt_len,
            shape: self.shape,
            block_size: self.cfg.block_size,
            unit_size,
            kind: self.cfg.score,
            pool,
        }
    }

    fn score(&self, q_window: &[f32], kv: &dyn ScoredLayer) -> Result<Vec<(u32, f32)>> {
        kv.block_scores(q_window, &self.request(true))
    }

    /// Prefill at a boundary: choose the stage's blocks and the rows that go on; keep the
    /// dropped rows' hidden states for revival.
    fn prune(
        &mut self,
        s: usize,
        h: &dyn HiddenRows,
        q: &[f32],
        positions: &[u32],
        kv: &dyn ScoredLayer,
    ) -> Result<Vec<usize>> {
        let width = self.shape.n_heads * self.shape.head_dim;
        let rows = positions.len();
        let q_window = last_rows(q, width, self.cfg.local_window.min(rows));
        let scores = match self.cfg.score_layers {
            ScoreLayers::Boundary => self.score(q_window, kv)?,
            ScoreLayers::Stage => {
                self.accumulate(q_window, kv)?;
                let n = self.acc_layers.max(1) as f32;
                self.acc_layers = 0;
                std::mem::take(&mut self.acc)
                    .into_iter()
                    .map(|(b, sum)| (b, sum / n))
                    .collect()
            }
        };
        let forced = forced_blocks(self.prompt_len, self.cfg.block_size, self.cfg.local_window);
        if s == 0 && self.cfg.budget_spread > 0.0 {
            self.fit_budgets(&scores, &forced);
        }
        let stage = self.stages[s].stage;
        let blocks = select_blocks(&scores, stage.keep_blocks, &forced, self.cfg.contrast_share);
        let keep = kept_rows(positions, self.prompt_len, &blocks, self.cfg.block_size);
        // decode's first active set: the best `decode_blocks` of the kept blocks, same scores
        let kept_scores: Vec<(u32, f32)> = (scores.iter())
            .filter(|(b, _)| blocks.binary_search(b).is_ok())
            .copied()
            .collect();
        let active = select_top_k(&kept_scores, self.stage_k(&stage), &forced);
        if self.cfg.revive && keep.len() < rows {
            let dropped = complement(&keep, rows);
            self.stages[s].aux = self.stash(h, positions, &dropped)?;
        }
        let st = &mut self.stages[s];
        st.window = q_window.chunks(width).map(WindowQuery::new).collect();
        st.prefill_scores = scores;
        st.pool = blocks;
        st.active = active;
        Ok(keep)
    }

    /// Scale every stage's budget past the always-kept blocks by [`budget_factor`] of the
    /// first stage's scores (this prompt's: more blocks when they are flat), each stage keeping
    /// at most the one before it; decode's sets stay within the new budgets.
    fn fit_budgets(&mut self, scores: &[(u32, f32)], forced: &[u32]) {
        let Some(first) = self.stages.first() else {
            return;
        };
        let (coverage, spread) = (self.cfg.budget_coverage, self.cfg.budget_spread);
        let f = budget_factor(scores, forced, first.stage.keep_blocks, coverage, spread);
        let floor = (scores.iter()).filter(|(b, _)| forced.contains(b)).count();
        let mut cap = scores.len();
        for st in &mut self.stages {
            let own = st.stage.keep_blocks.saturating_sub(floor);
            let scaled = floor + (own as f32 * f).round() as usize;
            st.stage.keep_blocks = scaled.min(cap).max(floor);
            st.stage.decode_blocks = st.stage.decode_blocks.min(st.stage.keep_blocks);
            cap = st.stage.keep_blocks;
        }
    }

    /// Add this layer's block scores (from its last `local_window` queries) to the stage's sums.
    fn accumulate(&mut self, q_window: &[f32], kv: &dyn ScoredLayer) -> Result<()> {
        for (b, score) in self.score(q_window, kv)? {
            *self.acc.entry(b).or_insert(0.0) += score;
        }
        self.acc_layers += 1;
        Ok(())
    }

    /// Hidden states of rows `rows` (ascending) of h, grouped by block: copied to the host, or
    /// held where the forward keeps them.
    fn stash(
        &self,
        h: &dyn HiddenRows,
        positions: &[u32],
        rows: &[usize],
    ) -> Result<BTreeMap<u32, AuxBlock>> {
        let kept = h.keep(rows)?;
        let block_of = |r: usize| positions[r] / self.cfg.block_size as u32;
        Ok(kept_rows::group_by_block(kept, positions, rows, block_of))
    }
}

fn last_rows(x: &[f32], width: usize, n: usize) -> &[f32] {
    let n = n.min(x.len() / width);
    &x[x.len() - n * width..]
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

/// The session between the forward's layers, on any device, over the backend's cache.
impl SlimSession {
    /// Rows whose queries the session scores after a layer: pruning scores the last
    /// `local_window` queries; decode's stage window keeps as many.
    pub fn query_rows(&self) -> usize {
        self.cfg.local_window
    }

    /// Layer `layer` has appended this step's rows (at `positions`) to `kv` and is about to
    /// attend: a slim layer choosing its own decode set does so now. `q` holds the post-RoPE
    /// queries of the step's last rows (every row, or at least the `local_window` last).
    pub fn prepare_attention(
        &mut self,
        layer: usize,
        q: &[f32],
        positions: &[u32],
        kv: &dyn ScoredLayer,
    ) -> Result<()> {
        if !self.layers.is_empty() {
            self.choose_for_layer(layer, q, positions, kv)?;
        }
        Ok(())
    }

    /// The request of the scoring `prepare_attention` will ask of layer `layer`'s cache in
    /// this step (the query of the step's last row over the layer's blocks), or None where it
    /// will score nothing: a backend may start that scoring before the query reaches the host.
    pub fn set_scoring(&self, layer: usize) -> Option<ScoreRequest> {
        self.layers.get(layer)?;
        let st = self.stage_of(layer)?;
        let every = st.stage.decode_blocks >= st.pool.len() && !st.pool.is_empty();
        (!every).then(|| self.request(false))
    }

    /// The request of the scoring `finish_layer` will ask of layer `layer`'s cache after a
    /// prefill step of `rows` rows (the queries of its last rows, how many returned too), or
    /// None: as [`Self::set_scoring`], for the prompt's prefill.
    pub fn prefill_scoring(&self, layer: usize, rows: usize) -> Option<(ScoreRequest, usize)> {
        if !self.prefilling || self.stages.is_empty() {
            return None;
        }
        let scores =
            self.boundary_after(layer).is_some() || self.cfg.score_layers == ScoreLayers::Stage;
        scores.then(|| (self.request(true), self.cfg.local_window.min(rows)))
    }

    /// The rows of `kv` layer `layer` attends to: sorted, disjoint ranges.
    pub fn attended_rows(&self, layer: usize, kv: &dyn ScoredLayer) -> Vec<Range<usize>> {
        #[allow(clippy::single_range_in_vec_init)] // one range: every row
        let all = vec![0..kv.positions().len()];
        if !self.decoding {
            return all;
        }
        if let Some(choice) = self.layers.get(layer) {
            if self.stage_of(layer).is_none() || choice.active.len() >= choice.candidates {
                return all;
            }
            return self.rows_of(&choice.active, kv);
        }
        match self.stage_of(layer) {
            // every cached block of this stage is active
            Some(st) if st.active.len() < st.pool.len() => self.rows_of(&st.active, kv),
            _ => all,
        }
    }

    /// After layer `layer` (output `h`, the post-RoPE queries `q` of its last
    /// `local_window` rows, the rows' positions, its cache): prefill scores, and at a stage
    /// boundary prunes; decode re-chooses a stage's blocks at its boundary. Returns how the
    /// rows change before the next layer, or None to keep them all.
    pub fn finish_layer(
        &mut self,
        layer: usize,
        h: &dyn HiddenRows,
        q: &[f32],
        positions: &[u32],
        kv: &dyn ScoredLayer,
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
                self.accumulate(last_rows(q, width, w), kv)?;
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

#[cfg(test)]
mod tests;
