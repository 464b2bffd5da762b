//! The chat screen with the real default model. `ui_keeps_redrawing_during_prefill` drives the
//! real event loop (TestBackend, engine thread) on a ~2000-token prompt and times the frames.
//! `tmux_session` runs the real binary in tmux: bracketed paste of a document, a question, the
//! streamed answer and its TTFT read off the screen, the ratio lowered, a second question,
//! quit, and `--resume` finds the conversation. `typed_paste_then_enter_sends_and_files_are_private`
//! pastes without bracketed paste (the terminal types it, line breaks as Enter) and checks the
//! next Enter sends it whole, and that every file of the session is 0600 / 0700 under umask 000.
//! `a_panic_restores_the_terminal_and_saves_the_conversation` uses the test-only
//! `SLIMCHAT_TEST_PANIC`. `full_context_offers_drop_oldest_and_new_conversation` fills a
//! 256-token window (`[model] context`) and takes the offer's Esc, `d` and `n`. The tmux tests
//! are skipped (with a message) without tmux.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use ratatui::backend::TestBackend;
use ratatui::Terminal;

use slimchat::config::AppConfig;
use slimchat::tui::app::{App, Msg};
use slimchat::tui::store::{Role, Store};
use slimchat::tui::worker::Worker;

use common::tmux::{has_tmux, slimchat_command, ttfts, wait_exit, Tmux};

/// The tests here each run the model (and one times frames): one at a time, so they do not
/// fight over the cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A session run in this process on the real engine, one at a time: a store in a fresh
/// directory (kept while the returned directory lives) and the defaults answering `max_tokens`
/// tokens.
fn in_process(
    max_tokens: usize,
) -> (
    std::sync::MutexGuard<'static, ()>,
    tempfile::TempDir,
    Store,
    AppConfig,
) {
    let serial = serial();
    let _ = common::default_model();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut cfg = AppConfig::default();
    cfg.chat.max_tokens = max_tokens;
    (serial, dir, store, cfg)
}

/// About `n` sentences of ~20 tokens each.
fn document(n: usize) -> String {
    (1..=n)
        .map(|i| {
            format!(
                "Entry {i}: the harbour master recorded that ship number {i} arrived with {} barrels of oil.\n",
                i * 7
            )
        })
        .collect()
}

#[test]
fn ui_keeps_redrawing_during_prefill() {
    let (_serial, _dir, store, cfg) = in_process(8);
    let mut frames: Vec<Instant> = Vec::new();
    let mut prefill_frames = 0usize;
    let mut ask = vec![Msg::Paste(document(100))];
    ask.extend(
        "How many barrels did ship 42 carry?"
            .chars()
            .map(Msg::Insert),
    );
    ask.push(Msg::Submit);
    let app = drive(&cfg, &store, vec![ask], &mut |app| {
        if let Some(r) = &app.running {
            frames.push(Instant::now());
            prefill_frames += usize::from(r.first_token.is_none());
        }
    });
    let last = app.last.as_ref().expect("the request finished");
    assert!(
        last.prompt_tokens > 1800,
        "prompt of {} tokens",
        last.prompt_tokens
    );
    let gaps: Vec<Duration> = frames.windows(2).map(|w| w[1] - w[0]).collect();
    let max_gap = gaps.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{} frames while busy ({} during prefill), TTFT {:.0} ms, max gap {:?}",
        frames.len(),
        prefill_frames,
        last.ttft_ms,
        max_gap
    );
    assert!(
        prefill_frames >= 3,
        "only {prefill_frames} frames during prefill"
    );
    assert!(
        max_gap < Duration::from_millis(250),
        "the screen froze for {max_gap:?}"
    );
    // The conversation was saved with the answer.
    let saved = store.latest().unwrap().expect("saved");
    assert_eq!(saved.messages.len(), 2);
    assert_eq!(saved.messages[1].role, Role::Assistant);
    assert!(!saved.messages[1].partial);
    assert!(std::fs::read_to_string(store.metrics_path())
        .unwrap()
        .contains("\"ttft_ms\""));
}

