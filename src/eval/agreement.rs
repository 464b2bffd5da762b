//! `slimchat eval`: does pruning keep the dense model's answers? (one document kind, one needle)
//!
//! On real English documents (sections of assets/long_text.txt) at each prompt length:
//! - teacher-forced agreement: the dense model answers a question about the document greedily
//!   (`answer_tokens` tokens); the pruned model is fed the same prompt and the same answer, and
//!   we count the positions where its top-1 equals the dense top-1, and the mean KL(dense‖pruned);
//! - needle retrieval: a sentence with a 5-digit code is planted at `depths` evenly spaced depths
//!   (0%..100%) of the document and asked for at the end; accuracy of dense and of pruned.
//!
//! Each length reads `documents` parts of the text and each (length, ratio) cell averages over
//! them: one document is one answer and ten needles, so alone a needle is ten points.
//!
//! The dense reference runs in the engine's KV type, or in `reference_kv` (to measure the pruned
//! model with Q8 KV against the dense model with f16 KV, on the same dense answer).

use std::sync::atomic::AtomicBool;

use serde::Serialize;

use crate::backend::attention::AttentionKind;
use crate::bench::LONG_TEXT;
use crate::engine::{Engine, GenerateRequest};
use crate::kv::KvDtype;
use crate::model::template::Message;
use crate::sampling::{argmax, SamplingConfig};
use crate::slim::SlimConfig;
use crate::{Error, Result};

use super::{kl_divergence, sentence_boundary, set_slim};

#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub lengths: Vec<usize>,
    /// Keep ratios to evaluate; `default_ratio` is marked in the results.
    pub ratios: Vec<f32>,
    pub default_ratio: f32,
    pub answer_tokens: usize,
    pub depths: usize,
    /// Documents per length (different parts of the text); a cell averages over them.
    pub documents: usize,
    /// KV element type of the dense reference (None: the engine's own).
    pub reference_kv: Option<KvDtype>,
    /// Prefill attention kernel of the dense reference (None: the engine's own).
    pub reference_attention: Option<AttentionKind>,
}

/// One (length, ratio) cell.
#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    /// Mean over the documents.
    pub prompt_tokens: usize,
    pub documents: usize,
    pub ratio: f32,
    pub default: bool,
    /// Means over the documents (needle accuracy: over every planted needle).
    pub top1_agreement: f64,
    /// The lowest document's agreement.
    pub min_top1_agreement: f64,
    pub mean_kl: f64,
    pub needle_acc_dense: f64,
    pub needle_acc_slim: f64,
    /// Prompt rows the last layer kept in the teacher-forced run.
    pub kept_last_layer: usize,
    pub ttft_ms_dense: f64,
    pub ttft_ms_slim: f64,
}

const QUESTION: &str = "Summarize the main points of the text above.";
const NEEDLE_QUESTION: &str =
    "What is the access code for the blue cabinet? Answer with the number only.";

/// Run the evaluation; `on_result` is called as each cell finishes.
pub fn run(
    engine: &mut Engine,
    cfg: &EvalConfig,
    on_result: &mut dyn FnMut(&EvalResult),
) -> Result<Vec<EvalResult>> {
    let base = engine.slim_config().clone();
    let text_tokens = engine.encode(LONG_TEXT)?;
    let docs = cfg.documents.max(1);
    let mut results = Vec::new();
    for (length_index, &length) in cfg.lengths.iter().enumerate() {
        let room = engine
            .context_length()
            .checked_sub(cfg.answer_tokens.max(24) + 8)
            .filter(|&r| r > 256);
        let Some(room) = room else {
            return Err(Error::Usage(format!(
                "--answer-tokens {} leaves no room for a document",
                cfg.answer_tokens
            )));
        };
        let length = length.min(room);
        // one cell per ratio, summed over the documents
        let mut cells: Vec<EvalResult> = Vec::new();
        for d in 0..docs {
            // each (length, document) reads a different part of the text
            let doc_index = length_index * docs + d;
            let per_ratio = one_document(engine, cfg, &base, &text_tokens, doc_index, length)?;
            if cells.is_empty() {
                cells = per_ratio;
            } else {
                for (cell, r) in cells.iter_mut().zip(per_ratio) {
                    cell.add(&r);
                }
            }
        }
        for mut cell in cells {
            cell.finish(docs);
            on_result(&cell);
            results.push(cell);
        }
    }
    engine.set_slim(base)?;
    engine.reset();
    Ok(results)
}

