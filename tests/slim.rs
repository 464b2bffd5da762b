//! SlimInfer in the real forward, on the default model: equivalence with dense when nothing is
//! pruned, original positions kept, the last prompt token reaching the head, follow-up reuse.

mod common;

use std::sync::atomic::AtomicBool;

use slimchat::bench::LONG_TEXT;
use slimchat::engine::{Engine, EngineOptions, PrefillKind};
use slimchat::model::template::Message;
use slimchat::sampling::SamplingConfig;
use slimchat::slim::{SlimConfig, StageConfig};

fn engine(slim: SlimConfig) -> Engine {
    Engine::load(
        &common::default_model(),
        &EngineOptions {
            slim,
            ..Default::default()
        },
    )
    .unwrap()
}

/// `engine` with f32 arithmetic in decode too: for comparisons where one side's decode row goes
/// through a multi-row layer (f32 GEMM) and the other's through the one-row GEMV, whose Q8
/// activation rounding alone moves logits by ~1e-2 (bench/NOTES.md, "Decode GEMV").
fn engine_f32(slim: SlimConfig) -> Engine {
    Engine::load(
        &common::default_model(),
        &EngineOptions {
            slim,
            linear: slimchat::backend::linear::LinearMode::DenseF32,
            ..Default::default()
        },
    )
    .unwrap()
}

fn dense() -> SlimConfig {
    SlimConfig {
        enabled: false,
        ..Default::default()
    }
}

fn prose(engine: &Engine, n: usize) -> Vec<u32> {
    engine.encode(LONG_TEXT).unwrap()[..n].to_vec()
}

#[test]
fn budgets_covering_the_prompt_give_logits_identical_to_dense() {
    let keep_all = SlimConfig {
        preset: "custom".into(),
        stages: vec![
            StageConfig {
                layer: 10,
                fraction: 1.0,
                floor: 0,
            },
            StageConfig {
                layer: 20,
                fraction: 1.0,
                floor: 0,
            },
        ],
        keep_ratio: 1.0,
        ..Default::default()
    };
    let mut slim = engine(keep_all);
    let tokens = prose(&slim, 700);
    let (pruned, _) = slim.prefill(&tokens, &mut |_| {}).unwrap();
    assert_eq!(slim.kept_per_layer(), vec![700; 30]);
    let mut dense = engine(dense());
    let (full, _) = dense.prefill(&tokens, &mut |_| {}).unwrap();
    assert_eq!(pruned, full, "logits differ although nothing was pruned");
    // and the same for the next decode step
    let t = common::argmax(&full) as u32;
    assert_eq!(slim.step(t).unwrap(), dense.step(t).unwrap());
}

#[test]
fn pruned_layers_keep_original_positions_and_the_last_token() {
    // smollm2's stages without its floors, so that 1500 tokens are pruned
    let mut e = engine(SlimConfig {
        keep_ratio: 0.25,
        ..smollm2_stages_without_floors()
    });
    let n = 1500;
    let tokens = prose(&e, n);
    let (logits, _) = e.prefill(&tokens, &mut |_| {}).unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
    let kept = e.kept_per_layer();
    assert_eq!(
        &kept[..10],
        &[n; 10],
        "preserve layers hold every prompt token"
    );
    assert!(
        kept[10] < n && kept[20] < kept[10] && kept[29] <= kept[20],
        "stages prune, nested: {kept:?}"
    );
    let last = e.layer_positions(29);
    assert_eq!(last.len(), kept[29]);
    assert!(
        last.windows(2).all(|w| w[0] < w[1]),
        "positions stay in order"
    );
    assert_eq!(
        last[..64],
        (0..64).collect::<Vec<u32>>()[..],
        "the sink block is kept at its positions"
    );
    assert_eq!(
        *last.last().unwrap(),
        n as u32 - 1,
        "the last prompt token reaches the head"
    );
    assert!(
        last.iter().any(|&p| p >= 64 && p < n as u32 - 64),
        "kept middle rows keep their original positions"
    );
    // generated tokens continue at position n and are never pruned
    e.step(common::argmax(&logits) as u32).unwrap();
    assert_eq!(*e.layer_positions(29).last().unwrap(), n as u32);
}