/// Runs the event loop on the real engine, sending each batch of `stages` once the model has
/// loaded and the previous batch's request is done, and quitting when the last is done
/// (or failing after three minutes).
fn drive(
    cfg: &AppConfig,
    store: &Store,
    stages: Vec<Vec<Msg>>,
    observe: &mut dyn FnMut(&App),
) -> App {
    let mut app = App::new(cfg, None);
    let (worker, events) = Worker::spawn(cfg);
    let mut stages = stages.into_iter();
    let mut hook = |app: &App| -> Vec<Msg> {
        if let Some(e) = &app.load_error {
            panic!("model did not load: {e}");
        }
        observe(app);
        if app.model.is_none() || app.busy() {
            return vec![];
        }
        stages.next().unwrap_or_else(|| vec![Msg::Quit])
    };
    let mut terminal = Terminal::new(TestBackend::new(160, 50)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(180),
            slimchat::tui::run_loop(
                &mut terminal,
                &mut app,
                &worker,
                events,
                futures_util::stream::pending(),
                store,
                Duration::from_millis(50),
                &mut hook,
            ),
        )
        .await
        .expect("the session finishes in time")
        .unwrap();
    });
    app
}

#[test]
fn a_follow_up_reads_the_whole_document_again() {
    let (_serial, _dir, store, cfg) = in_process(6);
    let mut ask = vec![Msg::Paste(document(140))];
    ask.extend(
        "How many barrels did ship 12 carry?"
            .chars()
            .map(Msg::Insert),
    );
    ask.push(Msg::Submit);
    let follow: Vec<Msg> = ("And ship 120?".chars().map(Msg::Insert))
        .chain([Msg::Submit])
        .collect();
    let mut first: Option<(Vec<usize>, Option<f64>)> = None;
    let app = drive(&cfg, &store, vec![ask, follow], &mut |app| {
        if let Some(l) = app.last.as_ref().filter(|_| first.is_none()) {
            first = Some((l.kept_per_layer.clone(), l.heal_ms));
        }
    });
    // the first answer's prefill pruned the document, and the answer brought the pruned
    // blocks back after its first token
    let (first, heal_ms) = first.expect("the first answer's numbers");
    assert!(first[29] < first[0], "{first:?}");
    assert!(heal_ms.is_some_and(|ms| ms > 0.0), "{heal_ms:?}");
    // the follow-up (over the healed cache) kept every row
    let last = app.last.as_ref().expect("the follow-up finished");
    assert!(last.whole_again, "{last:?}");
    let kept = &last.kept_per_layer;
    assert!(kept.iter().all(|&k| k == kept[0]), "{kept:?}");
    assert!(kept[0] > first[0], "{kept:?} after {first:?}");
    assert_eq!(app.conv.messages.len(), 4);
}

#[test]
fn compare_runs_dense_and_pruned_from_an_empty_cache() {
    let (_serial, _dir, store, cfg) = in_process(6);
    let mut ask = vec![Msg::Paste(document(30))];
    ask.extend("Which ship carried 70 barrels?".chars().map(Msg::Insert));
    ask.push(Msg::Submit);
    let app = drive(&cfg, &store, vec![ask, vec![Msg::Compare]], &mut |_| {});
    assert_eq!(app.conv.messages.len(), 3, "{:?}", app.status);
    let note = app.conv.messages.last().unwrap();
    let c = note.comparison.as_ref().expect("a comparison");
    assert!(c.dense_ttft_ms > 0.0 && c.slim_ttft_ms > 0.0, "{c:?}");
    assert!(!c.dense.is_empty() && !c.slim.is_empty(), "{c:?}");
    eprintln!(
        "compare: dense {:.0} ms, pruned {:.0} ms",
        c.dense_ttft_ms, c.slim_ttft_ms
    );
    let saved = store.latest().unwrap().unwrap();
    assert!(saved.messages[2].comparison.is_some());
}

