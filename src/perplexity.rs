//! `slimchat perplexity`: the model's perplexity on a text, by the method of llama.cpp's
//! `llama-perplexity` (tools/perplexity/perplexity.cpp), so that the two numbers compare:
//! - the whole text is tokenized once as plain text, with BOS in front when the model adds one
//!   (`tokenizer.ggml.add_bos_token`);
//! - it is cut into chunks of `ctx` tokens (the tail shorter than a chunk is dropped), and the
//!   text must hold at least two chunks;
//! - each chunk runs from an empty KV cache at positions 0..ctx, its first token replaced by BOS
//!   when the model adds one;
//! - only the second half is scored: the logits of rows `ctx/2 .. ctx-2` predict tokens
//!   `ctx/2+1 .. ctx-1`, so each chunk scores `ctx - ctx/2 - 1` tokens with at least half a
//!   window of context;
//! - NLL = max + ln Σ exp(logit - max) - logit[target], the exponentials in f32 summed in f64,
//!   and ppl = exp(mean NLL) over every scored token; the ± is llama.cpp's standard error.
//!
//! The model runs dense (no pruning: this measures the model) in the configured linear mode.
//! The head takes the scored rows as one batch through the linear mode's many-row path (int8
//! and dense: the int8 GEMM with Q8-rounded activations, as llama.cpp's CPU matmuls quantize
//! their input to Q8 too), not the per-row f32 path a prefill's last row takes: on 5100 tokens
//! of licence text the two heads' perplexities are 0.08-0.12% apart and the GEMM is 15-18x
//! faster (bench/NOTES.md, "Perplexity"); see [`crate::model::ops_llama::OpsLlama::logits_from`].
//! The KV type matters only as bf16: a chunk's attention reads its own rows at f16 precision
//! when the cache is q8 or f16 (llama.cpp's default KV type).

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::engine::Engine;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct PerplexityConfig {
    /// Tokens per chunk (llama.cpp's `-c`).
    pub ctx: usize,
    /// Chunks to score (None: every whole chunk of the text).
    pub chunks: Option<usize>,
}

/// What one perplexity run measured.
#[derive(Debug, Clone, Serialize)]
pub struct PerplexityResult {
    /// exp(mean NLL) over every scored token.
    pub ppl: f64,
    /// Standard error of `ppl` (llama.cpp's "+/-").
    pub ppl_stderr: f64,
    /// Tokens scored: `chunks * (ctx - ctx/2 - 1)`.
    pub tokens: usize,
    /// Tokens of the whole text (BOS included).
    pub text_tokens: usize,
    pub chunks: usize,
    pub ctx: usize,
    /// Wall time of the chunks' forwards and scoring.
    pub seconds: f64,
    /// The estimate after each chunk (llama.cpp's `[1]x,[2]y,...`).
    pub running: Vec<f64>,
}

