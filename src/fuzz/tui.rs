//! The chat screen under random input: the bytes are a program of keys (through the real key
//! map), pastes (odd Unicode, control characters, huge texts), resizes (down to 0 x 0), slash
//! commands, clock ticks and engine events, fed to `update`, with every state drawn on
//! ratatui's TestBackend. No I/O, no model: file reads and exports are answered from the bytes.

use std::path::PathBuf;
use std::time::Duration;

use crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers, MouseEvent, MouseEventKind};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

use super::targets::Check;
use crate::config::AppConfig;
use crate::engine::{EngineEvent, GenStats, PrefillKind, StopReason};
use crate::model::source::DownloadProgress;
use crate::tui::app::{update, App, Effect, Msg};
use crate::tui::input::map_event;
use crate::tui::render;
use crate::tui::store::Conversation;
use crate::tui::worker::WorkerEvent;

/// Texts that break naive width and cursor arithmetic.
const ODD: &[&str] = &[
    "\u{0}",
    "\u{7}\u{8}\u{1b}[2J\u{1b}]0;title\u{7}",
    "\r\n\r",
    "\t\t",
    "e\u{301}\u{301}\u{301}",
    "\u{200b}\u{200d}\u{2060}\u{feff}",
    "\u{202e}abc\u{202c}",
    "\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}",
    "中文字符全角",
    "\u{FFFD}\u{FFFF}\u{10FFFF}",
    "\u{85}\u{2028}\u{2029}",
    "/read /etc/passwd",
    "/export /tmp/x.md",
    "/system ",
    "/clear",
    "/regen",
    "/compare",
    "/help",
    "/nope",
    "/",
];

/// Reads the program; past its end every read is 0.
struct Prog<'a> {
    b: &'a [u8],
    at: usize,
}

impl Prog<'_> {
    fn byte(&mut self) -> u8 {
        let v = self.b.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        v
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn done(&self) -> bool {
        self.at >= self.b.len()
    }
    /// A text: raw bytes (lossy UTF-8), an odd one, or a huge repetition.
    fn text(&mut self) -> String {
        match self.byte() % 8 {
            0..=3 => {
                let from = self.at.min(self.b.len());
                let n = (self.byte() as usize).min(self.b.len().saturating_sub(from));
                let s = String::from_utf8_lossy(&self.b[from..from + n]).into_owned();
                self.at += n;
                s
            }
            4 | 5 => ODD[self.byte() as usize % ODD.len()].to_string(),
            6 => {
                let unit = ODD[self.byte() as usize % ODD.len()];
                unit.repeat(1 + self.u16() as usize % 20_000)
            }
            _ => "The lamp was lit at dusk and the fog came in.\n"
                .repeat(1 + self.u16() as usize % 8192),
        }
    }
    fn number(&mut self) -> usize {
        match self.byte() % 4 {
            0 => self.byte() as usize,
            1 => self.u16() as usize,
            2 => [0, 1, usize::MAX, usize::MAX / 2, u32::MAX as usize][self.byte() as usize % 5],
            _ => self.u16() as usize * 1000,
        }
    }
}

fn key(p: &mut Prog) -> Event {
    let code = match p.byte() % 24 {
        0..=7 => KeyCode::Char(char::from(p.byte())),
        8 => KeyCode::Char(char::from_u32(u32::from(p.u16())).unwrap_or('\u{FFFD}')),
        9 => KeyCode::Enter,
        10 => KeyCode::Backspace,
        11 => KeyCode::Delete,
        12 => KeyCode::Left,
        13 => KeyCode::Right,
        14 => KeyCode::Up,
        15 => KeyCode::Down,
        16 => KeyCode::Home,
        17 => KeyCode::End,
        18 => KeyCode::PageUp,
        19 => KeyCode::PageDown,
        20 => KeyCode::Tab,
        21 => KeyCode::Esc,
        22 => KeyCode::F(p.byte() % 13),
        _ => KeyCode::BackTab,
    };
    let mods = KeyModifiers::from_bits_truncate(p.byte() & 0x0f);
    Event::Key(KeyEvent::new(code, mods))
}

