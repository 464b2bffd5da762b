//! The `[slim]` config section and the pruning schedule it resolves to for one prompt.
//!
//! A schedule is a list of stages `(layer, fraction)`: from `layer` on (layers index from 0, and
//! `layer` is the first layer that sees only the kept rows), keep
//! `keep_ratio * fraction * prompt_tokens` prompt tokens, at least `min_keep_tokens` and the
//! preset's floor for the stage (the paper's absolute budgets), rounded up to whole blocks.
//! Invariants of a resolved schedule ([`SlimConfig::resolve`]):
//! - stage layers are strictly increasing and in `1..n_layers` (layer 0 always sees the whole prompt);
//! - `keep_blocks` is non-increasing from stage to stage (stages are nested: each one chooses among
//!   what the previous one kept), at most the number of prompt blocks, and at least the number of
//!   always-kept blocks ([`crate::slim::select::forced_blocks`]).
//!
//! Paper presets (SlimInfer, arXiv 2508.06447): LLaMA-3.1-8B prunes at layers 10/20/30 keeping
//! 8192/4096/2048 tokens of a 32k prompt, Qwen2.5-7B at 9/18/26 keeping 12k/6k/4k. Here budgets are
//! fractions of the prompt so that one knob (`keep_ratio`) scales them; the presets reproduce the
//! paper's counts at `keep_ratio = 0.5` and 32k tokens.

use serde::{Deserialize, Serialize};

use crate::backend::score::WindowPool;
use crate::slim::preset::{generic_floors, ModelFit};

/// Preset names accepted by `[slim] preset`.
pub const PRESETS: [&str; 8] = [
    "auto",
    "smollm2",
    "llama3.1-8b",
    "llama3.2-1b",
    "llama3.2-3b",
    "qwen2.5-7b",
    "generic",
    "custom",
];

