//! The tiered KV on the default model: the same logits as the all-resident run for a prefill
//! and 64 decode steps while each slim layer's fast tier holds its decode set and the sets
//! swap; the budget checked before the prefill; spill faults (directory, cap, a corrupted
//! block) fall back to RAM, say so, and change no output.

mod common;

use slimchat::bench::LONG_TEXT;
use slimchat::engine::{Engine, EngineOptions};
use slimchat::kv::{KvConfig, KvStats};
use slimchat::model::template::{Message, Role};
use slimchat::slim::schedule::DecodeSelect;
use slimchat::slim::{SlimConfig, StageConfig};

/// Characters of the document (about 1,450 tokens with the question and the chat template).
const DOC_CHARS: usize = 6000;
const STEPS: usize = 64;

/// smollm2's stages without their floors (under which this prompt would run dense), decode
/// attending to 0.4 of each stage's blocks (no floor in tokens), chosen per stage or per layer;
/// gamma 1 switches a set on any change
fn slim(select: DecodeSelect) -> SlimConfig {
    let stage = |layer, fraction| StageConfig {
        layer,
        fraction,
        floor: 0,
    };
    SlimConfig {
        preset: "custom".into(),
        stages: vec![stage(10, 1.0), stage(20, 0.5), stage(28, 0.25)],
        decode_keep: 0.4,
        decode_min_tokens: 0,
        gamma: 1.0,
        decode_select: select,
        // decode over the pruned cache, where the sets swap (healed after the first token,
        // every slim layer would hold all its blocks in the fast tier)
        heal_answers: false,
        ..Default::default()
    }
}

fn engine(kv: KvConfig) -> Engine {
    engine_choosing(kv, DecodeSelect::Stage)
}

fn engine_choosing(kv: KvConfig, select: DecodeSelect) -> Engine {
    Engine::load(
        &common::default_model(),
        &EngineOptions {
            slim: slim(select),
            kv,
            ..Default::default()
        },
    )
    .unwrap()
}

fn resident() -> KvConfig {
    KvConfig {
        resident: true,
        ..Default::default()
    }
}

/// A chat prompt: a document and a question about it (the answer moves the active sets).
fn prose(engine: &Engine) -> Vec<u32> {
    let doc: String = LONG_TEXT.chars().take(DOC_CHARS).collect();
    let content = format!("{doc}\n\nWhat is this text about? Answer in detail.");
    engine
        .encode_chat(&[Message {
            role: Role::User,
            content,
        }])
        .unwrap()
}

/// Prefill, then `STEPS` greedy steps (`before_decode` runs in between); every step's logits.
fn run(engine: &mut Engine, before_decode: impl FnOnce(&mut Engine)) -> (Vec<Vec<f32>>, KvStats) {
    let tokens = prose(engine);
    let (first, _) = engine.prefill(&tokens, &mut |_| {}).unwrap();
    before_decode(engine);
    let mut all = vec![first];
    for _ in 0..STEPS {
        let t = common::argmax(all.last().unwrap()) as u32;
        all.push(engine.step(t).unwrap());
    }
    let stats = engine.take_kv_stats();
    (all, stats)
}

fn reference() -> Vec<Vec<f32>> {
    run(&mut engine(resident()), |_| {}).0
}

#[test]
fn manager_gives_the_resident_logits_when_every_layer_chooses_its_own_blocks() {
    let select = DecodeSelect::Layer;
    let want = run(&mut engine_choosing(resident(), select), |_| {}).0;
    let (got, st) = run(&mut engine_choosing(KvConfig::default(), select), |_| {});
    assert_same(&got, &want);
    let decode_moves: usize = st.kv_blocks_moved_per_step.iter().sum();
    assert!(decode_moves > 0, "no swap in decode: {st:?}");
}

fn assert_same(got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "logits differ at step {i} (0 = prefill)");
    }
}

