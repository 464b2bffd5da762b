//! The engine: owns the model, tokenizer, chat template and KV cache, and turns a conversation
//! into streamed answer text plus the numbers a person wants to see (TTFT, tokens/s, KV bytes).
//!
//! A follow-up turn reuses the cache for the longest prefix of tokens it shares with what is
//! cached, so the document pasted earlier is not prefilled again.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;
use tokenizers::Tokenizer;

use crate::backend::attention::AttentionKind;
use crate::backend::engine_ops::EngineOps;
use crate::backend::linear::LinearMode;
use crate::backend::score::HeadShape;
use crate::config::AppConfig;
use crate::device_forward::DeviceForward;
use crate::kv::policy::Dense;
use crate::kv::{KvCache, KvConfig, KvDtype, KvManager, KvStats, LayerPlan};
use crate::metrics::MemoryNow;
use crate::model::gguf::GgufFile;
use crate::model::llama::Llama;
use crate::model::ops_llama::KvPlacement;
use crate::model::source::{DownloadProgress, ModelSource};
use crate::model::template::{ChatTemplate, Message};
use crate::model::tokenizer::{self, SpecialTokens};
use crate::sampling::{Sampler, SamplingConfig};
use crate::slim::preset::{self, ModelFacts, ModelFit};
use crate::slim::schedule::{SlimConfig, Stage};
use crate::slim::session::SlimSession;
use crate::{Error, Result};

mod memory;
mod on_device;

/// What the engine reports while it works.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// `layers_done` of `n_layers` finished for a prefill of `tokens` tokens; the last layer
    /// ran on `rows` rows (fewer than `tokens` once SlimInfer has pruned).
    PrefillProgress {
        layers_done: usize,
        n_layers: usize,
        tokens: usize,
        rows: usize,
    },
    /// New answer text (whole UTF-8 characters).
    Token(String),
    /// Memory now: during the prefill (the KV written so far), after it (where the KV
    /// lives: the host tier is empty when every block is resident) and during decode; at most
    /// one every [`memory::MEMORY_EVERY`].
    Memory(MemoryNow),
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The model produced an end-of-turn token.
    EndOfTurn,
    /// `max_tokens` reached.
    MaxTokens,
    /// The model's context is full.
    ContextFull,
    /// The caller cancelled.
    Cancelled,
}

/// Numbers for one request.
#[derive(Debug, Clone, Serialize)]
pub struct GenStats {
    pub text: String,
    /// Tokens of the rendered prompt (the whole conversation).
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV was reused from the previous turn.
    pub reused_tokens: usize,
    /// Prompt tokens run through the model for this request.
    pub prefilled_tokens: usize,
    pub generated_tokens: usize,
    pub ttft_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub kv_bytes: usize,
    pub stop_reason: StopReason,
    /// Whether SlimInfer pruning was on for this request.
    pub slim: bool,
    /// How the prompt got into the cache.
    pub prefill_kind: PrefillKind,
    /// KV rows per layer after the prefill (prompt tokens each layer kept).
    pub kept_per_layer: Vec<usize>,
    /// Active-set block changes at each decode step (all zero when the gate kept every set).
    pub blocks_swapped_per_step: Vec<usize>,
    /// (block, stage) pairs that decode brought back after prefill had pruned them.
    pub blocks_revived: usize,
    /// Bytes of pruned blocks' hidden states kept so that decode can revive them.
    pub revival_bytes: usize,
    /// Why nothing was pruned, when pruning was on but the prompt was too short.
    pub slim_note: Option<String>,
    /// The preset whose schedule applied (`"auto"` resolved for this model).
    pub slim_preset: String,
    /// The stages of this request's prompt: from which layer on, how many blocks prefill kept
    /// and decode attends to (empty when nothing was pruned).
    pub slim_stages: Vec<Stage>,
    /// Device memory (`gpu_total_bytes`, `gpu_free_bytes`, `gpu_own_bytes` in the JSON) when
    /// the model runs on a GPU; absent on the CPU.
    #[serde(flatten)]
    pub gpu_memory: Option<crate::metrics::GpuMemory>,
    /// The KV manager's numbers: bytes per tier, blocks moved, stall (`kv_*` fields).
    #[serde(flatten)]
    pub kv: KvStats,
}