/// The `[slim]` config section: SlimInfer prompt pruning.
///
/// Every key is optional; the defaults below are the paper's settings. As it appears in
/// `config.example.toml` (see [`EXAMPLE_TOML`]):
///
/// ```toml
/// [slim]
/// enabled = true
/// keep_ratio = 0.5
/// preset = "auto"
/// stages = []
/// min_keep_tokens = 256
/// block_size = 64
/// unit_size = 8
/// prefill_unit_size = 1
/// local_window = 32
/// gamma = 0.9
/// decode_keep = 0.25
/// decode_min_tokens = 1280
/// gate = "blocks"
/// revive = true
/// score = "attention"
/// score_layers = "stage"
/// window_pool = "max"
/// decode_select = "layer"
/// reprefill_followups = false
/// heal_followups = true
/// heal_answers = true
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlimConfig {
    /// Prune prompt rows in the upper layers. `false` runs the dense model, bit for bit.
    /// Default `true`.
    pub enabled: bool,
    /// The pruning knob: scales every stage's budget. Each stage keeps
    /// `keep_ratio * fraction * prompt_tokens` prompt tokens (at least `min_keep_tokens` and the
    /// preset's floor); `1.0` keeps the presets' full fractions. Allowed: `(0, 1]`. Default `0.5`:
    /// with the 8-bit prefill attention, dense's long prefill got faster than the pruned one's
    /// rows, and 0.6 gave TTFT 0.61x dense at 8192 tokens against 0.50x at 0.5; with
    /// token-level prefill scores (`prefill_unit_size = 1`), 0.5 keeps the facts and the
    /// agreement that 0.6 with unit scores kept on `slimchat facts` (bench/NOTES.md).
    pub keep_ratio: f32,
    /// Where the stages come from: `"auto"` (chosen from the model's metadata: architecture,
    /// depth, width and context, see `slim::preset`; by layer count alone when no model is known:
    /// 30 → `"smollm2"`, 32 → `"llama3.1-8b"`, 28 → `"qwen2.5-7b"`, otherwise `"generic"`),
    /// `"smollm2"` (layers 10/15/20/28, fractions 1, 1, 1/2, 1/4), `"llama3.1-8b"` (10/20/30; 1/2,
    /// 1/4, 1/8), `"llama3.2-1b"` (5/10/14) and `"llama3.2-3b"` (9/18/26) with the 8B's fractions,
    /// `"qwen2.5-7b"` (9/18/26; 3/4, 3/8, 1/4), `"generic"` (about L/3, 2L/3, L−2; 1, 1/2, 1/4;
    /// floors 1/4, 1/8, 1/16 of the context up to 8k), or `"custom"` (the `stages` list).
    /// Default `"auto"`.
    pub preset: String,
    /// The stages when `preset = "custom"`, e.g.
    /// `[{ layer = 10, fraction = 1.0 }, { layer = 20, fraction = 0.5, floor = 2048 }]`: layers
    /// strictly increasing in `1..n_layers`, fractions in `(0, 1]` and non-increasing, an
    /// optional floor in tokens per stage (default 0). Must be empty for
    /// any other preset. Default `[]`.
    pub stages: Vec<StageConfig>,
    /// Floor of every stage's budget, in tokens: short prompts are not pruned below this. The
    /// presets add their own per-stage floors (smollm2: 3072/2048/1024/512 tokens at layers
    /// 10/15/20/28; see [`Self::preset_floors`]). Any value ≥ 0. Default `256`.
    pub min_keep_tokens: usize,
    /// Tokens per block, the unit of selection and of KV movement. A positive multiple of
    /// `unit_size`. Default `64`.
    pub block_size: usize,
    /// Tokens per token unit, the unit of decode's scoring (keys are averaged over a unit, so
    /// that a step scores its query against an eighth of the rows). At least 1, and it must
    /// divide `block_size`. Default `8`. Prefill has its own, `prefill_unit_size`.
    pub unit_size: usize,
    /// Tokens per unit when prefill scores the blocks a stage keeps: `1` scores every prompt
    /// token's own key (each window query's true attention); a larger value averages keys over
    /// units like decode's `unit_size`. At least 1, and it must divide `block_size`. Default
    /// `1`: a unit's mean key averages a fact's few matching tokens with their neighbours, and
    /// on `slimchat facts` the first stage dropped 5 of 30 asked facts at 4096 tokens with
    /// units of 8 against 1 with single tokens, at the same TTFT (bench/NOTES.md).
    pub prefill_unit_size: usize,
    /// Number of most recent queries averaged into the local query that scores blocks; the
    /// block(s) holding the last `local_window` prompt tokens are always kept. At least 1.
    /// Default `32`: the paper's 4 suits 8B models; on SmolLM2-135M a window that reaches past
    /// the chat template into the question lowered the KL to dense by ~20% (bench/NOTES.md).
    pub local_window: usize,
    /// Overlap-aware swapping threshold in decode: a stage keeps its active blocks while the
    /// newly proposed top-K overlaps them by at least `gamma`. `0` never swaps, `1` swaps on any
    /// change. Allowed: `[0, 1]`. Default `0.9`.
    pub gamma: f32,
    /// Share of each stage's prefill blocks that decode attends to at once (the active set,
    /// the K of the top-K proposal and of the gate); the others keep their KV as candidates,
    /// which the KV manager holds outside its fast tier. Allowed: `(0, 1]`. Default `0.25`
    /// (with `decode_min_tokens`): at 8192 tokens and the default ratio the fast tier then holds
    /// under 45% of dense's KV, and on `slimchat eval` agreement and needle retrieval stay at
    /// the level of attending to every kept block (bench/NOTES.md). `1.0` attends to all.
    pub decode_keep: f32,
    /// Floor of decode's active set, in tokens: a stage's `decode_keep` share is raised to this
    /// many tokens' blocks (at most the blocks the stage kept), so that short prompts, where a
    /// share is a handful of blocks, still attend to enough of what prefill kept. Any value ≥ 0.
    /// Default `1280`: with 1024 the pruned model lost two needles of twenty more than dense at
    /// 4096 tokens (bench/NOTES.md).
    pub decode_min_tokens: usize,
    /// What gamma measures: `"blocks"` (the paper's |proposal ∩ active| / K) or `"mass"` (the
    /// share of the proposal's score mass that the active set already holds, so that one
    /// high-scoring block can switch the set, which a one-block change never does under
    /// `"blocks"` with gamma 0.9 and K ≥ 10). Default `"blocks"`: `"mass"` measured no better on
    /// the needles of `slimchat eval` (bench/NOTES.md).
    pub gate: GateKind,
    /// A raised ratio may bring back blocks that prefill pruned (LazyLLM's aux cache; see
    /// `slim::session`): a stage whose budget exceeds the blocks it holds revives the best-scored
    /// pruned ones. `false`: a stage only ever chooses among the blocks it kept in prefill.
    /// Default `true`.
    pub revive: bool,
    /// How blocks are scored: `"paper"` (mean over heads of |q_loc·k_unit|, max over units) or
    /// `"attention"` (each head's softmax over units; a block's score is its attention mass,
    /// averaged over heads). Default `"attention"`: on SmolLM2-135M it cut the mean KL to dense
    /// about 4x at the same budget (bench/NOTES.md).
    pub score: ScoreKind,
    /// Which layers' queries score the blocks in prefill: `"boundary"` (only the layer just
    /// before the stage, the paper's) or `"stage"` (the mean of the scores of every layer since
    /// the previous boundary; layers 0.. for the first stage). Default `"stage"`: on the default
    /// model the layers that retrieve a fact asked about (20-23) are not the boundary layers,
    /// and single boundary layers rank such a block low (bench/NOTES.md).
    pub score_layers: ScoreLayers,
    /// How the window's queries' attention-mass scores combine: `"mean"` or `"max"` (a block
    /// scores its best query's mass, averaged over heads). Default `"max"`: the question's own
    /// tokens attend to the fact they ask about, and averaging them with the other window
    /// tokens (template, recency) buried it; needle retrieval rose 10-40 points at the same
    /// budget with agreement unchanged (bench/NOTES.md). The paper's score ignores it.
    pub window_pool: WindowPool,
    /// Share of each prefill stage's budget (past the always-kept blocks) chosen by how much a
    /// block's score stands out from its neighbours' (`slim::select::local_contrast`) instead
    /// of by the score itself. The attention-mass score falls with distance from the question,
    /// so a fact early in a long document ranks below recent blocks that hold nothing asked
    /// for. Allowed: `[0, 1]`. Default `0`.
    pub contrast_share: f32,
    /// How far the first stage may move every stage's budget for this prompt, as a share of it:
    /// the budget becomes what the best-scored blocks need to hold `budget_coverage` of the
    /// first stage's score mass, within `1 ± budget_spread` of the ratio's (more kept when the
    /// scores are flat, fewer when they are peaked; `slim::select::budget_factor`). Allowed:
    /// `[0, 1)`. Default `0` (the ratio's budgets).
    pub budget_spread: f32,
    /// The share of the first stage's score mass (past the always-kept blocks) the kept blocks
    /// should hold when `budget_spread > 0`. Allowed: `(0, 1]`. Default `0.8`.
    pub budget_coverage: f32,
    /// Who chooses the `decode_keep` share decode attends to: `"stage"` (the stage's boundary
    /// window chooses one set for all its layers, the paper's) or `"layer"` (every slim layer
    /// chooses its own, with the query it is about to attend with, among the blocks its stage
    /// kept, Quest-like; the KV manager fetches a changed set before the layer attends).
    /// Has no effect at `decode_keep = 1`. Default `"layer"`: at the same share it cut the KL
    /// to dense 2-4x against the stage's choice (bench/NOTES.md).
    pub decode_select: DecodeSelect,
    /// Follow-up turns in a conversation: `false` keeps the pruned KV of earlier turns and only
    /// prefills the new message (fast); `true` prefills the whole conversation again so that the
    /// new question chooses which blocks of the earlier document to keep. Default `false`.
    pub reprefill_followups: bool,
    /// Follow-up turns over a pruned cache (`reprefill_followups = false`): `true` first brings
    /// back every block prefill pruned, at every stage (their rows run through the stages'
    /// layers in front of the new message, from the hidden states revival keeps), so that the
    /// new question reads the whole document where the first question's pruning had dropped
    /// what it needs; decode's sets keep their sizes. Costs the follow-up once what pruning
    /// saved the first prefill; later turns nothing. Needs `revive`. Default `true`.
    pub heal_followups: bool,
    /// A fresh prompt's answer: `true` brings back every block prefill pruned, at every stage,
    /// right after the answer's first token (the forward of that token carries their rows, as
    /// a healed follow-up's does), and the rest of the answer attends to every block: the first
    /// token comes at the pruned prefill's time, the second waits for the heal (on the default
    /// model a third of a dense prefill, so every token still comes before dense's), and the
    /// answer reads the whole document from its second token on. `false` answers over the
    /// pruned cache with decode's sets (faster after the first token, further from dense).
    /// Where prefill pruned nothing (every stage kept every block), `true` has the whole answer
    /// attend to every block. Skipped, like `heal_followups`, where the whole conversation
    /// would not fit `[kv] fast_budget`. Needs `revive`. Default `true`.
    pub heal_answers: bool,
    /// The model this config is applied to (set by the engine from the model's metadata, not a
    /// key): what `preset = "auto"` resolves to and the context the generic floors are shares of.
    #[serde(skip)]
    pub model: Option<ModelFit>,
}