fn stats(p: &mut Prog) -> GenStats {
    let layers = p.byte() as usize % 40;
    GenStats {
        text: p.text(),
        prompt_tokens: p.number(),
        reused_tokens: p.number(),
        prefilled_tokens: p.number(),
        generated_tokens: p.number(),
        ttft_ms: f64::from(p.u16()) * if p.byte() % 9 == 0 { f64::NAN } else { 1.5 },
        heal_ms: (p.byte() % 3 == 0).then(|| f64::from(p.u16())),
        prefill_tok_s: f64::from(p.u16()),
        decode_tok_s: if p.byte() % 7 == 0 {
            f64::INFINITY
        } else {
            3.0
        },
        kv_bytes: p.number(),
        stop_reason: [
            StopReason::EndOfTurn,
            StopReason::MaxTokens,
            StopReason::ContextFull,
            StopReason::Cancelled,
        ][p.byte() as usize % 4],
        slim: p.byte() % 2 == 0,
        prefill_kind: [
            PrefillKind::Full,
            PrefillKind::Reused,
            PrefillKind::Reprefilled,
        ][p.byte() as usize % 3],
        kept_per_layer: (0..layers).map(|_| p.number()).collect(),
        blocks_swapped_per_step: (0..p.byte() % 8).map(|_| p.number()).collect(),
        blocks_revived: p.number(),
        revival_bytes: p.number(),
        slim_note: (p.byte() % 2 == 0).then(|| p.text()),
        slim_preset: p.text(),
        slim_stages: Vec::new(),
        gpu_memory: None,
        kv: Default::default(),
    }
}

fn worker_event(p: &mut Prog) -> WorkerEvent {
    match p.byte() % 16 {
        0 => WorkerEvent::Loaded {
            model: p.text(),
            context_length: p.number(),
            n_layers: p.byte() as usize % 64,
            tokenizer: None,
            pruning: p.byte() % 2 == 0,
            remote: None,
        },
        1 => WorkerEvent::LoadProgress(DownloadProgress {
            what: p.text(),
            done_bytes: p.number() as u64,
            total_bytes: (p.byte() % 2 == 0).then(|| p.number() as u64),
        }),
        2 => WorkerEvent::Engine(EngineEvent::PrefillProgress {
            layers_done: p.number(),
            n_layers: p.number(),
            tokens: p.number(),
            rows: p.number(),
        }),
        3 | 4 => WorkerEvent::Engine(EngineEvent::Token(p.text())),
        13 => WorkerEvent::Engine(EngineEvent::Healing),
        14 => WorkerEvent::Engine(EngineEvent::Healed {
            blocks: p.number(),
            ms: p.number() as f64,
            kept_per_layer: (0..p.byte() % 40).map(|_| p.number()).collect(),
        }),
        5 => WorkerEvent::PromptTokens(p.number()),
        6 => WorkerEvent::Refused {
            prompt_tokens: p.number(),
            context_length: p.number(),
        },
        7 => WorkerEvent::Stats {
            stats: Box::new(stats(p)),
            rss_bytes: p.number() as u64,
        },
        8 => WorkerEvent::Compared {
            dense: Box::new(stats(p)),
            slim: Box::new(stats(p)),
            keep_ratio: f32::from(p.byte()) / 100.0,
        },
        9 => WorkerEvent::Error(p.text()),
        10 => WorkerEvent::Note(p.text()),
        11 => WorkerEvent::Engine(EngineEvent::Memory(crate::metrics::MemoryNow {
            kv_fast_bytes: p.number(),
            kv_host_bytes: p.number(),
            rss_bytes: p.number() as u64,
            gpu: p
                .byte()
                .is_multiple_of(2)
                .then(|| crate::metrics::GpuMemory {
                    gpu_total_bytes: p.number() as u64,
                    gpu_free_bytes: p.number() as u64,
                    gpu_own_bytes: p.number() as u64,
                }),
        })),
        12 => WorkerEvent::Healed {
            blocks: p.number(),
            ms: p.number() as f64,
            kept_per_layer: (0..p.byte() % 40).map(|_| p.number()).collect(),
        },
        _ => WorkerEvent::Done,
    }
}

/// Apply one message and answer the effects that ask for I/O from the program.
fn step(app: &mut App, msg: Msg, p: &mut Prog) {
    let mut queue = vec![msg];
    while let Some(msg) = queue.pop() {
        for effect in update(app, msg) {
            match effect {
                Effect::ReadFile(path) => queue.push(Msg::FileRead {
                    path,
                    result: if p.byte() % 3 == 0 {
                        Err(p.text())
                    } else {
                        Ok(p.text())
                    },
                }),
                Effect::Export(path) => queue.push(Msg::Exported {
                    path: path.unwrap_or_else(|| PathBuf::from("conversation.md")),
                    result: if p.byte() % 2 == 0 {
                        Ok(())
                    } else {
                        Err(p.text())
                    },
                }),
                Effect::Engine(_) | Effect::Save | Effect::Metrics(_) => {}
            }
        }
    }
}

/// Draw the screen at `size` and take the layout back, as the event loop does.
fn draw(app: &mut App, (w, h): (u16, u16)) -> Check {
    let mut term = Terminal::new(TestBackend::new(w, h)).map_err(|e| e.to_string())?;
    let mut view = app.view;
    term.draw(|f| view = render::draw(f, app))
        .map_err(|e| format!("draw at {w}x{h}: {e}"))?;
    app.view = view;
    check_state(app)
}

