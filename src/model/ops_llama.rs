//! The LLaMA forward written once against the ops seam ([`Ops`]), pruned by the CPU engine's own
//! [`SlimSession`] (its schedule, scores, prefill stages and each slim layer's decode set; the
//! scores are computed by the backend, where the keys are, and chosen on the host). It runs on the CPU ([`crate::backend::cpu_ops`], where the tests check it) and on the
//! GPU (`slimchat gpu-check`). Its weights come from a GGUF file (any type the models load,
//! expanded to bf16 by the backend: on a GPU by a kernel, [`Weights::from_gguf`]) or are drawn
//! at random for a named shape ([`Weights::random`], Llama-3.1-8B's for the GPU benchmark).
//!
//! Per layer: RMSNorm → fused q|k|v GEMM (+ biases) → RoPE at explicit positions → append K/V to
//! the layer's paged cache ([`crate::backend::paged_kv`]) → causal attention over the cache → o
//! GEMM + residual → RMSNorm → fused gate|up GEMM → SiLU gate → down GEMM + residual. At the
//! layers that score a stage, the last `local_window` queries score the prompt blocks; after the
//! layer before a stage, the top-K blocks' rows (hidden states and positions together) go on. In
//! decode each slim layer attends to the blocks the session chose for it (a slot table of those
//! blocks). The head's logits are f32.

use std::ops::Range;
use std::sync::atomic::AtomicUsize;

use crate::backend::ops::KV_BLOCK;
use crate::backend::ops::{AttentionContext, LayerRows, MlpScratch, MlpWeights, Ops, RowSlice};
use crate::backend::paged_kv::{LayerCache, LayerHooks};
use crate::backend::paged_tier::{row_blocks_of, SharedSpill};
use crate::kv::policy::{Revived, RowChange};
use crate::model::gguf::GgufFile;
use crate::slim::schedule::{SlimConfig, Stage};
use crate::slim::session::SlimSession;
use crate::{Error, Result};

mod cache;
mod probe;
mod session_io;
mod shape;
mod weights;
pub use cache::{KvPlacement, ModelCache, TierReport};
pub use probe::{OpProbe, ProbeMode, ProbePart};
use session_io::{every_row, kept_only, read_held, slot_subset, OpsHidden, OpsKeys, ReadyScores};
pub use shape::LlamaShape;
pub use weights::Weights;

/// What a prefill did.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillReport {
    /// Logits of the last prompt token (vocab).
    pub logits: Vec<f32>,
    /// Rows each layer ran on.
    pub rows_per_layer: Vec<usize>,
    /// The stages applied (empty when dense).
    pub stages: Vec<Stage>,
    /// The prompt blocks each stage kept (ascending), as the engine's `SlimSession::trace`
    /// lists them.
    pub kept_blocks: Vec<Vec<u32>>,
}

/// Scratch buffers of one forward, sized for its widest layer: the attention's (the normed
/// input and the output projection are the MLP's `x` and `out`) and the MLP's.
struct Scratch<O: Ops> {
    qkv: O::Act,
    attn: O::Act,
    mlp: MlpScratch<O>,
}

impl<O: Ops> Scratch<O> {
    fn new(ops: &O, s: &LlamaShape, rows: usize) -> Result<Self> {
        Ok(Self {
            qkv: ops.zeros_act(rows * s.qkv_dim())?,
            attn: ops.zeros_act(rows * s.heads.q_dim())?,
            mlp: mlp_scratch(ops, s, rows)?,
        })
    }
}

fn mlp_scratch<O: Ops>(ops: &O, s: &LlamaShape, rows: usize) -> Result<MlpScratch<O>> {
    Ok(MlpScratch {
        x: ops.zeros_act(rows * s.hidden)?,
        gate_up: ops.zeros_act(rows * 2 * s.intermediate)?,
        act: ops.zeros_act(rows * s.intermediate)?,
        out: ops.zeros_act(rows * s.hidden)?,
    })
}

