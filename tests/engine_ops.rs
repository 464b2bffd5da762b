//! The ops forward (src/model/ops_llama.rs) on the CPU engine's backend (`EngineOps`: f32
//! activations, the engine's int8 linear layers, its RMSNorm, RoPE and SiLU gate), against the
//! engine's own forward (src/model/llama.rs) on the default model, and on random shapes.
//! With the engine's KV set to what the seam's pools hold (bf16, f32 attention) the two
//! forwards give the same logits bit for bit; the product's Q8 keys and 8-bit attention are not
//! behind the seam yet.

mod common;

use std::time::Instant;

use slimchat::backend::attention_kind::AttentionKind;
use slimchat::backend::cpu_ops::CpuOps;
use slimchat::backend::engine_ops::EngineOps;
use slimchat::backend::kv_format::KvDtype;
use slimchat::backend::linear::LinearMode;
use slimchat::bench::LONG_TEXT;
use slimchat::engine::{Engine, EngineOptions};
use slimchat::eval::logits::compare;
use slimchat::model::gguf::GgufFile;
use slimchat::model::ops_llama::{LlamaShape, OpsLlama};

const TOKENS: usize = 256;

/// The engine with the KV the seam's pools hold (bf16 keys and values, f32 attention), its
/// linear layers in `linear` form, nothing pruned.
fn engine_with_bf16_kv(linear: LinearMode) -> Engine {
    let mut opts = EngineOptions {
        linear,
        kv_dtype: KvDtype::Bf16,
        attention: AttentionKind::F32,
        ..Default::default()
    };
    opts.slim.enabled = false;
    Engine::load(&common::default_model(), &opts).expect("the model loads")
}

#[test]
fn the_engines_backend_gives_the_ops_forward_the_engines_logits_bit_for_bit() {
    let path = common::default_model();
    let mut file = GgufFile::open(&path).unwrap();
    let model = OpsLlama::from_gguf(&EngineOps::INT8, &mut file, TOKENS + 8).unwrap();
    let mut engine = engine_with_bf16_kv(LinearMode::Int8);
    let tokens = engine.encode_plain(LONG_TEXT).unwrap()[..TOKENS].to_vec();

    // teacher forcing: every row's logits, the head as a GEMM over 8-bit activations
    let t = Instant::now();
    let want = engine.logits_from(&tokens, 0).unwrap();
    let engine_ms = t.elapsed().as_millis();
    let t = Instant::now();
    let got = model.logits_all(&tokens).unwrap();
    let ops_ms = t.elapsed().as_millis();
    eprintln!(
        "teacher-forced {TOKENS} tokens: the ops forward {ops_ms} ms, the engine {engine_ms} ms"
    );
    assert_eq!(got.len(), want.len());
    assert!(
        got == want,
        "teacher-forced logits differ: {:?}",
        common::max_abs_diff(&got, &want)
    );

    // a prefill (the last row's head in f32), then decode steps (one row: the GEMVs)
    engine.reset();
    let (want, _) = engine.prefill(&tokens, &mut |_| {}).unwrap();
    let hooks = &mut slimchat::backend::paged_kv::NoHooks;
    let (mut cache, report) = model.prefill(&tokens, None, 8, hooks).unwrap();
    assert!(report.logits == want, "prefill logits differ");
    let mut next = common::argmax(&want) as u32;
    for step in 0..8 {
        let want = engine.step(next).unwrap();
        let got = model.decode(&mut cache, next, hooks).unwrap();
        assert!(
            got == want,
            "decode step {step}: {:?}",
            common::max_abs_diff(&got, &want)
        );
        next = common::argmax(&want) as u32;
    }
}

#[test]
fn against_the_products_kv_the_engines_backend_differs_by_the_kv_alone() {
    let path = common::default_model();
    let mut product = common::dense_engine(&path, LinearMode::Int8); // Q8 keys, 8-bit attention
    let tokens = product.encode_plain(LONG_TEXT).unwrap()[..TOKENS].to_vec();
    let want = product.logits_from(&tokens, 0).unwrap();
    let bf16_kv = engine_with_bf16_kv(LinearMode::Int8)
        .logits_from(&tokens, 0)
        .unwrap();
    let mut file = GgufFile::open(&path).unwrap();
    let model = OpsLlama::from_gguf(&EngineOps::INT8, &mut file, TOKENS).unwrap();
    let got = model.logits_all(&tokens).unwrap();
    let vocab = model.shape.vocab;
    let ours = compare(&got, &want, vocab, &tokens);
    let kv_alone = compare(&bf16_kv, &want, vocab, &tokens);
    eprintln!("the ops forward on the engine's backend against the product: {ours:?}");
    eprintln!("the engine with bf16 KV against the product: {kv_alone:?}");
    assert!(
        got == bf16_kv,
        "the ops forward is not the engine with bf16 KV"
    );
    assert!(ours.top1_agreement >= 0.9, "{ours:?}");
    assert!(
        (ours.nll_a - ours.nll_b).abs() < 0.01 * ours.nll_b,
        "{ours:?}"
    );
}

#[test]
fn a_random_shape_runs_on_the_engines_backend_as_on_the_devices() {
    let shape = LlamaShape::tiny(3);
    let n = 96;
    let tokens: Vec<u32> = (0..n as u32)
        .map(|i| (i * 7919) % shape.vocab as u32)
        .collect();
    let ours = OpsLlama::random(&EngineOps::INT8, shape, n, 3).unwrap();
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