#[test]
fn tmux_session() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIPPED tmux_session: tmux is not installed");
        return;
    }
    let _serial = serial();
    let _ = common::default_model();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "[chat]\nmax_tokens = 24\n[model]\nthreads = 0\n",
    )
    .unwrap();
    let doc = document(75); // ~1500 tokens
    let doc_path = dir.path().join("doc.txt");
    std::fs::write(&doc_path, &doc).unwrap();
    let tmux = Tmux {
        socket: format!("slimchat-e2e-{}", std::process::id()),
    };
    tmux.start(dir.path(), "");
    tmux.wait("the model to load", 60, |s| s.contains("model   SmolLM2"));

    // Bracketed paste of the document, then the question.
    let doc_str = doc_path.to_str().unwrap();
    assert!(tmux
        .run(&["load-buffer", "-b", "doc", doc_str])
        .status
        .success());
    assert!(tmux
        .run(&["paste-buffer", "-p", "-b", "doc", "-t", "e2e"])
        .status
        .success());
    let chars = slimchat::tui::app::thousands(doc.chars().count());
    tmux.wait("the paste chip", 10, |s| {
        s.contains(&format!("[pasted {chars} chars"))
    });
    tmux.type_text("How many barrels did ship number 12 carry?");
    tmux.enter();
    let s = tmux.wait("the first answer", 90, |s| {
        ttfts(s).len() == 1 && s.contains("state   idle")
    });
    let first = ttfts(&s)[0];
    assert!(first > 0, "TTFT on screen: {first}\n{s}");
    let answer_line = s
        .lines()
        .skip_while(|l| !l.contains("│slimchat"))
        .nth(1)
        .unwrap_or("");
    assert!(
        answer_line
            .trim_matches(|c: char| c == '│' || c.is_whitespace())
            .len()
            > 1,
        "no streamed answer on screen:\n{s}"
    );
    assert!(s.contains("pruned, keep 0.50"), "{s}");

    // Lower the ratio: it shows at once.
    tmux.keys(&["-"]);
    tmux.wait("the new ratio", 10, |s| s.contains("on · keep 0.45"));
    tmux.type_text("And ship number 30?");
    tmux.enter();
    let s = tmux.wait("the second answer", 90, |s| {
        ttfts(s).len() == 2 && s.contains("state   idle")
    });
    assert!(s.contains("keep 0.45"), "{s}");
    eprintln!("TTFTs on screen: {:?}\n{s}", ttfts(&s));

    // Shrink to 20x6: the guard; back to 160x50: the whole screen again.
    assert!(tmux
        .run(&["resize-window", "-t", "e2e", "-x", "20", "-y", "6"])
        .status
        .success());
    tmux.wait("the size guard", 10, |s| s.contains("terminal too"));
    assert!(tmux
        .run(&["resize-window", "-t", "e2e", "-x", "160", "-y", "50"])
        .status
        .success());
    tmux.wait("the full screen", 10, |s| {
        s.contains("Metrics") && ttfts(s).len() == 2
    });

    // Quit (Ctrl+C when idle), then resume.
    tmux.keys(&["C-c"]);
    let until = Instant::now() + Duration::from_secs(15);
    while tmux.alive() {
        assert!(Instant::now() < until, "slimchat did not quit");
        std::thread::sleep(Duration::from_millis(100));
    }
    let store = Store::open(&dir.path().join("data")).unwrap();
    let saved = store.latest().unwrap().expect("the conversation was saved");
    assert_eq!(saved.messages.len(), 4, "{saved:?}");
    assert_eq!(saved.messages[0].attachments[0].text, doc);

    tmux.start(dir.path(), "--resume");
    let s = tmux.wait("the resumed conversation", 60, |s| {
        s.contains("And ship number 30?") && s.contains("model   SmolLM2")
    });
    assert!(
        s.contains("How many barrels did ship number 12 carry?"),
        "{s}"
    );
    assert_eq!(ttfts(&s).len(), 2, "{s}");
    tmux.keys(&["C-c"]);
    let stderr = std::fs::read_to_string(dir.path().join("stderr.txt")).unwrap_or_default();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn killed_mid_answer_keeps_the_partial_answer() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIPPED killed_mid_answer_keeps_the_partial_answer: tmux is not installed");
        return;
    }
    let _serial = serial();
    let _ = common::default_model();
    let dir = tempfile::tempdir().unwrap();
    // an answer that outlasts the 1.5 s below on a fast machine (400 tokens took 1.2-1.5 s)
    std::fs::write(
        dir.path().join("config.toml"),
        "[chat]\nmax_tokens = 2000\n",
    )
    .unwrap();
    let tmux = Tmux {
        socket: format!("slimchat-kill-{}", std::process::id()),
    };
    tmux.start(dir.path(), "");
    tmux.wait("the model to load", 60, |s| s.contains("model   SmolLM2"));
    tmux.type_text("Write a long story about a lighthouse keeper and a storm.");
    tmux.enter();
    tmux.wait("the answer to stream", 60, |s| {
        s.contains("state   decoding")
    });
    std::thread::sleep(Duration::from_millis(1500));
    let screen = tmux.screen();
    assert!(
        screen.contains("state   decoding"),
        "still answering:\n{screen}"
    );
    // SIGKILL: no handler runs, only what was already written survives
    let pid = String::from_utf8_lossy(
        &tmux
            .run(&["display", "-p", "-t", "e2e", "#{pane_pid}"])
            .stdout,
    )
    .trim()
    .to_string();
    assert!(Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap()
        .success());
    let store = Store::open(&dir.path().join("data")).unwrap();
    let saved = store.latest().unwrap().expect("the conversation was saved");
    let answer = saved.messages.last().unwrap();
    assert_eq!(answer.role, Role::Assistant);
    assert!(
        answer.content.split_whitespace().count() >= 3,
        "the partial answer was saved while streaming: {:?}",
        answer.content
    );
}

