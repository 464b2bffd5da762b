//! `slimchat bench`: time to first token, prefill and decode throughput at given prompt lengths.
//!
//! Prompts are the first N tokens of real English prose (assets/long_text.txt), not a repeated
//! token, so attention sees realistic score distributions. Each run starts from an empty cache.

use std::time::Instant;

use serde::Serialize;

use crate::engine::Engine;
use crate::kv::KvStats;
use crate::sampling::argmax;
use crate::{Error, Result};

/// The bench prose, about 60k tokens of it.
pub const LONG_TEXT: &str = include_str!("../assets/long_text.txt");

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub lengths: Vec<usize>,
    /// Modes to run per length, side by side: "dense" and/or "slim".
    pub modes: Vec<Mode>,
    pub runs: usize,
    /// Tokens generated after each prefill to time decode.
    pub decode_tokens: usize,
    /// KV placements to run per mode, alternating run by run: false = the KV manager, true =
    /// every block resident.
    pub kv_resident: Vec<bool>,
}

/// Dense, or pruned with the engine's SlimInfer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Dense,
    Slim,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Dense => "dense",
            Mode::Slim => "slim",
        }
    }
}

/// Medians over `runs`, with the spread of TTFT.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub prompt_tokens: usize,
    pub mode: String,
    pub runs: usize,
    pub ttft_ms: f64,
    pub ttft_ms_min: f64,
    pub ttft_ms_max: f64,
    /// Pruned TTFT over dense's, the median over rounds of each round's ratio (slim only, when
    /// dense ran beside it at the same placement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_vs_dense: Option<f64>,
    pub prefill_tok_s: f64,
    /// None when the prompt filled the context and nothing could be decoded.
    pub decode_tok_s: Option<f64>,
    /// Tokens decoded per run to time decode.
    pub decode_tokens: usize,
    /// The answer's second step when it brought back what the prompt's pruning dropped
    /// (`heal_answers`; slim only): timed on its own, `decode_tok_s` counts the steps after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heal_ms: Option<f64>,
    pub kv_bytes: usize,
    pub peak_rss_bytes: u64,
    /// Prompt rows each layer kept (slim only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_per_layer: Option<Vec<usize>>,
    /// The keep ratio in force (slim only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_ratio: Option<f32>,
    /// Decode's share of each stage's blocks (slim only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_keep: Option<f32>,
    /// The KV manager's numbers of the last run (`kv_*`).
    #[serde(flatten)]
    pub kv: KvStats,
}

/// Run the bench, calling `on_result` as each length finishes.
pub fn run(
    engine: &mut Engine,
    cfg: &BenchConfig,
    on_result: &mut dyn FnMut(&BenchResult),
) -> Result<Vec<BenchResult>> {
    let longest = cfg.lengths.iter().copied().max().unwrap_or(0);
    let text_tokens = engine.encode(LONG_TEXT)?;
    if longest > text_tokens.len() {
        return Err(Error::Prompt(format!(
            "bench text has {} tokens, {longest} requested",
            text_tokens.len()
        )));
    }
    let mut results = Vec::new();
    let slim = engine.slim_config().clone();
    for &n in &cfg.lengths {
        let prompt = &text_tokens[..n];
        if n == 0 || n > engine.context_length() {
            return Err(Error::Prompt(format!(
                "bench length {n} is outside 1..={}",
                engine.context_length()
            )));
        }
        // one run of each mode and placement in turn, so that a noisy machine (shared cores
        // whose speed drifts over tens of seconds) hits dense and pruned alike; the first of
        // each round alternates (a process's first run pays for its fresh pages)
        let places = if cfg.kv_resident.is_empty() {
            vec![false]
        } else {
            cfg.kv_resident.clone()
        };
        let slots: Vec<(Mode, bool)> = (cfg.modes.iter())
            .flat_map(|&mode| places.iter().map(move |&resident| (mode, resident)))
            .collect();
        let mut runs: Vec<Vec<BenchResult>> = vec![Vec::new(); slots.len()];
        for round in 0..cfg.runs.max(1) {
            let mut order: Vec<usize> = (0..slots.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let (mode, resident) = slots[i];
                // the placement first: it empties the cache, which a new ratio would plan for
                engine.set_kv_resident(resident)?;
                engine.set_slim(crate::slim::SlimConfig {
                    enabled: mode == Mode::Slim,
                    ..slim.clone()
                })?;
                runs[i].push(bench_one(engine, prompt, mode, cfg)?);
            }
        }
        let ratios: Vec<Vec<f64>> = (0..slots.len())
            .map(|i| round_ratios(&slots, &runs, i))
            .collect();
        for (r, ratios) in runs.into_iter().zip(ratios) {
            let mut r = combine(r);
            r.ttft_vs_dense = (!ratios.is_empty()).then(|| median(&ratios));
            on_result(&r);
            results.push(r);
        }
    }
    engine.set_slim(slim)?;
    engine.reset();
    Ok(results)
}

/// Each round's pruned TTFT over the dense one's at the same placement, for slot `i` (empty
/// for dense, or where dense did not run).
fn round_ratios(slots: &[(Mode, bool)], runs: &[Vec<BenchResult>], i: usize) -> Vec<f64> {
    let (mode, resident) = slots[i];
    let dense = slots.iter().position(|&s| s == (Mode::Dense, resident));
    match (mode, dense) {
        (Mode::Slim, Some(d)) => (runs[i].iter().zip(&runs[d]))
            .map(|(s, d)| s.ttft_ms / d.ttft_ms)
            .collect(),
        _ => Vec::new(),
    }
}

