//! The chat screen when a message will not fit, without a model: which turns may be left out
//! (not the document's, not the new message), the offer in the status line (snapshot), Esc
//! keeping the message, `d` sending with the oldest turns left out and marked (on screen, in the
//! saved file, out of the next request), `n` starting a new conversation with the documents while
//! the old one stays saved as it was.

mod common;

use crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};

use slimchat::engine::EngineEvent;
use slimchat::tui::app::{update, App, Effect, Msg};
use slimchat::tui::input::map_event;
use slimchat::tui::store::Store;
use slimchat::tui::worker::{EngineCmd, WorkerEvent};

use common::screen::{draw, loaded, screen, stats, type_text};

const DOC: &str = "The lighthouse keeper's log, 1887. The lamp was lit at dusk and the fog came in from the west. ";

/// Pastes a document, asks a question, and returns the effects of sending.
fn ask(app: &mut App) -> Vec<Effect> {
    update(app, Msg::Paste(DOC.repeat(20)));
    type_text(app, "When was the lamp lit?");
    update(app, Msg::Submit)
}

/// Sends `q` and finishes its answer `a`.
fn turn(app: &mut App, q: &str, a: &str) {
    type_text(app, q);
    update(app, Msg::Submit);
    update(
        app,
        Msg::Worker(WorkerEvent::Engine(EngineEvent::Token(a.into()))),
    );
    update(
        app,
        Msg::Worker(WorkerEvent::Stats {
            stats: Box::new(stats(a)),
            rss_bytes: 0,
        }),
    );
    update(app, Msg::Worker(WorkerEvent::Done));
}

/// A conversation with a document in its first turn and two more turns, and a fourth message
/// sent; returns what sending it asked of the engine.
fn long_conversation(app: &mut App) -> slimchat::context_fit::ChatRequest {
    ask(app);
    update(
        app,
        Msg::Worker(WorkerEvent::Engine(EngineEvent::Token("At dusk.".into()))),
    );
    update(app, Msg::Worker(WorkerEvent::Done));
    turn(app, "Where did the fog come from?", "From the west.");
    turn(app, "What year is the log?", "1887.");
    type_text(app, "Who kept the lighthouse?");
    let eff = update(app, Msg::Submit);
    match eff.first() {
        Some(Effect::Engine(EngineCmd::Generate(chat))) => chat.clone(),
        other => panic!("{other:?}"),
    }
}

fn overflow(app: &mut App) {
    update(
        app,
        Msg::Worker(WorkerEvent::Overflow {
            prompt_tokens: 8_300,
            context_length: 8_192,
            turns: 1,
            after_tokens: 7_650,
        }),
    );
    update(app, Msg::Worker(WorkerEvent::Done));
}

fn press(app: &mut App, code: KeyCode) -> Vec<Effect> {
    let ev = Event::Key(KeyEvent::new(code, KeyModifiers::NONE));
    match map_event(&ev, app) {
        Some(msg) => update(app, msg),
        None => vec![],
    }
}

#[test]
fn only_turns_without_documents_may_be_left_out() {
    let mut app = loaded();
    let chat = long_conversation(&mut app);
    assert!(
        !chat.drop_oldest,
        "a plain Enter asks before leaving anything out"
    );
    let ids: Vec<usize> = chat.droppable.iter().map(|d| d.id).collect();
    // messages: 0 doc + question, 1 answer, 2 fog, 3 west, 4 year, 5 1887, 6 the new one
    assert_eq!(
        ids,
        vec![2, 4],
        "the document's turn and the new message stay"
    );
    let m = &chat.req.messages;
    assert_eq!(m.len(), 7);
    assert_eq!(
        &m[chat.droppable[0].messages.clone()][0].content,
        "Where did the fog come from?"
    );
    assert_eq!(chat.droppable[0].messages, 2..4);
    assert_eq!(chat.droppable[1].messages, 4..6);
    let out = chat.without_oldest(1);
    assert_eq!(out.messages.len(), 5);
    assert!(
        out.messages[0].content.starts_with(DOC),
        "the document comes first still"
    );
    assert!(out
        .messages
        .iter()
        .all(|m| m.content != "Where did the fog come from?"));
    assert!(out
        .messages
        .iter()
        .any(|m| m.content == "What year is the log?"));
}

#[test]
fn overflow_offer_shows_and_esc_keeps_the_message() {
    let mut app = loaded();
    long_conversation(&mut app);
    overflow(&mut app);
    assert!(app.offer.is_some());
    assert_eq!(app.editor.text(), "Who kept the lighthouse?");
    assert_eq!(
        app.conv.messages.len(),
        6,
        "the message is not in the conversation yet"
    );
    let s = screen(&draw(&mut app, 200, 36));
    assert!(
        s.contains("⚠ 8,300 tokens leave no room for an answer in 8,192 · d: drop the 1 oldest turn (7,650 tokens left) and send · n: send in a new conversation with the same documents · Esc: cancel"),
        "{s}"
    );
    // other keys do nothing while the offer waits
    assert!(press(&mut app, KeyCode::Char('x')).is_empty());
    assert!(press(&mut app, KeyCode::Enter).is_empty());
    assert_eq!(app.editor.text(), "Who kept the lighthouse?");
    press(&mut app, KeyCode::Esc);
    assert!(app.offer.is_none());
    assert_eq!(app.editor.text(), "Who kept the lighthouse?");
    assert_eq!(app.conv.messages.len(), 6);
    let s = screen(&draw(&mut app, 120, 36));
    assert!(
        s.contains("not sent: the message is back in the input"),
        "{s}"
    );
}

