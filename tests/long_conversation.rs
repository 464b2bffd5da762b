//! Conversations longer than the context, on the real default model with a small `[model]
//! context`: leaving out the oldest turns keeps the document's turn and reuses its KV, drops the
//! fewest turns that make room for the answer, and marks them in the saved file; `run
//! --conversation --overflow error|drop-oldest|new` from the command line, each with its one line.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::AtomicBool;

use slimchat::context_fit::{self, answer_room, Fit};
use slimchat::engine::{Engine, EngineOptions, PrefillKind};
use slimchat::headless::{self, Overflow};
use slimchat::tui::store::{Attachment, ChatMessage, Conversation, Role, Store};
use slimchat::tui::turns;

const CONTEXT: usize = 320;

fn document() -> String {
    (1..=6)
        .map(|i| {
            format!(
                "Log entry {i}: ship {i} came in at dusk with {} barrels of oil.\n",
                i * 7
            )
        })
        .collect()
}

fn engine(context: usize) -> Engine {
    Engine::load(
        &common::default_model(),
        &EngineOptions {
            context,
            ..Default::default()
        },
    )
    .unwrap()
}

fn turn(conversation: &str, text: &str, attachments: Vec<Attachment>) -> headless::Turn {
    headless::Turn {
        conversation: conversation.into(),
        text: text.into(),
        attachments,
        system: None,
        max_tokens: 8,
        sampling: Default::default(),
        overflow: Overflow::DropOldest,
    }
}

#[test]
fn drop_oldest_keeps_the_document_reuses_its_kv_and_drops_the_fewest() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut engine = engine(CONTEXT);
    assert_eq!(engine.context_length(), CONTEXT);
    let cancel = AtomicBool::new(false);
    let doc = Attachment {
        label: "log.txt".into(),
        text: document(),
    };
    let first = headless::answer(
        &mut engine,
        &store,
        &turn("new", "Which ship had 21 barrels?", vec![doc.clone()]),
        &cancel,
        &mut |_| {},
    )
    .unwrap();
    let first_prompt = first.stats.prompt_tokens;
    let id = first.conversation.clone();
    let mut dropped_at = None;
    for i in 2..=40 {
        let q = format!("Question {i}: what did entry {} say?", i % 6 + 1);
        let done = headless::answer(
            &mut engine,
            &store,
            &turn(&id, &q, vec![]),
            &cancel,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(
            done.conversation, id,
            "drop-oldest stays in the conversation"
        );
        assert!(
            done.stats.prompt_tokens + 8 <= CONTEXT,
            "turn {i}: {:?}",
            done.stats.prompt_tokens
        );
        if !done.notes.is_empty() {
            assert!(done.notes[0].contains("oldest turn"), "{:?}", done.notes);
            dropped_at = Some((i, done.stats));
            break;
        }
    }
    let (i, stats) = dropped_at.expect("the conversation outgrew the context within 40 turns");
    eprintln!(
        "first drop at turn {i}: prompt {} tokens, {} reused, {} prefilled ({:?}); first prompt {first_prompt}",
        stats.prompt_tokens, stats.reused_tokens, stats.prefilled_tokens, stats.prefill_kind
    );
    // the document's turn comes first and stays: its KV (pruning state included) is reused
    assert_eq!(stats.prefill_kind, PrefillKind::Reused);
    assert!(stats.reused_tokens >= first_prompt, "{stats:?}");
    assert!(stats.prefilled_tokens < stats.prompt_tokens - first_prompt + 1);

    let saved = store.load(&id).unwrap();
    assert_eq!(
        saved.messages.len(),
        2 * i,
        "every turn is kept in the file"
    );
    assert!(
        !saved.messages[0].out_of_context,
        "the document's turn stays"
    );
    assert_eq!(saved.messages[0].attachments, vec![doc.clone()]);
    assert!(saved.messages[2].out_of_context && saved.messages[3].out_of_context);
    let last = &saved.messages[2 * i - 2];
    assert!(!last.out_of_context && last.content.starts_with(&format!("Question {i}:")));

    // the fewest turns: one fewer than the plan leaves no room for the answer
    let mut next = saved.clone();
    next.messages.push(ChatMessage::new(
        Role::User,
        "One more question about entry 3, please, in detail?".repeat(3),
    ));
    let chat = turns::chat_request(&next, 8, &Default::default(), true);
    let room = answer_room(8, CONTEXT);
    match context_fit::fit(&engine, &chat).unwrap() {
        Fit::Drop {
            ids,
            prompt,
            full_tokens,
        } => {
            let k = ids.len();
            assert!(full_tokens + room > CONTEXT);
            assert!(prompt.len() + room <= CONTEXT);
            let fewer = engine
                .encode_chat(&chat.without_oldest(k - 1).messages)
                .unwrap();
            assert!(
                fewer.len() + room > CONTEXT,
                "{k} turns dropped, {} would do",
                k - 1
            );
            let oldest: Vec<usize> = chat.droppable[..k].iter().map(|d| d.id).collect();
            assert_eq!(ids, oldest, "the oldest go first");
            assert!(!ids.contains(&0), "never the document's turn");
        }
        other => panic!("expected a drop: {other:?}"),
    }
}

#[test]
fn a_context_larger_than_the_models_is_an_error() {
    let err = Engine::load(
        &common::default_model(),
        &EngineOptions {
            context: 100_000,
            ..Default::default()
        },
    )
    .err()
    .expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("100000") && msg.contains("8192"), "{msg}");
    assert!(!msg.contains('\n'));
}