/// Medians of single runs of one length, mode and placement.
fn combine(runs: Vec<BenchResult>) -> BenchResult {
    let pick = |f: &dyn Fn(&BenchResult) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let decode: Vec<f64> = runs.iter().filter_map(|r| r.decode_tok_s).collect();
    let ttft: Vec<f64> = runs.iter().map(|r| r.ttft_ms).collect();
    let stall = pick(&|r| r.kv.kv_stall_ms);
    let heals: Vec<f64> = runs.iter().filter_map(|r| r.heal_ms).collect();
    let mut out = runs.last().expect("at least one run").clone();
    out.runs = runs.len();
    out.ttft_ms = median(&ttft);
    out.ttft_ms_min = ttft.iter().copied().fold(f64::INFINITY, f64::min);
    out.ttft_ms_max = ttft.iter().copied().fold(0.0, f64::max);
    out.prefill_tok_s = pick(&|r| r.prefill_tok_s);
    out.decode_tok_s = (!decode.is_empty()).then(|| median(&decode));
    out.heal_ms = (!heals.is_empty()).then(|| median(&heals));
    out.kv.kv_stall_ms = stall;
    out.kv.kv_decode_stall_ms = pick(&|r| r.kv.kv_decode_stall_ms);
    out
}

/// One run of one length in one mode, from an empty cache.
fn bench_one(
    engine: &mut Engine,
    prompt: &[u32],
    mode: Mode,
    cfg: &BenchConfig,
) -> Result<BenchResult> {
    let n = prompt.len();
    // A prompt that fills the context leaves no room to decode; time what fits.
    let decode_tokens = cfg.decode_tokens.min(engine.context_length() - n);
    let mut ttft = Vec::new();
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    engine.reset();
    let start = Instant::now();
    let (logits, _) = engine.prefill(prompt, &mut |_| {})?;
    let mut next = argmax(&logits);
    let t = start.elapsed().as_secs_f64();
    ttft.push(t * 1e3);
    prefill.push(n as f64 / t);
    let kept = engine.kept_per_layer();
    let mut heal_ms = None;
    let mut timed = decode_tokens;
    if decode_tokens > 0 && engine.heals_next_step() {
        let h0 = Instant::now();
        next = argmax(&engine.step(next)?);
        heal_ms = Some(h0.elapsed().as_secs_f64() * 1e3);
        timed -= 1;
    }
    let d0 = Instant::now();
    for _ in 0..timed {
        next = argmax(&engine.step(next)?);
    }
    if timed > 0 {
        decode.push(timed as f64 / d0.elapsed().as_secs_f64());
    }
    let kv_bytes = engine.kv_bytes();
    let kv = engine.take_kv_stats();
    let slim = mode == Mode::Slim;
    Ok(BenchResult {
        prompt_tokens: n,
        mode: mode.name().into(),
        runs: ttft.len(),
        ttft_ms: median(&ttft),
        ttft_ms_min: ttft.iter().copied().fold(f64::INFINITY, f64::min),
        ttft_ms_max: ttft.iter().copied().fold(0.0, f64::max),
        ttft_vs_dense: None,
        prefill_tok_s: median(&prefill),
        decode_tok_s: (!decode.is_empty()).then(|| median(&decode)),
        decode_tokens: timed,
        heal_ms,
        kv_bytes,
        peak_rss_bytes: crate::metrics::peak_rss_bytes(),
        kept_per_layer: slim.then_some(kept),
        keep_ratio: slim.then(|| engine.slim_config().keep_ratio),
        decode_keep: slim.then(|| engine.slim_config().decode_keep),
        kv,
    })
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timed(mode: Mode, ttft_ms: f64) -> BenchResult {
        BenchResult {
            prompt_tokens: 4096,
            mode: mode.name().into(),
            runs: 1,
            ttft_ms,
            ttft_ms_min: ttft_ms,
            ttft_ms_max: ttft_ms,
            ttft_vs_dense: None,
            prefill_tok_s: 4096.0 / ttft_ms * 1e3,
            decode_tok_s: None,
            decode_tokens: 0,
            heal_ms: None,
            kv_bytes: 0,
            peak_rss_bytes: 0,
            kept_per_layer: None,
            keep_ratio: None,
            decode_keep: None,
            kv: KvStats::default(),
        }
    }

    #[test]
    fn a_pruned_run_is_divided_by_the_dense_run_of_its_round_and_placement() {
        use Mode::{Dense, Slim};
        // dense and pruned at both placements; round 2 ran on a machine a third slower
        let slots = [(Dense, false), (Dense, true), (Slim, false), (Slim, true)];
        let runs: Vec<Vec<BenchResult>> = [
            [4000.0, 6000.0],
            [3000.0, 4500.0],
            [2400.0, 3900.0],
            [1500.0, 2700.0],
        ]
        .iter()
        .zip(slots)
        .map(|(ttfts, (mode, _))| ttfts.iter().map(|&t| timed(mode, t)).collect())
        .collect();
        assert_eq!(round_ratios(&slots, &runs, 2), vec![0.6, 0.65]);
        assert_eq!(round_ratios(&slots, &runs, 3), vec![0.5, 0.6]);
        assert!(round_ratios(&slots, &runs, 0).is_empty());
        // pruned alone: nothing to divide by
        let alone = [(Slim, false)];
        assert!(round_ratios(&alone, &runs[2..3], 0).is_empty());
    }
}
