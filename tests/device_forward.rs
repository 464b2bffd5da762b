//! The chat engine on the device forward (the ops seam's LLaMA forward with the engine's own
//! SlimSession), run here on the CPU's ops: the same code `--device cuda` runs on a GPU.

mod common;

use std::sync::atomic::AtomicBool;

use slimchat::backend::linear::LinearMode;
use slimchat::bench::LONG_TEXT;
use slimchat::device_forward::load_cpu_ops;
use slimchat::engine::{Engine, EngineEvent, EngineOptions, GenerateRequest, PrefillKind};
use slimchat::model::template::Message;
use slimchat::sampling::SamplingConfig;
use slimchat::slim::SlimConfig;

fn request(doc: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        messages: vec![Message::user(format!(
            "{doc}\n\nWhat is this text about? Answer in one sentence."
        ))],
        max_tokens,
        sampling: SamplingConfig::default(),
    }
}

#[test]
fn the_engine_answers_through_the_device_forward_as_it_does_on_the_cpu() {
    let path = common::default_model();
    // about 1,100 prompt tokens: the default schedule prunes layers 28-29 (floor 1024 tokens)
    let doc: String = LONG_TEXT.chars().take(4400).collect();
    let opts = EngineOptions {
        linear: LinearMode::Dense,
        ..EngineOptions::default()
    };
    let mut cpu = Engine::load(&path, &opts).unwrap();
    let mut dev = Engine::load(&path, &opts).unwrap();
    dev.use_device(load_cpu_ops(&path, 2048).unwrap());
    assert!(dev.device().is_some() && cpu.device().is_none());
    let cancel = AtomicBool::new(false);
    let mut cpu_readings = Vec::new();
    let want = cpu
        .generate(&request(&doc, 12), &cancel, &mut |ev| {
            if let EngineEvent::Memory(m) = ev {
                cpu_readings.push(m)
            }
        })
        .unwrap();
    assert!(
        cpu_readings.iter().any(|m| m.kv_fast_bytes > 0),
        "{cpu_readings:?}"
    );
    let mut layers_seen = Vec::new();
    // memory readings, each with the layers done when it came (30: after the prefill)
    let mut readings = Vec::new();
    let got = dev
        .generate(&request(&doc, 12), &cancel, &mut |ev| match ev {
            EngineEvent::PrefillProgress { layers_done, .. } => layers_seen.push(layers_done),
            EngineEvent::Memory(m) => readings.push((layers_seen.len(), m)),
            EngineEvent::Token(_) => {}
        })
        .unwrap();
    eprintln!(
        "CPU engine: {:?}\ndevice forward: {:?}",
        want.text, got.text
    );
    assert_eq!(got.prompt_tokens, want.prompt_tokens);
    assert_eq!(got.prefill_kind, PrefillKind::Full);
    assert!(got.generated_tokens > 0 && !got.text.trim().is_empty());
    // the same model: its greedy answer starts with the CPU engine's (bf16 against f32
    // weights part on near-ties later)
    let prefix: String = want.text.chars().take(12).collect();
    assert!(
        got.text.starts_with(&prefix),
        "{:?} vs {:?}",
        got.text,
        want.text
    );
    // the prefill reported every layer, and pruned what the engine prunes
    assert_eq!(layers_seen, (1..=30).collect::<Vec<_>>());
    assert_eq!(got.kept_per_layer.len(), 30);
    assert_eq!(got.kept_per_layer[0], want.kept_per_layer[0]);
    assert_eq!(got.kept_per_layer[29], want.kept_per_layer[29]);
    assert!(got.kept_per_layer[29] < got.kept_per_layer[0]);
    assert!(got.slim && want.slim);
    assert_eq!(got.slim_stages, want.slim_stages);
    assert!(got.kv_bytes > 0 && dev.kv_bytes() == got.kv_bytes);
    assert!(
        got.gpu_memory.is_none(),
        "the CPU's ops have no device memory"
    );
    // live memory: one reading right after the prefill, with the KV the prefill wrote, and
    // any during it counting fewer bytes (the layers written so far)
    let after: Vec<_> = readings.iter().filter(|(l, _)| *l == 30).collect();
    assert!(!after.is_empty(), "{readings:?}");
    let at_end = after[0].1;
    let prompt_kv: usize = (got.kept_per_layer.iter().sum::<usize>()) * 2 * 2 * 3 * 64;
    assert_eq!(at_end.kv_fast_bytes, prompt_kv, "{readings:?}");
    assert!(at_end.rss_bytes > 0 && at_end.gpu.is_none());
    for (layers, m) in readings.iter().filter(|(l, _)| *l < 30) {
        assert!(m.kv_fast_bytes < at_end.kv_fast_bytes, "{layers}: {m:?}");
    }

    // a follow-up runs only its new tokens after the pruned prompt's KV, as on the CPU
    let follow_up = |first: &str| {
        let mut r = request(&doc, 8);
        r.messages.push(Message::assistant(first));
        r.messages.push(Message::user("Name one word it uses."));
        r
    };
    let want2 = cpu
        .generate(&follow_up(&want.text), &cancel, &mut |_| {})
        .unwrap();
    // the ratio turned between the turns applies to the cached conversation's decode sets
    let turned = SlimConfig {
        keep_ratio: 0.4,
        ..dev.slim_config().clone()
    };
    dev.set_slim(turned).unwrap();
    let got2 = dev
        .generate(&follow_up(&got.text), &cancel, &mut |_| {})
        .unwrap();
    eprintln!(
        "follow-up, CPU engine: {:?}\ndevice forward: {:?}",
        want2.text, got2.text
    );
    assert_eq!(want2.prefill_kind, PrefillKind::Reused);
    assert_eq!(got2.prefill_kind, PrefillKind::Reused);
    assert_eq!(got2.reused_tokens, want2.reused_tokens);
    assert!(got2.reused_tokens >= got.prompt_tokens);
    assert!(got2.prefilled_tokens < 40, "{}", got2.prefilled_tokens);
    assert!(got2.generated_tokens > 0);
    // the prompt's pruned rows stay pruned; every new row is in every layer
    let pruned = |k: &[usize]| k[0] - k[29];
    assert_eq!(pruned(&got2.kept_per_layer), pruned(&got.kept_per_layer));
    assert!(got2.kept_per_layer[0] > got.kept_per_layer[0]);
    // a new document prefills whole; a reset empties the device cache
    let other: String = LONG_TEXT.chars().skip(9000).take(2000).collect();
    let fresh = dev
        .generate(&request(&other, 2), &cancel, &mut |_| {})
        .unwrap();
    assert_eq!(
        (fresh.prefill_kind, fresh.reused_tokens),
        (PrefillKind::Full, 0)
    );
    dev.reset();
    assert_eq!(dev.kv_bytes(), 0);
}