/// Every ratio on one document: one result per ratio, in `cfg.ratios` order.
fn one_document(
    engine: &mut Engine,
    cfg: &EvalConfig,
    base: &SlimConfig,
    text_tokens: &[u32],
    doc_index: usize,
    length: usize,
) -> Result<Vec<EvalResult>> {
    let kv_dtype = engine.kv_dtype();
    let reference_kv = cfg.reference_kv.unwrap_or(kv_dtype);
    let doc = document(engine, text_tokens, doc_index, length, QUESTION)?;
    let prompt = engine.encode_chat(&[Message::user(format!("{doc}\n\n{QUESTION}"))])?;

    // Dense reference: greedy answer and its logits at every answer position.
    let attention = engine.attention();
    engine.set_kv_dtype(reference_kv)?;
    engine.set_attention(cfg.reference_attention.unwrap_or(attention));
    set_slim(engine, base, None)?;
    let t0 = std::time::Instant::now();
    let (mut logits, _) = engine.prefill(&prompt, &mut |_| {})?;
    let ttft_dense = t0.elapsed().as_secs_f64() * 1e3;
    let mut answer = Vec::new();
    let mut dense_logits = Vec::new();
    for i in 0..cfg.answer_tokens {
        let t = argmax(&logits);
        answer.push(t);
        dense_logits.push(std::mem::take(&mut logits));
        if i + 1 < cfg.answer_tokens {
            logits = engine.step(t)?;
        }
    }
    let needles_dense = needle_run(
        engine,
        base,
        None,
        text_tokens,
        doc_index,
        length,
        cfg.depths,
    )?;

    engine.set_kv_dtype(kv_dtype)?;
    engine.set_attention(attention);
    let mut out = Vec::new();
    for &ratio in &cfg.ratios {
        // ratio 0: the model unpruned, against a reference in another KV type or kernel
        let pruned = (ratio > 0.0).then_some(ratio);
        set_slim(engine, base, pruned)?;
        let t0 = std::time::Instant::now();
        let (mut logits, _) = engine.prefill(&prompt, &mut |_| {})?;
        let ttft_slim = t0.elapsed().as_secs_f64() * 1e3;
        let kept_last_layer = engine.kept_per_layer().last().copied().unwrap_or(0);
        let (mut agree, mut kl) = (0usize, 0.0f64);
        for (i, &t) in answer.iter().enumerate() {
            agree += usize::from(argmax(&logits) == argmax(&dense_logits[i]));
            kl += kl_divergence(&dense_logits[i], &logits);
            if i + 1 < answer.len() {
                logits = engine.step(t)?;
            }
        }
        let needles_slim = needle_run(
            engine,
            base,
            pruned,
            text_tokens,
            doc_index,
            length,
            cfg.depths,
        )?;
        let n = answer.len().max(1) as f64;
        let top1 = agree as f64 / n;
        out.push(EvalResult {
            prompt_tokens: prompt.len(),
            documents: 1,
            ratio,
            default: (ratio - cfg.default_ratio).abs() < 1e-6,
            top1_agreement: top1,
            min_top1_agreement: top1,
            mean_kl: kl / n,
            needle_acc_dense: needles_dense,
            needle_acc_slim: needles_slim,
            kept_last_layer,
            ttft_ms_dense: ttft_dense,
            ttft_ms_slim: ttft_slim,
        });
    }
    Ok(out)
}