/// How a request's prompt reached the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefillKind {
    /// The whole prompt was prefilled (pruned when SlimInfer is on).
    Full,
    /// A follow-up: the earlier turns' KV was reused as it stands, only the new tokens ran.
    Reused,
    /// A follow-up re-prefilled whole (the `reprefill_followups` option), with the new question
    /// as the local query.
    Reprefilled,
}

/// How to load the engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub linear: LinearMode,
    pub slim: SlimConfig,
    /// Element type of the KV cache (Q8 falls back to f16 with a note for a head size that is
    /// not a multiple of 32)
    pub kv_dtype: KvDtype,
    /// The kernel of a prefill's attention
    pub attention: AttentionKind,
    /// The KV manager's fast tier and spill file (`kv.resident`: no manager).
    pub kv: KvConfig,
    /// Longest prompt plus answer (0: the model's own context; more is an error at load).
    pub context: usize,
}

impl EngineOptions {
    /// The options the config file (and the flags folded into it) asks for.
    pub fn from_config(cfg: &AppConfig) -> Self {
        Self {
            linear: cfg.model.linear,
            slim: cfg.slim.clone(),
            kv_dtype: cfg.model.kv_dtype,
            attention: cfg.model.attention,
            kv: cfg.kv.clone(),
            context: cfg.model.context,
        }
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            linear: LinearMode::Int8,
            slim: SlimConfig::default(),
            kv_dtype: KvDtype::Q8,
            attention: AttentionKind::default(),
            kv: KvConfig::default(),
            context: 0,
        }
    }
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub messages: Vec<Message>,
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
}

pub struct Engine {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub special: SpecialTokens,
    kv: KvCache,
    /// The tokens whose K/V are in `kv`, in order.
    cached: Vec<u32>,
    /// Pruning settings for the next request.
    slim: SlimConfig,
    /// The preset that fits the loaded model (`preset = "auto"`), from its metadata.
    fit: ModelFit,
    /// SlimInfer state of the cached conversation, when its prompt was pruned.
    session: Option<SlimSession>,
    /// Swaps per decode step of the current request.
    swaps: Vec<usize>,
    /// The `[kv]` settings the engine was loaded with.
    kv_cfg: KvConfig,
    /// Answer tokens the next prefill reserves fast-tier room for.
    answer_reserve: usize,
    /// Largest KV bytes of the current request when every block is resident.
    resident_peak: usize,
    last_prefill_kind: PrefillKind,
    /// The text of every special token, to spot them inside messages.
    special_strings: Vec<String>,
    /// Why the KV cache is not in the configured element type, if it is not.
    kv_note: Option<String>,
    /// Longest prompt plus answer: the model's context or the configured smaller window.
    context: usize,
    /// The forward on another device (`--device cuda`), when prompts and tokens run there
    /// rather than through `model`, `kv` and `session`.
    device: Option<Box<dyn DeviceForward>>,
}

impl Engine {
    /// Resolve the configured model (downloading it if needed, with progress) and load it, on
    /// the configured device: a GPU's forward when `[model] device` resolves to CUDA (a GPU
    /// forward that fails to load leaves the engine on the CPU, with one line saying why).
    pub fn load_configured(
        cfg: &AppConfig,
        on_progress: &mut dyn FnMut(&DownloadProgress),
    ) -> Result<Self> {
        let path = ModelSource::parse(&cfg.model.source)?.resolve(on_progress)?;
        let mut engine = Self::load(&path, &EngineOptions::from_config(cfg))?;
        let (device, _) = crate::device::resolve(cfg.model.device);
        let cpu = EngineOps::new(cfg.model.linear, engine.kv_dtype(), engine.attention());
        match crate::device_forward::load(device, &path, engine.context, cpu) {
            Ok(Some(forward)) => engine.use_device(forward),
            Ok(None) => {}
            Err(e) => {
                eprintln!("slimchat: the {device:?} forward did not load ({e}); running on the CPU")
            }
        }
        Ok(engine)
    }

