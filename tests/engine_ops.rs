//! The ops forward (src/model/ops_llama.rs) on the CPU engine's backend (`EngineOps`: f32
//! activations, the engine's int8 linear layers, its RMSNorm, RoPE and SiLU gate), against the
//! engine's own forward (src/model/llama.rs) on the default model, and on random shapes.
//! The two forwards give the same logits bit for bit.

mod common;

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use slimchat::backend::attention_kind::AttentionKind;
use slimchat::backend::cpu_ops::CpuOps;
use slimchat::backend::engine_ops::EngineOps;
use slimchat::backend::kv_format::KvDtype;
use slimchat::backend::linear::LinearMode;
use slimchat::backend::ops::Ops;
use slimchat::bench::LONG_TEXT;
use slimchat::config::AppConfig;
use slimchat::device_forward::load_engine_ops;
use slimchat::engine::{Engine, EngineOptions, GenerateRequest};
use slimchat::eval::logits::compare;
use slimchat::model::gguf::GgufFile;
use slimchat::model::ops_llama::{LlamaShape, ModelCache, OpsLlama};
use slimchat::model::template::Message;
use slimchat::sampling::SamplingConfig;

const TOKENS: usize = 256;

/// The product's numerics, for models that borrow their backend for the program's life.
static PRODUCT: EngineOps = EngineOps::product();

/// The engine with `ops`' numerics (linear layers, KV type, attention kernel), nothing pruned.
fn engine_like(ops: &EngineOps) -> Engine {
    let mut opts = EngineOptions {
        linear: ops.mode,
        kv_dtype: ops.kv(),
        attention: ops.attention(),
        ..Default::default()
    };
    opts.slim.enabled = false;
    Engine::load(&common::default_model(), &opts).expect("the model loads")
}

/// `steps` greedy decode steps after a prefill whose logits were `prefill`, on the engine and
/// on the ops forward: the same logits at every step.
fn decode_alike(
    engine: &mut Engine,
    model: &OpsLlama<EngineOps>,
    cache: &mut ModelCache<EngineOps>,
    prefill: &[f32],
    steps: usize,
) {
    let hooks = &mut slimchat::backend::paged_kv::NoHooks;
    let mut next = common::argmax(prefill) as u32;
    for step in 0..steps {
        let want = engine.step(next).unwrap();
        let got = model.decode(cache, next, hooks).unwrap();
        assert!(
            got == want,
            "decode step {step}: {:?}",
            common::max_abs_diff(&got, &want)
        );
        next = common::argmax(&want) as u32;
    }
}

/// The ops forward on `ops` gives the engine's logits bit for bit: teacher forcing (every row,
/// the head as a GEMM over 8-bit activations), a prefill (the last row's head in f32), decode
/// steps (one row: the GEMVs, attention over the stored KV).
fn the_same_logits_as_the_engine(ops: &'static EngineOps) {
    let path = common::default_model();
    let mut file = GgufFile::open(&path).unwrap();
    let model = OpsLlama::from_gguf(ops, &mut file, TOKENS + 8).unwrap();
    let mut engine = engine_like(ops);
    let tokens = engine.encode_plain(LONG_TEXT).unwrap()[..TOKENS].to_vec();

    let t = Instant::now();
    let want = engine.logits_from(&tokens, 0).unwrap();
    let engine_ms = t.elapsed().as_millis();
    let t = Instant::now();
    let got = model.logits_all(&tokens).unwrap();
    let ops_ms = t.elapsed().as_millis();
    eprintln!(
        "{}: teacher-forced {TOKENS} tokens, the ops forward {ops_ms} ms, the engine {engine_ms} ms",
        ops.name()
    );
    assert_eq!(got.len(), want.len());
    assert!(
        got == want,
        "teacher-forced: {:?}",
        common::max_abs_diff(&got, &want)
    );

    engine.reset();
    let (want, _) = engine.prefill(&tokens, &mut |_| {}).unwrap();
    let hooks = &mut slimchat::backend::paged_kv::NoHooks;
    let (mut cache, report) = model.prefill(&tokens, None, 8, hooks).unwrap();
    assert!(
        report.logits == want,
        "prefill: {:?}",
        common::max_abs_diff(&report.logits, &want)
    );
    decode_alike(&mut engine, &model, &mut cache, &want, 8);
}

