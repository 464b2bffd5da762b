//! `slimchat facts`: does the pruned model find what the dense model finds?
//!
//! Every case ([`super::cases`]) runs dense and pruned side by side on the same prompt:
//! - dense answers greedily; a fact is found when its answer contains the fact's value;
//! - the pruned model is fed the same prompt and dense's answer (teacher forcing): the share of
//!   positions where its top-1 is dense's token (the end of turn included) is the case's
//!   agreement; where it agrees everywhere its own greedy answer is dense's, otherwise it
//!   answers again on its own;
//! - for every fact asked about, [`super::diagnose`] finds its blocks' rank in each stage's
//!   scores and the stage or decode choice that dropped it, if one did.
//!
//! The documents come from the built-in texts ([`super::corpus`]) or from a person's own files
//! (`--text`): the latter check pruning on documents the defaults were never chosen on.
//!
//! With `--follow-up` each planted case plants one more fact that its question leaves out and
//! asks for it in a second turn, over the first turn's cache as the chat screen does (dense's
//! first answer fed to either model): what the first question's pruning dropped is what that
//! turn may miss.
//!
//! Results are summed per part, length and depth band (0-33%, 33-66%, 66-100% of the
//! document). Dense answers can be kept in a cache file between runs of one model and build
//! (tuning changes only the pruned side); a run whose TTFT ratios are reported runs dense
//! afresh, side by side.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::cases::{band, found, generate, Ask, Asked, Built, Case};
use super::corpus::{Corpus, OwnText, Part};
use super::diagnose::{diagnose, locate, Diagnosis, Lost};
use super::set_slim;
use crate::engine::Engine;
use crate::model::template::Message;
use crate::sampling::argmax;
use crate::slim::session::SlimTrace;
use crate::slim::SlimConfig;
use crate::{Error, Result};

mod follow_up;
use follow_up::one_follow_up;

#[derive(Debug, Clone)]
pub struct FactsConfig {
    pub parts: Vec<Part>,
    pub lengths: Vec<usize>,
    /// Cases per part and length.
    pub cases: usize,
    /// Answer tokens for one fact; a case asking for several gets this many per fact.
    pub max_tokens: usize,
    /// Dense answers by prompt, kept between runs (TTFTs from it are not side by side).
    pub dense_cache: Option<PathBuf>,
    /// A person's own documents to plant the facts in (empty: the built-in texts).
    pub texts: Vec<OwnText>,
    /// Ask each planted case a follow-up in a second turn, about a fact the first question
    /// left out, over the first turn's cache (as the chat screen does); the results are the
    /// follow-up's.
    pub follow_up: bool,
}

/// One fact asked about in one case.
#[derive(Debug, Clone, Serialize)]
pub struct FactOutcome {
    pub phrasing: String,
    pub depth: f64,
    pub band: usize,
    pub dense: bool,
    pub slim: bool,
    /// Where pruning left the fact (its blocks' ranks, the stage that dropped it); None for a
    /// run that pruned nothing or a probe not found in the prompt.
    pub diagnosis: Option<Diagnosis>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub id: String,
    pub part: Part,
    pub text: String,
    /// Prompt tokens the case was made for.
    pub length: usize,
    /// "one", "all", "natural", or "follow-up" (the second turn's results)
    pub ask: &'static str,
    pub planted: usize,
    pub prompt_tokens: usize,
    pub facts: Vec<FactOutcome>,
    pub dense_answer: String,
    pub slim_answer: String,
    pub identical: bool,
    pub agreement: f64,
    /// The answer positions (0 = the first token) where the pruned top-1 was not dense's.
    pub disagree_at: Vec<usize>,
    pub ttft_ms_dense: f64,
    pub ttft_ms_slim: f64,
    pub dense_cached: bool,
}

