//! The chat screen without a model: snapshots of the main screens (drawn from fixed states on
//! ratatui's TestBackend, so no clock reaches them), the 100k-character paste, the tiny
//! terminal guard and resize, the key map, and the conversation store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

use slimchat::config::AppConfig;
use slimchat::engine::EngineEvent;
use slimchat::metrics::{GpuMemory, MemoryNow};
use slimchat::tui::app::{update, App, Effect, Msg};
use slimchat::tui::input::map_event;
use slimchat::tui::render;
use slimchat::tui::store::{Conversation, Role, Store};
use slimchat::tui::tokens::SharedTokenizer;
use slimchat::tui::worker::{EngineCmd, WorkerEvent};

use common::screen::{draw, loaded, screen, stats, type_text};

const DOC: &str = "The lighthouse keeper's log, 1887. The lamp was lit at dusk and the fog came in from the west. ";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Pastes a document, asks a question, and returns the effects of sending.
fn ask(app: &mut App) -> Vec<Effect> {
    update(app, Msg::Paste(DOC.repeat(20)));
    type_text(app, "When was the lamp lit?");
    update(app, Msg::Submit)
}

fn prefill(app: &mut App, done: usize) {
    update(app, Msg::Worker(WorkerEvent::PromptTokens(1480)));
    update(
        app,
        Msg::Worker(WorkerEvent::Engine(EngineEvent::PrefillProgress {
            layers_done: done,
            n_layers: 30,
            tokens: 1480,
            rows: if done < 10 { 1480 } else { 1036 },
        })),
    );
}

/// A state in the middle of a prefill: 12 of 30 layers done after 600 ms.
fn prefilling() -> App {
    let mut app = loaded();
    update(&mut app, Msg::Tick(ms(1000)));
    ask(&mut app);
    update(&mut app, Msg::Tick(ms(1100)));
    prefill(&mut app, 1);
    update(&mut app, Msg::Tick(ms(1700)));
    prefill(&mut app, 12);
    app
}

fn streaming() -> App {
    let mut app = prefilling();
    update(&mut app, Msg::Tick(ms(1900)));
    prefill(&mut app, 30);
    for t in [
        "The lamp ",
        "was lit ",
        "at dusk:\n",
        "```text\nlog: dusk\n```\n",
        "as the log says",
    ] {
        update(
            &mut app,
            Msg::Worker(WorkerEvent::Engine(EngineEvent::Token(t.into()))),
        );
    }
    update(&mut app, Msg::Tick(ms(2400)));
    app
}

fn answered() -> App {
    let mut app = streaming();
    let text = app.conv.messages.last().unwrap().content.clone();
    update(
        &mut app,
        Msg::Worker(WorkerEvent::Stats {
            stats: Box::new(stats(&text)),
            rss_bytes: 412_000_000,
        }),
    );
    update(&mut app, Msg::Worker(WorkerEvent::Done));
    app
}

#[test]
fn snapshot_idle() {
    let mut app = loaded();
    insta::assert_snapshot!("idle", screen(&draw(&mut app, 120, 36)));
}

#[test]
fn snapshot_prefill_in_progress() {
    let mut app = prefilling();
    let s = screen(&draw(&mut app, 120, 36));
    assert!(s.contains("TTFT    0.7 s …"), "{s}");
    assert!(s.contains("12/30"), "{s}");
    assert!(s.contains("ETA"), "{s}");
    assert!(
        s.contains("context 1,480 / 8,192"),
        "the prompt counts while it runs: {s}"
    );
    insta::assert_snapshot!("prefill", s);
}

#[test]
fn snapshot_streaming() {
    let mut app = streaming();
    insta::assert_snapshot!("streaming", screen(&draw(&mut app, 120, 36)));
}

