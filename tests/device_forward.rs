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
use slimchat::slim::{SlimConfig, StageConfig};

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
    // 19 or 20 blocks of prompt, under the default schedule's floors (it would prune layers
    // 28-29 only, too few rows to be worth it, and runs the prompt dense): one stage at layer 28
    // keeping half by the ratio (10 blocks), and decode's sets (at least 1280 tokens) hold
    // every block it kept
    let doc: String = LONG_TEXT.chars().take(4900).collect();
    let opts = EngineOptions {
        linear: LinearMode::Dense,
        ..EngineOptions::default()
    };
    let layers_28_29 = SlimConfig {
        preset: "custom".into(),
        stages: vec![StageConfig {
            layer: 28,
            fraction: 1.0,
            floor: 0,
        }],
        ..SlimConfig::default()
    };
    let mut cpu = Engine::load(&path, &opts).unwrap();
    let mut dev = Engine::load(&path, &opts).unwrap();
    cpu.set_slim(layers_28_29.clone()).unwrap();
    dev.set_slim(layers_28_29).unwrap();
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
            _ => {}
        })
        .unwrap();
    eprintln!(
        "CPU engine: {:?}\ndevice forward: {:?}",
        want.text, got.text
    );
    assert_eq!(got.prompt_tokens, want.prompt_tokens);
    assert!(
        (1153..=1280).contains(&got.prompt_tokens),
        "{}",
        got.prompt_tokens
    );
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
    // the answer brought the pruned blocks back after its first token on both
    assert!(want.heal_ms.is_some() && got.heal_ms.is_some());
    assert_eq!(got.blocks_revived, want.blocks_revived);
    // live memory: one reading right after the prefill, with the KV the prefill wrote, and
    // any during it counting fewer bytes (the layers written so far); the heal's rows after it
    let after: Vec<_> = readings.iter().filter(|(l, _)| *l == 30).collect();
    assert!(!after.is_empty(), "{readings:?}");
    let at_end = after[0].1;
    let last = readings.last().unwrap().1;
    assert_eq!(last.kv_fast_bytes, got.kv.kv_fast_bytes, "{readings:?}");
    assert!(last.kv_fast_bytes > at_end.kv_fast_bytes, "{readings:?}");
    // the pools hold every kept row and room for the answer (this prompt is too short for
    // decode sets smaller than what the stages kept: nothing moves to the host tier)
    let prompt_kv: usize = (got.kept_per_layer.iter().sum::<usize>()) * 2 * 2 * 3 * 64;
    assert!(at_end.kv_fast_bytes > prompt_kv, "{readings:?}");
    assert_eq!((at_end.kv_host_bytes, got.kv.kv_host_bytes), (0, 0));
    assert!(!got.kv.kv_resident && got.kv.kv_blocks_moved == 0);
    // the engine's Q8 KV is not built for the device: one note says what it keeps instead
    assert!(
        got.kv.kv_notes.iter().any(|n| n.contains("bf16")),
        "{:?}",
        got.kv.kv_notes
    );
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
    // the prompt's pruned rows came back in the first answer, on the device as on the CPU,
    // and stay for the follow-up (whatever the ratio now): every new row is in every layer
    let pruned = |k: &[usize]| k[0] - k[29];
    assert!(pruned(&got.kept_per_layer) > 0);
    assert!(got.blocks_revived > 0);
    assert_eq!(pruned(&got2.kept_per_layer), 0);
    assert_eq!(pruned(&want2.kept_per_layer), 0);
    assert_eq!(got2.blocks_revived, want2.blocks_revived);
    assert!(got2.kept_per_layer[0] > got.kept_per_layer[0]);
    // a new document prefills whole; a reset empties the device cache
    let other: String = LONG_TEXT.chars().skip(9000).take(2000).collect();
    let fresh = dev
        .generate(&request(&other, 2), &cancel, &mut |_| {})
        .unwrap();
    assert_eq!(fresh.reused_tokens, 0);
    assert_ne!(fresh.prefill_kind, PrefillKind::Reused);
    dev.reset();
    assert_eq!(dev.kv_bytes(), 0);
}