/// One stage of a custom schedule: from `layer` on, keep `fraction` of the prompt (times
/// `keep_ratio`), and at least `floor` tokens (the presets' per-stage floors; default 0).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub layer: usize,
    pub fraction: f32,
    #[serde(default)]
    pub floor: usize,
}

/// A stage held at its floor that would drop fewer than 1 in `MIN_DROP_SHARE` of the blocks
/// reaching it keeps them all (a budget the ratio sets is the person's to choose, and stays).
/// A prompt a block or two over a stage's floor would spare the layers after it under
/// 1/8 of their rows (on the default model 0.4% of the forward's at 1,088 tokens, 2% at 2,112),
/// while any block it drops may hold what the question asks for (`slimchat facts`: a
/// 1,088-token prompt lost its fact at layer 28, which kept 16 of its 17 blocks; bench/NOTES.md).
/// The paper's stages halve what reaches them and are never affected.
pub const MIN_DROP_SHARE: usize = 8;

/// When the whole schedule would spare under 1 in `MIN_SPARED_SHARE` of the forward's rows
/// (prompt rows times layers), every stage held at its floor keeps all its blocks: such a prompt
/// is barely over the floors and only the last stage's few layers would prune. Measured where
/// layers 28-29 halved 2k prompts, 3-4% of the rows: the pruned TTFT was 1.5% under dense's
/// (0.98-1.07x across runs) while the answers changed (agreement 0.96-0.97; bench/NOTES.md).
pub const MIN_SPARED_SHARE: usize = 16;