/// Sums over the cases of one part and length (and depth band, or all bands).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cell {
    pub part: Option<Part>,
    pub length: usize,
    /// None: every band.
    pub band: Option<usize>,
    pub cases: usize,
    pub prompt_tokens: f64,
    pub asked: usize,
    pub dense_found: usize,
    pub slim_found: usize,
    /// Facts dense found and pruned did not.
    pub lost: usize,
    /// Facts pruned found and dense did not.
    pub gained: usize,
    pub agreement: f64,
    pub identical: f64,
    pub ttft_ms_dense: f64,
    pub ttft_ms_slim: f64,
    /// Where the lost facts were dropped: "stage 0".., "decode set", "kept".
    pub lost_at: BTreeMap<String, usize>,
}

impl Cell {
    pub fn dense_acc(&self) -> f64 {
        self.dense_found as f64 / self.asked.max(1) as f64
    }

    pub fn slim_acc(&self) -> f64 {
        self.slim_found as f64 / self.asked.max(1) as f64
    }
}

impl CaseResult {
    /// One line: the case, its agreement and TTFTs, and each fact's fate (found by both,
    /// LOST by pruning, gained by pruning, or `-`: found by neither).
    pub fn line(&self) -> String {
        let facts: Vec<String> = (self.facts.iter())
            .map(|f| {
                let mark = match (f.dense, f.slim) {
                    (true, false) => "LOST",
                    (false, true) => "gained",
                    (true, true) => "found",
                    (false, false) => "-",
                };
                format!("{}@{:.2} {mark}", f.phrasing, f.depth)
            })
            .collect();
        format!(
            "{} {:>5} tok {:<9} {:<7} agree {:.2} TTFT {:.0} -> {:.0} ms | {}",
            self.id,
            self.prompt_tokens,
            self.text,
            self.ask,
            self.agreement,
            self.ttft_ms_dense,
            self.ttft_ms_slim,
            facts.join(", ")
        )
    }
}

/// The cells as a text table, a line each (agreement, identical answers and the TTFT ratio on
/// the every-band lines).
pub fn table(cells: &[Cell]) -> String {
    let mut out = String::from(
        "part    length band     asked  dense  slim  lost gained agree  ident  TTFT slim/dense  lost at\n",
    );
    for c in cells {
        let band = c.band.map_or("all", |b| ["0-33%", "33-66%", "66-100%"][b]);
        let (agree, ttft) = match c.band {
            None => (
                format!("{:.3}  {:.2}", c.agreement, c.identical),
                format!("{:.2}", c.ttft_ms_slim / c.ttft_ms_dense.max(1e-9)),
            ),
            Some(_) => (String::new(), String::new()),
        };
        let part = match c.part {
            Some(Part::Tune) => "tune",
            Some(Part::Report) => "report",
            None => "",
        };
        out.push_str(&format!(
            "{part:<7} {:>6} {band:<8} {:>5} {:>6.3} {:>5.3} {:>5} {:>6} {agree:<12} {ttft:<15} {:?}\n",
            c.length,
            c.asked,
            c.dense_acc(),
            c.slim_acc(),
            c.lost,
            c.gained,
            c.lost_at
        ));
    }
    out
}

/// A dense answer: greedy tokens, whether it ended its turn, its text and TTFT.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DenseRun {
    tokens: Vec<u32>,
    stopped: bool,
    text: String,
    ttft_ms: f64,
}