#[test]
fn a_long_prompt_kv_waits_in_ram_beyond_each_layer_decode_set_and_answers_alike() {
    let path = common::default_model();
    // about 3,000 prompt tokens: every stage keeps more blocks than its decode set (1,280
    // tokens), so the slim layers' other blocks move to the host tier
    let doc: String = LONG_TEXT.chars().take(12000).collect();
    // the answers and the follow-up below run over the pruned cache as it stands: healing it
    // would give the host tier up (healing: tests/slim.rs, tests/cpu_forward.rs)
    let opts = EngineOptions {
        linear: LinearMode::Dense,
        slim: SlimConfig {
            heal_answers: false,
            heal_followups: false,
            ..SlimConfig::default()
        },
        ..EngineOptions::default()
    };
    let mut e = Engine::load(&path, &opts).unwrap();
    e.use_device(load_cpu_ops(&path, 5120).unwrap());
    let cancel = AtomicBool::new(false);
    e.set_kv_resident(true).unwrap();
    let resident = e
        .generate(&request(&doc, 24), &cancel, &mut |_| {})
        .unwrap();
    e.set_kv_resident(false).unwrap();
    let mut readings = Vec::new();
    let tiered = e
        .generate(&request(&doc, 24), &cancel, &mut |ev| {
            if let EngineEvent::Memory(m) = ev {
                readings.push(m)
            }
        })
        .unwrap();
    let (r, t) = (&resident.kv, &tiered.kv);
    eprintln!(
        "{} prompt tokens; resident: fast {} B; tiered: fast {} B (peak {}), host {} B, \
         {} blocks moved ({} B); dense {} B\n{:?}",
        tiered.prompt_tokens,
        r.kv_fast_bytes,
        t.kv_fast_bytes,
        t.kv_fast_bytes_peak,
        t.kv_host_bytes,
        t.kv_blocks_moved,
        t.kv_bytes_copied,
        t.kv_dense_bytes,
        tiered.text
    );
    // decode reads the same rows from either placement: the same greedy answer
    assert_eq!(tiered.text, resident.text);
    assert_eq!(tiered.kept_per_layer, resident.kept_per_layer);
    assert!(r.kv_resident && !t.kv_resident);
    assert_eq!((r.kv_host_bytes, r.kv_blocks_moved), (0, 0));
    assert!(
        t.kv_host_bytes > 0 && t.kv_fast_bytes < r.kv_fast_bytes,
        "{t:?}"
    );
    assert!(t.kv_blocks_moved > 0 && t.kv_bytes_copied >= t.kv_host_bytes);
    assert!(!t.kv_blocks_moved_per_step.is_empty());
    assert_eq!(t.kv_dense_bytes, r.kv_dense_bytes);
    // a layer of a stage whose decode set is smaller than what it kept holds less in the fast
    // tier and the rest on the host; every other layer keeps every row resident either way
    let (rf, tf) = (&r.kv_fast_bytes_per_layer, &t.kv_fast_bytes_per_layer);
    let mut tiered_layers = 0;
    for l in 0..tf.len() {
        let stage = (tiered.slim_stages.iter().rev()).find(|s| s.start_layer <= l);
        let host = t.kv_host_bytes_per_layer[l];
        match stage {
            Some(s) if s.decode_blocks < s.keep_blocks => {
                assert!(tf[l] < rf[l] && host > 0, "layer {l}: {s:?}");
                tiered_layers += 1;
            }
            _ => assert!(tf[l] == rf[l] && host == 0, "layer {l}: {stage:?}"),
        }
    }
    assert!(tiered_layers > 0, "{:?}", tiered.slim_stages);
    // the live readings show the host tier as the prefill fills it
    assert!(readings.iter().any(|m| m.kv_host_bytes > 0), "{readings:?}");

    // a follow-up longer than any room the prefill left (about 1,300 tokens; the prefill left
    // room for the answer only, and before the pools grew, 1,024 tokens more) runs after the
    // cached conversation: the pools grow, the host tier stays as it was
    let mut follow = request(&doc, 8);
    follow.messages.push(Message::assistant(&tiered.text));
    let more: String = LONG_TEXT.chars().skip(20000).take(5200).collect();
    follow
        .messages
        .push(Message::user(format!("{more}\n\nAnd this part?")));
    let next = e.generate(&follow, &cancel, &mut |_| {}).unwrap();
    assert_eq!(next.prefill_kind, PrefillKind::Reused);
    assert!(next.reused_tokens >= tiered.prompt_tokens);
    assert!(next.prefilled_tokens > 1100, "{}", next.prefilled_tokens);
    assert!(next.generated_tokens > 0);
    for (l, (&now, &before)) in (next.kept_per_layer.iter().zip(&tiered.kept_per_layer)).enumerate()
    {
        assert!(
            now >= before + next.prefilled_tokens,
            "layer {l}: {now} rows"
        );
    }
    assert_eq!(next.kv.kv_host_bytes, t.kv_host_bytes);
    assert!(next.kv.kv_fast_bytes > t.kv_fast_bytes);
}