/// The model: shape, weights, and the backend that runs it.
pub struct OpsLlama<'o, O: Ops> {
    pub ops: &'o O,
    pub shape: LlamaShape,
    pub weights: Weights<O>,
    /// Where the forward's time goes, while a probe runs (gpu-check's decode profile).
    pub probe: OpProbe,
    /// Whether a decode step starts each slim layer's scoring before its query is downloaded
    /// (one wait a slim layer instead of two; the same scores). On by default.
    pub score_ahead: bool,
    /// Decode scorings the session took from scores started that way.
    pub scored_ahead: AtomicUsize,
}

impl<'o, O: Ops> OpsLlama<'o, O> {
    /// A model of `shape` with random weights ([`Weights::random`]).
    pub fn random(ops: &'o O, shape: LlamaShape, max_positions: usize, seed: u64) -> Result<Self> {
        let weights = Weights::random(ops, &shape, max_positions, seed)?;
        Ok(Self {
            ops,
            shape,
            weights,
            probe: OpProbe::default(),
            score_ahead: true,
            scored_ahead: AtomicUsize::new(0),
        })
    }

    /// A model file's architecture and weights, for prompts and answers of up to
    /// `max_positions` tokens (at most the model's context).
    pub fn from_gguf(ops: &'o O, f: &mut GgufFile, max_positions: usize) -> Result<Self> {
        let spec = f.spec()?;
        weights::check_tensors_are_known(f, &spec)?;
        let shape = LlamaShape::from_spec(&spec)?;
        (ops.kv_dtype().check_head_dim(spec.head_dim)).map_err(Error::ModelLoad)?;
        let max_positions = max_positions.min(spec.context_length);
        let weights = Weights::from_gguf(ops, f, &shape, max_positions)?;
        Ok(Self {
            ops,
            shape,
            weights,
            probe: OpProbe::default(),
            score_ahead: true,
            scored_ahead: AtomicUsize::new(0),
        })
    }

    /// Teacher forcing: the logits of every position of `tokens` (a dense prefill at positions
    /// 0..), (tokens, vocab) row-major.
    pub fn logits_all(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.logits_from(tokens, 0)
    }

    /// Teacher forcing: the logits of positions `from..` of `tokens` (a dense prefill at
    /// positions 0..), (tokens - from, vocab) row-major; the head takes those rows as one batch.
    pub fn logits_from(&self, tokens: &[u32], from: usize) -> Result<Vec<f32>> {
        if from >= tokens.len() {
            return Err(Error::Engine(format!(
                "logits_from: row {from} of {} tokens",
                tokens.len()
            )));
        }
        let mut no_hooks = crate::backend::paged_kv::NoHooks;
        let (_, h, rows, _) =
            self.run_prompt(tokens, None, 0, KvPlacement::Resident, None, &mut no_hooks)?;
        if from == 0 {
            return self.logits(&h, rows, false);
        }
        let (ops, hidden, n) = (self.ops, self.shape.hidden, rows - from);
        let idx = ops.upload_u32(&(from as u32..rows as u32).collect::<Vec<_>>())?;
        let pos = ops.upload_u32(&vec![0; rows])?;
        let (mut tail, mut tail_pos) = (ops.zeros_f32(n * hidden)?, ops.zeros_u32_like(n)?);
        ops.gather_rows(&h, &pos, &idx, &mut tail, &mut tail_pos, hidden)?;
        self.logits(&tail, n, false)
    }

    /// Prefill `tokens` at positions 0.., pruned by `slim` (None: dense), leaving room for
    /// `headroom` decoded tokens in every layer's cache, which keeps every kept row.
    pub fn prefill(
        &self,
        tokens: &[u32],
        slim: Option<&SlimConfig>,
        headroom: usize,
        hooks: &mut dyn LayerHooks<O>,
    ) -> Result<(ModelCache<O>, PrefillReport)> {
        self.prefill_placed(tokens, slim, headroom, KvPlacement::Resident, hooks)
    }

    /// [`Self::prefill`], with the pruned prompt's KV kept as `placement` says.
    pub fn prefill_placed(
        &self,
        tokens: &[u32],
        slim: Option<&SlimConfig>,
        headroom: usize,
        placement: KvPlacement,
        hooks: &mut dyn LayerHooks<O>,
    ) -> Result<(ModelCache<O>, PrefillReport)> {
        self.prefill_spilling(tokens, slim, headroom, placement, None, hooks)
    }

