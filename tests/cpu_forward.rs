//! The CPU engine's forward: the LLaMA forward over the ops seam (src/model/ops_llama.rs) on the
//! CPU engine's backend (`EngineOps`: f32 activations, int8 linear layers over the file's
//! blocks, Q8/f16/bf16 KV, the 8-bit prefill attention) on the default model. It replaced the
//! engine's own forward (src/model/llama.rs, retired 2026-12-05) after giving its logits bit for
//! bit; tests/fixtures/cpu_forward_golden.json holds what that forward computed, and the
//! product must keep computing it.

mod common;

use std::sync::atomic::AtomicBool;

use serde::Deserialize;
use slimchat::backend::attention_int8::Int8Path;
use slimchat::backend::attention_kind::AttentionKind;
use slimchat::backend::cpu_ops::CpuOps;
use slimchat::backend::engine_ops::EngineOps;
use slimchat::backend::kv_format::KvDtype;
use slimchat::bench::LONG_TEXT;
use slimchat::engine::{Engine, EngineOptions, GenerateRequest};
use slimchat::eval::logits::compare;
use slimchat::kv::KvConfig;
use slimchat::model::ops_llama::{LlamaShape, OpsLlama};
use slimchat::model::template::Message;
use slimchat::sampling::SamplingConfig;
use slimchat::slim::{SlimConfig, StageConfig};

/// The retired forward's numbers: for each row, the top token, its logit and the log-sum-exp.
#[derive(Deserialize)]
struct Golden {
    teacher_forced_tokens: usize,
    teacher_forced: Vec<(usize, f32, f64)>,
    chat_doc_chars: usize,
    chat_prompt_tokens: usize,
    chat_kept_per_layer: Vec<usize>,
    chat_steps: Vec<(usize, f32, f64)>,
}

fn golden() -> Golden {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cpu_forward_golden.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Each row of `logits` summarized as the golden file does.
fn summary(logits: &[f32], vocab: usize) -> Vec<(usize, f32, f64)> {
    logits
        .chunks(vocab)
        .map(|r| {
            let top = common::argmax(r);
            let m = r[top];
            let lse = r.iter().map(|&x| ((x - m) as f64).exp()).sum::<f64>().ln() + m as f64;
            (top, m, lse)
        })
        .collect()
}

/// How far a logit may move from the golden file's: the file was made by a release build on a
/// CPU with AVX-512 VNNI, where a release build of the CPU forward gives every row bit for bit
/// (128 of 128 and 17 of 17, 2026-12-05, 2-core Xeon without AMX), while the test profile
/// (opt-level 2) rounds some f32 sums differently (110 of 128 and 13 of 17 bit-identical); a
/// flipped 8-bit rounding moves a logit far less than 0.05. A CPU without VNNI has no 8-bit
/// prefill attention and attends in f32 (the engine's fallback): the teacher-forced rows stay
/// bit for bit (they attend in f32 everywhere), while the pruned chat's prefill attention, and
/// with it the blocks each decode step chooses, differ, moving its logits by up to 0.44 with
/// every top token kept (2-core AMD EPYC with AVX2 only, test profile, 2026-12-05).
fn tolerance(head_dim: usize) -> f64 {
    match Int8Path::fast(head_dim) {
        Some(_) => 0.05,
        None => 1.0,
    }
}

/// `got` against the golden rows: the same top token everywhere and logits within `tol`.
/// Returns how many rows were bit-identical.
fn assert_close(
    what: &str,
    got: &[(usize, f32, f64)],
    want: &[(usize, f32, f64)],
    tol: f64,
) -> usize {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    let mut exact = 0;
    let mut worst = 0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.0, w.0, "{what}: row {i}'s top token");
        let d = ((g.1 - w.1) as f64).abs().max((g.2 - w.2).abs());
        assert!(d <= tol, "{what}: row {i} off by {d}: {g:?} against {w:?}");
        worst = worst.max(d);
        exact += usize::from(g.1.to_bits() == w.1.to_bits() && g.2 == w.2);
    }
    eprintln!("{what}: largest difference {worst:.4} (bound {tol})");
    exact
}