#[test]
fn typed_paste_then_enter_sends_and_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    if !has_tmux("typed_paste_then_enter_sends_and_files_are_private") {
        return;
    }
    let _serial = serial();
    let _ = common::default_model();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), "[chat]\nmax_tokens = 8\n").unwrap();
    let tmux = Tmux {
        socket: format!("slimchat-typed-{}", std::process::id()),
    };
    // umask 000: a file or directory whose mode was not set at creation would be world-writable
    tmux.start_script(&format!(
        "umask 000; exec {} 2>>'{}'",
        slimchat_command(dir.path()),
        dir.path().join("stderr.txt").display()
    ));
    tmux.wait("the model to load", 60, |s| s.contains("model   SmolLM2"));
    // paste-buffer without -p: no bracketed paste, tmux types the text and turns each line
    // break into Enter (CR), as a terminal without bracketed paste does
    let text = "-Ship 12 carried 84 barrels.\nShip 30 carried 210 barrels.\nHow many barrels did ship 12 carry?";
    let paste = dir.path().join("paste.txt");
    std::fs::write(&paste, text).unwrap();
    assert!(tmux
        .run(&["load-buffer", "-b", "typed", paste.to_str().unwrap()])
        .status
        .success());
    assert!(tmux
        .run(&["paste-buffer", "-b", "typed", "-t", "e2e"])
        .status
        .success());
    let s = tmux.wait("the typed paste in the input", 10, |s| {
        s.contains("│How many barrels did ship 12 carry?")
    });
    assert!(
        !s.contains("│You") && !s.contains("an answer is running"),
        "nothing is sent before Enter:\n{s}"
    );
    assert!(
        s.contains("on · keep 0.50"),
        "the paste's leading '-' is text, not the knob:\n{s}"
    );
    tmux.enter();
    tmux.wait("the answer", 90, |s| {
        ttfts(s).len() == 1 && s.contains("state   idle")
    });
    tmux.type_text("/export");
    tmux.enter();
    tmux.wait("the default export", 10, |s| s.contains("exported to"));
    let named = dir.path().join("named.md");
    tmux.type_text(&format!("/export {}", named.display()));
    tmux.enter();
    tmux.wait("the named export", 10, |s| {
        s.lines()
            .any(|l| l.contains("exported to") && l.contains("named.md"))
    });
    tmux.keys(&["C-c"]);
    wait_exit(&tmux);

    let data = dir.path().join("data");
    let store = Store::open(&data).unwrap();
    let saved = store.latest().unwrap().expect("saved");
    assert_eq!(
        saved.messages.len(),
        2,
        "one question, one answer: {saved:?}"
    );
    assert_eq!(saved.messages[0].content, text, "the paste was sent whole");
    let mut seen = Vec::new();
    let mut stack = vec![data.clone()];
    while let Some(p) = stack.pop() {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        if p.is_dir() {
            assert_eq!(mode, 0o700, "{}", p.display());
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        seen.push(p.strip_prefix(&data).unwrap().display().to_string());
    }
    for want in ["conversations", "exports", "metrics.jsonl", "slimchat.log"] {
        assert!(seen.iter().any(|p| p == want), "{want} in {seen:?}");
    }
    assert!(seen
        .iter()
        .any(|p| p.starts_with("exports/") && p.ends_with(".md")));
    let named_mode = std::fs::metadata(&named).unwrap().permissions().mode() & 0o777;
    assert_eq!(named_mode, 0o600);
}