    /// [`Self::prefill_placed`], with every block a tiered layer keeps in RAM also written to
    /// `spill` (`[kv] spill`), from which decode reads it back.
    pub fn prefill_spilling(
        &self,
        tokens: &[u32],
        slim: Option<&SlimConfig>,
        headroom: usize,
        placement: KvPlacement,
        spill: Option<&SharedSpill>,
        hooks: &mut dyn LayerHooks<O>,
    ) -> Result<(ModelCache<O>, PrefillReport)> {
        let run = self.run_prompt(tokens, slim, headroom, placement, spill, hooks)?;
        let (cache, h, rows, mut report) = run;
        report.logits = self.head(&h, rows, tokens.len() > 1)?;
        Ok((cache, report))
    }

    /// Every layer on the prompt, pruned by `slim`: the cache, the last layer's hidden states
    /// and how many rows they hold, and the report without its logits.
    fn run_prompt(
        &self,
        tokens: &[u32],
        slim: Option<&SlimConfig>,
        headroom: usize,
        placement: KvPlacement,
        spill: Option<&SharedSpill>,
        hooks: &mut dyn LayerHooks<O>,
    ) -> Result<(ModelCache<O>, O::F32, usize, PrefillReport)> {
        let (ops, s) = (self.ops, &self.shape);
        let n0 = tokens.len();
        self.check_tokens(tokens, n0 + headroom)?;
        let mut session = slim.map(|c| self.session(c, n0)).transpose()?;
        let mut cache = ModelCache {
            layers: Vec::with_capacity(s.n_layers),
            prompt_len: n0,
            session: None,
        };
        let mut positions: Vec<u32> = (0..n0 as u32).collect();
        let mut pos_dev = ops.upload_u32(&positions)?;
        let mut h = self.embed(tokens)?;
        let mut scratch = Scratch::new(ops, s, n0)?;
        let mut rows_per_layer = Vec::with_capacity(s.n_layers);
        for layer in 0..s.n_layers {
            let n = positions.len();
            cache
                .layers
                .push(LayerCache::new(ops, n + headroom, s.heads.kv_dim())?);
            let kv = cache.layers.last_mut().expect("pushed");
            let (slim, sc) = (session.as_mut(), &mut scratch);
            let (at, pos) = (&mut positions, &mut pos_dev);
            self.prefill_layer(layer, &mut h, at, pos, kv, sc, hooks, slim)?;
            if let Some(session) = &session {
                cache::ready_for_decode(ops, layer, kv, session, placement, spill)?;
                self.probe.mark(ops, "ready for decode")?;
            }
            hooks.layer_done(ops, layer, kv)?;
            rows_per_layer.push(n);
        }
        let (stages, kept_blocks) = match &session {
            Some(session) => (
                session.stages(),
                (session.trace().stages.into_iter())
                    .map(|st| st.pool)
                    .collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        cache.session = session;
        let report = PrefillReport {
            logits: Vec::new(),
            rows_per_layer,
            stages,
            kept_blocks,
        };
        Ok((cache, h, positions.len(), report))
    }

    /// The engine's SlimInfer session for a prompt of `prompt_len` tokens, revival (a raised
    /// ratio brings pruned blocks back) as configured: the pruned rows' hidden states are held
    /// on the backend (on a GPU, in its memory: nothing is downloaded during the prefill), and
    /// read back when a block is revived. A tiered layer that revives a block first gives its
    /// host tier up ([`LayerCache::untier`]).
    fn session(&self, cfg: &SlimConfig, prompt_len: usize) -> Result<SlimSession> {
        let s = &self.shape;
        cfg.check(s.n_layers)?;
        if cfg.block_size != KV_BLOCK {
            return Err(Error::Config(format!(
                "[slim] block_size must be {KV_BLOCK} on the ops forward (the KV slot size)"
            )));
        }
        Ok(SlimSession::new(cfg, s.n_layers, s.heads, prompt_len))
    }

    /// A layer's cache as the session scores it.
    fn keys<'a>(&'a self, kv: &'a LayerCache<O>) -> OpsKeys<'a, O> {
        OpsKeys {
            ops: self.ops,
            kv,
            heads: self.shape.heads,
            probe: Some(&self.probe),
            ready: None,
            ready_used: Some(&self.scored_ahead),
        }
    }

    /// One decode step: `token` at the next position, through every layer (each attends to
    /// all its cached rows, a slim layer to its decode set). Returns the logits.
    pub fn decode(
        &self,
        cache: &mut ModelCache<O>,
        token: u32,
        hooks: &mut dyn LayerHooks<O>,
    ) -> Result<Vec<f32>> {
        self.extend(cache, &[token], hooks)
    }

    /// `tokens` at the next positions (a follow-up message, or one decoded token), through
    /// every layer: each row attends causally to the cached rows and to the rows before it.
    /// Nothing past the prompt is pruned; a layer whose pool is full grows it. Returns the
    /// logits of the last token.
    pub fn extend(
        &self,
        cache: &mut ModelCache<O>,
        tokens: &[u32],
        hooks: &mut dyn LayerHooks<O>,
    ) -> Result<Vec<f32>> {
        let (ops, s) = (self.ops, &self.shape);
        let n = tokens.len();
        let pos = cache.layers[0].positions.last().map_or(0, |&p| p + 1);
        self.check_tokens(tokens, pos as usize + n)?;
        for kv in &mut cache.layers {
            kv.reserve(ops, n)?;
        }
        let mut positions: Vec<u32> = (pos..pos + n as u32).collect();
        let mut pos_dev = ops.upload_u32(&positions)?;
        let mut h = self.embed(tokens)?;
        let mut scratch = Scratch::new(ops, s, n)?;
        self.probe.mark(ops, "step setup")?;
        let mut session = cache.session.take();
        let prompt_len = cache.prompt_len as u32;
        let mut step = || -> Result<()> {
            for (layer, kv) in cache.layers.iter_mut().enumerate() {
                let (slim, sc) = (session.as_mut(), &mut scratch);
                let change = self
                    .layer_and_session(layer, &mut h, &positions, &pos_dev, kv, sc, hooks, slim)?;
                let Some(change) = change else {
                    continue;
                };
                // every row past the prompt goes on; prompt rows revived at a stage leave at
                // the next boundary (their KV stays in the stage's layers)
                let past = (positions.iter()).filter(|&&p| p >= prompt_len).count();
                let kept_past = (change.keep.iter())
                    .filter(|&&r| positions[r] >= prompt_len)
                    .count();
                if kept_past != past {
                    return Err(Error::Engine(
                        "decode: a stage dropped a row past the prompt".into(),
                    ));
                }
                (h, positions, pos_dev) = self.change_rows(&h, &positions, &pos_dev, change)?;
                scratch = Scratch::new(ops, s, positions.len())?;
            }
            Ok(())
        };
        let stepped = step();
        cache.session = session;
        stepped?;
        let logits = self.head(&h, positions.len(), n > 1)?;
        self.probe.mark(ops, "head")?;
        Ok(logits)
    }

    /// The rows of h (and their positions) after a session's change: the kept rows, then the
    /// revived rows (hidden states kept on the host, positions below every kept row's) in
    /// front. Revived rows are few blocks and come rarely (a raised ratio), so the kept rows
    /// pass through the host to join them.
    fn change_rows(
        &self,
        h: &O::F32,
        positions: &[u32],
        pos_dev: &O::U32,
        change: RowChange,
    ) -> Result<(O::F32, Vec<u32>, O::U32)> {
        let (ops, hidden) = (self.ops, self.shape.hidden);
        let RowChange { keep, insert } = change;
        let idx = ops.upload_u32(&keep.iter().map(|&i| i as u32).collect::<Vec<_>>())?;
        let mut kept = ops.zeros_f32(keep.len() * hidden)?;
        let mut kept_pos = ops.zeros_u32_like(keep.len())?;
        ops.gather_rows(h, pos_dev, &idx, &mut kept, &mut kept_pos, hidden)?;
        let mut positions: Vec<u32> = keep.iter().map(|&i| positions[i]).collect();
        let Some((extra, extra_pos)) = insert else {
            return Ok((kept, positions, kept_pos));
        };
        let rows = extra_pos.len();
        let ordered = extra_pos.windows(2).all(|w| w[0] < w[1])
            && (extra_pos.last().zip(positions.first())).is_none_or(|(a, b)| a < b);
        let extra = match extra {
            Revived::Rows(t) => t.flatten_all()?.to_vec1::<f32>()?,
            Revived::Held(runs) => {
                let mut all = Vec::with_capacity(rows * hidden);
                let finish_mlp = |h: &mut O::F32, rows: usize, layer: usize| {
                    let mut scratch = mlp_scratch(ops, &self.shape, rows)?;
                    self.mlp(layer, h, &mut scratch, rows)
                };
                for (held, range) in runs {
                    all.extend(read_held(ops, &held, range, hidden, &finish_mlp)?);
                }
                all
            }
        };
        if !ordered || extra.len() != rows * hidden {
            return Err(Error::Engine(format!(
                "ops forward: {rows} revived rows out of order or without their hidden states"
            )));
        }
        let mut joined = extra;
        let mut kept = ops.download_f32(&kept)?;
        kept.truncate(keep.len() * hidden);
        joined.extend(kept);
        positions.splice(0..0, extra_pos);
        let pos_dev = ops.upload_u32(&positions)?;
        Ok((ops.upload_f32(&joined)?, positions, pos_dev))
    }

    /// One layer of a prompt's prefill: [`Self::layer`], the session's turn (its scores, and
    /// at a stage's boundary the rows that go on, gathered here with their positions), then the
    /// MLP on the rows that go on only. A dropped row's MLP waits with its hidden state in the
    /// session's stash until a heal or revival reads it ([`read_held`]), or never runs.
    #[allow(clippy::too_many_arguments)]
    fn prefill_layer(
        &self,
        layer: usize,
        h: &mut O::F32,
        positions: &mut Vec<u32>,
        pos_dev: &mut O::U32,
        kv: &mut LayerCache<O>,
        sc: &mut Scratch<O>,
        hooks: &mut dyn LayerHooks<O>,
        mut slim: Option<&mut SlimSession>,
    ) -> Result<()> {
        let (ops, hidden) = (self.ops, self.shape.hidden);
        let session = slim.as_deref_mut();
        let q = self.layer(layer, h, positions, pos_dev, kv, sc, hooks, session)?;
        let change = match (slim, q) {
            (Some(session), Some((q, ready))) => {
                let before_mlp = Some(layer);
                self.session_turn(layer, h, positions, kv, session, (q, ready), before_mlp)?
            }
            _ => None,
        };
        if let Some(keep) = change.map(kept_only).transpose()? {
            let idx = ops.upload_u32(&keep.iter().map(|&i| i as u32).collect::<Vec<_>>())?;
            let mut h2 = ops.zeros_f32(keep.len() * hidden)?;
            let mut pos2 = ops.zeros_u32_like(keep.len())?;
            ops.gather_rows(h, pos_dev, &idx, &mut h2, &mut pos2, hidden)?;
            self.probe.mark(ops, "prune (gather)")?;
            (*h, *pos_dev) = (h2, pos2);
            *positions = keep.iter().map(|&i| positions[i]).collect();
        }
        self.mlp(layer, h, &mut sc.mlp, positions.len())
    }

    /// [`Self::layer`] and its MLP, then the session's turn after it (a decode step re-chooses
    /// at a boundary): the rows that go on, when they change.
    #[allow(clippy::too_many_arguments)]
    fn layer_and_session(
        &self,
        layer: usize,
        h: &mut O::F32,
        positions: &[u32],
        pos_dev: &O::U32,
        kv: &mut LayerCache<O>,
        sc: &mut Scratch<O>,
        hooks: &mut dyn LayerHooks<O>,
        mut slim: Option<&mut SlimSession>,
    ) -> Result<Option<RowChange>> {
        let session = slim.as_deref_mut();
        let q = self.layer(layer, h, positions, pos_dev, kv, sc, hooks, session)?;
        self.mlp(layer, h, &mut sc.mlp, positions.len())?;
        let (Some(session), Some(q)) = (slim, q) else {
            return Ok(None);
        };
        self.session_turn(layer, h, positions, kv, session, q, None)
    }

    /// The session's turn after layer `layer` on the rows of h (whose MLP is still to run
    /// where `mlp_pending` says so): the rows that go on, when they change.
    #[allow(clippy::too_many_arguments)]
    fn session_turn(
        &self,
        layer: usize,
        h: &O::F32,
        positions: &[u32],
        kv: &LayerCache<O>,
        session: &mut SlimSession,
        (q, ready): (Vec<f32>, Option<ReadyScores>),
        mlp_pending: Option<usize>,
    ) -> Result<Option<RowChange>> {
        let rows = OpsHidden {
            ops: self.ops,
            h,
            rows: positions.len(),
            hidden: self.shape.hidden,
            mlp_pending,
        };
        let mut keys = self.keys(kv);
        keys.ready = ready;
        let change = session.finish_layer(layer, &rows, &q, positions, &keys)?;
        self.probe.mark(self.ops, "session (scores)")?;
        Ok(change)
    }

    /// One layer on the rows of h up to its MLP ([`Self::mlp`]). With a session: the post-RoPE
    /// queries of the rows it scores (its `local_window` last), widened on the host, are
    /// returned for its `finish_layer`, and the layer attends to the rows the session chose.
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        layer: usize,
        h: &mut O::F32,
        positions: &[u32],
        pos_dev: &O::U32,
        kv: &mut LayerCache<O>,
        sc: &mut Scratch<O>,
        hooks: &mut dyn LayerHooks<O>,
        mut slim: Option<&mut SlimSession>,
    ) -> Result<Option<(Vec<f32>, Option<ReadyScores>)>> {
        let (ops, s, w) = (self.ops, &self.shape, &self.weights.layers[layer]);
        let n = positions.len();
        let (qd, kvd, qkv_dim) = (s.heads.q_dim(), s.heads.kv_dim(), s.qkv_dim());
        let rows = |offset| RowSlice {
            rows: n,
            stride: qkv_dim,
            offset,
        };
        ops.rmsnorm(h, &w.attn_norm, &mut sc.mlp.x, n, s.rms_eps)?;
        ops.matmul(&sc.mlp.x, &w.wqkv, &mut sc.qkv, n, s.hidden, qkv_dim)?;
        if let Some(b) = &w.bqkv {
            ops.add_bias(&mut sc.qkv, b, n, qkv_dim)?;
        }
        self.probe.mark(ops, "norm + qkv")?;
        let (hd, layout) = (s.heads.head_dim, s.rope.layout);
        let (nh, nkv) = (s.heads.n_heads, s.heads.n_kv_heads);
        if let Some((qn, kn)) = &w.qk_norm {
            ops.head_rmsnorm(&mut sc.qkv, rows(0), qn, nh, hd, s.rms_eps)?;
            ops.head_rmsnorm(&mut sc.qkv, rows(qd), kn, nkv, hd, s.rms_eps)?;
        }
        let (cos, sin) = (&self.weights.cos, &self.weights.sin);
        ops.rope(&mut sc.qkv, rows(0), pos_dev, cos, sin, nh, hd, layout)?;
        ops.rope(&mut sc.qkv, rows(qd), pos_dev, cos, sin, nkv, hd, layout)?;
        kv.append(ops, &sc.qkv, rows(0), (qd, qd + kvd), positions, pos_dev)?;
        hooks.kv_written(ops, layer, kv)?;
        self.probe.mark(ops, "rope + kv append")?;
        let q = match slim.as_deref_mut() {
            Some(session) => {
                let tail = session.query_rows().min(n);
                // the scorings the session will ask of this layer start now, from the queries
                // where they are, so that downloading them waits once for everything
                let set_req = session.set_scoring(layer).filter(|_| self.score_ahead);
                let prefill = (session.prefill_scoring(layer, n)).filter(|_| self.score_ahead);
                let last_rows = |w: usize| rows(0).rows_from(n - w, w);
                let keys = self.keys(kv);
                let set_issued = match set_req {
                    Some(req) => Some((req, keys.issue(&sc.qkv, last_rows(1), &req)?)),
                    None => None,
                };
                let prefill_issued = match prefill.filter(|&(_, w)| w > 0 && w <= tail) {
                    Some((req, w)) => Some((req, w, keys.issue(&sc.qkv, last_rows(w), &req)?)),
                    None => None,
                };
                let q = self.query_rows(&sc.qkv, n - tail..n)?;
                let ready = |req, w: usize, scores| ReadyScores {
                    q: q[(tail - w) * qd..].to_vec(),
                    req,
                    scores,
                };
                let mut keys = self.keys(kv);
                if let Some((req, issued)) = set_issued {
                    keys.ready = Some(ready(req, 1, keys.collect(issued)?));
                }
                let after = match prefill_issued {
                    Some((req, w, issued)) => Some(ready(req, w, keys.collect(issued)?)),
                    None => None,
                };
                session.prepare_attention(layer, &q, positions, &keys)?;
                Some((q, after))
            }
            None => None,
        };
        let attended = slim.map(|session| session.attended_rows(layer, &self.keys(kv)));
        if let Some(ranges) = attended.as_ref().filter(|_| kv.host.is_some()) {
            kv.make_resident(ops, &row_blocks_of(ranges))?;
        }
        // a layer with a host tier reads its fast tier through a table of what is resident
        let subset = match &attended {
            Some(ranges) if kv.host.is_some() || !every_row(ranges, kv.rows) => {
                Some(slot_subset(&kv.table, ranges)?)
            }
            None if kv.host.is_some() => {
                return Err(Error::Engine(
                    "ops forward: a tiered layer without its session".into(),
                ))
            }
            _ => None,
        };
        let subset_table = match &subset {
            Some((slots, _)) => Some(ops.upload_u32(slots)?),
            None => None,
        };
        let (table, n_keys) = match (&subset_table, &subset) {
            (Some(table), Some((_, n_keys))) => (table, *n_keys),
            _ => (&kv.table_dev, kv.rows),
        };
        self.probe.mark(ops, "decode set")?;
        // a subset, for a backend that reads it as the layer's rows: the layer's own pool, or
        // for a tiered layer's several rows (a follow-up) a copy holding every row
        let by_rows = ops.attends_by_layer_rows();
        let whole = match (&subset, by_rows && n > 1) {
            (Some(_), true) => kv.whole_pool(ops)?,
            _ => None,
        };
        let whole_table = match &whole {
            Some(_) => Some(ops.upload_u32(&(0..kv.row_blocks() as u32).collect::<Vec<_>>())?),
            None => None,
        };
        let layer_rows = match (&subset, &attended, &whole, &whole_table) {
            (Some(_), Some(ranges), Some(pool), Some(table)) => Some(LayerRows {
                pool,
                table,
                rows: kv.rows,
                ranges,
            }),
            (Some(_), Some(ranges), None, _) if by_rows && kv.host.is_none() => Some(LayerRows {
                pool: &kv.pool,
                table: &kv.table_dev,
                rows: kv.rows,
                ranges,
            }),
            _ => None,
        };
        let ctx = AttentionContext {
            fresh: Some((qd, qd + kvd)),
            layer: layer_rows,
        };
        ops.attention(
            &sc.qkv,
            rows(0),
            pos_dev,
            &kv.pool,
            table,
            n_keys,
            s.heads,
            &mut sc.attn,
            &ctx,
        )?;
        self.probe.mark(ops, "attention")?;
        ops.matmul(&sc.attn, &w.wo, &mut sc.mlp.out, n, qd, s.hidden)?;
        ops.residual_add(h, &sc.mlp.out)?;
        self.probe.mark(ops, "o + residual")?;
        Ok(q)
    }

    /// Layer `layer`'s MLP (with its residual) on the first `rows` rows of h.
    fn mlp(&self, layer: usize, h: &mut O::F32, sc: &mut MlpScratch<O>, rows: usize) -> Result<()> {
        let (s, w) = (&self.shape, &self.weights.layers[layer]);
        let mlp = MlpWeights {
            norm: &w.mlp_norm,
            gate_up: &w.w_gate_up,
            down: &w.w_down,
        };
        (self.ops).mlp(h, mlp, sc, rows, s.hidden, s.intermediate, s.rms_eps)?;
        self.probe.mark(self.ops, "mlp")
    }

    /// The post-RoPE queries of rows `rows` of the fused q|k|v buffer, widened: (rows, q_dim).
    fn query_rows(&self, qkv: &O::Act, rows: Range<usize>) -> Result<Vec<f32>> {
        let (stride, q_dim) = (self.shape.qkv_dim(), self.shape.heads.q_dim());
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let span = rows.start * stride..(rows.end - 1) * stride + q_dim;
        let wide = self.ops.download_act_range(qkv, span)?;
        Ok((0..rows.len())
            .flat_map(|r| wide[r * stride..][..q_dim].iter().copied())
            .collect())
    }

    /// The embedding's rows of `tokens`: (tokens, hidden).
    fn embed(&self, tokens: &[u32]) -> Result<O::F32> {
        let (ops, s) = (self.ops, &self.shape);
        let mut h = ops.zeros_f32(tokens.len() * s.hidden)?;
        ops.embed(
            &self.weights.embed,
            &ops.upload_u32(tokens)?,
            &mut h,
            s.hidden,
        )?;
        Ok(h)
    }

    /// Positions the model's RoPE tables cover: the longest prompt plus answer it takes.
    pub fn max_positions(&self) -> usize {
        self.weights.max_positions
    }

    /// Logits of the last of `rows` rows of h; `exact_input`: the head multiplies that row as it
    /// is (the CPU engine's backend, a forward of several tokens), not rounded to 8 bits.
    fn head(&self, h: &O::F32, rows: usize, exact_input: bool) -> Result<Vec<f32>> {
        let (ops, s) = (self.ops, &self.shape);
        let idx = ops.upload_u32(&[rows as u32 - 1])?;
        let pos = ops.upload_u32(&vec![0; rows])?;
        let (mut last, mut last_pos) = (ops.zeros_f32(s.hidden)?, ops.zeros_u32_like(1)?);
        ops.gather_rows(h, &pos, &idx, &mut last, &mut last_pos, s.hidden)?;
        self.logits(&last, 1, exact_input)
    }

    /// Logits of every one of `rows` rows of h, (rows, vocab) f32: the final norm, the head.
    fn logits(&self, h: &O::F32, rows: usize, exact_input: bool) -> Result<Vec<f32>> {
        let (ops, s) = (self.ops, &self.shape);
        let mut x = ops.zeros_act(rows * s.hidden)?;
        ops.rmsnorm(h, &self.weights.final_norm, &mut x, rows, s.rms_eps)?;
        let mut logits = ops.zeros_f32(rows * s.vocab)?;
        let (head, hidden, vocab) = (self.weights.head(), s.hidden, s.vocab);
        ops.matmul_f32(&x, head, &mut logits, rows, hidden, vocab, exact_input)?;
        let mut out = ops.download_f32(&logits)?;
        out.truncate(rows * s.vocab);
        Ok(out)
    }

    fn check_tokens(&self, tokens: &[u32], last_position: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::Engine("forward: no tokens".into()));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= self.shape.vocab) {
            return Err(Error::Engine(format!(
                "forward: token {t} outside the vocabulary"
            )));
        }
        if last_position > self.weights.max_positions {
            return Err(Error::Engine(format!(
                "forward: {last_position} positions exceed the RoPE table of {}",
                self.weights.max_positions
            )));
        }
        Ok(())
    }
}

/// A u32 buffer of `n` zeros (a helper every backend gets from `upload_u32`).
trait ZerosU32: Ops {
    fn zeros_u32_like(&self, n: usize) -> Result<Self::U32> {
        self.upload_u32(&vec![0; n])
    }
}
impl<O: Ops> ZerosU32 for O {}