#[test]
fn the_cpu_forward_keeps_the_retired_forwards_logits() {
    let want = golden();
    let path = common::default_model();
    let mut opts = EngineOptions::default();
    opts.slim.enabled = false;
    let mut dense = Engine::load(&path, &opts).unwrap();
    let vocab = dense.spec.vocab_size;
    let tokens = dense.encode_plain(LONG_TEXT).unwrap()[..want.teacher_forced_tokens].to_vec();
    let tf = summary(&dense.logits_from(&tokens, 0).unwrap(), vocab);
    let tol = tolerance(dense.spec.head_dim);
    let exact_tf = assert_close("teacher-forced", &tf, &want.teacher_forced, tol);
    drop(dense);

    // the product's defaults when the golden file was made: pruned at smollm2's floors then
    // (2048/2048/1024 tokens at layers 10/20/28, as custom stages), tiered KV; a 3,600-token
    // prompt and 16 greedy steps over the pruned cache, as the retired forward decoded (no heal
    // after the first token)
    let mut opts = EngineOptions::default();
    opts.slim.heal_answers = false;
    opts.slim.preset = "custom".into();
    let stage = |layer, fraction, floor| StageConfig {
        layer,
        fraction,
        floor,
    };
    opts.slim.stages = vec![
        stage(10, 1.0, 2048),
        stage(20, 0.5, 2048),
        stage(28, 0.25, 1024),
    ];
    let mut e = Engine::load(&path, &opts).unwrap();
    let doc: String = LONG_TEXT.chars().take(want.chat_doc_chars).collect();
    let prompt = e
        .encode_chat(&[Message::user(format!(
            "{doc}\n\nWhat is this text about? Answer in detail."
        ))])
        .unwrap();
    assert_eq!(prompt.len(), want.chat_prompt_tokens);
    let (first, _) = e.prefill(&prompt, &mut |_| {}).unwrap();
    assert_eq!(e.kept_per_layer(), want.chat_kept_per_layer);
    let mut steps = summary(&first, vocab);
    for _ in 1..want.chat_steps.len() {
        let next = steps.last().unwrap().0 as u32;
        steps.extend(summary(&e.step(next).unwrap(), vocab));
    }
    let exact_chat = assert_close("pruned chat", &steps, &want.chat_steps, tol);
    eprintln!(
        "bit-identical rows: {exact_tf} of {} teacher-forced, {exact_chat} of {} in the chat",
        tf.len(),
        steps.len()
    );
}

#[test]
fn a_random_shape_runs_on_the_engines_backend_as_on_the_devices() {
    static PRODUCT: EngineOps = EngineOps::product();
    let shape = LlamaShape::tiny(3);
    let n = 96;
    let tokens: Vec<u32> = (0..n as u32)
        .map(|i| (i * 7919) % shape.vocab as u32)
        .collect();
    let ours = OpsLlama::random(&PRODUCT, shape, n, 3).unwrap();
    let bf16 = OpsLlama::random(&CpuOps, shape, n, 3).unwrap();
    let a = ours.logits_all(&tokens).unwrap();
    let b = bf16.logits_all(&tokens).unwrap();
    let agreement = compare(&a, &b, shape.vocab, &tokens);
    eprintln!("a tiny random shape: engine ops against bf16: {agreement:?}");
    // the same values drawn, then rounded to Q8_0 blocks and 8-bit activations
    assert!(agreement.top1_agreement >= 0.9, "{agreement:?}");
    assert!(
        agreement.max_abs_diff < 0.05 * agreement.max_abs_logit,
        "{agreement:?}"
    );
}

/// Logits of a prefill of `tokens` and of 4 greedy steps after it.
fn prefill_and_steps(e: &mut Engine, tokens: &[u32]) -> Vec<Vec<f32>> {
    let (first, _) = e.prefill(tokens, &mut |_| {}).unwrap();
    let mut out = vec![first];
    for _ in 0..4 {
        let next = common::argmax(out.last().unwrap()) as u32;
        out.push(e.step(next).unwrap());
    }
    out
}

#[test]
fn numerics_switched_while_loaded_are_those_of_an_engine_loaded_with_them() {
    let path = common::default_model();
    let mut switched = Engine::load(&path, &EngineOptions::default()).unwrap();
    let tokens = switched.encode_plain(LONG_TEXT).unwrap()[..300].to_vec();
    let q8 = prefill_and_steps(&mut switched, &tokens);
    switched.set_kv_dtype(KvDtype::F16).unwrap();
    switched.set_attention(AttentionKind::F32);
    let mut loaded = Engine::load(
        &path,
        &EngineOptions {
            kv_dtype: KvDtype::F16,
            attention: AttentionKind::F32,
            ..Default::default()
        },
    )
    .unwrap();
    let got = prefill_and_steps(&mut switched, &tokens);
    let want = prefill_and_steps(&mut loaded, &tokens);
    assert!(got == want, "the switched engine's logits differ");
    // decode reads the stored keys: Q8 against f16 shows there
    assert!(got[4] != q8[4], "the switch changed nothing");
    let note = switched.take_kv_stats().kv_notes;
    assert!(note.is_empty(), "{note:?}");
}