#[test]
fn a_panic_restores_the_terminal_and_saves_the_conversation() {
    if !has_tmux("a_panic_restores_the_terminal_and_saves_the_conversation") {
        return;
    }
    let _serial = serial();
    let _ = common::default_model();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), "[chat]\nmax_tokens = 400\n").unwrap();
    let tmux = Tmux {
        socket: format!("slimchat-panic-{}", std::process::id()),
    };
    // stderr stays on the terminal: the panic message must be readable there afterwards
    let stty = dir.path().join("stty.txt");
    tmux.start_script(&format!(
        "echo BEFORE; SLIMCHAT_TEST_PANIC=1 RUST_BACKTRACE=0 {}; echo EXIT=$?; stty -a > '{}'; sleep 120",
        slimchat_command(dir.path()),
        stty.display()
    ));
    tmux.wait("the model to load", 60, |s| s.contains("model   SmolLM2"));
    tmux.type_text("Write a long story about a lighthouse keeper.");
    tmux.enter();
    let s = tmux.wait("the exit", 60, |s| s.contains("EXIT="));
    let at = |what: &str| s.find(what).unwrap_or_else(|| panic!("{what} on:\n{s}"));
    // in order, nothing drawn over: the terminal was restored before the message was printed
    assert!(at("BEFORE") < at("panicked at"), "{s}");
    assert!(
        at("panicked at") < at("test panic (SLIMCHAT_TEST_PANIC)"),
        "{s}"
    );
    assert!(at("test panic") < at("conversation saved as"), "{s}");
    assert!(at("conversation saved as") < at("EXIT=1"), "{s}");
    assert!(!s.contains("Metrics"), "the screen is gone:\n{s}");
    let flags = String::from_utf8_lossy(
        &tmux
            .run(&[
                "display",
                "-p",
                "-t",
                "e2e",
                "#{alternate_on} #{cursor_flag} #{mouse_any_flag}",
            ])
            .stdout,
    )
    .trim()
    .to_string();
    assert_eq!(
        flags, "0 1 0",
        "alternate screen off, cursor shown, no mouse capture"
    );
    let until = Instant::now() + Duration::from_secs(5);
    while !stty.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    let modes = std::fs::read_to_string(&stty).unwrap();
    let words: Vec<&str> = modes.split_whitespace().collect();
    for m in ["icanon", "echo", "isig"] {
        assert!(words.contains(&m), "raw mode is off ({m}): {modes}");
    }
    // the answer in memory at the panic, not yet saved by the 250 ms timer, is on disk
    let chars: usize = s
        .split("test panic (SLIMCHAT_TEST_PANIC) with ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the panic message says how long the answer was");
    let store = Store::open(&dir.path().join("data")).unwrap();
    let saved = store.latest().unwrap().expect("the conversation was saved");
    let answer = saved.messages.last().unwrap();
    assert_eq!(answer.role, Role::Assistant);
    assert!(answer.partial);
    assert_eq!(answer.content.chars().count(), chars, "{answer:?}");
    let log = std::fs::read_to_string(store.log_path()).unwrap();
    assert!(log.contains("panic: test panic"), "{log}");
}