#[test]
fn a_prompt_that_was_not_pruned_says_so_beside_the_knob() {
    let mut app = streaming();
    let text = app.conv.messages.last().unwrap().content.clone();
    let mut whole = stats(&text);
    whole.kept_per_layer = vec![1480; 30];
    let stats_msg = |stats| {
        Msg::Worker(WorkerEvent::Stats {
            stats: Box::new(stats),
            rss_bytes: 412_000_000,
        })
    };
    update(&mut app, stats_msg(whole));
    update(&mut app, Msg::Worker(WorkerEvent::Done));
    let s = screen(&draw(&mut app, 120, 50));
    assert!(s.contains("nothing pruned at this length"), "{s}");
    // a pruned prompt does not say it
    let s = screen(&draw(&mut answered(), 120, 50));
    assert!(!s.contains("nothing pruned"), "{s}");
}

#[test]
fn blocks_brought_back_after_an_answer_show_beside_the_knob() {
    let mut app = answered();
    let pruned = app.last.as_ref().unwrap().kept_per_layer.clone();
    assert!(pruned.iter().any(|&k| k < pruned[0]), "{pruned:?}");
    update(
        &mut app,
        Msg::Worker(WorkerEvent::Healed {
            blocks: 52,
            ms: 1900.0,
            kept_per_layer: vec![pruned[0]; pruned.len()],
        }),
    );
    let s = screen(&draw(&mut app, 120, 50));
    assert!(s.contains("whole again for follow-ups"), "{s}");
    assert!(!s.contains("nothing pruned"), "{s}");
    assert!(
        s.contains("follow-ups read the whole document: 52 pruned blocks back in 1.9 s"),
        "{s}"
    );
}

#[test]
fn an_answer_healing_after_its_first_token_says_so_while_it_waits_and_after() {
    let mut app = prefilling();
    update(&mut app, Msg::Tick(ms(1900)));
    prefill(&mut app, 30);
    let event = |ev| Msg::Worker(WorkerEvent::Engine(ev));
    update(&mut app, event(EngineEvent::Token("The lamp ".into())));
    update(&mut app, event(EngineEvent::Healing));
    update(&mut app, Msg::Tick(ms(3100)));
    let s = screen(&draw(&mut app, 120, 50));
    assert!(s.contains("healing"), "{s}");
    assert!(s.contains("heal    1.2 s …"), "{s}");
    update(
        &mut app,
        event(EngineEvent::Healed {
            blocks: 52,
            ms: 1250.0,
            kept_per_layer: vec![1480; 30],
        }),
    );
    update(&mut app, event(EngineEvent::Token("was lit".into())));
    update(&mut app, Msg::Tick(ms(3300)));
    let s = screen(&draw(&mut app, 120, 50));
    assert!(s.contains("decoding") && s.contains("heal    1.2 s"), "{s}");
    assert!(!s.contains("1.2 s …"), "{s}");
    assert!(
        s.contains("the answer reads the whole document from its second token: 52 pruned blocks back in 1.2 s"),
        "{s}"
    );
    // the finished answer keeps the heal's time, and its prompt's pruning
    let text = app.conv.messages.last().unwrap().content.clone();
    let mut healed = stats(&text);
    healed.heal_ms = Some(1250.0);
    update(
        &mut app,
        Msg::Worker(WorkerEvent::Stats {
            stats: Box::new(healed),
            rss_bytes: 412_000_000,
        }),
    );
    update(&mut app, Msg::Worker(WorkerEvent::Done));
    let l = app.last.as_ref().unwrap();
    assert!(l.whole_again && l.heal_ms == Some(1250.0));
    let s = screen(&draw(&mut app, 120, 50));
    assert!(s.contains("heal    1.2 s") && s.contains("idle"), "{s}");
}

#[test]
fn snapshot_answered_with_metrics() {
    let mut app = answered();
    let s = screen(&draw(&mut app, 120, 50));
    assert!(s.contains("TTFT 812 ms"), "{s}");
    assert!(s.contains("kept tokens per layer"), "{s}");
    insta::assert_snapshot!("answered", s);
}