#[test]
fn with_the_products_numerics_the_ops_forward_gives_the_engines_logits_bit_for_bit() {
    // int8 linear layers, Q8 keys and values, 8-bit attention
    the_same_logits_as_the_engine(&PRODUCT);
}

#[test]
fn with_16_bit_kv_and_f32_attention_the_ops_forward_gives_the_engines_logits_bit_for_bit() {
    static BF16_KV: EngineOps = EngineOps::new(LinearMode::Int8, KvDtype::Bf16, AttentionKind::F32);
    static F16_KV: EngineOps = EngineOps::new(LinearMode::Dense, KvDtype::F16, AttentionKind::Int8);
    the_same_logits_as_the_engine(&BF16_KV);
    the_same_logits_as_the_engine(&F16_KV);
}

#[test]
fn a_random_shape_runs_on_the_engines_backend_as_on_the_devices() {
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

#[test]
fn pruned_the_ops_forward_gives_the_engines_logits_bit_for_bit() {
    let path = common::default_model();
    let ops = &PRODUCT;
    let opts = EngineOptions {
        linear: ops.mode,
        kv_dtype: ops.kv(),
        attention: ops.attention(),
        ..Default::default()
    };
    let mut engine = Engine::load(&path, &opts).unwrap();
    let cfg = engine.slim_config().clone();
    assert!(cfg.enabled);
    let n = 4096;
    let tokens = engine.encode_plain(LONG_TEXT).unwrap()[..n].to_vec();
    let t = Instant::now();
    let (want, _) = engine.prefill(&tokens, &mut |_| {}).unwrap();
    let engine_ms = t.elapsed().as_millis();
    let trace = engine.slim_trace().expect("the prompt was pruned");

    let mut file = GgufFile::open(&path).unwrap();
    let model = OpsLlama::from_gguf(ops, &mut file, n + 8).unwrap();
    let hooks = &mut slimchat::backend::paged_kv::NoHooks;
    let t = Instant::now();
    let (mut cache, report) = model.prefill(&tokens, Some(&cfg), 8, hooks).unwrap();
    let ops_ms = t.elapsed().as_millis();
    eprintln!(
        "pruned prefill of {n} tokens: the ops forward {ops_ms} ms, the engine {engine_ms} ms"
    );
    let theirs: Vec<&Vec<u32>> = trace.stages.iter().map(|s| &s.pool).collect();
    let ours: Vec<&Vec<u32>> = report.kept_blocks.iter().collect();
    assert_eq!(ours, theirs, "kept blocks");
    assert!(
        report.logits == want,
        "prefill: {:?}",
        common::max_abs_diff(&report.logits, &want)
    );
    decode_alike(&mut engine, &model, &mut cache, &want, 8);
}

/// A question about `doc` after the turns so far.
fn turn(history: &[Message], question: &str, max_tokens: usize) -> GenerateRequest {
    let mut messages = history.to_vec();
    messages.push(Message::user(question));
    GenerateRequest {
        messages,
        max_tokens,
        sampling: SamplingConfig::default(),
    }
}

#[test]
fn the_chat_engine_answers_through_the_one_forward_as_through_its_own() {
    let path = common::default_model();
    // about 3,600 prompt tokens: every stage of the default schedule prunes
    let doc: String = LONG_TEXT.chars().take(15_000).collect();
    let ops = EngineOps::product();
    let opts = EngineOptions {
        linear: ops.mode,
        kv_dtype: ops.kv(),
        attention: ops.attention(),
        ..Default::default()
    };
    let mut own = Engine::load(&path, &opts).unwrap();
    let mut one = Engine::load(&path, &opts).unwrap();
    one.use_device(load_engine_ops(&path, own.context_length(), ops).unwrap());
    // the device forward's default: a slim layer's prompt blocks beyond its decode set wait in
    // its host tier (a follow-up reads the layer's rows whole)
    assert!(one
        .device()
        .is_some_and(|d| d.contains("engine's numerics")));
    let cancel = AtomicBool::new(false);
    let mut history = vec![Message::user(format!("{doc}\n\nWhat is this text about?"))];
    for (i, question) in ["", "Which keywords does it name? List three."]
        .iter()
        .enumerate()
    {
        if i > 0 {
            history = turn(&history, question, 0).messages;
        }
        let req = GenerateRequest {
            messages: history.clone(),
            max_tokens: 24,
            sampling: SamplingConfig::default(),
        };
        let want = own.generate(&req, &cancel, &mut |_| {}).unwrap();
        let got = one.generate(&req, &cancel, &mut |_| {}).unwrap();
        eprintln!("turn {i}: {:?} / {:?}", want.text, got.text);
        eprintln!(
            "turn {i}: TTFT {:.0} ms (own forward) / {:.0} ms (one forward), {:?} / {:?}",
            want.ttft_ms, got.ttft_ms, want.prefill_kind, got.prefill_kind
        );
        assert_eq!(got.text, want.text, "turn {i}");
        assert_eq!(got.generated_tokens, want.generated_tokens);
        assert_eq!(got.prefill_kind, want.prefill_kind);
        assert_eq!(got.kept_per_layer, want.kept_per_layer);
        assert_eq!(got.slim_stages, want.slim_stages);
        history.push(Message::assistant(want.text));
    }
}

#[test]
fn device_cpu_seam_puts_the_chat_engine_on_the_one_forward() {
    let path = common::default_model();
    let toml = format!(
        "[model]\nsource = {:?}\ndevice = \"cpu-seam\"\ncontext = 4096\n",
        path.display().to_string()
    );
    let cfg = AppConfig::parse(&toml, "test").unwrap();
    let mut engine = Engine::load_configured(&cfg, &mut |_| {}).unwrap();
    let device = engine.device().expect("the ops forward");
    assert!(device.contains("engine's numerics"), "{device}");
    assert!(
        device.contains("Q8 KV") && device.contains("Int8 attention"),
        "{device}"
    );
    let req = turn(&[], "Say hello.", 4);
    let answer = engine
        .generate(&req, &AtomicBool::new(false), &mut |_| {})
        .unwrap();
    assert!(answer.generated_tokens > 0);
    assert!(AppConfig::parse("[model]\ndevice = \"cpu-seem\"\n", "test").is_err());
    // teacher forcing (perplexity) through the one forward: the engine's own logits
    let mut own = Engine::load(&path, &EngineOptions::from_config(&cfg)).unwrap();
    assert!(own.device().is_none());
    let tokens = own.encode_plain(LONG_TEXT).unwrap()[..300].to_vec();
    let want = own.logits_from(&tokens, 120).unwrap();
    let got = engine.logits_from(&tokens, 120).unwrap();
    assert_eq!(got.len(), 180 * 49_152);
    assert!(got == want, "{:?}", common::max_abs_diff(&got, &want));
    // an evaluation's reference numerics, switched while loaded, switch the one forward too
    for e in [&mut own, &mut engine] {
        e.set_kv_dtype(KvDtype::F16).unwrap();
        e.set_attention(AttentionKind::F32);
    }
    let device = engine.device().unwrap();
    assert!(
        device.contains("F16 KV") && device.contains("F32 attention"),
        "{device}"
    );
    let (want_f16, _) = own.prefill(&tokens, &mut |_| {}).unwrap();
    let (got_f16, _) = engine.prefill(&tokens, &mut |_| {}).unwrap();
    assert!(
        got_f16 == want_f16,
        "{:?}",
        common::max_abs_diff(&got_f16, &want_f16)
    );
}