impl EvalResult {
    /// Sum another document's result into this one (means are taken by `finish`).
    fn add(&mut self, o: &EvalResult) {
        self.prompt_tokens += o.prompt_tokens;
        self.documents += o.documents;
        self.top1_agreement += o.top1_agreement;
        self.min_top1_agreement = self.min_top1_agreement.min(o.min_top1_agreement);
        self.mean_kl += o.mean_kl;
        self.needle_acc_dense += o.needle_acc_dense;
        self.needle_acc_slim += o.needle_acc_slim;
        self.kept_last_layer += o.kept_last_layer;
        self.ttft_ms_dense += o.ttft_ms_dense;
        self.ttft_ms_slim += o.ttft_ms_slim;
    }

    /// Sums over `n` documents → means.
    fn finish(&mut self, n: usize) {
        let f = n as f64;
        self.prompt_tokens = (self.prompt_tokens as f64 / f).round() as usize;
        self.kept_last_layer = (self.kept_last_layer as f64 / f).round() as usize;
        for x in [
            &mut self.top1_agreement,
            &mut self.mean_kl,
            &mut self.needle_acc_dense,
            &mut self.needle_acc_slim,
            &mut self.ttft_ms_dense,
            &mut self.ttft_ms_slim,
        ] {
            *x /= f;
        }
    }
}

/// About `length` tokens of prose (the chat template and `question` included), from a part of
/// the text chosen by `index`, cut at a sentence end.
fn document(
    engine: &Engine,
    tokens: &[u32],
    index: usize,
    length: usize,
    question: &str,
) -> Result<String> {
    let overhead = engine
        .encode_chat(&[Message::user(format!("\n\n{question}"))])?
        .len()
        + 24;
    let want = length.saturating_sub(overhead);
    let start = (index * 20_000) % tokens.len().saturating_sub(want).max(1);
    if start + want > tokens.len() {
        return Err(Error::Prompt(format!(
            "eval text has {} tokens, {want} needed",
            tokens.len()
        )));
    }
    let text = engine
        .tokenizer
        .decode(&tokens[start..start + want], false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    // Start and end on whole sentences.
    let from = text.find(". ").map_or(0, |i| i + 2);
    let to = text.rfind(". ").map_or(text.len(), |i| i + 1);
    Ok(text[from..to.max(from)].to_string())
}

/// Plant the needle at `depths` depths; return the fraction of answers that contain the code.
fn needle_run(
    engine: &mut Engine,
    base: &SlimConfig,
    ratio: Option<f32>,
    text_tokens: &[u32],
    index: usize,
    length: usize,
    depths: usize,
) -> Result<f64> {
    if depths == 0 {
        return Ok(f64::NAN);
    }
    let needle_len = 24;
    let doc = document(
        engine,
        text_tokens,
        index,
        length.saturating_sub(needle_len),
        NEEDLE_QUESTION,
    )?;
    let mut correct = 0;
    for d in 0..depths {
        let depth = if depths > 1 {
            d as f64 / (depths - 1) as f64
        } else {
            0.5
        };
        let code = 10_000 + (index * 7919 + d * 104_729) % 90_000;
        let needle = format!(" The access code for the blue cabinet is {code}. ");
        let at = sentence_boundary(&doc, (doc.len() as f64 * depth) as usize);
        let text = format!("{}{needle}{}", &doc[..at], &doc[at..]);
        set_slim(engine, base, ratio)?;
        let req = GenerateRequest {
            messages: vec![Message::user(format!("{text}\n\n{NEEDLE_QUESTION}"))],
            max_tokens: 24,
            sampling: SamplingConfig {
                temperature: 0.0,
                repeat_penalty: 1.0,
                ..Default::default()
            },
        };
        let stats = engine.generate(&req, &AtomicBool::new(false), &mut |_| {})?;
        correct += usize::from(stats.text.contains(&code.to_string()));
    }
    Ok(correct as f64 / depths.max(1) as f64)
}