#[test]
fn snapshot_overflow_offer() {
    let mut app = loaded();
    long_conversation(&mut app);
    overflow(&mut app);
    insta::assert_snapshot!("overflow_offer", screen(&draw(&mut app, 120, 36)));
}

#[test]
fn drop_oldest_sends_marks_and_leaves_the_turns_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut app = loaded();
    long_conversation(&mut app);
    overflow(&mut app);
    let eff = press(&mut app, KeyCode::Char('d'));
    let Some(Effect::Engine(EngineCmd::Generate(chat))) = eff.first() else {
        panic!("{eff:?}")
    };
    assert!(chat.drop_oldest);
    assert!(app.offer.is_none() && app.busy());
    assert_eq!(app.conv.messages[6].content, "Who kept the lighthouse?");
    let eff = update(
        &mut app,
        Msg::Worker(WorkerEvent::Dropped {
            ids: vec![2],
            from_tokens: 8_300,
            to_tokens: 7_650,
        }),
    );
    assert!(matches!(&eff[..], [Effect::Save]));
    let gone: Vec<bool> = app.conv.messages.iter().map(|m| m.out_of_context).collect();
    assert_eq!(gone, [false, false, true, true, false, false, false, false]);
    update(
        &mut app,
        Msg::Worker(WorkerEvent::Engine(EngineEvent::Token(
            "The keeper.".into(),
        ))),
    );
    update(&mut app, Msg::Worker(WorkerEvent::Done));
    let s = screen(&draw(&mut app, 120, 60));
    assert!(s.contains("You · left out of the model's context"), "{s}");
    assert!(
        s.contains("slimchat · left out of the model's context"),
        "{s}"
    );
    assert!(
        s.contains("Where did the fog come from?"),
        "still on screen:\n{s}"
    );
    // saved with the marks; the next message goes without the left-out turn
    store.save(&app.conv).unwrap();
    let saved = store.load(&app.conv.id).unwrap();
    assert_eq!(saved, app.conv);
    assert!(saved.messages[2].out_of_context && !saved.messages[4].out_of_context);
    let text = std::fs::read_to_string(store.conversation_path(&app.conv.id)).unwrap();
    assert_eq!(
        text.matches("\"out_of_context\": true").count(),
        2,
        "{text}"
    );
    type_text(&mut app, "And the lamp?");
    let eff = update(&mut app, Msg::Submit);
    let Some(Effect::Engine(EngineCmd::Generate(chat))) = eff.first() else {
        panic!("{eff:?}")
    };
    let sent: Vec<&str> = chat
        .req
        .messages
        .iter()
        .map(|m| m.content.as_str())
        .collect();
    assert!(!sent.contains(&"Where did the fog come from?"), "{sent:?}");
    assert!(sent.contains(&"What year is the log?"), "{sent:?}");
    assert_eq!(
        chat.droppable.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![4, 6]
    );
}

#[test]
fn new_conversation_keeps_the_documents_and_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut app = loaded();
    long_conversation(&mut app);
    overflow(&mut app);
    let old = app.conv.clone();
    store.save(&old).unwrap();
    // a second document waiting as a chip goes too, after the old conversation's
    update(&mut app, Msg::Paste("A second page. ".repeat(80)));
    let eff = press(&mut app, KeyCode::Char('n'));
    let chat = eff
        .iter()
        .find_map(|e| match e {
            Effect::Engine(EngineCmd::Generate(c)) => Some(c.clone()),
            _ => None,
        })
        .expect("sent in the new conversation");
    for e in &eff {
        if let Effect::Save = e {
            store.save(&app.conv).unwrap();
        }
    }
    assert_ne!(app.conv.id, old.id);
    assert!(app.conv.id > old.id, "the new one is the latest");
    assert_eq!(
        app.conv.messages.len(),
        2,
        "the message and its answer to come"
    );
    let first = &app.conv.messages[0];
    assert_eq!(first.content, "Who kept the lighthouse?");
    assert_eq!(first.attachments.len(), 2);
    assert_eq!(first.attachments[0].text, DOC.repeat(20));
    assert!(first.attachments[1].text.starts_with("A second page."));
    assert!(app.chips.is_empty() && app.editor.is_empty());
    assert!(chat.droppable.is_empty());
    assert_eq!(chat.req.messages.len(), 1);
    assert!(chat.req.messages[0].content.starts_with(DOC));
    let s = screen(&draw(&mut app, 120, 36));
    assert!(s.contains("new conversation with 1 document of"), "{s}");
    assert_eq!(
        store.load(&old.id).unwrap(),
        old,
        "the old one stays as it was"
    );
    assert_eq!(store.latest().unwrap().unwrap().id, app.conv.id);
}