/// The conversation so far and a new question.
fn turn(history: &[Message], question: &str) -> GenerateRequest {
    let mut messages = history.to_vec();
    messages.push(Message::user(question));
    GenerateRequest {
        messages,
        max_tokens: 24,
        sampling: SamplingConfig::default(),
    }
}

#[test]
fn a_tiered_conversation_answers_as_a_resident_one_turn_after_turn() {
    let path = common::default_model();
    // about 3,600 prompt tokens: every stage of the default schedule prunes, and each slim
    // layer keeps more blocks than its decode set: the others wait in RAM
    let doc: String = LONG_TEXT.chars().take(15_000).collect();
    // over the pruned cache as it stands (the follow-up reads the first turn's blocks), with
    // every pruned block back for the follow-up, and back after the first answer's first token
    // (a healed layer gives its RAM tier up)
    for (heal_answers, heal_followups) in [(false, false), (false, true), (true, true)] {
        let slim = SlimConfig {
            heal_answers,
            heal_followups,
            ..Default::default()
        };
        let resident = EngineOptions {
            slim: slim.clone(),
            kv: KvConfig {
                resident: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let tiered = EngineOptions {
            slim,
            ..Default::default()
        };
        let mut tiered = Engine::load(&path, &tiered).unwrap();
        let mut whole = Engine::load(&path, &resident).unwrap();
        let cancel = AtomicBool::new(false);
        let mut history = vec![Message::user(format!("{doc}\n\nWhat is this text about?"))];
        for (i, question) in ["", "Which keywords does it name? List three."]
            .iter()
            .enumerate()
        {
            if i > 0 {
                history = turn(&history, question).messages;
            }
            let req = turn(
                &history[..history.len() - 1],
                &history.last().unwrap().content,
            );
            let want = whole.generate(&req, &cancel, &mut |_| {}).unwrap();
            let got = tiered.generate(&req, &cancel, &mut |_| {}).unwrap();
            eprintln!(
                "heal answers {heal_answers}, follow-ups {heal_followups}, turn {i}: {:?} / {:?}",
                got.text, want.text
            );
            assert_eq!(got.text, want.text, "turn {i}");
            assert_eq!(got.prefill_kind, want.prefill_kind);
            assert_eq!(got.kept_per_layer, want.kept_per_layer);
            assert_eq!(got.blocks_revived, want.blocks_revived);
            assert_eq!(got.heal_ms.is_some(), heal_answers && i == 0);
            let healed_here = match i {
                0 => heal_answers,
                _ => heal_followups && !heal_answers,
            };
            assert_eq!(got.blocks_revived > 0, healed_here);
            if !heal_answers && (i == 0 || !heal_followups) {
                assert!(got.kv.kv_host_bytes > 0, "turn {i}: nothing in RAM");
                assert!(got.kv.kv_fast_bytes < want.kv.kv_fast_bytes);
            }
            history.push(Message::assistant(want.text));
        }
    }
}

#[test]
fn a_prompt_that_parts_from_the_cache_cuts_it_there_and_leaves_no_trace_of_the_rest() {
    let path = common::default_model();
    // f16 KV: each row stored on its own (a Q8 layer's key scale comes from its first append,
    // so a history of other rows gives other, equally valid, roundings)
    let mut opts = EngineOptions {
        kv_dtype: KvDtype::F16,
        ..Default::default()
    };
    opts.slim.enabled = false;
    let tokens = {
        let e = Engine::load(&path, &opts).unwrap();
        e.encode_plain(LONG_TEXT).unwrap()[..400].to_vec()
    };
    // the cache holds 300 tokens; the next prompt shares the first 200 and goes on elsewhere
    let (a, b) = (&tokens[..300], [&tokens[..200], &tokens[300..400]].concat());
    let mut cut = Engine::load(&path, &opts).unwrap();
    cut.prefill(a, &mut |_| {}).unwrap();
    let (got, reused) = cut.prefill(&b, &mut |_| {}).unwrap();
    assert_eq!(reused, 200);
    assert_eq!(cut.kept_per_layer(), vec![300; 30]);
    // the same prompt over a cache that never held the other 100 rows
    let mut clean = Engine::load(&path, &opts).unwrap();
    clean.prefill(&tokens[..200], &mut |_| {}).unwrap();
    let (want, reused) = clean.prefill(&b, &mut |_| {}).unwrap();
    assert_eq!(reused, 200);
    assert!(got == want, "{:?}", common::max_abs_diff(&got, &want));
    let next = common::argmax(&want) as u32;
    assert!(cut.step(next).unwrap() == clean.step(next).unwrap());
}