/// Prompts of up to this many tokens run dense on `"smollm2"`: pruned from layer 20 a 2k prompt
/// lost facts dense found (reported part, 72 cases: 16-17 of 90 against 20; bench/NOTES.md).
pub const SMOLLM2_DENSE_TOKENS: usize = 2304;

/// A stage resolved for one prompt: from layer `start_layer` on, keep `keep_blocks` prompt blocks.
///
/// A stage whose `keep_blocks` equals the number of prompt blocks still appears; it keeps
/// everything (a no-op), which lets the callers show a per-layer budget for every stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stage {
    pub start_layer: usize,
    pub keep_blocks: usize,
    /// Blocks decode attends to at once (the active set): `decode_keep * keep_blocks`, rounded
    /// up, at least `decode_min_tokens`' blocks and the always-kept blocks, at most
    /// `keep_blocks`.
    pub decode_blocks: usize,
}

/// The `[slim]` section with every key at its default, commented, for `config.example.toml`.
/// A test checks that it parses to [`SlimConfig::default`].
pub const EXAMPLE_TOML: &str = r#"[slim]
# Prune prompt rows in the upper layers (SlimInfer). false = the dense model.
enabled = true
# The pruning knob, in (0, 1]: each stage keeps keep_ratio * fraction * prompt tokens.
keep_ratio = 0.5
# "auto" (matched on the model's architecture, depth, width and context; unknown models get
# generic), "smollm2", "llama3.1-8b", "llama3.2-1b", "llama3.2-3b", "qwen2.5-7b", "generic"
# (stages at about L/3, 2L/3, L-2; floors 1/4, 1/8, 1/16 of the context up to 8k tokens), or
# "custom" (uses `stages`).
preset = "auto"
# Only with preset = "custom": [{ layer = 10, fraction = 1.0 }, { layer = 20, fraction = 0.5 }]
# (layers strictly increasing in 1..n_layers, fractions in (0, 1] and non-increasing; each may
# add `floor = TOKENS`).
stages = []
# Floor of every stage's budget, in tokens (the presets add their own per-stage floors, the
# paper's absolute budgets: smollm2 keeps at least 3072/2048/1024/512 tokens at layers
# 10/15/20/28, its stage at 15 dropping rows only where the floor of 10 binds;
# a custom stage takes its own, e.g. { layer = 20, fraction = 0.5, floor = 2048 }).
min_keep_tokens = 256
# Tokens per block (unit of selection and KV movement); a multiple of unit_size.
block_size = 64
# Tokens per token unit (unit of decode's scoring); at least 1.
unit_size = 8
# Tokens per unit when prefill scores a stage's blocks (1 = every token's own key); it must
# divide block_size.
prefill_unit_size = 1
# Queries of the last local_window tokens score the blocks; at least 1.
local_window = 32
# Decode keeps its active blocks while a new proposal overlaps them by >= gamma, in [0, 1].
gamma = 0.9
# Share of each stage's prefill blocks that decode attends to (its active set), in (0, 1]:
# the rest stay cached as candidates (in the KV manager's host tier). 1.0 = all of them.
decode_keep = 0.25
# Floor of that active set, in tokens (at most what the stage kept); any value >= 0.
decode_min_tokens = 1280
# What gamma measures: "blocks" (the paper's |proposal ∩ active| / K) or "mass" (the share of
# the proposal's score mass that the active set holds).
gate = "blocks"
# A raised ratio may bring back blocks pruned in prefill (their hidden states are kept for it).
revive = true
# Block scoring: "attention" (each window query's per-head softmax mass over units) or
# "paper" (mean over heads of |q_loc.k_unit|, max over units).
score = "attention"
# Which layers' queries score blocks in prefill: "stage" (mean over the layers since the previous
# boundary) or "boundary" (only the layer before the stage, the paper's).
score_layers = "stage"
# How the window's queries' attention-mass scores combine: "max" (a block scores its best query)
# or "mean".
window_pool = "max"
# Share of each prefill stage's budget chosen by how much a block stands out from its
# neighbours rather than by its score (the score favours recent blocks), in [0, 1].
contrast_share = 0.0
# How far the first stage may move the budgets for this prompt, as a share of them, in [0, 1):
# the budget becomes what the best blocks need to hold budget_coverage of the score mass (more
# when the scores are flat, fewer when peaked). 0 keeps the ratio's budgets.
budget_spread = 0.0
budget_coverage = 0.8
# Who chooses the decode_keep share decode attends to: "stage" (one set per stage, from the
# boundary's queries) or "layer" (each slim layer from its own queries).
decode_select = "layer"
# Follow-up turns: false = prefill only the new message; true = prefill the whole conversation.
reprefill_followups = false
# Follow-ups over a pruned cache first bring back every block its prefill pruned (needs revive).
heal_followups = true
# After an answer's first token, bring back every block prefill pruned, and let the rest of the
# answer attend to every block (needs revive); where nothing was pruned, the whole answer does.
heal_answers = true
"#;