#[test]
fn memory_is_shown_live_while_an_answer_runs() {
    let mut app = prefilling();
    const GB: u64 = 1_000_000_000;
    let reading = |kv_mb: usize, used_gb: u64| MemoryNow {
        kv_fast_bytes: kv_mb * 1_000_000,
        kv_host_bytes: 0,
        rss_bytes: 300_000_000,
        gpu: Some(GpuMemory {
            gpu_total_bytes: 140 * GB,
            gpu_free_bytes: (140 - used_gb) * GB,
            gpu_own_bytes: (used_gb - 1) * GB,
        }),
    };
    update(
        &mut app,
        Msg::Worker(WorkerEvent::Engine(EngineEvent::Memory(reading(20, 35)))),
    );
    let s = screen(&draw(&mut app, 120, 40));
    assert!(s.contains("KV      20.0 MB"), "{s}");
    assert!(s.contains("VRAM    35.0 GB / 140.0 GB"), "{s}");
    assert!(s.contains(" 25%"), "the share of the device in use: {s}");
    assert!(s.contains("ours    34.0 GB"), "{s}");
    // a later reading replaces it, before the request ends
    update(
        &mut app,
        Msg::Worker(WorkerEvent::Engine(EngineEvent::Memory(reading(45, 70)))),
    );
    let s = screen(&draw(&mut app, 120, 40));
    assert!(s.contains("KV      45.0 MB"), "{s}");
    assert!(s.contains("VRAM    70.0 GB / 140.0 GB"), "{s}");
    assert!(s.contains(" 50%"), "{s}");
}

#[test]
fn snapshot_help() {
    let mut app = loaded();
    update(&mut app, Msg::ToggleHelp);
    insta::assert_snapshot!("help", screen(&draw(&mut app, 120, 36)));
}

#[test]
fn help_lists_every_key_and_command() {
    let mut app = loaded();
    update(&mut app, Msg::ToggleHelp);
    let s = screen(&draw(&mut app, 120, 40));
    let all = slimchat::tui::input::KEYS
        .iter()
        .chain(slimchat::tui::app::COMMANDS);
    for (k, d) in all {
        assert!(s.contains(k) && s.contains(d), "help lacks {k}: {d}\n{s}");
    }
}

#[test]
fn snapshot_error() {
    let mut app = loaded();
    update(
        &mut app,
        Msg::FileRead {
            path: "notes.bin".into(),
            result: Err(
                "notes.bin is not valid UTF-8 (invalid byte at offset 3); nothing attached".into(),
            ),
        },
    );
    let s = screen(&draw(&mut app, 120, 36));
    assert!(s.contains("not valid UTF-8"), "{s}");
    assert!(
        s.contains("/read notes.bin"),
        "the command is kept for fixing: {s}"
    );
    insta::assert_snapshot!("error", s);
}

#[test]
fn snapshot_tiny_terminal_guard() {
    let mut app = answered();
    insta::assert_snapshot!("tiny", screen(&draw(&mut app, 20, 6)));
}

#[test]
fn snapshot_download_gauge() {
    let mut app = App::new(&AppConfig::default(), None);
    app.conv.id = "0000000000000-00000".into();
    update(
        &mut app,
        Msg::Worker(WorkerEvent::LoadProgress(
            slimchat::model::source::DownloadProgress {
                what: "unpack model.gguf".into(),
                done_bytes: 40_000_000,
                total_bytes: Some(98_000_000),
            },
        )),
    );
    let s = screen(&draw(&mut app, 120, 36));
    assert!(s.contains(" 41%"), "{s}");
    insta::assert_snapshot!("loading", s);
}