/// Run every case; `on_case` sees each as it finishes. Returns the cases and the cells.
pub fn run(
    engine: &mut Engine,
    cfg: &FactsConfig,
    on_case: &mut dyn FnMut(&CaseResult),
) -> Result<(Vec<CaseResult>, Vec<Cell>)> {
    let base = engine.slim_config().clone();
    let ratio = base.keep_ratio;
    let own: Vec<_> = cfg.texts.iter().map(OwnText::text).collect();
    let corpus = match own.is_empty() {
        true => Corpus::BuiltIn,
        false => Corpus::Own(&own),
    };
    let own_tokens: Vec<usize> = (cfg.texts.iter())
        .map(|t| engine.encode_plain(&t.body).map(|ids| ids.len()))
        .collect::<Result<_>>()?;
    let mut cache = load_cache(cfg)?;
    let mut results = Vec::new();
    for &part in &cfg.parts {
        for &length in &cfg.lengths {
            // a case asks for up to three facts; its prompt may come out ~2% long
            let room = engine.context_length().saturating_sub(cfg.max_tokens * 3);
            let length = length.min(room * 49 / 50);
            engine.check_fits(length + cfg.max_tokens * 3)?;
            for (text, &tokens) in cfg.texts.iter().zip(&own_tokens) {
                if tokens < length {
                    return Err(Error::Usage(format!(
                        "--text {}: {tokens} tokens, fewer than the {length}-token prompts asked for (give a longer text or shorter --lengths)",
                        text.name
                    )));
                }
            }
            for case in generate(part, length, cfg.cases, &corpus) {
                let r = match cfg.follow_up {
                    false => one_case(engine, &base, ratio, &case, &corpus, cfg, &mut cache)?,
                    true => match case.with_follow_up() {
                        Some(case) => {
                            one_follow_up(engine, &base, ratio, &case, &corpus, cfg, &mut cache)?
                        }
                        None => continue,
                    },
                };
                on_case(&r);
                results.push(r);
            }
            save_cache(cfg, &cache)?;
        }
    }
    engine.set_slim(base)?;
    engine.reset();
    let cells = summarize(&results);
    Ok((results, cells))
}

fn one_case(
    engine: &mut Engine,
    base: &SlimConfig,
    ratio: f32,
    case: &Case,
    corpus: &Corpus,
    cfg: &FactsConfig,
    cache: &mut BTreeMap<String, DenseRun>,
) -> Result<CaseResult> {
    let (built, prompt) = build(engine, case, corpus)?;
    let max_tokens = cfg.max_tokens * built.asked.len().max(1);
    let (dense, dense_cached) = cached(engine, cache, &prompt, max_tokens, |engine| {
        greedy(engine, base, None, &prompt, max_tokens)
    })?;

    // pruned, teacher-forced along dense's answer
    set_slim(engine, base, Some(ratio))?;
    let t0 = std::time::Instant::now();
    let (logits, _) = engine.prefill(&prompt, &mut |_| {})?;
    let ttft_slim = t0.elapsed().as_secs_f64() * 1e3;
    let forced = teacher_force(engine, logits, &dense)?;
    let slim_answer = if forced.identical() {
        dense.text.clone()
    } else {
        greedy(engine, base, Some(ratio), &prompt, max_tokens)?.text
    };
    let facts = outcomes(
        engine,
        &built.asked,
        &prompt,
        &dense.text,
        &slim_answer,
        &forced,
    );
    let ask = match case.ask {
        Ask::One(_) => "one",
        Ask::All => "all",
        Ask::Natural(_) => "natural",
    };
    let answered = Answered {
        facts,
        dense,
        slim_answer,
        forced,
        ttft_slim,
        dense_cached,
    };
    Ok(answered.result(case, corpus, ask, prompt.len()))
}

/// A case's message as `case.build` makes it (counting tokens with the chat template) and its
/// prompt.
fn build(engine: &Engine, case: &Case, corpus: &Corpus) -> Result<(Built, Vec<u32>)> {
    let built = case.build(corpus, &mut |m| {
        engine
            .encode_chat(&[Message::user(m.to_string())])
            .map_or(0, |t| t.len())
    });
    let prompt = engine.encode_chat(&[Message::user(built.message.clone())])?;
    Ok((built, prompt))
}

/// What one turn of a case came to, on both sides.
struct Answered {
    facts: Vec<FactOutcome>,
    dense: DenseRun,
    slim_answer: String,
    forced: Forced,
    ttft_slim: f64,
    dense_cached: bool,
}