/// Score `text`; `on_chunk(k, estimate)` is called after chunk k (1-based) with the running
/// perplexity.
pub fn run(
    engine: &mut Engine,
    text: &str,
    cfg: &PerplexityConfig,
    on_chunk: &mut dyn FnMut(usize, f64),
) -> Result<PerplexityResult> {
    let ctx = cfg.ctx;
    if ctx > engine.context_length() {
        return Err(Error::Usage(format!(
            "--ctx {ctx} is beyond the model's context of {}",
            engine.context_length()
        )));
    }
    let tokens = engine.encode_plain(text)?;
    let chunks = chunk_count(tokens.len(), cfg)?;
    let first = ctx / 2;
    let bos = engine.special.bos.filter(|_| engine.special.add_bos);

    let start = Instant::now();
    let (mut nll, mut nll2, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut running = Vec::with_capacity(chunks);
    for k in 0..chunks {
        let chunk = chunk(&tokens, k, ctx, bos);
        let logits = engine.logits_from(&chunk, first)?; // (ctx - first, vocab)
        let vocab = logits.len() / (ctx - first);
        // row j predicts chunk[first + j + 1]; the last row predicts nothing
        let row_nll: Vec<f64> = logits
            .par_chunks_exact(vocab)
            .zip(&chunk[first + 1..])
            .map(|(row, &target)| token_nll(row, target as usize))
            .collect();
        for v in row_nll {
            nll += v;
            nll2 += v * v;
        }
        count += ctx - first - 1;
        let estimate = (nll / count as f64).exp();
        running.push(estimate);
        on_chunk(k + 1, estimate);
    }
    let seconds = start.elapsed().as_secs_f64();
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = nll2 / count as f64 - mean * mean;
    let ppl_stderr = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(PerplexityResult {
        ppl,
        ppl_stderr,
        tokens: count,
        text_tokens: tokens.len(),
        chunks,
        ctx,
        seconds,
        running,
    })
}

/// How many chunks of `cfg.ctx` tokens a text of `n_tokens` tokens gives: every whole chunk, or
/// `cfg.chunks` if fewer; an error when the text holds fewer than two (llama.cpp's minimum).
fn chunk_count(n_tokens: usize, cfg: &PerplexityConfig) -> Result<usize> {
    let ctx = cfg.ctx;
    if ctx < 3 {
        return Err(Error::Usage(format!(
            "--ctx {ctx} scores nothing: it must be at least 3"
        )));
    }
    if cfg.chunks == Some(0) {
        return Err(Error::Usage("--chunks must be at least 1".into()));
    }
    if n_tokens < 2 * ctx {
        return Err(Error::Prompt(format!(
            "the text is {n_tokens} tokens; perplexity with --ctx {ctx} needs at least {}",
            2 * ctx
        )));
    }
    let whole = n_tokens / ctx;
    Ok(cfg.chunks.map_or(whole, |c| c.min(whole)))
}

/// Chunk `k` of `tokens` (`ctx` tokens from `k * ctx`), its first token replaced by `bos` when
/// the model adds one.
fn chunk(tokens: &[u32], k: usize, ctx: usize, bos: Option<u32>) -> Vec<u32> {
    let mut chunk = tokens[k * ctx..(k + 1) * ctx].to_vec();
    if let Some(bos) = bos {
        chunk[0] = bos;
    }
    chunk
}

/// -log softmax(logits)[target], as llama.cpp computes it: the exponentials in f32 relative to
/// the largest logit, summed in f64.
pub fn token_nll(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from((x - max).exp())).sum();
    f64::from(max) + sum.ln() - f64::from(logits[target])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ctx: usize, chunks: Option<usize>) -> PerplexityConfig {
        PerplexityConfig { ctx, chunks }
    }

    #[test]
    fn whole_chunks_are_scored_and_a_text_needs_two() {
        assert_eq!(chunk_count(1000, &cfg(100, None)).unwrap(), 10);
        assert_eq!(chunk_count(1099, &cfg(100, None)).unwrap(), 10);
        assert_eq!(chunk_count(1000, &cfg(100, Some(3))).unwrap(), 3);
        assert_eq!(chunk_count(1000, &cfg(100, Some(30))).unwrap(), 10);
        assert_eq!(chunk_count(200, &cfg(100, None)).unwrap(), 2);
        assert!(chunk_count(199, &cfg(100, None)).is_err());
        assert!(chunk_count(0, &cfg(100, None)).is_err());
        assert!(chunk_count(1000, &cfg(2, None)).is_err());
        assert!(chunk_count(1000, &cfg(100, Some(0))).is_err());
    }

    #[test]
    fn a_chunk_starts_with_bos_when_the_model_adds_one() {
        let tokens: Vec<u32> = (10..30).collect();
        assert_eq!(chunk(&tokens, 1, 5, None), [15, 16, 17, 18, 19]);
        assert_eq!(chunk(&tokens, 1, 5, Some(1)), [1, 16, 17, 18, 19]);
    }

    #[test]
    fn nll_of_a_uniform_row_is_ln_vocab() {
        let v = token_nll(&[3.0; 8], 5);
        assert!((v - 8f64.ln()).abs() < 1e-12, "{v}");
    }

    #[test]
    fn nll_is_small_for_the_favoured_token_and_large_for_the_others() {
        let row = [0.0, 20.0, 0.0, 0.0];
        assert!(token_nll(&row, 1) < 1e-6);
        assert!((token_nll(&row, 0) - 20.0).abs() < 1e-6);
    }
}
