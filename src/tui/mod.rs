//! The chat screen (`slimchat` with no subcommand): terminal setup and teardown (restored on
//! every exit path, panics included: the hook restores the terminal before the message is
//! printed, and the conversation is saved after the unwind is caught), the tokio event loop
//! that joins terminal input, engine events and a redraw tick, and the effects `update` asks
//! for (engine commands, saves, reads).

pub mod agreement;
pub mod app;
pub mod editor;
pub mod input;
pub mod paste_burst;
pub mod remote_worker;
pub mod render;
pub mod saver;
pub mod store;
pub mod tokens;
pub mod turns;
pub mod worker;

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossterm::event::{
    DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture, Event,
    EventStream, KeyboardEnhancementFlags, PopKeyboardEnhancementFlags,
    PushKeyboardEnhancementFlags,
};
use crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use futures_util::{FutureExt, Stream, StreamExt};
use ratatui::backend::{Backend, CrosstermBackend};
use ratatui::Terminal;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::config::AppConfig;
use crate::{Error, Result};

use app::{update, App, Effect, Msg};
use saver::Saver;
use store::Store;
use worker::{Worker, WorkerEvent};

/// Test only: when set, the chat screen panics at the first frame drawn while an answer streams
/// with text not saved yet (tests/tui_e2e.rs checks the terminal is restored, the message
/// printed and the conversation saved, unsaved text included).
pub const TEST_PANIC_ENV: &str = "SLIMCHAT_TEST_PANIC";

/// How the screen starts.
#[derive(Debug, Clone, Default)]
pub struct TuiOptions {
    /// `Some("latest")` or `Some(id)`: reopen a saved conversation.
    pub resume: Option<String>,
}

/// Input events taken without a redraw once one has arrived (the keys already waiting).
const INPUT_BURST: usize = 4096;

/// Opens the chat screen and runs it until the person quits.
pub fn run(cfg: &AppConfig, opts: &TuiOptions) -> Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(Error::Usage(
            "the chat screen needs a terminal; for a one-shot answer use `slimchat run --prompt \"...\"`".into(),
        ));
    }
    let store = Store::open_default()?;
    store.log(&format!("start: model {}", cfg.model.source));
    let note = store.note.clone();
    let conv = match opts.resume.as_deref() {
        None => None,
        Some("latest") => store.latest()?,
        Some(id) => Some(store.load(id)?),
    };
    let resumed = conv.as_ref().map(|c| c.id.clone());
    let mut app = App::new(cfg, conv);
    if opts.resume.is_some() && resumed.is_none() {
        update(
            &mut app,
            Msg::IoError("no saved conversation to resume: starting a new one".into()),
        );
    }
    if let Some(note) = note {
        update(&mut app, Msg::Notice(note));
    }
    let (worker, events) = Worker::spawn(cfg);

    install_panic_hook();
    let guard = TerminalGuard::enter(cfg.tui.mouse)?;
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let tick = Duration::from_millis(cfg.tui.tick_ms);
    let test_panic = std::env::var_os(TEST_PANIC_ENV).is_some();
    let run = std::panic::AssertUnwindSafe(|| {
        rt.block_on(run_loop(
            &mut terminal,
            &mut app,
            &worker,
            events,
            EventStream::new(),
            &store,
            tick,
            &mut |app| {
                if test_panic {
                    panic_if_unsaved(app);
                }
                Vec::new()
            },
        ))
    });
    let result = std::panic::catch_unwind(run);
    drop(guard);
    let result = result.unwrap_or_else(|payload| {
        // The hook has restored the terminal and printed the panic; keep the conversation.
        let what = crate::error::panic_message(payload.as_ref());
        store.log(&format!("panic: {what}"));
        if !app.conv.messages.is_empty() {
            if let Err(e) = store.save(&app.conv) {
                store.log(&format!("save after the panic failed: {e}"));
            }
        }
        Err(Error::Engine(format!("the chat screen stopped: {what}")))
    });
    drop(worker);
    store.log(&format!("quit: conversation {}", app.conv.id));
    if !app.conv.messages.is_empty() {
        // Say what is on disk, read back: a save can fail at the end too (a full disk).
        let id = &app.conv.id;
        if store.load(id).is_ok_and(|c| c == app.conv) {
            eprintln!("slimchat: conversation saved as {id} (slimchat --resume {id})");
        } else {
            eprintln!(
                "slimchat: the last changes to conversation {id} could not be saved (see {})",
                store.log_path().display()
            );
        }
    }
    result
}