impl Default for SlimConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            keep_ratio: 0.5,
            preset: "auto".into(),
            stages: Vec::new(),
            min_keep_tokens: 256,
            block_size: 64,
            unit_size: 8,
            prefill_unit_size: 1,
            local_window: 32,
            gamma: 0.9,
            decode_keep: 0.25,
            decode_min_tokens: 1280,
            gate: GateKind::Blocks,
            revive: true,
            score: ScoreKind::Attention,
            score_layers: ScoreLayers::Stage,
            window_pool: WindowPool::Max,
            contrast_share: 0.0,
            budget_spread: 0.0,
            budget_coverage: 0.8,
            decode_select: DecodeSelect::Layer,
            reprefill_followups: false,
            heal_followups: true,
            heal_answers: true,
            model: None,
        }
    }
}

impl SlimConfig {
    /// Check the keys that do not depend on the model. Errors name the key: `[slim] <key> ...`.
    pub fn validate_keys(&self) -> Result<(), String> {
        if !(self.keep_ratio > 0.0 && self.keep_ratio <= 1.0) {
            return Err(format!(
                "[slim] keep_ratio must be in (0, 1], got {}",
                self.keep_ratio
            ));
        }
        if !(0.0..=1.0).contains(&self.contrast_share) {
            return Err(format!(
                "[slim] contrast_share must be in [0, 1], got {}",
                self.contrast_share
            ));
        }
        if !(0.0..1.0).contains(&self.budget_spread) {
            return Err(format!(
                "[slim] budget_spread must be in [0, 1), got {}",
                self.budget_spread
            ));
        }
        if !(self.budget_coverage > 0.0 && self.budget_coverage <= 1.0) {
            return Err(format!(
                "[slim] budget_coverage must be in (0, 1], got {}",
                self.budget_coverage
            ));
        }
        if !PRESETS.contains(&self.preset.as_str()) {
            return Err(format!(
                "[slim] preset must be one of {}, got \"{}\"",
                PRESETS.map(|p| format!("\"{p}\"")).join(", "),
                self.preset
            ));
        }
        if self.preset != "custom" && !self.stages.is_empty() {
            return Err(format!(
                "[slim] stages is used only with preset = \"custom\", but preset = \"{}\"",
                self.preset
            ));
        }
        if self.preset == "custom" && self.stages.is_empty() {
            return Err(
                "[slim] stages must list at least one stage when preset = \"custom\"".into(),
            );
        }
        if self.unit_size == 0 {
            return Err("[slim] unit_size must be at least 1, got 0".into());
        }
        if self.block_size == 0 || !self.block_size.is_multiple_of(self.unit_size) {
            return Err(format!(
                "[slim] block_size must be a positive multiple of unit_size ({}), got {}",
                self.unit_size, self.block_size
            ));
        }
        if self.prefill_unit_size == 0 || !self.block_size.is_multiple_of(self.prefill_unit_size) {
            return Err(format!(
                "[slim] prefill_unit_size must be at least 1 and divide block_size ({}), got {}",
                self.block_size, self.prefill_unit_size
            ));
        }
        if self.local_window == 0 {
            return Err("[slim] local_window must be at least 1, got 0".into());
        }
        if !(self.decode_keep > 0.0 && self.decode_keep <= 1.0) {
            return Err(format!(
                "[slim] decode_keep must be in (0, 1], got {}",
                self.decode_keep
            ));
        }
        if !(0.0..=1.0).contains(&self.gamma) {
            return Err(format!(
                "[slim] gamma must be in [0, 1], got {}",
                self.gamma
            ));
        }
        Ok(())
    }

