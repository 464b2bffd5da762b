//! What slimchat keeps on disk, without a model: files private from their creation (0600 /
//! 0700, under a umask that would allow anything), an existing open data dir tightened with a
//! one-line note, damaged conversation files listed and left alone, SIGKILL at random moments
//! during 100 saves of a streaming answer (every file afterwards is the old or the new version),
//! and a full disk (RLIMIT_FSIZE) that shows one line, keeps the conversation in memory and saves
//! it once space returns.
//!
//! The kill and the file-size tests run their writer in a child: this test binary run again
//! with `SLIMCHAT_TEST_CHILD` set, so the limit and the kills touch nothing else.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ratatui::backend::TestBackend;
use ratatui::Terminal;

use slimchat::config::AppConfig;
use slimchat::tui::app::App;
use slimchat::tui::saver::Saver;
use slimchat::tui::store::{Attachment, ChatMessage, Conversation, Role, Store, TurnMetrics};

const CHILD_ENV: &str = "SLIMCHAT_TEST_CHILD";
const DIR_ENV: &str = "SLIMCHAT_TEST_CHILD_DIR";

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every path under `root` (itself included) with its mode.
fn walk(root: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = vec![(root.to_path_buf(), mode(root))];
    if root.is_dir() {
        for e in std::fs::read_dir(root).unwrap() {
            out.extend(walk(&e.unwrap().path()));
        }
    }
    out
}

fn assert_private(root: &Path) {
    for (p, m) in walk(root) {
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(m, want, "{} is {m:o}", p.display());
    }
}

/// Runs this test binary again as the child of `test`, with `role` in the environment.
fn child(test: &str, role: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, role)
        .env(DIR_ENV, dir);
    cmd
}

fn child_role() -> Option<(String, PathBuf)> {
    let role = std::env::var(CHILD_ENV).ok()?;
    Some((role, PathBuf::from(std::env::var_os(DIR_ENV)?)))
}

fn conversation_with_document(id: &str, doc_bytes: usize) -> Conversation {
    let mut conv = Conversation::new(String::new());
    conv.id = id.into();
    let mut user = ChatMessage::new(Role::User, "What does the log say?");
    user.attachments.push(Attachment {
        label: "pasted".into(),
        text: "The lamp was lit at dusk. ".repeat(doc_bytes / 26 + 1),
    });
    conv.messages.push(user);
    let mut answer = ChatMessage::new(Role::Assistant, "");
    answer.partial = true;
    conv.messages.push(answer);
    conv
}

/// The streamed answer after `n` tokens.
fn answer_after(n: usize) -> String {
    (1..=n).map(|i| format!(" w{i}")).collect()
}