#[test]
fn full_context_offers_drop_oldest_and_new_conversation() {
    if !has_tmux("full_context_offers_drop_oldest_and_new_conversation") {
        return;
    }
    let _serial = serial();
    let _ = common::default_model();
    let dir = tempfile::tempdir().unwrap();
    // a 256-token window fills after a few turns; a short paste still becomes a chip
    std::fs::write(
        dir.path().join("config.toml"),
        "[model]\ncontext = 256\n[chat]\nmax_tokens = 8\n[tui]\npaste_chip_chars = 100\n",
    )
    .unwrap();
    let doc: String = (1..=4)
        .map(|d| format!("Day {d}: ship {} came in with {} barrels.\n", d * 3, d * 11))
        .collect();
    let doc_path = dir.path().join("doc.txt");
    std::fs::write(&doc_path, &doc).unwrap();
    let tmux = Tmux {
        socket: format!("slimchat-full-{}", std::process::id()),
    };
    tmux.start(dir.path(), "");
    tmux.wait("the model to load", 60, |s| s.contains("model   SmolLM2"));
    assert!(tmux
        .run(&["load-buffer", "-b", "doc", doc_path.to_str().unwrap()])
        .status
        .success());
    assert!(tmux
        .run(&["paste-buffer", "-p", "-b", "doc", "-t", "e2e"])
        .status
        .success());
    tmux.wait("the paste chip", 10, |s| s.contains("[pasted "));
    let offered = |s: &str| s.contains("leave no room for an answer");
    let mut answers = 0;
    let mut asked = 0;
    let mut s = String::new();
    while !offered(&s) {
        asked += 1;
        assert!(asked <= 15, "no offer after {asked} turns:\n{s}");
        tmux.type_text(&format!(
            "Question {asked}: which ship came in on day {}?",
            asked % 4 + 1
        ));
        tmux.enter();
        s = tmux.wait("an answer or the offer", 60, |s| {
            offered(s) || (ttfts(s).len() > answers && s.contains("state   idle"))
        });
        if !offered(&s) {
            answers = ttfts(&s).len();
        }
    }
    let pending = format!(
        "Question {asked}: which ship came in on day {}?",
        asked % 4 + 1
    );
    assert!(asked >= 3, "the window filled after {asked} turns:\n{s}");
    assert!(s.contains("d: drop the 1 oldest turn"), "{s}");
    assert!(
        s.contains("n: send in a new conversation with the same documents"),
        "{s}"
    );
    assert!(
        s.contains(&format!("│{pending}")),
        "the message waits in the input:\n{s}"
    );

    // Esc: nothing sent, the message stays; Enter offers again
    tmux.keys(&["Escape"]);
    let s = tmux.wait("the offer to close", 10, |s| !offered(s));
    assert!(
        s.contains("not sent: the message is back in the input"),
        "{s}"
    );
    assert!(s.contains(&format!("│{pending}")), "{s}");
    tmux.enter();
    tmux.wait("the offer again", 30, offered);

    // d: the oldest turn is left out, the message sent, the answer streams
    tmux.keys(&["d"]);
    let s = tmux.wait("the answer after the drop", 60, |s| {
        ttfts(s).len() > answers && s.contains("state   idle") && !offered(s)
    });
    assert!(
        s.contains("left the 1 oldest turn out of the model's context"),
        "{s}"
    );

    // the next message overflows again: n starts a new conversation with the document
    let last = "Which ship had 44 barrels?";
    tmux.type_text(last);
    tmux.enter();
    tmux.wait("the offer for the next message", 30, offered);
    tmux.keys(&["n"]);
    let s = tmux.wait("the answer in the new conversation", 60, |s| {
        s.contains("new conversation with 1 document of")
            && ttfts(s).len() == 1
            && s.contains("state   idle")
    });
    assert!(
        s.contains(&format!("┌ {last} ")),
        "the new conversation's title:\n{s}"
    );
    assert!(
        s.contains("[pasted "),
        "the document is in the new conversation:\n{s}"
    );
    assert!(
        !s.contains("Question 1:"),
        "the old turns are not in it:\n{s}"
    );
    tmux.keys(&["C-c"]);
    wait_exit(&tmux);

    let store = Store::open(&dir.path().join("data")).unwrap();
    let all = store.list().unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    let old = store.load(&all[0].id).unwrap();
    let new = store.load(&all[1].id).unwrap();
    // the old conversation: every turn kept, the oldest without the document marked
    assert_eq!(old.messages.len(), 2 * asked, "{old:?}");
    assert_eq!(old.messages[0].attachments[0].text, doc);
    assert!(!old.messages[0].out_of_context);
    assert!(old.messages[2].out_of_context && old.messages[3].out_of_context);
    assert_eq!(old.messages[2 * asked - 2].content, pending);
    assert!(!old.messages[2 * asked - 1].content.is_empty());
    // the new one: the document and the last message, answered
    assert_eq!(new.messages.len(), 2, "{new:?}");
    assert_eq!(new.messages[0].content, last);
    assert_eq!(new.messages[0].attachments[0].text, doc);
    assert!(!new.messages[1].content.is_empty() && !new.messages[1].partial);
    let stderr = std::fs::read_to_string(dir.path().join("stderr.txt")).unwrap_or_default();
    assert!(!stderr.contains("panicked"), "{stderr}");
}