#[test]
fn resize_to_tiny_and_back_restores_the_screen() {
    let mut app = answered();
    let mut t = Terminal::new(TestBackend::new(120, 40)).unwrap();
    t.draw(|f| {
        render::draw(f, &app);
    })
    .unwrap();
    let full = screen(&t);
    t.backend_mut().resize(20, 6);
    t.autoresize().unwrap();
    t.draw(|f| {
        render::draw(f, &app);
    })
    .unwrap();
    let tiny = screen(&t);
    assert!(tiny.contains("terminal too"), "{tiny}");
    assert!(tiny.contains("small"), "{tiny}");
    t.backend_mut().resize(120, 40);
    t.autoresize().unwrap();
    app.view = Default::default();
    t.draw(|f| {
        render::draw(f, &app);
    })
    .unwrap();
    assert_eq!(screen(&t), full);
}

#[test]
fn paste_of_100k_chars_is_kept_whole() {
    let mut app = loaded();
    let mut doc = String::new();
    let mut i = 0;
    let mut chars = 0;
    while chars < 100_000 {
        let line = format!("line {i}: ünïcödé text, nothing dropped\n");
        chars += line.chars().count();
        doc.push_str(&line);
        i += 1;
    }
    let doc: String = doc.chars().take(100_000).collect();
    assert_eq!(doc.chars().count(), 100_000);
    let key = |c| Event::Key(KeyEvent::new(c, KeyModifiers::NONE));
    let started = std::time::Instant::now();
    let msg = map_event(&Event::Paste(doc.clone()), &app).unwrap();
    update(&mut app, msg);
    let s = screen(&draw(&mut app, 120, 36));
    assert!(s.contains("pasted 100,000 chars · ~25,000 tokens"), "{s}");
    for c in "Summarize it.".chars() {
        let msg = map_event(&key(KeyCode::Char(c)), &app).unwrap();
        update(&mut app, msg);
    }
    let msg = map_event(&key(KeyCode::Enter), &app).unwrap();
    let effects = update(&mut app, msg);
    draw(&mut app, 120, 36);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "paste, typing, send and two frames took {:?}",
        started.elapsed()
    );
    let sent = effects
        .iter()
        .find_map(|e| match e {
            Effect::Engine(EngineCmd::Generate(req)) => Some(req.req.clone()),
            _ => None,
        })
        .expect("a generate request");
    let text = &sent.messages.last().unwrap().content;
    assert_eq!(text.chars().count(), 100_000 + 2 + "Summarize it.".len());
    assert!(text.starts_with(&doc));
    assert!(text.ends_with("\n\nSummarize it."));
}

#[test]
fn short_paste_goes_into_the_input() {
    let mut app = loaded();
    update(&mut app, Msg::Paste("two\r\nlines".into()));
    assert_eq!(app.editor.text(), "two\nlines");
    assert!(app.chips.is_empty());
}

#[test]
fn keys_map_to_their_messages() {
    let mut app = loaded();
    let k = |code, m| Event::Key(KeyEvent::new(code, m));
    let none = KeyModifiers::NONE;
    let is = |ev: Event, app: &App, want: &str| {
        let got = format!("{:?}", map_event(&ev, app));
        assert!(got.contains(want), "{ev:?}: {got}");
    };
    is(k(KeyCode::Enter, none), &app, "Submit");
    is(k(KeyCode::Enter, KeyModifiers::ALT), &app, "Newline");
    is(k(KeyCode::Enter, KeyModifiers::SHIFT), &app, "Newline");
    is(
        k(KeyCode::Char('j'), KeyModifiers::CONTROL),
        &app,
        "Newline",
    );
    is(k(KeyCode::Char('?'), none), &app, "ToggleHelp");
    is(k(KeyCode::Char('+'), none), &app, "RatioUp");
    is(k(KeyCode::Char('-'), none), &app, "RatioDown");
    is(k(KeyCode::Up, KeyModifiers::CONTROL), &app, "RatioUp");
    is(
        k(KeyCode::Char('p'), KeyModifiers::CONTROL),
        &app,
        "TogglePruning",
    );
    is(k(KeyCode::F(1), none), &app, "ToggleHelp");
    is(k(KeyCode::Esc, none), &app, "Stop");
    update(&mut app, Msg::Insert('x'));
    is(k(KeyCode::Char('?'), none), &app, "Insert('?')");
    is(k(KeyCode::Char('-'), none), &app, "Insert('-')");
}

