//! The chat screen (`slimchat` with no subcommand): terminal setup and teardown (restored on
//! every exit path, panics included), the tokio event loop that joins terminal input, engine
//! events and a redraw tick, and the effects `update` asks for (engine commands, saves, reads).

pub mod agreement;
pub mod app;
pub mod editor;
pub mod input;
pub mod render;
pub mod store;
pub mod tokens;
pub mod worker;

use std::io::Write;
use std::path::Path;
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
use store::Store;
use worker::{Worker, WorkerEvent};

/// How the screen starts.
#[derive(Debug, Clone, Default)]
pub struct TuiOptions {
    /// `Some("latest")` or `Some(id)`: reopen a saved conversation.
    pub resume: Option<String>,
}

/// Saves while an answer streams happen at most this often.
const SAVE_INTERVAL: Duration = Duration::from_millis(250);
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
    let (worker, events) = Worker::spawn(cfg);

    install_panic_hook();
    let guard = TerminalGuard::enter(cfg.tui.mouse)?;
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let tick = Duration::from_millis(cfg.tui.tick_ms);
    let result = rt.block_on(run_loop(
        &mut terminal,
        &mut app,
        &worker,
        events,
        EventStream::new(),
        &store,
        tick,
        &mut |_| Vec::new(),
    ));
    drop(guard);
    drop(worker);
    store.log(&format!("quit: conversation {}", app.conv.id));
    if !app.conv.messages.is_empty() {
        eprintln!(
            "slimchat: conversation saved as {} (slimchat --resume {})",
            app.conv.id, app.conv.id
        );
    }
    result
}

/// The event loop, generic over the terminal backend and the input stream so tests can drive
/// it. After each draw `hook` sees the state and may inject messages (tests use it to script
/// a session and to time frames; the real screen passes a no-op).
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
    let mut last_save = Instant::now();
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
                dispatch(app, msg, worker, store);
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
                    take_input(app, &ev, worker, store);
                    // Take the keys that have already arrived, so that text a terminal types
                    // (a paste without bracketed paste: one event per character) costs one frame
                    // per burst, not one per character.
                    for _ in 0..INPUT_BURST {
                        match input.next().now_or_never() {
                            Some(Some(Ok(ev))) => take_input(app, &ev, worker, store),
                            Some(Some(Err(e))) => store.log(&format!("input error: {e}")),
                            Some(None) => {
                                input_open = false;
                                break;
                            }
                            None => break,
                        }
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
                    dispatch(app, Msg::Worker(ev), worker, store);
                    // Take what else has arrived, so a burst costs one frame.
                    while let Ok(ev) = events.try_recv() {
                        dispatch(app, Msg::Worker(ev), worker, store);
                    }
                    changed = true;
                }
                None => events_open = false,
            },
            _ = ticker.tick() => {
                dispatch(app, Msg::Tick(start.elapsed()), worker, store);
                draw_now = changed || app.busy();
                if app.dirty && last_save.elapsed() >= SAVE_INTERVAL {
                    save(app, store);
                    app.dirty = false;
                    last_save = Instant::now();
                }
            }
        }
    }
    save(app, store);
    Ok(())
}

/// Applies one input event (a key, a paste, a resize, the mouse).
fn take_input(app: &mut App, ev: &Event, worker: &Worker, store: &Store) {
    if let Some(msg) = input::map_event(ev, app) {
        dispatch(app, msg, worker, store);
    }
}

/// Applies a message and carries out its effects (which may produce further messages).
pub fn dispatch(app: &mut App, msg: Msg, worker: &Worker, store: &Store) {
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
                Effect::Save => save(app, store),
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
                    let result =
                        store::export_markdown(&app.conv, &path).map_err(|e| e.to_string());
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

fn save(app: &mut App, store: &Store) {
    if app.conv.messages.is_empty() {
        return;
    }
    if let Err(e) = store.save(&app.conv) {
        store.log(&format!("save failed: {e}"));
        update(
            app,
            Msg::IoError(format!("cannot save the conversation: {e}")),
        );
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

/// Raw mode, alternate screen, bracketed paste and mouse capture for its lifetime.
struct TerminalGuard;

impl TerminalGuard {
    fn enter(mouse: bool) -> Result<Self> {
        enable_raw_mode()?;
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

/// Puts the terminal back as it was; safe to call more than once.
fn restore_terminal() {
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
    let all = store.list()?;
    if all.is_empty() {
        writeln!(out, "no saved conversations in {}", store.dir.display())?;
    }
    for s in all {
        writeln!(out, "{}  {:>3} messages  {}", s.id, s.messages, s.title)?;
    }
    Ok(())
}