    /// Check every key against a model with `n_layers` layers: [`Self::validate_keys`], then the
    /// stages of the chosen preset (layers strictly increasing in `1..n_layers`, fractions in
    /// `(0, 1]` and non-increasing). Checked whether or not `enabled` is set, since pruning can be
    /// switched on while chatting.
    pub fn validate(&self, n_layers: usize) -> Result<(), String> {
        self.validate_keys()?;
        let preset = self.preset_for(n_layers);
        let stages = self.stage_fractions(n_layers);
        // Name the offending entry: `stages[i]` for a custom list, the preset otherwise.
        let key = |i: usize, field: &str| {
            if preset == "custom" {
                format!("[slim] stages[{i}].{field}")
            } else {
                format!("[slim] preset \"{preset}\" (for {n_layers} layers): stage {i} {field}")
            }
        };
        let mut prev: Option<(usize, f32)> = None;
        for (i, &(layer, fraction)) in stages.iter().enumerate() {
            if layer == 0 || layer >= n_layers {
                return Err(format!(
                    "{} must be in 1..{n_layers} (the model has {n_layers} layers), got {layer}",
                    key(i, "layer")
                ));
            }
            if !(fraction > 0.0 && fraction <= 1.0) {
                return Err(format!(
                    "{} must be in (0, 1], got {fraction}",
                    key(i, "fraction")
                ));
            }
            if let Some((prev_layer, prev_fraction)) = prev {
                if layer <= prev_layer {
                    return Err(format!(
                        "{} must be greater than the previous stage's layer {prev_layer}, got {layer}",
                        key(i, "layer")
                    ));
                }
                if fraction > prev_fraction {
                    return Err(format!(
                        "{} must not grow: the previous stage keeps {prev_fraction}, got {fraction}",
                        key(i, "fraction")
                    ));
                }
            }
            prev = Some((layer, fraction));
        }
        Ok(())
    }

    /// [`Self::validate`] as the application error.
    pub fn check(&self, n_layers: usize) -> crate::Result<()> {
        self.validate(n_layers).map_err(crate::Error::Config)
    }

    /// This config for `model` (`preset = "auto"` resolves to the preset that fits it).
    pub fn for_model(mut self, model: ModelFit) -> Self {
        self.model = Some(model);
        self
    }

    /// The preset in effect for a model with `n_layers` layers: `"auto"` resolved from the model
    /// (`self.model`) or, without one, by layer count; any other name as is.
    pub fn preset_for(&self, n_layers: usize) -> &str {
        match self.preset.as_str() {
            "auto" if self.model.is_some() => self.model.as_ref().map_or("generic", |m| m.preset),
            "auto" => match n_layers {
                30 => "smollm2",
                32 => "llama3.1-8b",
                28 => "qwen2.5-7b",
                _ => "generic",
            },
            other => other,
        }
    }

    /// The stages of the chosen preset as `(layer, fraction at keep_ratio = 1)`. An unknown preset
    /// gives no stages ([`Self::validate`] reports it). `"generic"` for L layers is
    /// `[(round(L/3), 1), (round(2L/3), 1/2), (L−2, 1/4)]`, with layers outside `1..L` dropped and,
    /// where two coincide (small L), the first (larger) fraction kept.
    pub fn stage_fractions(&self, n_layers: usize) -> Vec<(usize, f32)> {
        match self.preset_for(n_layers) {
            "smollm2" => vec![(10, 1.0), (15, 1.0), (20, 0.5), (28, 0.25)],
            "llama3.1-8b" => vec![(10, 0.5), (20, 0.25), (30, 0.125)],
            // the 8B's stages at the same depth fractions (10/32, 20/32, L−2)
            "llama3.2-1b" => vec![(5, 0.5), (10, 0.25), (14, 0.125)],
            "llama3.2-3b" => vec![(9, 0.5), (18, 0.25), (26, 0.125)],
            "qwen2.5-7b" => vec![(9, 0.75), (18, 0.375), (26, 0.25)],
            "generic" => {
                let l = n_layers;
                // round(L/3) and round(2L/3) in integers: floor(x + 1/2) = (6x + 3) / 6.
                let candidates = [
                    ((2 * l + 3) / 6, 1.0),
                    ((4 * l + 3) / 6, 0.5),
                    (l.saturating_sub(2), 0.25),
                ];
                let mut out: Vec<(usize, f32)> = Vec::with_capacity(3);
                for (layer, fraction) in candidates {
                    let increasing = out.last().is_none_or(|&(prev, _)| layer > prev);
                    if layer >= 1 && layer < l && increasing {
                        out.push((layer, fraction));
                    }
                }
                out
            }
            "custom" => self.stages.iter().map(|s| (s.layer, s.fraction)).collect(),
            _ => Vec::new(),
        }
    }

