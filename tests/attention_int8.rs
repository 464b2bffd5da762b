//! The 8-bit prefill attention in the real default model, against the f32 kernel (the exact
//! reference) on the same text: perplexity within the 0.5%, and, where the CPU has
//! AVX-512 VNNI, proof that the 8-bit kernel ran (the logits differ). A CPU without VNNI runs
//! the f32 kernel for `attention = "int8"`, so the two agree bit for bit there. The kernel's own
//! checks (odd shapes, GQA, pruned positions, both paths bit for bit) are unit tests in
//! src/backend/attention_int8/tests.rs; eval and perplexity at 2k-8k are in bench/NOTES.md.

mod common;

use slimchat::backend::attention::AttentionKind;
use slimchat::backend::attention_int8::Int8Path;
use slimchat::bench::LONG_TEXT;
use slimchat::engine::{Engine, EngineOptions};
use slimchat::perplexity::{self, PerplexityConfig};

#[test]
fn int8_attention_scores_the_text_within_half_a_percent_of_f32() {
    let mut opts = EngineOptions::default();
    opts.slim.enabled = false;
    let mut engine =
        Engine::load(&common::default_model(), &opts).expect("the default model loads");
    let end = LONG_TEXT[..20_000].rfind("\n\n").expect("a paragraph end");
    let cfg = PerplexityConfig {
        ctx: 1024,
        chunks: Some(2),
    };
    let mut ppl = |kind: AttentionKind| {
        engine.set_attention(kind);
        assert_eq!(engine.attention(), kind);
        perplexity::run(&mut engine, &LONG_TEXT[..end], &cfg, &mut |_, _| {})
            .expect("perplexity")
            .ppl
    };
    let (f32_ppl, int8_ppl) = (ppl(AttentionKind::F32), ppl(AttentionKind::Int8));
    let path = Int8Path::fast(64);
    println!("perplexity f32 {f32_ppl:.4}, int8 {int8_ppl:.4} (8-bit path: {path:?})");
    let rel = (int8_ppl / f32_ppl - 1.0).abs();
    assert!(
        rel < 0.005,
        "int8 {int8_ppl} against f32 {f32_ppl}: {rel:.4}"
    );
    if path.is_some() {
        assert_ne!(int8_ppl, f32_ppl, "the 8-bit kernel did not run");
    } else {
        assert_eq!(int8_ppl, f32_ppl, "without VNNI, int8 runs the f32 kernel");
    }
}