    pub fn load(path: &Path, opts: &EngineOptions) -> Result<Self> {
        let mut file = GgufFile::open(path)?;
        let tokenizer = tokenizer::from_gguf(&file.content)?;
        let special = SpecialTokens::from_gguf(&file.content)?;
        let template = ChatTemplate::from_gguf(&file.content)?;
        let model = Llama::load(&mut file, opts.linear)?;
        let spec = &model.spec;
        let fit = preset::fit(&ModelFacts::from_gguf(
            &file,
            spec.n_layers,
            spec.hidden,
            spec.context_length,
        ));
        let context = match opts.context {
            0 => spec.context_length,
            n if n > spec.context_length => {
                return Err(Error::Config(format!(
                    "[model] context {n} is larger than the model's context of {} tokens",
                    spec.context_length
                )))
            }
            n => n,
        };
        let slim = opts.slim.clone().for_model(fit.clone());
        slim.check(spec.n_layers)?;
        let (kv_dtype, kv_note) = match opts.kv_dtype.check_head_dim(model.spec.head_dim) {
            Ok(()) => (opts.kv_dtype, None),
            Err(why) => (KvDtype::F16, Some(format!("{why}: the KV cache is f16"))),
        };
        let mut kv = KvCache::with_dtype(model.spec.n_layers, kv_dtype);
        kv.set_attention(opts.attention);
        if !opts.kv.resident {
            let row_words = kv_dtype.stored_len(model.spec.n_kv_heads * model.spec.head_dim);
            kv.set_tiers(Some(KvManager::new(
                &opts.kv,
                model.spec.n_layers,
                row_words,
            )?));
        }
        let special_strings = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .collect();
        Ok(Self {
            model,
            tokenizer,
            template,
            special,
            kv,
            cached: Vec::new(),
            slim,
            fit,
            session: None,
            swaps: Vec::new(),
            kv_cfg: opts.kv.clone(),
            answer_reserve: 512,
            resident_peak: 0,
            last_prefill_kind: PrefillKind::Full,
            special_strings,
            kv_note,
            context,
            device: None,
        })
    }

    /// Run prompts and tokens through `forward` (a GPU's) from now on; the loaded CPU model
    /// still tokenizes, templates and describes the model. The context becomes the smaller of
    /// the engine's and the forward's.
    pub fn use_device(&mut self, mut forward: Box<dyn DeviceForward>) {
        self.reset();
        self.context = self.context.min(forward.context());
        forward.set_kv_placement(self.kv_placement());
        self.device = Some(forward);
    }

    /// Where a pruned prompt's KV is kept: the KV manager's tiers, or every row resident.
    fn kv_placement(&self) -> KvPlacement {
        match self.kv.tiers() {
            Some(_) => KvPlacement::Tiered,
            None => KvPlacement::Resident,
        }
    }

    /// The device the forward runs on, when it is not the CPU engine's own.
    pub fn device(&self) -> Option<String> {
        self.device.as_ref().map(|d| d.describe())
    }