    /// Each preset stage's floor in tokens, in the order of [`Self::stage_fractions`]: the
    /// paper's absolute budgets. LLaMA-3.1-8B keeps 8192/4096/2048 tokens of its 32k context at
    /// layers 10/20/30 whatever the prompt, so a prompt of up to 8192 tokens is not pruned at
    /// layer 10. SmolLM2 keeps 3072/2048/1024/512 of its 8192-token context at layers
    /// 10/15/20/28: agreement with dense falls with the rows the first stage drops, so at 4k
    /// tokens layers 10-14 keep three quarters, 15-19 half (the stage at 15 has layer 10's
    /// fraction: from 6k tokens it keeps what 10 keeps and is left out), 20-27 a quarter.
    /// Against 3072/1024/512 alone: 0.954 against 0.959 reported at 4k (`slimchat facts`, 72
    /// cases), 0.962 on the tuning part as before, for 150 ms less of a 4k prefill (0.59
    /// against 0.64 of dense's TTFT; bench/NOTES.md). The Llama-3.2 presets and
    /// `"generic"` take shares of the context (`slim::preset::generic_floors`: 2048/1024/512 for
    /// a 128k-context model); `"custom"` takes each stage's `floor`; `"generic"` without a known
    /// model has none (`min_keep_tokens` applies to every stage).
    pub fn preset_floors(&self, n_layers: usize) -> Vec<usize> {
        match self.preset_for(n_layers) {
            "smollm2" => vec![3072, 2048, 1024, 512],
            "llama3.1-8b" => vec![8192, 4096, 2048],
            "qwen2.5-7b" => vec![12288, 6144, 4096],
            "llama3.2-1b" | "llama3.2-3b" | "generic" => self
                .model
                .as_ref()
                .map_or_else(Vec::new, |m| generic_floors(m.context)),
            "custom" => self.stages.iter().map(|s| s.floor).collect(),
            _ => Vec::new(),
        }
    }

    /// Prompts of up to this many tokens run dense on the preset ([`SMOLLM2_DENSE_TOKENS`]).
    pub fn preset_dense_tokens(&self, n_layers: usize) -> usize {
        match self.preset_for(n_layers) {
            "smollm2" => SMOLLM2_DENSE_TOKENS,
            _ => 0,
        }
    }

    /// The stages for one prompt of `prompt_tokens` tokens on a model with `n_layers` layers.
    ///
    /// A stage's budget is `keep_ratio * fraction * prompt_tokens` tokens, at least
    /// `min_keep_tokens` and the preset's floor ([`Self::preset_floors`]), in blocks
    /// `ceil(tokens / block_size)`, capped at the prompt's `ceil(prompt_tokens / block_size)`
    /// blocks and at the previous stage's blocks (nested), and raised to the number of
    /// always-kept blocks. A stage held at its floor that would drop fewer than 1 in
    /// [`MIN_DROP_SHARE`] of its blocks keeps them all, and so does every stage held at its
    /// floor when the schedule would spare under 1 in [`MIN_SPARED_SHARE`] of the forward's
    /// rows; when that leaves no stage dropping a block, the schedule is empty (the prompt runs
    /// dense, decode attending to every block too). A stage that keeps every block still
    /// appears (a no-op), except one with the fraction of the stage before it (a step down of
    /// the floor alone) that keeps every block reaching it: it is left out, and the stage
    /// before it goes on (its scores, decode set and stash span both). Empty when disabled,
    /// when the prompt fits in one block or in the preset's dense length
    /// ([`Self::preset_dense_tokens`]), or when the config is invalid in a way that would make
    /// the arithmetic meaningless (call [`Self::validate`] first; stages with layers outside
    /// `1..n_layers` are skipped here).
    pub fn resolve(&self, n_layers: usize, prompt_tokens: usize) -> Vec<Stage> {
        let bs = self.block_size;
        let dense = prompt_tokens <= self.preset_dense_tokens(n_layers);
        if !self.enabled || bs == 0 || prompt_tokens <= bs || dense {
            return Vec::new();
        }
        let (mut stages, at_floor) = self.resolve_stages(n_layers, prompt_tokens, &[]);
        let n_blocks = prompt_tokens.div_ceil(bs);
        let spared = spared_block_layers(&stages, n_layers, n_blocks);
        if spared > 0 && spared * MIN_SPARED_SHARE < n_layers * n_blocks {
            stages = self.resolve_stages(n_layers, prompt_tokens, &at_floor).0;
            if stages.iter().all(|s| s.keep_blocks >= n_blocks) {
                stages.clear(); // the dense forward, decode attending to every block
            }
        }
        stages
    }