#[test]
fn files_are_private_from_creation() {
    // with umask 0, anything not set at creation would come out 0666 / 0777
    unsafe { libc::umask(0) };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = Store::open(&data).unwrap();
    assert!(store.note.is_none(), "a new data dir needs no tightening");
    let conv = conversation_with_document("0000000000000-00001", 1000);
    store.save(&conv).unwrap();
    store.save(&conv).unwrap();
    store
        .append_metrics(&serde_json::json!({"ttft_ms": 1}))
        .unwrap();
    store.log("a line");
    let default = store.default_export_path(&conv.id);
    store.export(&conv, &default).unwrap();
    let named = dir.path().join("named.md");
    store.export(&conv, &named).unwrap();
    let spill =
        slimchat::backend::spill_file::SpillFile::create(&data.join("kv-spill"), 4096).unwrap();
    let names: Vec<_> = walk(&data)
        .iter()
        .map(|(p, _)| p.strip_prefix(&data).unwrap().display().to_string())
        .collect();
    for want in [
        "conversations",
        "conversations/0000000000000-00001.json",
        "metrics.jsonl",
        "slimchat.log",
        "exports/0000000000000-00001.md",
        "kv-spill",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    assert_private(&data);
    assert_eq!(mode(&named), 0o600, "an export holds the pasted documents");
    drop(spill);
}

#[test]
fn an_open_data_dir_is_tightened_at_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let conv_dir = data.join("conversations");
    std::fs::create_dir_all(&conv_dir).unwrap();
    let conv = conversation_with_document("0000000000000-00002", 100);
    std::fs::write(
        conv_dir.join("0000000000000-00002.json"),
        serde_json::to_vec(&conv).unwrap(),
    )
    .unwrap();
    std::fs::write(data.join("metrics.jsonl"), "{}\n").unwrap();
    for (p, m) in [
        (&data, 0o755),
        (&conv_dir, 0o755),
        (&conv_dir.join("0000000000000-00002.json"), 0o644),
        (&data.join("metrics.jsonl"), 0o666),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    let list = || {
        Command::new(env!("CARGO_BIN_EXE_slimchat"))
            .arg("--list")
            .env("SLIMCHAT_DATA_DIR", &data)
            .env("SLIMCHAT_CONFIG", "/nonexistent")
            .output()
            .unwrap()
    };
    let out = list();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("made 4 path(s)") && stderr.contains("private"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("0000000000000-00002"));
    assert_private(&data);
    let log = std::fs::read_to_string(data.join("slimchat.log")).unwrap();
    assert!(log.contains("made 4 path(s)"), "{log}");
    // the second start finds nothing to change and says nothing
    let again = list();
    assert!(again.stderr.is_empty(), "{again:?}");
}

#[test]
fn a_saved_conversation_reads_back_equal_to_the_last_bit() {
    // the chat screen checks at quit that the file holds what it showed; an answer's timings
    // are f64s that a float parser without exact rounding reads back one unit off
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("data")).unwrap();
    let mut conv = conversation_with_document("0000000000000-00002", 100);
    let answer = conv.messages.last_mut().unwrap();
    answer.partial = false;
    answer.content = "At dusk.".into();
    answer.metrics = Some(TurnMetrics {
        ttft_ms: 994.1414234726625,
        prefill_tok_s: 122.71076486622357,
        decode_tok_s: 150.13880600000002,
        prompt_tokens: 33,
        generated_tokens: 4,
        kv_bytes: 746_640,
        slim: true,
        keep_ratio: 0.5,
        stop_reason: "end_of_turn".into(),
    });
    store.save(&conv).unwrap();
    assert_eq!(store.load(&conv.id).unwrap(), conv);
}

#[test]
fn damaged_conversations_are_listed_and_never_touched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = Store::open(&data).unwrap();
    let good = conversation_with_document("0000000000000-00003", 100);
    store.save(&good).unwrap();
    let whole = std::fs::read(store.conversation_path(&good.id)).unwrap();
    let truncated = &whole[..whole.len() / 2];
    let damaged = [
        ("0000000000000-00004", truncated.to_vec()),
        ("0000000000000-00005", b"\x00\xffnot json at all".to_vec()),
        ("0000000000000-00006", b"{\"id\": 7}".to_vec()),
    ];
    for (id, bytes) in &damaged {
        std::fs::write(store.conversation_path(id), bytes).unwrap();
    }
    // a leftover of a killed save by a process that is gone
    let leftover = data.join("conversations/.0000000000000-00003.json.4000000000.0.tmp");
    std::fs::write(&leftover, truncated).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_slimchat"))
        .arg("--list")
        .env("SLIMCHAT_DATA_DIR", &data)
        .env("SLIMCHAT_CONFIG", "/nonexistent")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        4,
        "three damaged and one good, no leftover: {stdout}"
    );
    assert!(lines[0].starts_with("0000000000000-00003") && lines[0].contains("2 messages"));
    for (line, (id, _)) in lines[1..].iter().zip(&damaged) {
        assert!(
            line.starts_with(id) && line.contains("damaged (left as it is)"),
            "{line}"
        );
    }
    assert!(!leftover.exists(), "a dead writer's temp file is removed");
    // Saving (the good one again, and a new one) and reopening leave every damaged file as it was.
    let store = Store::open(&data).unwrap();
    store.save(&good).unwrap();
    store
        .save(&conversation_with_document("9999999999999-00001", 10))
        .unwrap();
    for (id, bytes) in &damaged {
        assert_eq!(&std::fs::read(store.conversation_path(id)).unwrap(), bytes);
    }
    let list = store.list().unwrap();
    assert_eq!(list.iter().filter(|s| s.damaged.is_some()).count(), 3);
}