#[test]
fn ratio_knob_steps_and_reaches_the_engine() {
    let mut app = loaded();
    let before = app.slim.keep_ratio;
    let eff = update(&mut app, Msg::RatioDown);
    assert!((app.slim.keep_ratio - (before - 0.05)).abs() < 1e-6);
    assert!(
        matches!(&eff[..], [Effect::Engine(EngineCmd::SetPruning(s))] if (s.keep_ratio - app.slim.keep_ratio).abs() < 1e-6)
    );
    for _ in 0..40 {
        update(&mut app, Msg::RatioDown);
    }
    assert!((app.slim.keep_ratio - 0.05).abs() < 1e-6);
    for _ in 0..40 {
        update(&mut app, Msg::RatioUp);
    }
    assert!((app.slim.keep_ratio - 1.0).abs() < 1e-6);
    let eff = update(&mut app, Msg::TogglePruning);
    assert!(!app.slim.enabled);
    assert!(matches!(&eff[..], [Effect::Engine(EngineCmd::SetPruning(s))] if !s.enabled));
    let s = screen(&draw(&mut app, 120, 36));
    assert!(s.contains("off · keep 1.00"), "{s}");
}

#[test]
fn stop_then_second_ctrl_c_quits() {
    let mut app = streaming();
    let eff = update(&mut app, Msg::Interrupt);
    assert!(matches!(&eff[..], [Effect::Engine(EngineCmd::Cancel)]));
    assert!(!app.quit);
    update(&mut app, Msg::Interrupt);
    assert!(app.quit);

    let mut app = streaming();
    let eff = update(&mut app, Msg::Stop);
    assert!(matches!(&eff[..], [Effect::Engine(EngineCmd::Cancel)]));
    update(&mut app, Msg::Worker(WorkerEvent::Done));
    assert!(!app.busy());
    let last = app.conv.messages.last().unwrap();
    assert_eq!(last.role, Role::Assistant);
    assert!(
        last.content.starts_with("The lamp"),
        "the partial answer stays"
    );
}

#[test]
fn refused_prompt_comes_back_to_the_input() {
    let mut app = loaded();
    ask(&mut app);
    update(
        &mut app,
        Msg::Worker(WorkerEvent::Refused {
            prompt_tokens: 9000,
            context_length: 8192,
        }),
    );
    update(&mut app, Msg::Worker(WorkerEvent::Done));
    assert!(app.conv.messages.is_empty());
    assert_eq!(app.editor.text(), "When was the lamp lit?");
    assert_eq!(app.chips.len(), 1);
    let s = screen(&draw(&mut app, 120, 36));
    assert!(s.contains("not sent"), "{s}");
}

#[test]
fn overflow_is_warned_before_sending() {
    let mut app = loaded();
    update(&mut app, Msg::Paste("word ".repeat(8000)));
    let s = screen(&draw(&mut app, 120, 36));
    assert!(s.contains("will not fit"), "{s}");
}