/// A late stage (the last two layers keep a quarter of the prompt) must not change the next
/// token; how far earlier stages move answers is measured by `slimchat eval` (bench/NOTES.md).
#[test]
fn late_pruning_of_a_real_question_answers_like_dense() {
    let question = "\n\nQuestion: In one word, what does a Python program consist of? Answer:";
    let mut doc = prose(&engine(dense()), 1200);
    let mut q = engine(dense()).encode(question).unwrap();
    doc.append(&mut q);
    let mut d = engine(dense());
    let late = SlimConfig {
        preset: "custom".into(),
        stages: vec![StageConfig {
            layer: 28,
            fraction: 0.25,
            floor: 0,
        }],
        keep_ratio: 1.0,
        ..Default::default()
    };
    let mut s = engine(late);
    let (ld, _) = d.prefill(&doc, &mut |_| {}).unwrap();
    let (ls, _) = s.prefill(&doc, &mut |_| {}).unwrap();
    assert!(s.kept_per_layer()[29] < doc.len());
    assert_eq!(
        common::argmax(&ld),
        common::argmax(&ls),
        "pruned top-1 differs from dense"
    );
}

#[test]
fn follow_up_reuses_the_pruned_cache_without_a_second_prefill() {
    let mut e = engine(SlimConfig::default());
    let doc: String = LONG_TEXT.chars().take(3000).collect();
    let greedy = SamplingConfig {
        temperature: 0.0,
        ..Default::default()
    };
    let cancel = AtomicBool::new(false);
    let mut messages = vec![Message::user(format!("{doc}\n\nWhat is this text about?"))];
    let first = e
        .generate(
            &slimchat::engine::GenerateRequest {
                messages: messages.clone(),
                max_tokens: 8,
                sampling: greedy.clone(),
            },
            &cancel,
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(first.prefill_kind, PrefillKind::Full);
    messages.push(Message::assistant(first.text.clone()));
    messages.push(Message::user("Name one keyword it mentions."));
    let second = e
        .generate(
            &slimchat::engine::GenerateRequest {
                messages,
                max_tokens: 8,
                sampling: greedy,
            },
            &cancel,
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(second.prefill_kind, PrefillKind::Reused);
    assert!(
        second.reused_tokens >= first.prompt_tokens,
        "the document's KV was reused"
    );
    assert!(
        second.prefilled_tokens < 60,
        "only the new turn ran: {}",
        second.prefilled_tokens
    );
}

#[test]
fn a_prompt_shorter_than_one_block_prunes_nothing_and_says_so() {
    let mut e = engine(SlimConfig::default());
    let cancel = AtomicBool::new(false);
    let req = slimchat::engine::GenerateRequest {
        messages: vec![Message::user("Hi")],
        max_tokens: 2,
        sampling: SamplingConfig::default(),
    };
    let stats = e.generate(&req, &cancel, &mut |_| {}).unwrap();
    assert!(stats.prompt_tokens <= 64);
    assert!(stats
        .kept_per_layer
        .iter()
        .all(|&k| k == stats.kept_per_layer[0]));
    assert!(stats.slim_note.unwrap().contains("nothing pruned"));
}

#[test]
fn a_short_document_stays_whole_until_the_preset_floors_bind() {
    // smollm2's floors: 3072 tokens at layer 10, 2048 at 15, 1024 at 20, 512 at 28
    let mut e = engine(SlimConfig::default());
    // 2,500 tokens: whole through layer 14, then the later stages drop blocks
    let n = 2500;
    let tokens = prose(&e, n);
    e.prefill(&tokens, &mut |_| {}).unwrap();
    let kept = e.kept_per_layer();
    assert_eq!(&kept[..15], &[n; 15], "whole through layer 14: {kept:?}");
    // 32, 16 and 8 blocks of 64, one of them the prompt's partial last block
    assert!(kept[15] > 2048 - 64 && kept[15] <= 2048, "{kept:?}");
    assert!(kept[20] > 1024 - 64 && kept[20] <= 1024, "{kept:?}");
    assert!(kept[28] > 512 - 64 && kept[28] <= 512, "{kept:?}");
    // a document of about 900 tokens runs dense (smollm2 runs prompts of up to 2,304 tokens
    // dense), and the person is told why
    let greedy = SamplingConfig {
        temperature: 0.0,
        ..Default::default()
    };
    let doc: String = LONG_TEXT.chars().take(3800).collect();
    let req = slimchat::engine::GenerateRequest {
        messages: vec![Message::user(format!("{doc}\n\nWhat is this text about?"))],
        max_tokens: 2,
        sampling: greedy,
    };
    let stats = e
        .generate(&req, &AtomicBool::new(false), &mut |_| {})
        .unwrap();
    // a prompt of 10-16 blocks, well within the 2,304 tokens smollm2 runs dense
    assert!(
        (600..1024).contains(&stats.prompt_tokens),
        "{}",
        stats.prompt_tokens
    );
    let kept = &stats.kept_per_layer;
    assert!(
        kept.iter()
            .all(|&k| k == kept[0] && k >= stats.prompt_tokens),
        "{kept:?}"
    );
    let note = stats.slim_note.unwrap();
    assert!(note.contains("nothing is pruned"), "{note}");
    // the same stages without floors prune from layer 10, at 1,500 tokens too
    let n = 1500;
    let mut e = engine(smollm2_stages_without_floors());
    let tokens = prose(&e, n);
    e.prefill(&tokens, &mut |_| {}).unwrap();
    assert!(e.kept_per_layer()[10] < n);
}

/// The smollm2 preset's stages (layers 10/20/28 keeping 1, 1/2, 1/4 of the ratio; its stage at
/// 15 only steps the first floor down) as a custom schedule, which has no per-stage floors.
fn smollm2_stages_without_floors() -> SlimConfig {
    let stage = |layer, fraction| StageConfig {
        layer,
        fraction,
        floor: 0,
    };
    SlimConfig {
        preset: "custom".into(),
        stages: vec![stage(10, 1.0), stage(20, 0.5), stage(28, 0.25)],
        ..Default::default()
    }
}

/// One stage from `layer` on keeping `keep_ratio` of the prompt.
fn one_stage(layer: usize, keep_ratio: f32, revive: bool) -> SlimConfig {
    SlimConfig {
        preset: "custom".into(),
        stages: vec![StageConfig {
            layer,
            fraction: 1.0,
            floor: 0,
        }],
        keep_ratio,
        min_keep_tokens: 0,
        revive,
        ..Default::default()
    }
}

#[test]
fn raising_the_ratio_in_decode_revives_pruned_blocks_to_the_dense_result() {
    let n = 900;
    // pruning only in the last layer: the kept rows' K/V there are dense's (their input is), so
    // once the pruned rows are back, that layer holds exactly the dense layer's keys
    let mut s = engine_f32(one_stage(29, 0.3, true));
    let tokens = prose(&s, n);
    let (first, _) = s.prefill(&tokens, &mut |_| {}).unwrap();
    assert!(s.kept_per_layer()[29] < n / 2, "the stage pruned");
    // everything fits the new budget: the next step brings every pruned block back
    s.set_slim(one_stage(29, 1.0, true)).unwrap();
    let t = common::argmax(&first) as u32;
    let revived = s.step(t).unwrap();
    assert_eq!(s.kept_per_layer(), vec![n + 1; 30]);
    let all: Vec<u32> = (0..=n as u32).collect();
    assert_eq!(s.layer_positions(29), all, "rows merged in position order");
    // the revived rows entered the layer with their dense hidden states, so the step sees the
    // dense keys and values and matches dense up to summation order (both in f32: the revived
    // step runs layer 29 on many rows, dense's on one)
    let mut d = engine_f32(dense());
    d.prefill(&tokens, &mut |_| {}).unwrap();
    let full = d.step(t).unwrap();
    let (diff, scale) = common::max_abs_diff(&revived, &full);
    assert!(diff <= 2e-3 * scale, "max |Δlogit| {diff} of {scale}");
}

#[test]
fn without_revival_a_raised_ratio_cannot_grow_pruned_layers() {
    let n = 900;
    let mut s = engine(one_stage(20, 0.3, false));
    let tokens = prose(&s, n);
    let (first, _) = s.prefill(&tokens, &mut |_| {}).unwrap();
    let kept = s.kept_per_layer()[20];
    s.set_slim(one_stage(20, 1.0, false)).unwrap();
    s.step(common::argmax(&first) as u32).unwrap();
    assert_eq!(s.kept_per_layer()[20], kept + 1, "only the new token");
}

#[test]
fn revived_rows_carry_on_through_later_stages() {
    let two = |keep_ratio| SlimConfig {
        preset: "custom".into(),
        stages: vec![
            StageConfig {
                layer: 12,
                fraction: 1.0,
                floor: 0,
            },
            StageConfig {
                layer: 24,
                fraction: 0.5,
                floor: 0,
            },
        ],
        keep_ratio,
        min_keep_tokens: 0,
        ..Default::default()
    };
    let n = 900;
    let mut s = engine(two(0.4));
    let tokens = prose(&s, n);
    let (first, _) = s.prefill(&tokens, &mut |_| {}).unwrap();
    let before = s.kept_per_layer();
    assert!(before[12] < n && before[24] < before[12]);
    s.set_slim(two(1.0)).unwrap();
    let logits = s.step(common::argmax(&first) as u32).unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
    let after = s.kept_per_layer();
    // stage 1 takes everything back; stage 2 (half the prompt) takes back what it now chooses,
    // which may include blocks that were revived one stage earlier in this same step
    assert_eq!(&after[..24], &[n + 1; 24][..]);
    assert!(after[24] > before[24] + 1 && after[24] <= n + 1);
    for layer in [12, 24, 29] {
        let p = s.layer_positions(layer);
        assert!(p.windows(2).all(|w| w[0] < w[1]), "layer {layer} in order");
    }
}

#[test]
fn pruning_turned_on_after_a_dense_answer_prunes_a_new_document_and_reuses_for_a_follow_up() {
    let mut e = engine(dense());
    let n = 3000;
    let doc = prose(&e, n);
    // a dense answer leaves a short prompt in the cache; the document shares its first tokens
    e.prefill(&doc[..40], &mut |_| {}).unwrap();
    e.set_slim(SlimConfig::default()).unwrap();
    let (_, reused) = e.prefill(&doc, &mut |_| {}).unwrap();
    assert_eq!(reused, 0, "the document starts over");
    assert!(
        e.kept_per_layer()[29] < n,
        "pruned: {:?}",
        e.kept_per_layer()
    );

    // a dense document, then pruning on, then a short follow-up: the dense rows are reused
    let mut e = engine(dense());
    e.prefill(&doc, &mut |_| {}).unwrap();
    e.set_slim(SlimConfig::default()).unwrap();
    let longer = prose(&e, n + 20);
    let (_, reused) = e.prefill(&longer, &mut |_| {}).unwrap();
    assert_eq!(reused, n);
    assert_eq!(e.kept_per_layer(), vec![n + 20; 30]);
}

/// The prompt's prefill (the first `n` tokens of prose), 16 answer tokens stepped, then a
/// follow-up that runs 44 more tokens over the cached conversation: the follow-up's logits.
fn follow_up_logits(e: &mut Engine, tokens: &[u32], n: usize) -> Vec<f32> {
    e.prefill(&tokens[..n], &mut |_| {}).unwrap();
    for &t in &tokens[n..n + 16] {
        e.step(t).unwrap();
    }
    let (logits, reused) = e.prefill(tokens, &mut |_| {}).unwrap();
    assert_eq!(
        reused,
        n + 16,
        "the follow-up ran over the cached conversation"
    );
    logits
}

#[test]
fn a_follow_up_brings_back_what_the_first_question_pruned() {
    // the first answer over the pruned cache as it stands (healing it: the test below)
    let slim = |heal_followups| SlimConfig {
        keep_ratio: 0.4,
        heal_followups,
        heal_answers: false,
        ..smollm2_stages_without_floors()
    };
    let n = 1500;
    let mut d = engine(dense());
    let tokens = prose(&d, n + 60);
    let want = follow_up_logits(&mut d, &tokens, n);

    let mut kept = engine(slim(false));
    let unhealed = follow_up_logits(&mut kept, &tokens, n);
    assert!(kept.kept_per_layer()[20] < n, "{:?}", kept.kept_per_layer());

    let mut healed = engine(slim(true));
    let got = follow_up_logits(&mut healed, &tokens, n);
    // every layer holds every prompt row again, in position order
    assert_eq!(healed.kept_per_layer(), vec![n + 60; 30]);
    let all: Vec<u32> = (0..(n + 60) as u32).collect();
    for layer in [10, 20, 28, 29] {
        assert_eq!(healed.layer_positions(layer), all, "layer {layer}");
    }
    // the rows came back through the stages' layers attending to the whole prompt: the
    // follow-up reads much what dense reads
    let kl = |l: &[f32]| slimchat::eval::kl_divergence(&want, l);
    let (kl_healed, kl_kept) = (kl(&got), kl(&unhealed));
    eprintln!("KL to dense: healed {kl_healed:.5}, pruned cache {kl_kept:.5}");
    assert!(
        kl_healed * 4.0 < kl_kept,
        "healed {kl_healed}, kept {kl_kept}"
    );

    // a fast tier that holds the pruned conversation but not every row at every layer: the
    // follow-up runs over the pruned cache as it stands
    let mut tight = Engine::load(
        &common::default_model(),
        &EngineOptions {
            slim: slim(true),
            kv: slimchat::kv::config::KvConfig {
                fast_budget: "1600tok".into(),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let capped = follow_up_logits(&mut tight, &tokens, n);
    assert_eq!(tight.kept_per_layer(), kept.kept_per_layer());
    assert_eq!(capped, unhealed);
}

/// The logits of `tokens[n..n + 16]` teacher-forced after a prefill of `tokens[..n]`.
fn answer_logits(e: &mut Engine, tokens: &[u32], n: usize) -> Vec<Vec<f32>> {
    let (first, _) = e.prefill(&tokens[..n], &mut |_| {}).unwrap();
    let mut out = vec![first];
    for &t in &tokens[n..n + 15] {
        out.push(e.step(t).unwrap());
    }
    out
}

#[test]
fn an_answer_reads_the_whole_document_from_its_second_token() {
    let slim = |heal_answers| SlimConfig {
        keep_ratio: 0.4,
        heal_answers,
        ..smollm2_stages_without_floors()
    };
    let n = 1500;
    let mut d = engine(dense());
    let tokens = prose(&d, n + 16);
    let want = answer_logits(&mut d, &tokens, n);

    let mut kept = engine(slim(false));
    let unhealed = answer_logits(&mut kept, &tokens, n);
    assert!(kept.kept_per_layer()[20] < n, "{:?}", kept.kept_per_layer());

    let mut healed = engine(slim(true));
    assert!(!healed.heals_next_step());
    let (first, _) = healed.prefill(&tokens[..n], &mut |_| {}).unwrap();
    // the first token comes from the pruned prefill, as without the heal
    assert_eq!(first, unhealed[0]);
    let pruned: Vec<usize> = (kept.kept_per_layer().iter()).map(|k| k - 15).collect();
    assert_eq!(healed.kept_per_layer(), pruned);
    assert!(healed.heals_next_step());
    let mut got = vec![first];
    for &t in &tokens[n..n + 15] {
        got.push(healed.step(t).unwrap());
        assert!(!healed.heals_next_step());
    }
    // after the first step every layer holds every prompt row, in position order
    assert_eq!(healed.kept_per_layer(), vec![n + 15; 30]);
    let all: Vec<u32> = (0..(n + 15) as u32).collect();
    for layer in [10, 20, 28, 29] {
        assert_eq!(healed.layer_positions(layer), all, "layer {layer}");
    }
    // the answer's later tokens read what dense reads, closer than over the pruned cache
    // (0.0094 against 0.0359 on a CPU without VNNI, test profile)
    let kl = |a: &[Vec<f32>]| -> f64 {
        (a[1..].iter().zip(&want[1..]))
            .map(|(l, w)| slimchat::eval::kl_divergence(w, l))
            .sum::<f64>()
            / 15.0
    };
    let (kl_healed, kl_kept) = (kl(&got), kl(&unhealed));
    eprintln!(
        "mean KL to dense over tokens 2-16: healed {kl_healed:.5}, pruned cache {kl_kept:.5}"
    );
    assert!(
        kl_healed * 2.5 < kl_kept,
        "healed {kl_healed}, kept {kl_kept}"
    );

    // a fresh prompt heals again; a follow-up over a healed cache has nothing left to heal
    let (_, reused) = healed.prefill(&tokens[..n + 16], &mut |_| {}).unwrap();
    assert_eq!(reused, n + 15);
    assert!(!healed.heals_next_step());
    healed.prefill(&tokens[..n], &mut |_| {}).unwrap();
    assert!(healed.heals_next_step());
}

/// A prompt whose stages keep every block (here a floor over the prompt) runs dense in
/// prefill, and with `heal_answers` its answer reads every block from the first step too, as
/// dense's does, rather than decode's sets of a quarter of the blocks: less pruning must not
/// read less than a pruned and healed answer reads.
#[test]
fn an_answer_over_a_prompt_pruned_of_nothing_reads_every_block() {
    let whole = |heal_answers| SlimConfig {
        min_keep_tokens: 4096,
        heal_answers,
        ..Default::default()
    };
    let n = 2600; // decode's sets: a quarter of 41 blocks, at least 1,280 tokens (20 blocks)
    let mut d = engine(dense());
    let tokens = prose(&d, n + 16);
    let want = answer_logits(&mut d, &tokens, n);

    let mut sets = engine(whole(false));
    let over_sets = answer_logits(&mut sets, &tokens, n);
    assert_eq!(sets.kept_per_layer(), vec![n + 15; 30], "nothing pruned");
    assert_eq!(over_sets[0], want[0], "the prefill is dense's");
    assert_ne!(
        over_sets[1..],
        want[1..],
        "decode's sets read a part of the prompt"
    );

    let mut every = engine(whole(true));
    let got = answer_logits(&mut every, &tokens, n);
    assert!(!every.heals_next_step(), "nothing to heal");
    assert_eq!(got, want, "the answer reads every block, as dense's");
}

/// Esc during a long prefill or during the answer's heal: the forward stops at the next layer
/// (not at the end of the forward), the answer ends cancelled with what it had, and the next
/// request starts from an empty cache and answers as if nothing had happened.
#[test]
fn a_cancel_stops_the_prefill_and_the_heal_at_the_next_layer() {
    use slimchat::engine::{EngineEvent, StopReason};
    use std::sync::atomic::Ordering::Relaxed;
    let slim = SlimConfig {
        keep_ratio: 0.4,
        ..smollm2_stages_without_floors()
    };
    let mut e = engine(slim.clone());
    let tokens = prose(&e, 1500);
    let greedy = SamplingConfig {
        temperature: 0.0,
        ..Default::default()
    };
    let cancel = AtomicBool::new(false);
    let answer = |e: &mut Engine, stop_on: &dyn Fn(&EngineEvent) -> bool| {
        let mut seen = Vec::new();
        let stats = e
            .generate_from_tokens(&tokens, 4, &greedy, &cancel, &mut |ev| {
                if stop_on(&ev) {
                    cancel.store(true, Relaxed);
                }
                seen.push(ev);
            })
            .unwrap();
        cancel.store(false, Relaxed);
        (stats, seen)
    };
    let want = answer(&mut engine(slim), &|_| false).0;
    assert!(want.heal_ms.is_some() && want.generated_tokens == 4);

    // the prefill: no layer after the one that heard the cancel
    let at_layer_3 =
        |ev: &EngineEvent| matches!(ev, EngineEvent::PrefillProgress { layers_done: 3, .. });
    let (stopped, seen) = answer(&mut e, &at_layer_3);
    let last_layer = (seen.iter()).rev().find_map(|ev| match ev {
        EngineEvent::PrefillProgress { layers_done, .. } => Some(*layers_done),
        _ => None,
    });
    assert_eq!(last_layer, Some(3));
    assert_eq!(stopped.stop_reason, StopReason::Cancelled);
    assert_eq!((stopped.generated_tokens, stopped.text.as_str()), (0, ""));
    assert_eq!(stopped.prefilled_tokens, 0);
    assert!(e.kept_per_layer().iter().all(|&k| k == 0));
    assert_eq!(answer(&mut e, &|_| false).0.text, want.text);

    // the heal after the first token: stopped inside its forward, so it never reports blocks
    // back and leaves no half-healed cache
    e.reset();
    let (stopped, seen) = answer(&mut e, &|ev| matches!(ev, EngineEvent::Healing));
    assert!(seen.iter().any(|ev| matches!(ev, EngineEvent::Healing)));
    assert!(!seen
        .iter()
        .any(|ev| matches!(ev, EngineEvent::Healed { .. })));
    assert_eq!(stopped.stop_reason, StopReason::Cancelled);
    assert_eq!(stopped.generated_tokens, 1);
    // the prompt was pruned, whatever became of its cache
    assert!(stopped.slim && !stopped.slim_stages.is_empty());
    assert!(want.text.starts_with(&stopped.text), "{:?}", stopped.text);
    assert!(e.kept_per_layer().iter().all(|&k| k == 0));
    let again = answer(&mut e, &|_| false).0;
    assert_eq!(again.prefill_kind, PrefillKind::Full);
    assert_eq!(again.text, want.text);
}