/// Child of `sigkill_during_saves_leaves_the_old_or_the_new_version`: continues the saved
/// answer one token per save, printing `begin N` before and `done N` after each, until killed.
fn saving_child(dir: &Path) {
    let store = Store::open(dir).unwrap();
    let mut conv = store
        .latest()
        .unwrap()
        .unwrap_or_else(|| conversation_with_document("0000000000000-00007", 400_000));
    let mut n = conv.messages[1].content.split_whitespace().count();
    let mut out = std::io::stdout().lock();
    loop {
        n += 1;
        conv.messages[1].content.push_str(&format!(" w{n}"));
        writeln!(out, "begin {n}").unwrap();
        out.flush().unwrap();
        store.save(&conv).unwrap();
        writeln!(out, "done {n}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn sigkill_during_saves_leaves_the_old_or_the_new_version() {
    if let Some((role, dir)) = child_role() {
        assert_eq!(role, "saves");
        return saving_child(&dir);
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut rng = 0x5eed_1234_abcd_0001u64; // fixed seed: the same kill times every run
    let (mut mid_save, mut left_new, mut temps_seen, mut saves) = (0, 0, 0, 0);
    for round in 0..100 {
        let mut proc = child(
            "sigkill_during_saves_leaves_the_old_or_the_new_version",
            "saves",
            &data,
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        let mut lines = BufReader::new(proc.stdout.take().unwrap()).lines();
        // the test harness prints its own lines first
        let first = lines
            .by_ref()
            .map_while(|l| l.ok())
            .find(|l| l.starts_with("begin "))
            .expect("the child starts saving");
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_micros(rng % 30_000));
        proc.kill().unwrap(); // SIGKILL
        proc.wait().unwrap();
        let first_begin: usize = first["begin ".len()..].parse().unwrap();
        let mut last_begin = 0;
        let mut last_done = first_begin - 1; // the version the child started from
        for line in std::iter::once(first).chain(lines.map_while(|l| l.ok())) {
            let Some((what, Ok(n))) = line.split_once(' ').map(|(w, n)| (w, n.parse::<usize>()))
            else {
                continue;
            };
            match what {
                "begin" => last_begin = n,
                _ => last_done = n,
            }
        }
        saves += (last_done + 1).saturating_sub(first_begin);
        let conv_dir = data.join("conversations");
        temps_seen += std::fs::read_dir(&conv_dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tmp")
            })
            .count();
        // Store::open also removes the dead child's temp file
        let store = Store::open(&data).unwrap();
        let ids = store.ids().unwrap();
        if ids.is_empty() && last_done == 0 {
            mid_save += 1; // killed inside the very first save: there is no old version yet
            continue;
        }
        assert_eq!(
            ids,
            ["0000000000000-00007"],
            "round {round}: only the conversation"
        );
        let conv = store
            .load(&ids[0])
            .unwrap_or_else(|e| panic!("round {round}: the file does not parse: {e}"));
        let n = conv.messages[1].content.split_whitespace().count();
        assert_eq!(conv.messages[1].content, answer_after(n), "round {round}");
        assert!(
            n == last_done || (n == last_begin && last_begin == last_done + 1),
            "round {round}: file at {n}, child began {last_begin} and finished {last_done}"
        );
        if last_begin > last_done {
            mid_save += 1;
            left_new += usize::from(n == last_begin);
        }
    }
    let leftovers = std::fs::read_dir(data.join("conversations"))
        .unwrap()
        .count();
    assert_eq!(leftovers, 1, "no temp file survives the next start");
    eprintln!(
        "100 SIGKILLs: {mid_save} inside a save ({left_new} of them after its rename: the new \
         version; {} the old), {} between saves; {temps_seen} temp files left by kills, removed \
         at the next start; about {saves} saves finished in all; every file parsed and was the \
         old or the new version",
        mid_save - left_new,
        100 - mid_save
    );
    assert!(
        mid_save >= 10,
        "the kills reached the middle of a save: {mid_save}"
    );
}

/// Child of `a_full_disk_shows_one_line_and_saves_when_space_returns`.
fn full_disk_child(dir: &Path) {
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let store = Store::open(dir).unwrap();
    let mut app = App::new(&AppConfig::default(), None);
    app.conv = conversation_with_document("0000000000000-00008", 100);
    app.conv.messages[1].content = "The lamp was lit at dusk.".into();
    app.conv.messages[1].partial = false;
    let mut saver = Saver::default();
    assert!(saver.save(&mut app, &store), "saved before the disk fills");
    let path = store.conversation_path(&app.conv.id);
    let before = std::fs::read(&path).unwrap();

    // The "disk" now holds 64 KiB per file; the next message carries a 300 KB document.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim) };
    let hard = lim.rlim_max;
    lim.rlim_cur = 64 << 10;
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) }, 0);
    let next = conversation_with_document("x", 300_000);
    app.conv.messages.extend(next.messages);
    app.conv.messages[3].content = "It was".into();
    app.dirty = true;
    assert!(!saver.save(&mut app, &store), "the save cannot fit");
    app.conv.messages[3].content.push_str(" lit at dusk.");
    app.dirty = true;
    assert!(!saver.save(&mut app, &store));

    // One line on screen, one in the log; the old file whole; the conversation in memory.
    let status = app.status.clone().expect("a status line");
    assert!(status.error && !status.text.contains('\n'), "{status:?}");
    assert!(status.text.contains("cannot save"), "{status:?}");
    let mut term = Terminal::new(TestBackend::new(120, 36)).unwrap();
    term.draw(|f| {
        slimchat::tui::render::draw(f, &app);
    })
    .unwrap();
    let buf = term.backend().buffer().clone();
    let rows = (0..buf.area.height)
        .filter(|&y| {
            let row: String = (0..buf.area.width).map(|x| buf[(x, y)].symbol()).collect();
            row.contains("cannot save the conversation")
        })
        .count();
    assert_eq!(rows, 1, "one line on the screen");
    let log = std::fs::read_to_string(store.log_path()).unwrap();
    let failed: Vec<&str> = log.lines().filter(|l| l.contains("failed")).collect();
    assert_eq!(
        failed.len(),
        1,
        "one line in the log, not one per attempt: {log}"
    );
    assert!(failed[0].contains("File too large"), "{}", failed[0]);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the old version is whole"
    );
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temp file left: {names:?}");
    assert_eq!(app.conv.messages.len(), 4);

    // Space returns: the next attempt (a tick after the retry interval) saves it all.
    lim.rlim_cur = hard;
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) }, 0);
    saver.retry = Duration::ZERO;
    saver.tick(&mut app, &store);
    assert!(!saver.failing());
    assert_eq!(store.load(&app.conv.id).unwrap(), app.conv);
    let status = app.status.clone().unwrap();
    assert!(
        !status.error && status.text.contains("saved again"),
        "{status:?}"
    );
    let log = std::fs::read_to_string(store.log_path()).unwrap();
    assert!(log.contains("after 2 failed attempt(s)"), "{log}");
    println!("child passed");
}

#[test]
fn a_full_disk_shows_one_line_and_saves_when_space_returns() {
    if let Some((role, dir)) = child_role() {
        assert_eq!(role, "fsize");
        return full_disk_child(&dir);
    }
    let dir = tempfile::tempdir().unwrap();
    let out = child(
        "a_full_disk_shows_one_line_and_saves_when_space_returns",
        "fsize",
        &dir.path().join("data"),
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("child passed"),
        "child: {out:?}\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