fn check_state(app: &App) -> Check {
    let (row, col) = app.editor.cursor();
    let lines = app.editor.lines();
    match lines.get(row) {
        Some(line) if col <= line.chars().count() => Ok(()),
        _ => Err(format!(
            "editor cursor ({row}, {col}) outside its {} lines",
            lines.len()
        )),
    }
}

/// Run the program in `input` against a fresh chat screen.
pub fn tui(input: &[u8]) -> Check {
    let mut app = App::new(&AppConfig::default(), None);
    let mut p = Prog { b: input, at: 0 };
    let mut size = (80u16, 24u16);
    let mut clock = 0u64;
    let mut ops = 0;
    let trace = std::env::var_os("SLIMCHAT_FUZZ_TRACE").is_some();
    while !p.done() && ops < 400 {
        ops += 1;
        let t0 = std::time::Instant::now();
        let op = p.b.get(p.at).copied().unwrap_or(0) % 10;
        if trace {
            eprintln!("op {ops} kind {op} at byte {} size {size:?}", p.at);
        }
        match p.byte() % 10 {
            0..=2 => {
                let ev = key(&mut p);
                if let Some(msg) = map_event(&ev, &app) {
                    step(&mut app, msg, &mut p);
                }
            }
            3 => {
                let text = p.text();
                if let Some(msg) = map_event(&Event::Paste(text), &app) {
                    step(&mut app, msg, &mut p);
                }
            }
            4 => {
                size = match p.byte() % 4 {
                    0 => (p.byte() as u16 % 4, p.byte() as u16 % 4),
                    1 => (p.byte() as u16 % 40, p.byte() as u16 % 12),
                    _ => (p.byte() as u16 + 1, p.byte() as u16 % 120 + 1),
                };
            }
            5 => {
                let ev = worker_event(&mut p);
                step(&mut app, Msg::Worker(ev), &mut p);
            }
            6 => {
                clock = match p.byte() % 4 {
                    0 => clock.saturating_sub(u64::from(p.u16())),
                    _ => clock.saturating_add(u64::from(p.u16())),
                };
                step(&mut app, Msg::Tick(Duration::from_millis(clock)), &mut p);
            }
            7 => {
                let kind =
                    [MouseEventKind::ScrollUp, MouseEventKind::ScrollDown][p.byte() as usize % 2];
                let ev = Event::Mouse(MouseEvent {
                    kind,
                    column: p.u16(),
                    row: p.u16(),
                    modifiers: KeyModifiers::empty(),
                });
                if let Some(msg) = map_event(&ev, &app) {
                    step(&mut app, msg, &mut p);
                }
            }
            8 => {
                let msg = match p.byte() % 11 {
                    8 => Msg::DropOldest,
                    9 => Msg::NewWithDocuments,
                    10 => Msg::Notice(p.text()),
                    0 => Msg::ScrollUp(p.number()),
                    1 => Msg::ScrollDown(p.number()),
                    2 => Msg::IoError(p.text()),
                    3 => Msg::FileRead {
                        path: PathBuf::from(p.text()),
                        result: Ok(p.text()),
                    },
                    4 => Msg::Regenerate,
                    5 => Msg::Compare,
                    6 => Msg::ToggleChips,
                    _ => Msg::Submit,
                };
                step(&mut app, msg, &mut p);
            }
            _ => {
                let text = ODD[p.byte() as usize % ODD.len()];
                for c in text.chars() {
                    step(&mut app, Msg::Insert(c), &mut p);
                }
                step(&mut app, Msg::Submit, &mut p);
            }
        }
        if app.quit {
            app.quit = false;
        }
        draw(&mut app, size)?;
        if trace {
            eprintln!("  took {:?}", t0.elapsed());
        }
    }
    Ok(())
}

/// A loaded conversation on the chat screen: drawn at several sizes, with chips expanded, and
/// sent on.
pub fn show_conversation(conv: Conversation) -> Check {
    let mut app = App::new(&AppConfig::default(), Some(conv));
    let mut p = Prog { b: &[], at: 0 };
    step(
        &mut app,
        Msg::Worker(WorkerEvent::Loaded {
            model: "fuzz".into(),
            context_length: 8192,
            n_layers: 30,
            tokenizer: None,
            pruning: true,
            remote: None,
        }),
        &mut p,
    );
    for size in [(80, 24), (20, 5), (200, 60)] {
        draw(&mut app, size)?;
    }
    step(&mut app, Msg::ToggleChips, &mut p);
    step(&mut app, Msg::PageUp, &mut p);
    draw(&mut app, (80, 24))?;
    step(&mut app, Msg::Regenerate, &mut p);
    step(&mut app, Msg::Insert('x'), &mut p);
    step(&mut app, Msg::Submit, &mut p);
    draw(&mut app, (80, 24))
}