#[test]
fn regenerate_and_compare_build_the_right_requests() {
    let mut app = answered();
    let eff = update(&mut app, Msg::Regenerate);
    let Some(Effect::Engine(EngineCmd::Generate(req))) = eff.first() else {
        panic!("{eff:?}")
    };
    assert_eq!(req.req.messages.len(), 1, "the old answer is not sent");
    assert_eq!(app.conv.messages.len(), 2);
    assert!(app.conv.messages[1].content.is_empty());
    update(
        &mut app,
        Msg::Worker(WorkerEvent::Engine(EngineEvent::Token("Again.".into()))),
    );
    update(&mut app, Msg::Worker(WorkerEvent::Done));

    let eff = update(&mut app, Msg::Compare);
    let Some(Effect::Engine(EngineCmd::Compare(req, slim))) = eff.first() else {
        panic!("{eff:?}")
    };
    assert_eq!(req.messages.len(), 1);
    assert!(slim.enabled);
    let mut dense = stats("Dense answer.");
    dense.ttft_ms = 1500.0;
    update(
        &mut app,
        Msg::Worker(WorkerEvent::Compared {
            dense: Box::new(dense),
            slim: Box::new(stats("Pruned answer.")),
            keep_ratio: 0.7,
        }),
    );
    update(&mut app, Msg::Worker(WorkerEvent::Done));
    let s = screen(&draw(&mut app, 120, 40));
    assert!(s.contains("Dense · TTFT 1500 ms"), "{s}");
    assert!(s.contains("Pruned keep 0.70 · TTFT 812 ms"), "{s}");
    assert!(s.contains("Dense answer."), "{s}");
    assert!(s.contains("Pruned answer."), "{s}");
    // the compare says whether the answers agree, and which numbers or names differ
    assert!(s.contains("answers differ (parting at word 1 of 2"), "{s}");

    update(&mut app, Msg::Compare);
    update(
        &mut app,
        Msg::Worker(WorkerEvent::Compared {
            dense: Box::new(stats("The code is 48213.")),
            slim: Box::new(stats("The code is 48213.")),
            keep_ratio: 0.6,
        }),
    );
    update(&mut app, Msg::Worker(WorkerEvent::Done));
    let s = screen(&draw(&mut app, 120, 40));
    assert!(s.contains("answers identical"), "{s}");
    let md = app.conv.to_markdown();
    assert!(md.contains("_answers identical_"), "{md}");
}

#[test]
fn commands_system_clear_export() {
    let mut app = answered();
    type_text(&mut app, "/system Be brief.");
    update(&mut app, Msg::Submit);
    assert_eq!(app.conv.system, "Be brief.");
    type_text(&mut app, "/export /tmp/x.md");
    let eff = update(&mut app, Msg::Submit);
    assert!(matches!(&eff[..], [Effect::Export(Some(p))] if p.to_str() == Some("/tmp/x.md")));
    let old = app.conv.id.clone();
    type_text(&mut app, "/clear");
    let eff = update(&mut app, Msg::Submit);
    assert!(matches!(&eff[..], [Effect::Engine(EngineCmd::Reset)]));
    assert!(app.conv.messages.is_empty());
    assert_eq!(app.conv.system, "Be brief.");
    assert_ne!(app.conv.id, old);
}

#[test]
fn invalid_utf8_file_is_one_line_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.txt");
    std::fs::write(&path, b"ok\xff\xfe").unwrap();
    let err = slimchat::tui::read_text(&path).unwrap_err();
    assert!(
        err.contains("not valid UTF-8") && err.contains("offset 2"),
        "{err}"
    );
    assert!(!err.contains('\n'));
    let good = dir.path().join("good.txt");
    std::fs::write(&good, "fine text").unwrap();
    assert_eq!(slimchat::tui::read_text(&good).unwrap(), "fine text");
}

#[test]
fn store_saves_lists_resumes_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let app = answered();
    let mut conv = app.conv.clone();
    store.save(&conv).unwrap();
    conv.id = "9999999999999-00000".into();
    store.save(&conv).unwrap();
    assert_eq!(store.latest().unwrap().unwrap().id, conv.id);
    let back: Conversation = store.load("0000000000000-00000").unwrap();
    assert_eq!(back, app.conv);
    let list = store.list().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].title, "When was the lamp lit?");
    let md = dir.path().join("c.md");
    slimchat::tui::store::export_markdown(&back, &md).unwrap();
    let md = std::fs::read_to_string(md).unwrap();
    assert!(
        md.contains("## Assistant") && md.contains("TTFT 812 ms"),
        "{md}"
    );
    store
        .append_metrics(&serde_json::json!({"ttft_ms": 1}))
        .unwrap();
    store
        .append_metrics(&serde_json::json!({"ttft_ms": 2}))
        .unwrap();
    let lines = std::fs::read_to_string(store.metrics_path()).unwrap();
    assert_eq!(lines.lines().count(), 2);
    // No temp files are left behind by the atomic writes.
    for e in std::fs::read_dir(dir.path().join("conversations")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(name.ends_with(".json"), "{name}");
    }
}

