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

use crate::backend::linear::LinearMode;
use crate::kv::KvCache;
use crate::model::gguf::GgufFile;
use crate::model::llama::Llama;
use crate::model::template::{ChatTemplate, Message};
use crate::model::tokenizer::{self, SpecialTokens};
use crate::sampling::{Sampler, SamplingConfig};
use crate::{Error, Result};

/// What the engine reports while it works.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// `layers_done` of `n_layers` finished for a prefill of `tokens` tokens.
    PrefillProgress { layers_done: usize, n_layers: usize, tokens: usize },
    /// New answer text (whole UTF-8 characters).
    Token(String),
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
}

/// How to load the engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub linear: LinearMode,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self { linear: LinearMode::Dense }
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
}

impl Engine {
    pub fn load(path: &Path, opts: &EngineOptions) -> Result<Self> {
        let mut file = GgufFile::open(path)?;
        let tokenizer = tokenizer::from_gguf(&file.content)?;
        let special = SpecialTokens::from_gguf(&file.content)?;
        let template = ChatTemplate::from_gguf(&file.content)?;
        let model = Llama::load(&mut file, opts.linear)?;
        let kv = KvCache::new(model.spec.n_layers);
        Ok(Self { model, tokenizer, template, special, kv, cached: Vec::new() })
    }

    /// The longest prompt plus answer the model accepts.
    pub fn context_length(&self) -> usize {
        self.model.spec.context_length
    }

    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// Forget every cached token.
    pub fn reset(&mut self) {
        self.kv.clear();
        self.cached.clear();
    }

    /// Render the conversation with the chat template and tokenize it (special tokens parsed).
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.template.render(messages, true)?;
        self.encode(&text, true)
    }

    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(text, parse_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if self.special.add_bos {
            if let Some(bos) = self.special.bos {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
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
        let start = Instant::now();
        let (mut logits, reused) = self.prefill(prompt, on_event)?;
        let prefill_secs = start.elapsed().as_secs_f64();

        let mut sampler = Sampler::new(sampling.clone());
        let mut history = prompt.to_vec();
        let mut answer: Vec<u32> = Vec::new();
        let mut detok = Detokenizer::default();
        let mut text = String::new();
        let mut ttft = None;
        let mut decode_start = Instant::now();
        let stop_reason = loop {
            if cancel.load(Ordering::Relaxed) {
                break StopReason::Cancelled;
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
        };
        // The last sampled token is in `cached` only if it went through the model.
        let decode_secs = decode_start.elapsed().as_secs_f64();
        let decoded = answer.len().saturating_sub(1);
        let prefilled = prompt.len() - reused;
        Ok(GenStats {
            text,
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
            prefilled_tokens: prefilled,
            generated_tokens: answer.len(),
            ttft_ms: ttft.unwrap_or(prefill_secs) * 1e3,
            prefill_tok_s: prefilled as f64 / prefill_secs.max(1e-9),
            decode_tok_s: if decoded > 0 { decoded as f64 / decode_secs.max(1e-9) } else { 0.0 },
            kv_bytes: self.kv.bytes(),
            stop_reason,
        })
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
    /// the logits after the last prompt token and how many tokens were reused.
    pub fn prefill(&mut self, prompt: &[u32], on_event: &mut dyn FnMut(EngineEvent)) -> Result<(Vec<f32>, usize)> {
        let shared = self.cached.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        // At least one token must run to produce logits.
        let reused = shared.min(prompt.len() - 1);
        self.kv.truncate_from(reused as u32);
        self.cached.truncate(reused);
        let tokens = &prompt[reused..];
        let positions: Vec<u32> = (reused as u32..prompt.len() as u32).collect();
        let n_layers = self.model.spec.n_layers;
        let rows = tokens.len();
        let logits = self.model.forward(tokens, &positions, &mut self.kv, &mut |i| {
            on_event(EngineEvent::PrefillProgress { layers_done: i + 1, n_layers, tokens: rows })
        });
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                // A failed forward may have appended to some layers only: start clean next time.
                self.reset();
                return Err(e);
            }
        };
        self.cached.extend_from_slice(tokens);
        Ok((logits, reused))
    }

    /// Run one generated token through the model.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        let pos = self.cached.len() as u32;
        let logits = self.model.forward(&[token], &[pos], &mut self.kv, &mut |_| {})?;
        self.cached.push(token);
        Ok(logits)
    }
}

/// Turns a growing list of token ids into text pieces that end on whole characters.
#[derive(Default)]
struct Detokenizer {
    /// Tokens before this index are already reflected in emitted text.
    prev: usize,
    /// Text of tokens[prev..current] as decoded when `current` was last advanced.
    emitted_len: usize,
}

impl Detokenizer {
    fn push(&mut self, tok: &Tokenizer, tokens: &[u32]) -> Result<String> {
        let decode = |ids: &[u32]| tok.decode(ids, false).map_err(|e| Error::Tokenizer(e.to_string()));
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
}