/// The event loop, generic over the terminal backend and the input stream so tests can drive
/// it. After each draw `hook` sees the state and may inject messages (tests use it to script
/// a session and to time frames; the real screen's does nothing unless [`TEST_PANIC_ENV`] is set).
#[allow(clippy::too_many_arguments)]
pub async fn run_loop<B, S>(
    terminal: &mut Terminal<B>,
    app: &mut App,
    worker: &Worker,
    mut events: UnboundedReceiver<WorkerEvent>,
    mut input: S,
    store: &Store,
    tick: Duration,
    hook: &mut dyn FnMut(&App) -> Vec<Msg>,
) -> Result<()>
where
    B: Backend,
    S: Stream<Item = std::io::Result<Event>> + Unpin,
{
    let start = Instant::now();
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut saver = Saver::default();
    let mut draw_now = true;
    let mut changed = false;
    let mut input_open = true;
    let mut events_open = true;
    loop {
        if draw_now {
            let mut view = app.view;
            terminal.draw(|f| view = render::draw(f, app))?;
            app.view = view;
            for msg in hook(app) {
                dispatch(app, msg, worker, store, &mut saver);
            }
            draw_now = false;
            changed = false;
        }
        if app.quit {
            break;
        }
        tokio::select! {
            ev = input.next(), if input_open => match ev {
                Some(Ok(ev)) => {
                    // Take the keys that have already arrived, so that text a terminal types
                    // (a paste without bracketed paste: one event per character) costs one frame
                    // per burst, not one per character, and so that each key knows whether
                    // more were waiting behind it (see `paste_burst`).
                    let mut batch = vec![ev];
                    while batch.len() < INPUT_BURST {
                        match input.next().now_or_never() {
                            Some(Some(Ok(ev))) => batch.push(ev),
                            Some(Some(Err(e))) => store.log(&format!("input error: {e}")),
                            Some(None) => {
                                input_open = false;
                                break;
                            }
                            None => break,
                        }
                    }
                    let mut keys_before = 0;
                    for (i, ev) in batch.iter().enumerate() {
                        let more = matches!(batch.get(i + 1), Some(Event::Key(_)));
                        if let Some(msg) = input::map_event(ev, app) {
                            let msg = paste_burst::filter(ev, msg, keys_before, more);
                            dispatch(app, msg, worker, store, &mut saver);
                        }
                        keys_before += usize::from(matches!(ev, Event::Key(_)));
                        if app.quit {
                            break;
                        }
                    }
                    draw_now = true;
                }
                Some(Err(e)) => store.log(&format!("input error: {e}")),
                None => input_open = false,
            },
            ev = events.recv(), if events_open => match ev {
                Some(ev) => {
                    dispatch(app, Msg::Worker(ev), worker, store, &mut saver);
                    // Take what else has arrived, so a burst costs one frame.
                    while let Ok(ev) = events.try_recv() {
                        dispatch(app, Msg::Worker(ev), worker, store, &mut saver);
                    }
                    changed = true;
                }
                None => events_open = false,
            },
            _ = ticker.tick() => {
                dispatch(app, Msg::Tick(start.elapsed()), worker, store, &mut saver);
                draw_now = changed || app.busy() || saver.failing();
                saver.tick(app, store);
            }
        }
    }
    saver.save(app, store);
    Ok(())
}