impl Answered {
    fn result(self, case: &Case, corpus: &Corpus, ask: &'static str, tokens: usize) -> CaseResult {
        CaseResult {
            id: case.id.clone(),
            part: case.part,
            text: corpus.texts()[case.text].kind.to_string(),
            length: case.length,
            ask,
            planted: case.facts.len(),
            prompt_tokens: tokens,
            facts: self.facts,
            dense_answer: self.dense.text,
            slim_answer: self.slim_answer,
            identical: self.forced.identical(),
            agreement: self.forced.agreement(),
            disagree_at: self.forced.misses,
            ttft_ms_dense: self.dense.ttft_ms,
            ttft_ms_slim: self.ttft_slim,
            dense_cached: self.dense_cached,
        }
    }
}

/// A greedy answer (dense when `ratio` is None), on a fresh cache.
fn greedy(
    engine: &mut Engine,
    base: &SlimConfig,
    ratio: Option<f32>,
    prompt: &[u32],
    max_tokens: usize,
) -> Result<DenseRun> {
    set_slim(engine, base, ratio)?;
    let t0 = std::time::Instant::now();
    let (logits, _) = engine.prefill(prompt, &mut |_| {})?;
    let ttft_ms = t0.elapsed().as_secs_f64() * 1e3;
    answer(engine, logits, max_tokens, ttft_ms)
}

/// Greedy tokens on from `logits` (the prompt's, just prefilled) until the end of the turn or
/// `max_tokens`.
fn answer(
    engine: &mut Engine,
    mut logits: Vec<f32>,
    max_tokens: usize,
    ttft_ms: f64,
) -> Result<DenseRun> {
    let mut tokens = Vec::new();
    let mut stopped = false;
    loop {
        let t = argmax(&logits);
        if engine.is_stop(t) {
            stopped = true;
            break;
        }
        tokens.push(t);
        if tokens.len() >= max_tokens {
            break;
        }
        logits = engine.step(t)?;
    }
    let text = engine
        .tokenizer
        .decode(&tokens, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    Ok(DenseRun {
        tokens,
        stopped,
        text,
        ttft_ms,
    })
}

/// The pruned model fed dense's answer: how many positions its top-1 agreed on, and where
/// pruning stood for the answer's second token.
struct Forced {
    positions: usize,
    misses: Vec<usize>,
    trace: Option<SlimTrace>,
}

impl Forced {
    fn identical(&self) -> bool {
        self.misses.is_empty()
    }

    fn agreement(&self) -> f64 {
        (self.positions - self.misses.len()) as f64 / self.positions.max(1) as f64
    }
}

/// Feed `dense`'s answer after `logits` (the prompt's, just prefilled), comparing top-1s; the
/// end of turn counts where dense ended its turn.
fn teacher_force(engine: &mut Engine, mut logits: Vec<f32>, dense: &DenseRun) -> Result<Forced> {
    let mut trace = engine.slim_trace();
    let (mut positions, mut misses) = (0usize, Vec::new());
    for i in 0..=dense.tokens.len() {
        let pred = argmax(&logits);
        let ok = match dense.tokens.get(i) {
            Some(&t) => pred == t,
            None if dense.stopped => engine.is_stop(pred),
            None => break, // dense stopped at max_tokens: nothing more to compare
        };
        if !ok {
            misses.push(i);
        }
        positions += 1;
        if let Some(&t) = dense.tokens.get(i) {
            logits = engine.step(t)?;
            if i == 0 {
                trace = engine.slim_trace(); // decode's sets for the answer's second token
            }
        }
    }
    Ok(Forced {
        positions,
        misses,
        trace,
    })
}

/// Whether dense and pruned found each asked fact, and where pruning left it (located in
/// `prompt`, the prompt that was pruned).
fn outcomes(
    engine: &Engine,
    asked: &[Asked],
    prompt: &[u32],
    dense: &str,
    slim: &str,
    forced: &Forced,
) -> Vec<FactOutcome> {
    (asked.iter())
        .map(|a| {
            let diagnosis = forced.trace.as_ref().and_then(|trace| {
                let decode = |t: &[u32]| engine.tokenizer.decode(t, false).unwrap_or_default();
                locate(prompt, &a.probe, &decode).map(|span| diagnose(trace, span))
            });
            FactOutcome {
                phrasing: a.phrasing.clone(),
                depth: a.depth,
                band: band(a.depth),
                dense: found(dense, &a.answers),
                slim: found(slim, &a.answers),
                diagnosis,
            }
        })
        .collect()
}

/// A dense run from the cache (true), or run now (by `run`) and cached (false).
fn cached(
    engine: &mut Engine,
    cache: &mut BTreeMap<String, DenseRun>,
    prompt: &[u32],
    max_tokens: usize,
    run: impl FnOnce(&mut Engine) -> Result<DenseRun>,
) -> Result<(DenseRun, bool)> {
    let key = cache_key(prompt, max_tokens);
    if let Some(d) = cache.get(&key) {
        return Ok((d.clone(), true));
    }
    let d = run(engine)?;
    cache.insert(key, d.clone());
    Ok((d, false))
}

/// FNV-1a of the prompt and the answer budget.
fn cache_key(prompt: &[u32], max_tokens: usize) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &t in prompt.iter().chain(std::iter::once(&(max_tokens as u32))) {
        for b in t.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}-{}", prompt.len())
}