fn slimchat(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_slimchat"))
        .args(args)
        .args(["--config", dir.join("config.toml").to_str().unwrap()])
        .env("SLIMCHAT_DATA_DIR", dir.join("data"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A saved conversation that the next message overflows: a document's turn, then twelve short
/// ones.
fn full_conversation(store: &Store) -> Conversation {
    let mut conv = Conversation::new(String::new());
    let mut first = ChatMessage::new(Role::User, "Which ship had 21 barrels?");
    first.attachments.push(Attachment {
        label: "log.txt".into(),
        text: document(),
    });
    conv.messages.push(first);
    conv.messages
        .push(ChatMessage::new(Role::Assistant, "Ship 3."));
    for i in 2..=13 {
        conv.messages.push(ChatMessage::new(
            Role::User,
            format!("Question {i}: what did the keeper write on day {i}?"),
        ));
        conv.messages.push(ChatMessage::new(
            Role::Assistant,
            format!("On day {i} the keeper wrote that the lamp was lit at dusk."),
        ));
    }
    store.save(&conv).unwrap();
    conv
}

#[test]
fn run_overflow_policies_from_the_command_line() {
    let _ = common::default_model();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        format!("[model]\ncontext = {CONTEXT}\n[chat]\nmax_tokens = 4\n"),
    )
    .unwrap();
    let store = Store::open(&dir.path().join("data")).unwrap();
    let conv = full_conversation(&store);
    let path = store.conversation_path(&conv.id);
    let before = std::fs::read(&path).unwrap();
    let ask = "And what did the keeper write about the fog?";

    // a single prompt has no turns: --overflow without --conversation is one line
    let out = slimchat(dir.path(), &["run", "--prompt", "hi", "--overflow", "new"]);
    let e = stderr(&out);
    assert!(!out.status.success());
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("--overflow applies to a conversation continued with --conversation"),
        "{e}"
    );
    let out = slimchat(
        dir.path(),
        &["run", "--prompt", "hi", "--overflow", "sideways"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("expected drop-oldest, new or error"),
        "{}",
        stderr(&out)
    );
    let out = slimchat(
        dir.path(),
        &["run", "--prompt", "hi", "--conversation", "nosuch"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no saved conversation nosuch"),
        "{}",
        stderr(&out)
    );

    // error (the default): one line naming the flag; the file is untouched
    let out = slimchat(
        dir.path(),
        &["run", "--conversation", &conv.id, "--prompt", ask],
    );
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.starts_with("slimchat: error: "), "{e}");
    assert!(
        e.contains("--overflow drop-oldest") && e.contains("--overflow new"),
        "{e}"
    );
    assert!(e.contains(&format!("context is {CONTEXT} tokens")), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // new: a new conversation with the document; the old file is byte for byte as it was
    let out = slimchat(
        dir.path(),
        &[
            "run",
            "--conversation",
            &conv.id,
            "--prompt",
            ask,
            "--overflow",
            "new",
        ],
    );
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    assert!(
        e.contains(&format!("conversation {} is full", conv.id)) && e.contains("1 document"),
        "{e}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let new = store.latest().unwrap().unwrap();
    assert_ne!(new.id, conv.id);
    assert!(
        e.contains(&format!("conversation saved as {}", new.id)),
        "{e}"
    );
    assert_eq!(new.messages.len(), 2);
    assert_eq!(new.messages[0].content, ask);
    assert_eq!(new.messages[0].attachments[0].text, document());
    assert!(!new.messages[1].content.is_empty());

    // drop-oldest: the fewest oldest turns marked, the document's turn kept, the answer saved
    let out = slimchat(
        dir.path(),
        &[
            "run",
            "--conversation",
            &conv.id,
            "--prompt",
            ask,
            "--overflow",
            "drop-oldest",
            "--json",
        ],
    );
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    assert!(
        e.contains("oldest turn") && e.contains("out of the model's context"),
        "{e}"
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["conversation"], conv.id.as_str());
    assert!(
        json["prompt_tokens"].as_u64().unwrap() as usize + 4 <= CONTEXT,
        "{json}"
    );
    let saved = store.load(&conv.id).unwrap();
    assert_eq!(saved.messages.len(), conv.messages.len() + 2);
    assert!(!saved.messages[0].out_of_context && !saved.messages[1].out_of_context);
    let gone = saved.messages.iter().filter(|m| m.out_of_context).count();
    assert!(gone >= 2 && gone % 2 == 0, "whole turns: {gone}");
    assert!(
        saved.messages[2].out_of_context,
        "the oldest without a document goes first"
    );
    assert!(
        !saved.messages[saved.messages.len() - 3].out_of_context,
        "the newest stay"
    );
    assert_eq!(saved.messages[saved.messages.len() - 2].content, ask);
    for (a, b) in conv.messages.iter().zip(&saved.messages) {
        assert_eq!(a.content, b.content, "nothing is lost from the file");
    }

    // a window below the smallest is one line at start
    std::fs::write(dir.path().join("config.toml"), "[model]\ncontext = 64\n").unwrap();
    let out = slimchat(dir.path(), &["run", "--prompt", "hi"]);
    let e = stderr(&out);
    assert!(!out.status.success() && e.lines().count() == 1, "{e}");
    assert!(
        e.contains("[model] context must be 0 (the model's own) or at least 128"),
        "{e}"
    );
}