    /// The stages, and for each of the preset's stages whether its floor set its budget (rather
    /// than the ratio). A stage whose flag is set in `keep_whole` keeps every block that
    /// reaches it.
    fn resolve_stages(
        &self,
        n_layers: usize,
        prompt_tokens: usize,
        keep_whole: &[bool],
    ) -> (Vec<Stage>, Vec<bool>) {
        let bs = self.block_size;
        let n_blocks = prompt_tokens.div_ceil(bs);
        let forced = crate::slim::select::forced_blocks(prompt_tokens, bs, self.local_window).len();
        let mut prev_blocks = n_blocks;
        let (mut prev_layer, mut prev_fraction) = (0, f32::NAN);
        let mut out = Vec::new();
        let mut at_floor = Vec::new();
        let floors = self.preset_floors(n_layers);
        for (i, (layer, fraction)) in self.stage_fractions(n_layers).into_iter().enumerate() {
            at_floor.push(false);
            if layer <= prev_layer || layer >= n_layers {
                continue;
            }
            let floor = self
                .min_keep_tokens
                .max(floors.get(i).copied().unwrap_or(0));
            let by_ratio = self.keep_ratio as f64 * fraction as f64 * prompt_tokens as f64;
            let tokens = by_ratio.max(floor as f64);
            // Shave a relative 1e-6 (a few f32 ulps of keep_ratio * fraction) so that budgets
            // that are whole blocks up to f32 rounding (0.1f32 * 6400 = 640.0000095) do not
            // round up to one block more.
            let blocks = ((tokens / bs as f64) * (1.0 - 1e-6)).ceil().max(0.0) as usize;
            let mut keep_blocks = blocks.min(prev_blocks).max(forced.min(n_blocks));
            let floor_binds = floor as f64 >= by_ratio;
            let sliver = (prev_blocks - keep_blocks) * MIN_DROP_SHARE < prev_blocks;
            if floor_binds && (sliver || keep_whole.get(i).copied().unwrap_or(false)) {
                keep_blocks = prev_blocks;
            }
            at_floor[i] = floor_binds;
            if fraction == prev_fraction && keep_blocks == prev_blocks {
                continue; // a step of the floor that does not bind
            }
            let decode_blocks = ((keep_blocks as f64 * self.decode_keep as f64) * (1.0 - 1e-6))
                .ceil()
                .max(forced as f64)
                .max(self.decode_min_tokens.div_ceil(bs) as f64)
                as usize;
            out.push(Stage {
                start_layer: layer,
                keep_blocks,
                decode_blocks: decode_blocks.min(keep_blocks),
            });
            (prev_blocks, prev_layer, prev_fraction) = (keep_blocks, layer, fraction);
        }
        (out, at_floor)
    }
}

/// Block-layers a schedule spares: each stage's dropped blocks times the layers it spans.
fn spared_block_layers(stages: &[Stage], n_layers: usize, n_blocks: usize) -> usize {
    let ends = (stages.iter().skip(1).map(|s| s.start_layer)).chain(std::iter::once(n_layers));
    (stages.iter().zip(ends))
        .map(|(s, end)| (end - s.start_layer) * n_blocks.saturating_sub(s.keep_blocks))
        .sum()
}

/// Which block score ranks the candidates (see `slim::score`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreKind {
    /// The paper's: mean over heads of |q_loc · k_unit|, max over the block's units.
    Paper,
    /// Attention mass of the block's units under each head's softmax, averaged over heads.
    Attention,
}

/// What the decode gate's gamma measures (see `slim::select`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GateKind {
    /// |proposal ∩ active| / K, the paper's overlap.
    Blocks,
    /// The share of the proposal's score mass inside the active set.
    Mass,
}

/// Who chooses the prompt blocks decode attends to (see `slim::session`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DecodeSelect {
    /// One set per stage, chosen at its boundary layer.
    Stage,
    /// One set per slim layer, chosen from that layer's own queries.
    Layer,
}

/// Which layers' queries score the blocks in prefill (see `slim::session`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreLayers {
    /// The layer just before the stage (the paper's).
    Boundary,
    /// The mean over every layer since the previous boundary.
    Stage,
}

#[cfg(test)]
mod tests;