fn load_cache(cfg: &FactsConfig) -> Result<BTreeMap<String, DenseRun>> {
    let Some(path) = &cfg.dense_cache else {
        return Ok(BTreeMap::new());
    };
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            Error::Usage(format!(
                "dense cache {} is not readable: {e}",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(Error::Usage(format!("cannot read {}: {e}", path.display()))),
    }
}

fn save_cache(cfg: &FactsConfig, cache: &BTreeMap<String, DenseRun>) -> Result<()> {
    let Some(path) = &cfg.dense_cache else {
        return Ok(());
    };
    let json = serde_json::to_vec(cache).map_err(|e| Error::Usage(e.to_string()))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| Error::Usage(format!("cannot write {}: {e}", path.display())))
}

/// Cells per (part, length): every band, then each band.
pub fn summarize(results: &[CaseResult]) -> Vec<Cell> {
    let mut keys: Vec<(Part, usize)> = Vec::new();
    for r in results {
        if !keys.contains(&(r.part, r.length)) {
            keys.push((r.part, r.length));
        }
    }
    let mut cells = Vec::new();
    for (part, length) in keys {
        let of: Vec<&CaseResult> = (results.iter())
            .filter(|r| r.part == part && r.length == length)
            .collect();
        for band in [None, Some(0), Some(1), Some(2)] {
            let mut c = Cell {
                part: Some(part),
                length,
                band,
                ..Cell::default()
            };
            for r in &of {
                let facts: Vec<&FactOutcome> = (r.facts.iter())
                    .filter(|f| band.is_none_or(|b| f.band == b))
                    .collect();
                if band.is_none() {
                    c.cases += 1;
                    c.prompt_tokens += r.prompt_tokens as f64;
                    c.agreement += r.agreement;
                    c.identical += f64::from(u8::from(r.identical));
                    c.ttft_ms_dense += r.ttft_ms_dense;
                    c.ttft_ms_slim += r.ttft_ms_slim;
                }
                for f in facts {
                    c.asked += 1;
                    c.dense_found += usize::from(f.dense);
                    c.slim_found += usize::from(f.slim);
                    c.gained += usize::from(f.slim && !f.dense);
                    if f.dense && !f.slim {
                        c.lost += 1;
                        let at = match f.diagnosis.as_ref().map(|d| d.lost) {
                            Some(Lost::Prefill(s)) => format!("stage {s}"),
                            Some(Lost::DecodeSet) => "decode set".into(),
                            Some(Lost::Kept) => "kept".into(),
                            None => "not located".into(),
                        };
                        *c.lost_at.entry(at).or_insert(0) += 1;
                    }
                }
            }
            if band.is_none() {
                let n = c.cases.max(1) as f64;
                c.prompt_tokens /= n;
                c.agreement /= n;
                c.identical /= n;
                c.ttft_ms_dense /= n;
                c.ttft_ms_slim /= n;
            }
            cells.push(c);
        }
    }
    cells
}
