//! The 300-turn soak: one conversation, headless through the engine (`slimchat run
//! --conversation` does the same), short questions and answers of at most 8 tokens, a context
//! window of 256 tokens so that the oldest turns are left out again and again, and the
//! conversation loaded and saved through the real store at every turn. Peak RSS after turn 300
//! stays within 5% of its value after turn 10, and every turn is in the saved file at the end.
//!
//! It takes two to three minutes on two cores, so it is `#[ignore]`d; .ci/run runs it with
//! `cargo test --test soak -- --ignored`. The figures go to stderr (`--nocapture`).

mod common;

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use slimchat::engine::{Engine, EngineOptions};
use slimchat::headless::{self, Overflow};
use slimchat::metrics::{peak_rss_bytes, rss_bytes};
use slimchat::tui::store::{Attachment, Role, Store};

const TURNS: usize = 300;
const CONTEXT: usize = 256;
const MAX_TOKENS: usize = 8;

fn question(i: usize) -> String {
    format!("Turn {i}: which ship came in on day {}?", i % 7 + 1)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

#[test]
#[ignore = "two to three minutes: .ci/run runs it with --ignored"]
fn soak_300_turns_keeps_memory_flat_and_every_turn_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut engine = Engine::load(
        &common::default_model(),
        &EngineOptions {
            context: CONTEXT,
            ..Default::default()
        },
    )
    .unwrap();
    let cancel = AtomicBool::new(false);
    let doc = Attachment {
        label: "log.txt".into(),
        text: (1..=4)
            .map(|d| format!("Day {d}: ship {} came in with {} barrels.\n", d * 3, d * 11))
            .collect(),
    };
    let started = Instant::now();
    let mut id = "new".to_string();
    let mut drops = 0;
    let mut reused_after_drop = Vec::new();
    let mut at_10 = (0, 0);
    let mut max_prompt = 0;
    let mut first_prompt = 0;
    for i in 1..=TURNS {
        let turn = headless::Turn {
            conversation: id.clone(),
            text: question(i),
            attachments: if i == 1 { vec![doc.clone()] } else { vec![] },
            system: None,
            max_tokens: MAX_TOKENS,
            sampling: Default::default(),
            overflow: Overflow::DropOldest,
        };
        let done = headless::answer(&mut engine, &store, &turn, &cancel, &mut |_| {})
            .unwrap_or_else(|e| panic!("turn {i}: {e}"));
        assert!(done.stats.generated_tokens <= MAX_TOKENS);
        assert!(done.stats.prompt_tokens + MAX_TOKENS <= CONTEXT, "turn {i}");
        max_prompt = max_prompt.max(done.stats.prompt_tokens);
        if i == 1 {
            first_prompt = done.stats.prompt_tokens;
        }
        if !done.notes.is_empty() {
            drops += 1;
            reused_after_drop.push(done.stats.reused_tokens);
        }
        id = done.conversation;
        if i == 10 {
            at_10 = (peak_rss_bytes(), rss_bytes());
            assert!(drops > 0, "the window is full before turn 10");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let at_300 = (peak_rss_bytes(), rss_bytes());
    let saved = store.load(&id).unwrap();
    let users: Vec<&str> = (saved.messages.iter())
        .filter(|m| m.role == Role::User)
        .map(|m| m.content.as_str())
        .collect();
    let answers = (saved.messages.iter())
        .filter(|m| m.role == Role::Assistant && !m.partial && !m.content.is_empty())
        .count();
    let left_out = (saved.messages.iter())
        .filter(|m| m.role == Role::User && m.out_of_context)
        .count();
    let min_reused = reused_after_drop.iter().min().copied().unwrap_or(0);
    eprintln!(
        "soak: {TURNS} turns in {secs:.1} s ({:.0} ms a turn), context {CONTEXT}, first prompt {first_prompt}, longest {max_prompt}; \
         {drops} turns left out older ones ({left_out} turns out of the context at the end), reused after a drop >= {min_reused} tokens; \
         peak RSS after turn 10 {:.1} MiB, after turn 300 {:.1} MiB ({:+.2}%); RSS {:.1} -> {:.1} MiB; \
         {} user messages and {answers} answers in the saved file ({} bytes)",
        secs * 1e3 / TURNS as f64,
        mib(at_10.0),
        mib(at_300.0),
        (at_300.0 as f64 / at_10.0 as f64 - 1.0) * 100.0,
        mib(at_10.1),
        mib(at_300.1),
        users.len(),
        std::fs::metadata(store.conversation_path(&id)).unwrap().len(),
    );
    // no turn lost on disk: every question, in order, each with its answer
    let want: Vec<String> = (1..=TURNS).map(question).collect();
    assert_eq!(users, want);
    assert_eq!(answers, TURNS);
    assert_eq!(saved.messages.len(), 2 * TURNS);
    assert_eq!(
        saved.messages[0].attachments,
        vec![doc],
        "the document stays"
    );
    assert!(!saved.messages[0].out_of_context);
    assert!(drops >= 100, "only {drops} turns overflowed the window");
    assert_eq!(left_out, drops, "one turn left out per overflow");
    // the document's turn comes first: its KV (the whole first prompt) is reused at every drop
    assert!(
        min_reused >= first_prompt,
        "reused after a drop: {min_reused} of the first prompt's {first_prompt}"
    );
    assert!(
        at_300.0 as f64 <= at_10.0 as f64 * 1.05,
        "peak RSS grew from {:.1} MiB after turn 10 to {:.1} MiB after turn 300",
        mib(at_10.0),
        mib(at_300.0)
    );
}