    /// Change pruning from the next request on (a follow-up that reuses the cache keeps the
    /// prompt's pruning and applies the new ratio to decode-time selection).
    pub fn set_slim(&mut self, slim: SlimConfig) -> Result<()> {
        let slim = slim.for_model(self.fit.clone());
        slim.check(self.model.spec.n_layers)?;
        let old = self.slim.keep_ratio;
        if let Some(session) = &mut self.session {
            session.set_keep_ratio(slim.keep_ratio);
        }
        if let Some(device) = &mut self.device {
            device.set_keep_ratio(slim.keep_ratio);
        }
        self.slim = slim;
        // the cached conversation's active sets may grow: size the fast tier for them now
        if self.session.is_some() {
            if let Err(e) = self.plan_kv(self.cached.len(), false) {
                if let Some(session) = &mut self.session {
                    session.set_keep_ratio(old);
                }
                self.slim.keep_ratio = old;
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn slim_config(&self) -> &SlimConfig {
        &self.slim
    }

    fn head_shape(&self) -> HeadShape {
        let s = &self.model.spec;
        HeadShape {
            n_heads: s.n_heads,
            n_kv_heads: s.n_kv_heads,
            head_dim: s.head_dim,
        }
    }

    /// The longest prompt plus answer the engine accepts (the model's context, or the
    /// configured smaller window).
    pub fn context_length(&self) -> usize {
        self.context
    }

    pub fn kv_bytes(&self) -> usize {
        match &self.device {
            Some(d) => d.kv_bytes(),
            None => self.kv.bytes(),
        }
    }

    /// Positions of the rows layer `layer` holds in its cache.
    pub fn layer_positions(&self, layer: usize) -> Vec<u32> {
        self.kv.layers[layer].positions.clone()
    }

    /// Where pruning stands (None for a dense run): see [`SlimSession::trace`].
    pub fn slim_trace(&self) -> Option<crate::slim::session::SlimTrace> {
        self.session.as_ref().map(SlimSession::trace)
    }

    /// Whether `token` ends the model's turn.
    pub fn is_stop(&self, token: u32) -> bool {
        self.special.stop.contains(&token)
    }

    /// KV rows each layer holds now.
    pub fn kept_per_layer(&self) -> Vec<usize> {
        match &self.device {
            Some(d) => d.rows_per_layer(),
            None => self.kv.rows_per_layer(),
        }
    }

    /// Forget every cached token.
    pub fn reset(&mut self) {
        self.resident_peak = 0;
        self.kv.clear();
        self.cached.clear();
        self.session = None;
        if let Some(d) = &mut self.device {
            d.reset();
        }
    }

    /// Render the conversation with the chat template and tokenize it. The template's own
    /// special tokens (`<|im_start|>` …) become special ids; the same strings inside a message
    /// (a pasted document about chat templates, say) stay plain text, so no message can forge a
    /// turn boundary.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let has_special = |text: &str| {
            self.special_strings
                .iter()
                .any(|s| text.contains(s.as_str()))
        };
        if !messages.iter().any(|m| has_special(&m.content)) {
            return self.encode(&self.template.render(messages, true)?);
        }
        // Render with a placeholder per message, then tokenize the template around the
        // placeholders with special tokens and each message's content without.
        let marker = |i: usize| format!("\u{E000}{i}\u{E001}");
        let masked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| Message {
                role: m.role,
                content: marker(i),
            })
            .collect();
        let mut rest = self.template.render(&masked, true)?;
        let mut plain = self.tokenizer.clone();
        plain.set_encode_special_tokens(true);
        let raw = |tok: &Tokenizer, text: &str| {
            tok.encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Tokenizer(e.to_string()))
        };
        let mut ids = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            let Some(at) = rest.find(&marker(i)) else {
                continue;
            };
            ids.extend(raw(&self.tokenizer, &rest[..at])?);
            ids.extend(raw(&plain, &m.content)?);
            rest = rest[at + marker(i).len()..].to_string();
        }
        ids.extend(raw(&self.tokenizer, &rest)?);
        Ok(self.with_bos(ids))
    }

    /// Token ids of `text`, with the model's BOS in front when it asks for one. Special-token
    /// strings in `text` (e.g. `<|im_start|>`) become their special ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(self.with_bos(enc.get_ids().to_vec()))
    }

    /// Token ids of `text` taken as plain text (special-token strings such as `<|im_start|>`
    /// stay text, as llama.cpp tokenizes a file it scores), with the model's BOS in front when it
    /// asks for one.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let mut plain = self.tokenizer.clone();
        plain.set_encode_special_tokens(true);
        let enc = plain
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(self.with_bos(enc.get_ids().to_vec()))
    }

    /// Put the model's BOS in front when it asks for one and it is not there yet.
    fn with_bos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        if self.special.add_bos {
            if let Some(bos) = self.special.bos {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        ids
    }

    /// Answer the conversation, streaming text through `on_event`.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(EngineEvent),
    ) -> Result<GenStats> {
        let prompt = self.encode_chat(&req.messages)?;
        self.generate_from_tokens(&prompt, req.max_tokens, &req.sampling, cancel, on_event)
    }

    /// Continue from prompt token ids (already templated).
    pub fn generate_from_tokens(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampling: &SamplingConfig,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(EngineEvent),
    ) -> Result<GenStats> {
        self.check_fits(prompt.len())?;
        self.answer_reserve = max_tokens;
        let start = Instant::now();
        let (mut logits, reused) = self.prefill(prompt, on_event)?;
        let prefill_secs = start.elapsed().as_secs_f64();
        on_event(EngineEvent::Memory(self.memory_now()));
        let mut memory = memory::MemoryTicker::clock();
        let kept_per_layer = self.kept_per_layer();
        let prefill_kind = self.last_prefill_kind;
        self.swaps.clear();

        let mut sampler = Sampler::new(sampling.clone());
        let mut history = prompt.to_vec();
        let mut answer: Vec<u32> = Vec::new();
        let mut detok = Detokenizer::default();
        let mut text = String::new();
        let mut ttft = None;
        let mut decode_start = Instant::now();
        let mut steps = 0usize;
        let stop_reason = loop {
            if cancel.load(Ordering::Relaxed) {
                break StopReason::Cancelled;
            }
            if max_tokens == 0 {
                break StopReason::MaxTokens;
            }
            if let Some(bad) = logits.iter().find(|l| !l.is_finite()) {
                // NaN compares false everywhere: greedy would pick token 0, often the end of
                // text, and the answer would silently be empty
                return Err(Error::Engine(format!(
                    "the model computed a logit of {bad}: its weights are corrupt or out of range"
                )));
            }
            let next = sampler.sample(&mut logits, &history);
            if ttft.is_none() {
                ttft = Some(start.elapsed().as_secs_f64());
                decode_start = Instant::now();
            }
            if self.special.stop.contains(&next) {
                break StopReason::EndOfTurn;
            }
            answer.push(next);
            history.push(next);
            let piece = detok.push(&self.tokenizer, &answer)?;
            if !piece.is_empty() {
                text.push_str(&piece);
                on_event(EngineEvent::Token(piece));
            }
            if answer.len() >= max_tokens {
                break StopReason::MaxTokens;
            }
            if history.len() >= self.context_length() {
                break StopReason::ContextFull;
            }
            logits = self.step(next)?;
            steps += 1;
            if memory.due() {
                on_event(EngineEvent::Memory(self.memory_now()));
            }
        };
        let tail = detok.finish(&self.tokenizer, &answer)?;
        if !tail.is_empty() {
            text.push_str(&tail);
            on_event(EngineEvent::Token(tail));
        }
        let decode_secs = decode_start.elapsed().as_secs_f64();
        let decoded = steps;
        let prefilled = prompt.len() - reused;
        Ok(GenStats {
            text,
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
            prefilled_tokens: prefilled,
            generated_tokens: answer.len(),
            ttft_ms: ttft.unwrap_or(prefill_secs) * 1e3,
            prefill_tok_s: prefilled as f64 / prefill_secs.max(1e-9),
            decode_tok_s: if decoded > 0 {
                decoded as f64 / decode_secs.max(1e-9)
            } else {
                0.0
            },
            kv_bytes: self.kv_bytes(),
            stop_reason,
            slim: self.session.is_some() || !self.stages().is_empty(),
            prefill_kind,
            kept_per_layer,
            blocks_swapped_per_step: std::mem::take(&mut self.swaps),
            blocks_revived: self.session.as_mut().map_or(0, SlimSession::take_revived),
            revival_bytes: self.session.as_ref().map_or(0, SlimSession::aux_bytes),
            slim_note: self.slim_note(),
            slim_preset: self.slim.preset_for(self.model.spec.n_layers).to_string(),
            slim_stages: self.stages(),
            gpu_memory: self.device.as_ref().and_then(|d| d.memory()),
            kv: self.take_kv_stats(),
        })
    }

    /// The stages that pruned the cached prompt, on whichever forward holds it.
    fn stages(&self) -> Vec<Stage> {
        match (&self.session, &self.device) {
            (Some(s), _) => s.stages(),
            (None, Some(d)) => d.stages(),
            (None, None) => Vec::new(),
        }
    }

    /// Fast-tier and host-tier bytes now.
    fn kv_stats_now(&self) -> (usize, usize) {
        if let Some(d) = &self.device {
            return d.kv_tiers();
        }
        match self.kv.tiers() {
            Some(_) => {
                let (mut fast, mut host) = (0, 0);
                let s = self.kv_layer_bytes();
                for (f, h) in s {
                    fast += f;
                    host += h;
                }
                (fast, host)
            }
            None => (self.kv.bytes(), 0),
        }
    }

    fn kv_layer_bytes(&self) -> Vec<(usize, usize)> {
        (0..self.model.spec.n_layers)
            .map(|i| {
                let b = self.kv.layer(i).bytes();
                match self.kv.tiers() {
                    Some(t) if t.is_managed(i) => (t.layer_fast_bytes(i), b),
                    _ => (b, 0),
                }
            })
            .collect()
    }

    /// Stored `u16` words of one cached K (or V) row in this cache's element type.
    fn kv_row_words(&self) -> usize {
        let s = &self.model.spec;
        self.kv_dtype().stored_len(s.n_kv_heads * s.head_dim)
    }

    /// Bytes of one cached row of K and V in one layer.
    fn kv_row_bytes(&self) -> usize {
        2 * self.kv_row_words() * 2 // K and V, u16 words
    }

    /// The request's KV numbers (the manager's counters start again).
    pub fn take_kv_stats(&mut self) -> KvStats {
        if let Some(stats) = self.device_kv_stats() {
            return stats;
        }
        let s = &self.model.spec;
        let dense = self.cached.len() * s.n_layers * self.kv_row_bytes();
        let mut stats = match self.kv.take_tier_stats() {
            Some(st) => st,
            None => {
                let per_layer: Vec<usize> = self.kv.layers.iter().map(|l| l.bytes()).collect();
                let now = per_layer.iter().sum();
                KvStats {
                    kv_resident: true,
                    kv_fast_bytes: now,
                    kv_fast_bytes_peak: std::mem::take(&mut self.resident_peak).max(now),
                    kv_host_bytes_per_layer: vec![0; per_layer.len()],
                    kv_fast_bytes_per_layer: per_layer,
                    kv_worker_alive: false,
                    ..Default::default()
                }
            }
        };
        stats.kv_dense_bytes = dense;
        stats.kv_notes.extend(self.kv_note.clone());
        stats
    }

    /// The KV cache's element type.
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv
            .layers
            .first()
            .map_or(KvDtype::default(), |l| l.dtype)
    }

    /// The kernel of a prefill's attention.
    pub fn attention(&self) -> AttentionKind {
        self.kv.attention()
    }

    /// Attend with `kind` from the next prefill on (the cache is kept: the kernels read the
    /// same cache).
    pub fn set_attention(&mut self, kind: AttentionKind) {
        self.kv.set_attention(kind);
        let kv = self.kv_dtype();
        if let Some(device) = &mut self.device {
            device.set_cpu_numerics(kv, kind);
        }
    }

    /// Store the KV cache in `dtype` from now on (the cache is emptied); a type the model's head
    /// size cannot hold is a config error.
    pub fn set_kv_dtype(&mut self, dtype: KvDtype) -> Result<()> {
        if dtype == self.kv_dtype() {
            return Ok(());
        }
        dtype
            .check_head_dim(self.model.spec.head_dim)
            .map_err(Error::Config)?;
        self.reset();
        let resident = self.kv.tiers().is_none();
        let n = self.model.spec.n_layers;
        let attention = self.kv.attention();
        self.kv = KvCache::with_dtype(n, dtype); // no manager until the next line
        self.kv.set_attention(attention);
        self.kv_note = None;
        if let Some(device) = &mut self.device {
            device.set_cpu_numerics(dtype, attention);
        }
        self.set_kv_resident(resident)
    }

    /// Switch between the KV manager (`false`) and every block resident (`true`); the cache is
    /// emptied. The manager keeps the loaded `[kv]` settings; a device forward tiers its KV or
    /// keeps it resident alike.
    pub fn set_kv_resident(&mut self, resident: bool) -> Result<()> {
        self.reset();
        if let Some(d) = &mut self.device {
            d.set_kv_placement(match resident {
                true => KvPlacement::Resident,
                false => KvPlacement::Tiered,
            });
        }
        if resident == self.kv.tiers().is_none() {
            return Ok(());
        }
        let tiers = if resident {
            None
        } else {
            let s = &self.model.spec;
            let cfg = KvConfig {
                resident: false,
                ..self.kv_cfg.clone()
            };
            Some(KvManager::new(&cfg, s.n_layers, self.kv_row_words())?)
        };
        self.kv.set_tiers(tiers);
        Ok(())
    }

    /// Test hook: stop the KV manager's offload worker as if it had died.
    #[doc(hidden)]
    pub fn kill_kv_worker(&mut self) {
        if let Some(t) = self.kv.tiers_mut() {
            t.kill_worker();
        }
    }

    /// Test hook: corrupt every block of the KV spill file.
    #[doc(hidden)]
    pub fn corrupt_kv_spill(&mut self) {
        if let Some(t) = self.kv.tiers_mut() {
            t.corrupt_spill();
        }
    }

    /// Size the fast tier for a prompt of `prompt_tokens` tokens (the whole conversation) that
    /// reuses the session `fresh` says it will not; an error when the budget is too small.
    fn plan_kv(&mut self, prompt_tokens: usize, fresh: bool) -> Result<()> {
        let n_layers = self.model.spec.n_layers;
        let (stages, prompt_len, block_size) = match (&self.session, fresh) {
            (Some(s), false) => (s.stages(), s.prompt_len(), self.slim.block_size),
            _ if self.slim.enabled => (
                self.slim.resolve(n_layers, prompt_tokens),
                prompt_tokens,
                self.slim.block_size,
            ),
            _ => (Vec::new(), 0, self.slim.block_size),
        };
        let total = (prompt_tokens + self.answer_reserve).min(self.context_length());
        let plan: Vec<LayerPlan> = (0..n_layers)
            .map(|l| match stages.iter().rev().find(|s| s.start_layer <= l) {
                Some(st) => LayerPlan {
                    managed: true,
                    slots: st.decode_blocks,
                    rows: total.saturating_sub(prompt_len),
                },
                None => LayerPlan {
                    managed: false,
                    slots: 0,
                    rows: total,
                },
            })
            .collect();
        match self.kv.tiers_mut() {
            Some(t) => t.plan(block_size, &plan).map(|_| ()),
            None => Ok(()),
        }
    }

    fn slim_note(&self) -> Option<String> {
        match &self.session {
            Some(s) if s.stages().is_empty() => Some(format!(
                "prompt of {} tokens is not longer than one block of {}: nothing pruned",
                s.prompt_len(),
                self.slim.block_size
            )),
            _ => None,
        }
    }

    /// Error unless a prompt of `n` tokens leaves room for at least one answer token.
    pub fn check_fits(&self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::Prompt("empty prompt".into()));
        }
        if n >= self.context_length() {
            return Err(Error::Prompt(format!(
                "the prompt is {n} tokens but the model's context is {} tokens (the answer needs room too)",
                self.context_length()
            )));
        }
        Ok(())
    }

    /// Make the cache hold exactly `prompt`, reusing the longest cached prefix, and return
    /// the logits after the last prompt token and how many tokens were reused. A fresh prompt
    /// is pruned when SlimInfer is on; a follow-up keeps the earlier turns' pruned KV.
    pub fn prefill(
        &mut self,
        prompt: &[u32],
        on_event: &mut dyn FnMut(EngineEvent),
    ) -> Result<(Vec<f32>, usize)> {
        if self.device.is_some() {
            return self.prefill_on_device(prompt, on_event);
        }
        let shared = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // At least one token must run to produce logits.
        let mut reused = shared.min(prompt.len() - 1);
        let mut kind = if reused > 0 {
            PrefillKind::Reused
        } else {
            PrefillKind::Full
        };
        if let Some(session) = &self.session {
            // Pruned rows cannot be recomputed in place: a change inside the pruned prompt, or
            // the re-prefill option, starts over.
            if reused < session.prompt_len() || self.slim.reprefill_followups {
                kind = if reused > 0 {
                    PrefillKind::Reprefilled
                } else {
                    PrefillKind::Full
                };
                reused = 0;
            }
        } else if self.slim.enabled && reused > 0 && prompt.len() - reused > reused {
            // The cache was prefilled dense (pruning was off), and a session prunes from
            // position 0: a follow-up reuses the dense rows, but a prompt that is mostly new (a
            // new document) starts over, pruned.
            kind = PrefillKind::Reprefilled;
            reused = 0;
        }
        // the fast tier must fit before anything changes: a clear error, not a crash mid-answer
        self.plan_kv(prompt.len(), reused == 0)?;
        if reused == 0 {
            self.reset();
        }
        self.kv.truncate_from(reused as u32);
        self.cached.truncate(reused);
        if reused == 0 && self.slim.enabled {
            self.session = Some(SlimSession::new(
                &self.slim,
                self.model.spec.n_layers,
                self.head_shape(),
                prompt.len(),
            ));
        }
        self.last_prefill_kind = kind;
        let tokens = &prompt[reused..];
        let positions: Vec<u32> = (reused as u32..prompt.len() as u32).collect();
        let n_layers = self.model.spec.n_layers;
        let total = tokens.len();
        let mut memory = memory::MemoryTicker::new(self.kv.bytes(), self.kv_row_bytes(), None);
        let mut progress = |i: usize, rows: usize| {
            on_event(EngineEvent::PrefillProgress {
                layers_done: i + 1,
                n_layers,
                tokens: total,
                rows,
            });
            if let Some(reading) = memory.layer_written(rows) {
                on_event(reading);
            }
        };
        let logits = match &mut self.session {
            Some(session) => {
                self.model
                    .forward(tokens, &positions, &mut self.kv, session, &mut progress)
            }
            None => self
                .model
                .forward(tokens, &positions, &mut self.kv, &mut Dense, &mut progress),
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                // A failed forward may have appended to some layers only: start clean next time.
                self.reset();
                return Err(e);
            }
        };
        if let Some(session) = &mut self.session {
            session.take_swaps();
        }
        self.cached.extend_from_slice(tokens);
        self.resident_peak = self.resident_peak.max(self.kv.bytes());
        Ok((logits, reused))
    }

    /// Teacher-forced logits: run `tokens` at positions 0.. from an empty cache, dense whatever
    /// the pruning setting, and return the logits of rows `from..` as (tokens.len() - from,
    /// vocab), row-major. The cache is empty afterwards.
    pub fn logits_from(&mut self, tokens: &[u32], from: usize) -> Result<Vec<f32>> {
        if tokens.len() > self.context_length() {
            return Err(Error::Prompt(format!(
                "{} tokens do not fit the model's context of {}",
                tokens.len(),
                self.context_length()
            )));
        }
        self.reset();
        if let Some(device) = &mut self.device {
            return device.logits_from(tokens, from);
        }
        // no pruning: every layer keeps its whole cache in the fast tier
        let plan = vec![
            LayerPlan {
                managed: false,
                slots: 0,
                rows: tokens.len(),
            };
            self.model.spec.n_layers
        ];
        if let Some(t) = self.kv.tiers_mut() {
            t.plan(self.slim.block_size, &plan)?;
        }
        let positions: Vec<u32> = (0..tokens.len() as u32).collect();
        let logits = self
            .model
            .logits_from(tokens, &positions, from, &mut self.kv);
        self.reset();
        Ok(logits?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Run one generated token through the model.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        if let Some(device) = &mut self.device {
            let logits = device.extend(&[token])?;
            self.cached.push(token);
            return Ok(logits);
        }
        let pos = self.cached.len() as u32;
        if let Some(t) = self.kv.tiers_mut() {
            t.begin_step();
        }
        let (model, kv) = (&self.model, &mut self.kv);
        // The whole step runs on a pool thread: its parallel sections (about five per layer)
        // then start as work for the other thread to steal, instead of each waking the pool
        // from outside and putting this thread to sleep until it finishes (two futex round
        // trips per section; see bench/NOTES.md, "Decode GEMV").
        let logits = match &mut self.session {
            Some(session) => {
                let l =
                    rayon::scope(|_| model.forward(&[token], &[pos], kv, session, &mut |_, _| {}));
                self.swaps.push(session.take_swaps());
                l
            }
            None => {
                rayon::scope(|_| model.forward(&[token], &[pos], kv, &mut Dense, &mut |_, _| {}))
            }
        };
        self.kv.end_step();
        match logits {
            Ok(l) => {
                self.cached.push(token);
                self.resident_peak = self.resident_peak.max(self.kv.bytes());
                Ok(l)
            }
            Err(e) => {
                // Some layers may hold this token already: start clean next time.
                self.reset();
                Err(e)
            }
        }
    }
}

