//! The engine: owns the model's forward (with its KV cache), tokenizer and chat template, and
//! turns a conversation into streamed answer text plus the numbers a person wants to see (TTFT,
//! tokens/s, KV bytes).
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
use crate::config::AppConfig;
use crate::device_forward::{DeviceForward, SpillSetting};
use crate::kv::{KvConfig, KvDtype, KvStats};
use crate::metrics::MemoryNow;
use crate::model::gguf::{GgufFile, ModelSpec};
use crate::model::ops_llama::KvPlacement;
use crate::model::source::{DownloadProgress, ModelSource};
use crate::model::template::{ChatTemplate, Message};
use crate::model::tokenizer::{self, SpecialTokens};
use crate::sampling::{Sampler, SamplingConfig};
use crate::slim::preset::{self, ModelFacts, ModelFit};
use crate::slim::schedule::{SlimConfig, Stage, MIN_SPARED_SHARE};
use crate::slim::session::SlimSession;
use crate::{Error, Result};

mod memory;
mod prefill;

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
    /// The answer's first token is out and the next step brings back every block the prompt's
    /// pruning dropped (`heal_answers`): the answer's second token waits for it.
    Healing,
    /// They are back, `blocks` (block, stage) pairs in `ms`: the rest of the answer reads the
    /// whole document; every layer now keeps `kept_per_layer` rows.
    Healed {
        blocks: usize,
        ms: f64,
        kept_per_layer: Vec<usize>,
    },
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
    /// The answer's second step, when it brought back what the prompt's pruning dropped
    /// (`heal_answers`); `decode_tok_s` counts the steps after it.
    pub heal_ms: Option<f64>,
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
    /// A follow-up: the earlier turns' KV was reused, only the new tokens ran (after the blocks
    /// pruned from it came back, with `heal_followups`: `blocks_revived` counts them).
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
    pub spec: ModelSpec,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub special: SpecialTokens,
    /// The forward: the LLaMA forward over the CPU engine's backend (its int8 linear layers,
    /// KV types and attention kernels), or a GPU's. It holds the KV cache and, when the cached
    /// prompt was pruned, its SlimInfer session.
    forward: Box<dyn DeviceForward>,
    /// The device `forward` runs on, when it is not the CPU engine's backend.
    device: Option<String>,
    /// The tokens whose K/V the forward holds, in order.
    cached: Vec<u32>,
    /// Pruning settings for the next request.
    slim: SlimConfig,
    /// The preset that fits the loaded model (`preset = "auto"`), from its metadata.
    fit: ModelFit,
    /// Blocks changed per decode step of the current request.
    swaps: Vec<usize>,
    /// The `[kv]` settings the engine was loaded with.
    kv_cfg: KvConfig,
    /// The configured KV element type and prefill attention kernel (the CPU backend's).
    kv_dtype: KvDtype,
    attention: AttentionKind,
    /// The fast-tier budget the cached request was checked against (None: every row resident).
    kv_budget: Option<usize>,
    /// Answer tokens the next prefill reserves fast-tier room for.
    answer_reserve: usize,
    /// The next step is an answer's first past a fresh pruned prefill: `heal_answers` heals
    /// in it.
    heal_next_step: bool,
    last_prefill_kind: PrefillKind,
    /// The text of every special token, to spot them inside messages.
    special_strings: Vec<String>,
    /// Why the KV cache is not in the configured element type, if it is not.
    kv_note: Option<String>,
    /// Longest prompt plus answer: the model's context or the configured smaller window.
    context: usize,
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
        match crate::device_forward::load(device, &path, engine.context, engine.kv_dtype) {
            Ok(Some(forward)) => engine.use_device(forward),
            Ok(None) => {}
            Err(e) => {
                eprintln!("slimchat: the {device:?} forward did not load ({e}); running on the CPU")
            }
        }
        Ok(engine)
    }

    /// Load the model file at `path` on the CPU.
    pub fn load(path: &Path, opts: &EngineOptions) -> Result<Self> {
        opts.kv.validate().map_err(Error::Config)?;
        let mut file = GgufFile::open(path)?;
        let tokenizer = tokenizer::from_gguf(&file.content)?;
        let special = SpecialTokens::from_gguf(&file.content)?;
        let template = ChatTemplate::from_gguf(&file.content)?;
        let spec = file.spec()?;
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
        let (kv_dtype, kv_note) = match opts.kv_dtype.check_head_dim(spec.head_dim) {
            Ok(()) => (opts.kv_dtype, None),
            Err(why) => (KvDtype::F16, Some(format!("{why}: the KV cache is f16"))),
        };
        let cpu = EngineOps::new(opts.linear, kv_dtype, opts.attention);
        let mut forward = crate::device_forward::load_engine_ops(&mut file, context, cpu)?;
        forward.set_kv_placement(match opts.kv.resident {
            true => KvPlacement::Resident,
            false => KvPlacement::Tiered,
        });
        forward.set_spill(spill_setting(&opts.kv)?);
        let special_strings = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .collect();
        Ok(Self {
            spec,
            tokenizer,
            template,
            special,
            forward,
            device: None,
            cached: Vec::new(),
            slim,
            fit,
            swaps: Vec::new(),
            kv_cfg: opts.kv.clone(),
            kv_dtype,
            attention: opts.attention,
            kv_budget: None,
            answer_reserve: 512,
            heal_next_step: false,
            last_prefill_kind: PrefillKind::Full,
            special_strings,
            kv_note,
            context,
        })
    }

    /// Run prompts and tokens through `forward` (a GPU's) from now on, with the same KV
    /// placement and spill file; the loaded file still tokenizes, templates and describes the model. The
    /// context becomes the smaller of the engine's and the forward's.
    pub fn use_device(&mut self, mut forward: Box<dyn DeviceForward>) {
        self.reset();
        self.context = self.context.min(forward.context());
        forward.set_kv_placement(self.forward.kv_placement());
        if let Ok(spill) = spill_setting(&self.kv_cfg) {
            forward.set_spill(spill);
        }
        self.device = Some(forward.describe());
        self.forward = forward;
    }

    /// The device the forward runs on, when it is not the CPU engine's backend.
    pub fn device(&self) -> Option<String> {
        self.device.clone()
    }

    /// Change pruning from the next request on (a follow-up that reuses the cache keeps the
    /// prompt's pruning and applies the new ratio to decode-time selection).
    pub fn set_slim(&mut self, slim: SlimConfig) -> Result<()> {
        let slim = slim.for_model(self.fit.clone());
        slim.check(self.spec.n_layers)?;
        let old = self.slim.keep_ratio;
        self.forward.set_keep_ratio(slim.keep_ratio);
        self.slim = slim;
        // the cached conversation's active sets may grow: check the fast tier for them now
        if self.forward.session().is_some() {
            if let Err(e) = self.plan_kv(self.cached.len(), false) {
                self.forward.set_keep_ratio(old);
                self.slim.keep_ratio = old;
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn slim_config(&self) -> &SlimConfig {
        &self.slim
    }

    /// The longest prompt plus answer the engine accepts (the model's context, or the
    /// configured smaller window).
    pub fn context_length(&self) -> usize {
        self.context
    }

    pub fn kv_bytes(&self) -> usize {
        self.forward.kv_bytes()
    }

    /// Positions of the rows layer `layer` holds in its cache.
    pub fn layer_positions(&self, layer: usize) -> Vec<u32> {
        self.forward.layer_positions(layer)
    }

    /// Where pruning stands (None for a dense run): see [`SlimSession::trace`].
    pub fn slim_trace(&self) -> Option<crate::slim::session::SlimTrace> {
        self.forward.session().map(SlimSession::trace)
    }

    /// Whether `token` ends the model's turn.
    pub fn is_stop(&self, token: u32) -> bool {
        self.special.stop.contains(&token)
    }

    /// KV rows each layer holds now.
    pub fn kept_per_layer(&self) -> Vec<usize> {
        match self.forward.rows_per_layer() {
            rows if rows.is_empty() => vec![0; self.spec.n_layers],
            rows => rows,
        }
    }

    /// Forget every cached token.
    pub fn reset(&mut self) {
        self.cached.clear();
        self.heal_next_step = false;
        self.forward.reset();
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
        // a prefill stopped between two layers leaves no cache and no logits: the loop below
        // ends the answer, cancelled, before it samples
        let prefill = self.prefill_until(prompt, cancel, on_event);
        let prefill_stopped = matches!(prefill, Err(Error::Cancelled));
        let (mut logits, reused) = match prefill {
            Err(Error::Cancelled) => (Vec::new(), 0),
            done => done?,
        };
        let prefill_secs = start.elapsed().as_secs_f64();
        on_event(EngineEvent::Memory(self.memory_now()));
        let mut memory = memory::MemoryTicker::new(None);
        let kept_per_layer = self.kept_per_layer();
        let prefill_kind = self.last_prefill_kind;
        // how the prompt was prefilled, read now: a heal stopped midway drops the cache
        let slim_stages = self.stages();
        let slim = match prefill_stopped {
            true => self.slim.enabled,
            false => self.forward.session().is_some() || !slim_stages.is_empty(),
        };
        self.swaps.clear();

        let mut sampler = Sampler::new(sampling.clone());
        let mut history = prompt.to_vec();
        let mut answer: Vec<u32> = Vec::new();
        let mut detok = Detokenizer::default();
        let mut text = String::new();
        let mut ttft = None;
        let mut decode_start = Instant::now();
        let mut steps = 0usize;
        let mut heal_ms = None;
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
            if self.heals_next_step() {
                // the heal takes a third of a dense prefill: a cancel stops it between layers
                match self.step_healing(next, cancel, on_event) {
                    Err(Error::Cancelled) => break StopReason::Cancelled,
                    healed => (logits, heal_ms) = healed?,
                }
            } else {
                logits = self.step(next)?;
            }
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
        // the heal's step is timed on its own: decode's rate is the steps' after it
        let decode_secs = decode_start.elapsed().as_secs_f64() - heal_ms.unwrap_or(0.0) / 1e3;
        let decoded = steps - usize::from(heal_ms.is_some());
        // a prefill stopped midway ran no token through every layer
        let prefilled = match prefill_stopped {
            true => 0,
            false => prompt.len() - reused,
        };
        Ok(GenStats {
            text,
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
            prefilled_tokens: prefilled,
            generated_tokens: answer.len(),
            ttft_ms: ttft.unwrap_or(prefill_secs) * 1e3,
            heal_ms,
            prefill_tok_s: prefilled as f64 / prefill_secs.max(1e-9),
            decode_tok_s: if decoded > 0 {
                decoded as f64 / decode_secs.max(1e-9)
            } else {
                0.0
            },
            kv_bytes: self.kv_bytes(),
            stop_reason,
            slim,
            prefill_kind,
            kept_per_layer,
            blocks_swapped_per_step: std::mem::take(&mut self.swaps),
            blocks_revived: (self.forward.session_mut()).map_or(0, SlimSession::take_revived),
            revival_bytes: (self.forward.session()).map_or(0, SlimSession::aux_bytes),
            slim_note: self.slim_note(),
            slim_preset: self.slim.preset_for(self.spec.n_layers).to_string(),
            slim_stages,
            gpu_memory: self.forward.memory(),
            kv: self.take_kv_stats(),
        })
    }

    /// The stages that pruned the cached prompt.
    fn stages(&self) -> Vec<Stage> {
        self.forward.stages()
    }

    /// The KV cache's element type.
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// The kernel of a prefill's attention.
    pub fn attention(&self) -> AttentionKind {
        self.attention
    }

    /// Attend with `kind` from the next prefill on (the cache is kept: the kernels read the
    /// same cache).
    pub fn set_attention(&mut self, kind: AttentionKind) {
        self.attention = kind;
        self.forward.set_numerics(self.kv_dtype, kind);
    }

    /// Store the KV cache in `dtype` from now on (the cache is emptied); a type the model's head
    /// size cannot hold is a config error.
    pub fn set_kv_dtype(&mut self, dtype: KvDtype) -> Result<()> {
        if dtype == self.kv_dtype {
            return Ok(());
        }
        dtype
            .check_head_dim(self.spec.head_dim)
            .map_err(Error::Config)?;
        self.reset();
        self.kv_dtype = dtype;
        self.kv_note = None;
        self.forward.set_numerics(dtype, self.attention);
        Ok(())
    }

    /// Switch between the tiered KV (`false`: each slim layer's fast tier holds its decode set,
    /// the rest of its kept blocks wait in RAM) and every row resident (`true`); the cache is
    /// emptied.
    pub fn set_kv_resident(&mut self, resident: bool) -> Result<()> {
        self.reset();
        self.forward.set_kv_placement(match resident {
            true => KvPlacement::Resident,
            false => KvPlacement::Tiered,
        });
        Ok(())
    }

    /// Test hook: corrupt every block of the KV spill file.
    #[doc(hidden)]
    pub fn corrupt_kv_spill(&mut self) {
        self.forward.corrupt_spill();
    }

    fn slim_note(&self) -> Option<String> {
        let dense_tokens = self.slim.preset_dense_tokens(self.spec.n_layers);
        match self.forward.session() {
            Some(s) if s.stages().is_empty() => Some(if s.prompt_len() <= self.slim.block_size {
                format!(
                    "prompt of {} tokens is not longer than one block of {}: nothing pruned",
                    s.prompt_len(),
                    self.slim.block_size
                )
            } else if s.prompt_len() <= dense_tokens {
                format!(
                    "prompt of {} tokens is within the {dense_tokens} tokens this preset runs dense: nothing is pruned",
                    s.prompt_len()
                )
            } else {
                format!(
                    "prompt of {} tokens is barely over the pruning floors: pruning would spare under 1/{} of the forward's rows, so nothing is pruned",
                    s.prompt_len(),
                    MIN_SPARED_SHARE
                )
            }),
            _ => None,
        }
    }
}

/// The spill file `[kv]` asks for (None: `spill = false`).
fn spill_setting(kv: &KvConfig) -> Result<Option<SpillSetting>> {
    if !kv.spill {
        return Ok(None);
    }
    Ok(Some(SpillSetting {
        dir: kv.spill_path(),
        cap: kv.cap().map_err(Error::Config)?,
    }))
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