#[test]
fn stats_become_turn_metrics_and_a_metrics_record() {
    let mut app = streaming();
    let eff = update(
        &mut app,
        Msg::Worker(WorkerEvent::Stats {
            stats: Box::new(stats("The lamp was lit at dusk.")),
            rss_bytes: 1,
        }),
    );
    let Some(Effect::Metrics(rec)) = eff.first() else {
        panic!("{eff:?}")
    };
    assert_eq!(rec["ttft_ms"], 812.0);
    assert_eq!(rec["turn"], 1);
    assert_eq!(rec["kept_per_layer"].as_array().unwrap().len(), 30);
    let m = app.conv.messages.last().unwrap();
    assert_eq!(m.metrics.as_ref().unwrap().ttft_ms, 812.0);
}

#[test]
fn with_the_model_tokenizer_counts_are_exact_and_warn_before_sending() {
    let file = slimchat::model::gguf::GgufFile::open(&common::default_model()).unwrap();
    let tok = slimchat::model::tokenizer::from_gguf(&file.content).unwrap();
    let mut app = App::new(&AppConfig::default(), None);
    update(
        &mut app,
        Msg::Worker(WorkerEvent::Loaded {
            model: "SmolLM2-135M-Instruct".into(),
            context_length: 8192,
            n_layers: 30,
            tokenizer: Some(SharedTokenizer(Arc::new(tok.clone()))),
            pruning: true,
            remote: None,
        }),
    );
    let text = DOC.repeat(400); // ~38k chars
    let exact = tok.encode(text.as_str(), false).unwrap().len();
    update(&mut app, Msg::Paste(text.clone()));
    let label = app.chip_label(&app.chips[0]);
    assert!(
        label.ends_with(&format!(" {} tokens", slimchat::tui::app::thousands(exact))),
        "{label} (want {exact})"
    );
    assert!(!label.contains('~'), "{label}");
    // exact counts put this paste over the 8,192-token context: warned before sending
    assert!(exact > 8192, "the test text is long enough: {exact}");
    let (next, ctx) = app.overflow_warning().expect("a warning before sending");
    assert_eq!(ctx, 8192);
    assert!(next > exact, "{next} counts the paste and the markup");
}

#[test]
fn esc_during_the_prefill_ends_the_turn_without_an_answer_or_a_ttft() {
    let mut app = prefilling();
    assert!(matches!(
        update(&mut app, Msg::Stop).as_slice(),
        [Effect::Engine(EngineCmd::Cancel)]
    ));
    // the engine stops at its next layer and reports a cancelled request with no token
    let mut stopped = stats("");
    stopped.stop_reason = slimchat::engine::StopReason::Cancelled;
    (stopped.generated_tokens, stopped.ttft_ms) = (0, 1300.0);
    update(
        &mut app,
        Msg::Worker(WorkerEvent::Stats {
            stats: Box::new(stopped),
            rss_bytes: 412_000_000,
        }),
    );
    update(&mut app, Msg::Worker(WorkerEvent::Done));
    let s = screen(&draw(&mut app, 120, 36));
    assert!(s.contains("stopped before the first token"), "{s}");
    assert!(s.contains("TTFT    stopped at 1.3 s"), "{s}");
    assert!(!s.contains("stopping"), "{s}");
    assert!(!app.busy());
}
