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
//! queries seen there; the window proposes a top-K among the blocks that have KV at that stage,
//! and the overlap gate (gamma) decides whether the active set switches. Layers of the stage
//! attend to the active blocks plus every token past the prompt.
//!
//! Pruned blocks are not revived (reading (b) of sliminfer.md §1.8): a block dropped at stage s
//! in prefill has no KV at stage s and never becomes a candidate there. The proposal can still
//! change the active set when the budget is smaller than the candidate pool, e.g. after the
//! person lowers the ratio and asks a follow-up that reuses the cache.

use std::collections::VecDeque;
use std::ops::Range;

use crate::kv::LayerKv;
use crate::model::llama::LayerPolicy;
use crate::slim::schedule::ScoreKind;
use crate::slim::schedule::{SlimConfig, Stage};
use crate::slim::score::{block_scores, block_scores_attention, HeadShape};
use crate::slim::select::{forced_blocks, gate, kept_rows, select_top_k};
use crate::Result;

type ScoreFn = fn(&[f32], &[f32], &[u32], usize, HeadShape, usize, usize) -> Vec<(u32, f32)>;

/// State of one stage across a conversation.
#[derive(Debug, Clone)]
struct StageState {
    stage: Stage,
    /// Blocks whose rows have KV at this stage's layers (chosen in prefill), ascending.
    pool: Vec<u32>,
    /// Blocks the stage's layers attend to now, ascending (a subset of `pool`).
    active: Vec<u32>,
    /// The last `local_window` queries seen at the boundary layer, each (n_heads * hd).
    window: VecDeque<Vec<f32>>,
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
    /// True until the first forward (the prompt's prefill) has run.
    prefilling: bool,
    /// Block changes (in + out) of the active sets in the current step.
    swaps_this_step: usize,
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
            })
            .collect();
        Self {
            cfg: cfg.clone(),
            shape,
            n_layers,
            prompt_len,
            stages,
            prefilling: true,
            swaps_this_step: 0,
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

    /// Apply a new keep ratio to later decode steps of this conversation. Budgets are capped at
    /// the blocks that have KV (the pool): rows pruned in prefill have no KV to grow back into.
    pub fn set_keep_ratio(&mut self, keep_ratio: f32) {
        self.cfg.keep_ratio = keep_ratio;
        let resolved = self.cfg.resolve(self.n_layers, self.prompt_len);
        for (st, new) in self.stages.iter_mut().zip(resolved) {
            st.stage.keep_blocks = new.keep_blocks.min(st.pool.len().max(1));
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

    fn score_fn(&self) -> ScoreFn {
        match self.cfg.score {
            ScoreKind::Paper => block_scores,
            ScoreKind::Attention => block_scores_attention,
        }
    }

    fn score(&self, q_window: &[f32], kv: &LayerKv) -> Vec<(u32, f32)> {
        let f = self.score_fn();
        f(
            q_window,
            &kv.k,
            &kv.positions,
            self.prompt_len,
            self.shape,
            self.cfg.block_size,
            self.cfg.unit_size,
        )
    }

    /// Prefill at a boundary: choose the stage's blocks and the rows that go on.
    fn prune(&mut self, s: usize, q: &[f32], positions: &[u32], kv: &LayerKv) -> Vec<usize> {
        let width = self.shape.n_heads * self.shape.head_dim;
        let rows = positions.len();
        let w = self.cfg.local_window.min(rows);
        let q_window = &q[(rows - w) * width..];
        let scores = self.score(q_window, kv);
        let forced = forced_blocks(self.prompt_len, self.cfg.block_size, self.cfg.local_window);
        let blocks = select_top_k(&scores, self.stages[s].stage.keep_blocks, &forced);
        let st = &mut self.stages[s];
        st.window = q_window.chunks(width).map(<[f32]>::to_vec).collect();
        st.pool = blocks.clone();
        st.active = blocks;
        kept_rows(positions, self.prompt_len, &st.active, self.cfg.block_size)
    }

    /// Decode (or a later turn) at a boundary: update the window, propose, gate.
    fn reselect(&mut self, s: usize, q: &[f32], kv: &LayerKv) {
        let width = self.shape.n_heads * self.shape.head_dim;
        let w = self.cfg.local_window;
        let st = &mut self.stages[s];
        for row in q.chunks(width) {
            st.window.push_back(row.to_vec());
            while st.window.len() > w {
                st.window.pop_front();
            }
        }
        if st.pool.len() <= st.stage.keep_blocks {
            // every candidate fits the budget (again, after a raised ratio): attend to all
            if st.active.len() < st.pool.len() {
                self.swaps_this_step += st.pool.len() - st.active.len();
                st.active = st.pool.clone();
            }
            return;
        }
        let q_window: Vec<f32> = st.window.iter().flatten().copied().collect();
        let scores = self.score(&q_window, kv);
        let (prompt_len, block_size, gamma) =
            (self.prompt_len, self.cfg.block_size, self.cfg.gamma);
        let st = &mut self.stages[s];
        let scores: Vec<(u32, f32)> = scores
            .into_iter()
            .filter(|(b, _)| st.pool.binary_search(b).is_ok())
            .collect();
        let forced = forced_blocks(prompt_len, block_size, w);
        let proposal = select_top_k(&scores, st.stage.keep_blocks, &forced);
        let before = st.active.clone();
        if gate(&mut st.active, proposal, gamma) {
            let kept = before
                .iter()
                .filter(|b| st.active.binary_search(b).is_ok())
                .count();
            self.swaps_this_step += (before.len() - kept) + (st.active.len() - kept);
        }
    }
}

impl LayerPolicy for SlimSession {
    fn key_ranges(&self, layer: usize, kv: &LayerKv) -> Vec<Range<usize>> {
        let Some(st) = self.stage_of(layer) else {
            return vec![0..kv.len()];
        };
        if st.active.len() >= st.pool.len() {
            return vec![0..kv.len()]; // every cached block of this stage is active
        }
        let bs = self.cfg.block_size as u32;
        let attend =
            |p: u32| p as usize >= self.prompt_len || st.active.binary_search(&(p / bs)).is_ok();
        let mut ranges: Vec<Range<usize>> = Vec::new();
        for (i, &p) in kv.positions.iter().enumerate() {
            if !attend(p) {
                continue;
            }
            match ranges.last_mut() {
                Some(r) if r.end == i => r.end = i + 1,
                _ => ranges.push(i..i + 1),
            }
        }
        ranges
    }

    fn after_layer(
        &mut self,
        layer: usize,
        q: &[f32],
        positions: &[u32],
        kv: &LayerKv,
    ) -> Result<Option<Vec<usize>>> {
        let Some(s) = self.boundary_after(layer) else {
            return Ok(None);
        };
        if self.prefilling {
            let keep = self.prune(s, q, positions, kv);
            if s + 1 == self.stages.len() {
                self.prefilling = false;
            }
            Ok((keep.len() < positions.len()).then_some(keep))
        } else {
            self.reselect(s, q, kv);
            Ok(None)
        }
    }
}