#[test]
fn manager_gives_the_resident_logits_while_the_fast_tier_holds_a_swapping_subset() {
    let (want, whole) = run(&mut engine(resident()), |_| {});
    let kv = KvConfig {
        fast_budget: "64M".into(),
        ..Default::default()
    };
    let (got, st) = run(&mut engine(kv), |_| {});
    assert_same(&got, &want);
    let decode_moves: usize = st.kv_blocks_moved_per_step.iter().sum();
    assert!(decode_moves > 0, "no swap in decode: {st:?}");
    assert!(st.kv_bytes_copied > 0, "{st:?}");
    assert!(st.kv_host_bytes > 0);
    assert!(
        st.kv_fast_bytes_peak <= st.kv_fast_budget_bytes.unwrap(),
        "peak {} over the budget {:?}",
        st.kv_fast_bytes_peak,
        st.kv_fast_budget_bytes
    );
    // a subset: the fast tier holds less than the resident run's, the slim layers' other
    // blocks wait in RAM
    assert!(
        st.kv_fast_bytes < whole.kv_fast_bytes,
        "fast {} against resident {}",
        st.kv_fast_bytes,
        whole.kv_fast_bytes
    );
    assert!(whole.kv_fast_budget_bytes.is_none() && whole.kv_host_bytes == 0);
}

#[test]
fn a_budget_too_small_is_a_clear_error_before_the_prefill() {
    let mut e = engine(KvConfig {
        fast_budget: "1M".into(),
        ..Default::default()
    });
    let tokens = prose(&e);
    let err = e.prefill(&tokens, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("[kv] fast_budget"), "{err}");
    assert!(err.contains("too small"), "{err}");
    assert_eq!(e.kept_per_layer(), vec![0; 30], "nothing ran");
}

#[test]
fn spill_faults_fall_back_to_ram_say_so_and_change_nothing() {
    let want = reference();
    let dir = tempfile::tempdir().unwrap();

    // a spill directory that cannot be created (below a regular file)
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let kv = KvConfig {
        spill: true,
        spill_dir: file.join("spill").display().to_string(),
        ..Default::default()
    };
    let (got, st) = run(&mut engine(kv), |_| {});
    assert_same(&got, &want);
    assert!(
        st.kv_notes.iter().any(|n| n.contains("not created")),
        "{:?}",
        st.kv_notes
    );
    assert_eq!(st.kv_spilled_blocks, 0);

    // a cap that holds a few blocks only
    let kv = KvConfig {
        spill: true,
        spill_dir: dir.path().join("capped").display().to_string(),
        spill_cap: "200K".into(),
        ..Default::default()
    };
    let (got, st) = run(&mut engine(kv), |_| {});
    assert_same(&got, &want);
    assert!(st.kv_spilled_blocks > 0, "{st:?}");
    assert!(st.kv_spill_bytes <= 200 << 10);
    assert!(
        st.kv_notes.iter().any(|n| n.contains("cap")),
        "{:?}",
        st.kv_notes
    );

    // every spilled block corrupted: detected on read, the RAM copy used
    let kv = KvConfig {
        spill: true,
        spill_dir: dir.path().join("bad").display().to_string(),
        ..Default::default()
    };
    let (got, st) = run(&mut engine(kv), |e| e.corrupt_kv_spill());
    assert_same(&got, &want);
    // (blocks spilled after the corruption read back fine; the logits show none was used bad)
    assert!(st.kv_spill_corrupt_blocks > 0, "{st:?}");
    assert!(
        st.kv_notes.iter().any(|n| n.contains("CRC")),
        "{:?}",
        st.kv_notes
    );

    // and a healthy spill file is read
    let kv = KvConfig {
        spill: true,
        spill_dir: dir.path().join("good").display().to_string(),
        ..Default::default()
    };
    let (got, st) = run(&mut engine(kv), |_| {});
    assert_same(&got, &want);
    assert!(st.kv_spill_reads > 0, "{st:?}");
    assert_eq!(st.kv_spill_corrupt_blocks, 0);
}
