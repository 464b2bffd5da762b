//! `slimchat facts --follow-up`: a case's second turn, asking for the fact its first question
//! left out, over the first turn's cache.

use std::collections::BTreeMap;

use super::{
    answer, build, cached, greedy, outcomes, teacher_force, Answered, CaseResult, DenseRun,
    FactsConfig,
};
use crate::engine::Engine;
use crate::eval::cases::Case;
use crate::eval::corpus::Corpus;
use crate::eval::set_slim;
use crate::model::template::Message;
use crate::slim::SlimConfig;
use crate::{Error, Result};

/// A case's second turn: the first question answered with dense's answer (fed to either
/// model), then the follow-up, which runs only its own tokens after the cached conversation,
/// as in the chat screen. Agreement, answers and TTFTs are the follow-up's.
pub(super) fn one_follow_up(
    engine: &mut Engine,
    base: &SlimConfig,
    ratio: f32,
    case: &Case,
    corpus: &Corpus,
    cfg: &FactsConfig,
    cache: &mut BTreeMap<String, DenseRun>,
) -> Result<CaseResult> {
    let (question, asked) = case
        .follow_up_asked()
        .ok_or_else(|| Error::Usage(format!("case {} has no follow-up", case.id)))?;
    let (built, prompt) = build(engine, case, corpus)?;
    let first_max = cfg.max_tokens * built.asked.len().max(1);
    let (first, _) = cached(engine, cache, &prompt, first_max, |engine| {
        greedy(engine, base, None, &prompt, first_max)
    })?;
    let follow = engine.encode_chat(&[
        Message::user(built.message.clone()),
        Message::assistant(first.text.clone()),
        Message::user(question),
    ])?;
    let max_tokens = cfg.max_tokens;
    let (dense, dense_cached) = cached(engine, cache, &follow, max_tokens, |engine| {
        let (logits, ttft_ms) = second_turn(engine, base, None, &prompt, &first, &follow)?;
        answer(engine, logits, max_tokens, ttft_ms)
    })?;

    let (logits, ttft_slim) = second_turn(engine, base, Some(ratio), &prompt, &first, &follow)?;
    let forced = teacher_force(engine, logits, &dense)?;
    let slim_answer = if forced.identical() {
        dense.text.clone()
    } else {
        let (logits, ttft) = second_turn(engine, base, Some(ratio), &prompt, &first, &follow)?;
        answer(engine, logits, max_tokens, ttft)?.text
    };
    let facts = outcomes(
        engine,
        &[asked],
        &prompt,
        &dense.text,
        &slim_answer,
        &forced,
    );
    let answered = Answered {
        facts,
        dense,
        slim_answer,
        forced,
        ttft_slim,
        dense_cached,
    };
    Ok(answered.result(case, corpus, "follow-up", follow.len()))
}

/// Prefill `prompt` on a fresh cache (pruned at `ratio`, dense when None), feed it `first`'s
/// answer, then the conversation `follow` that continues it: the follow-up's logits and its
/// time to first token (the follow-up's own prefill).
fn second_turn(
    engine: &mut Engine,
    base: &SlimConfig,
    ratio: Option<f32>,
    prompt: &[u32],
    first: &DenseRun,
    follow: &[u32],
) -> Result<(Vec<f32>, f64)> {
    set_slim(engine, base, ratio)?;
    engine.prefill(prompt, &mut |_| {})?;
    for &t in &first.tokens {
        engine.step(t)?;
    }
    let t0 = std::time::Instant::now();
    let (logits, _) = engine.prefill(follow, &mut |_| {})?;
    Ok((logits, t0.elapsed().as_secs_f64() * 1e3))
}