/// Applies a message and carries out its effects (which may produce further messages).
pub fn dispatch(app: &mut App, msg: Msg, worker: &Worker, store: &Store, saver: &mut Saver) {
    let mut queue = vec![msg];
    while let Some(msg) = queue.pop() {
        if let Msg::Worker(WorkerEvent::Error(e)) = &msg {
            store.log(&format!("engine error: {e}"));
        }
        for effect in update(app, msg) {
            match effect {
                Effect::Engine(cmd) => {
                    store.log(&format!("engine command: {}", command_name(&cmd)));
                    worker.send(cmd);
                }
                Effect::Save => {
                    saver.save(app, store);
                }
                Effect::Metrics(mut record) => {
                    record["ts"] = unix_secs().into();
                    if let Err(e) = store.append_metrics(&record) {
                        queue.push(Msg::IoError(format!("cannot write metrics.jsonl: {e}")));
                    }
                }
                Effect::ReadFile(path) => {
                    let result = read_text(&path);
                    queue.push(Msg::FileRead { path, result });
                }
                Effect::Export(path) => {
                    let path = path.unwrap_or_else(|| store.default_export_path(&app.conv.id));
                    let result = store.export(&app.conv, &path).map_err(|e| e.to_string());
                    queue.push(Msg::Exported { path, result });
                }
            }
        }
    }
}

fn command_name(cmd: &worker::EngineCmd) -> &'static str {
    use worker::EngineCmd::*;
    match cmd {
        Generate(_) => "generate",
        Cancel => "cancel",
        SetPruning(_) => "set pruning",
        Reset => "reset",
        Compare(..) => "compare",
        Quit => "quit",
    }
}

/// Test only (see [`TEST_PANIC_ENV`]): panics while an answer streams with unsaved text.
fn panic_if_unsaved(app: &App) {
    let Some(answer) = app.conv.messages.last().filter(|m| m.partial) else {
        return;
    };
    let chars = answer.content.chars().count();
    if app.dirty && chars >= 20 {
        panic!("test panic ({TEST_PANIC_ENV}) with {chars} chars of the answer in memory");
    }
}

fn unix_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// A file's text, or a one-line reason it cannot be attached.
pub fn read_text(path: &Path) -> std::result::Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "{} is not valid UTF-8 (invalid byte at offset {}); nothing attached",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// True while the terminal is set up for the screen, so that it is restored once: leaving the
/// alternate screen a second time would move the cursor back over what was printed since.
static TERMINAL_TAKEN: AtomicBool = AtomicBool::new(false);

/// Raw mode, alternate screen, bracketed paste and mouse capture for its lifetime.
struct TerminalGuard;

impl TerminalGuard {
    fn enter(mouse: bool) -> Result<Self> {
        enable_raw_mode()?;
        TERMINAL_TAKEN.store(true, Ordering::SeqCst);
        let guard = TerminalGuard; // from here on, Drop restores
        let mut out = std::io::stdout();
        crossterm::execute!(out, EnterAlternateScreen, EnableBracketedPaste)?;
        if mouse {
            crossterm::execute!(out, EnableMouseCapture)?;
        }
        // Lets terminals that know the kitty protocol report Shift+Enter; others ignore it.
        let _ = crossterm::execute!(
            out,
            PushKeyboardEnhancementFlags(KeyboardEnhancementFlags::DISAMBIGUATE_ESCAPE_CODES)
        );
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Puts the terminal back as it was; safe to call more than once (only the first call after
/// [`TerminalGuard::enter`] does anything).
fn restore_terminal() {
    if !TERMINAL_TAKEN.swap(false, Ordering::SeqCst) {
        return;
    }
    let mut out = std::io::stdout();
    let _ = crossterm::execute!(
        out,
        PopKeyboardEnhancementFlags,
        DisableMouseCapture,
        DisableBracketedPaste,
        LeaveAlternateScreen,
        crossterm::cursor::Show
    );
    let _ = disable_raw_mode();
    let _ = out.flush();
}

/// Restores the terminal before the default hook prints the panic.
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_terminal();
        previous(info);
    }));
}

/// `slimchat --list`: saved conversations, newest last.
pub fn list(out: &mut dyn Write) -> Result<()> {
    let store = Store::open_default()?;
    if let Some(note) = &store.note {
        eprintln!("slimchat: {note}");
    }
    let all = store.list()?;
    if all.is_empty() {
        writeln!(out, "no saved conversations in {}", store.dir.display())?;
    }
    for s in all {
        match &s.damaged {
            None => writeln!(out, "{}  {:>3} messages  {}", s.id, s.messages, s.title)?,
            Some(why) => writeln!(out, "{}  damaged (left as it is): {why}", s.id)?,
        }
    }
    Ok(())
}