/// Turns a growing list of token ids into text pieces that end on whole characters.
#[derive(Default)]
struct Detokenizer {
    /// Decoding starts at this token (a window, so long answers stay cheap to decode).
    prev: usize,
    /// Bytes of the decoded window text already emitted.
    emitted_len: usize,
}

impl Detokenizer {
    fn push(&mut self, tok: &Tokenizer, tokens: &[u32]) -> Result<String> {
        let decode = |ids: &[u32]| {
            tok.decode(ids, false)
                .map_err(|e| Error::Tokenizer(e.to_string()))
        };
        let text = decode(&tokens[self.prev..])?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new()); // an incomplete multi-byte character: wait for more
        }
        let piece = text.get(self.emitted_len..).unwrap_or("").to_string();
        self.emitted_len = text.len();
        // Restart the window now and then so decoding stays cheap for long answers.
        // Keep the last token as context: decoders strip a leading space from the first token.
        if tokens.len() - self.prev > 16 {
            self.prev = tokens.len() - 1;
            self.emitted_len = decode(&tokens[self.prev..])?.len();
        }
        Ok(piece)
    }

    /// Whatever is left at the end, even an incomplete character.
    fn finish(&mut self, tok: &Tokenizer, tokens: &[u32]) -> Result<String> {
        let text = tok
            .decode(&tokens[self.prev..], false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let rest = text.get(self.emitted_len..).unwrap_or("").to_string();
        self.emitted_len = text.len();
        Ok(rest)
    }
}
