//! Terminal input to [`Msg`]: which key, paste or mouse event does what. [`KEYS`] lists the same
//! bindings for the help overlay, so the two cannot drift apart unnoticed.

use crossterm::event::{Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseEventKind};

use super::app::{App, Msg};

/// Every key binding, for the help overlay.
pub const KEYS: &[(&str, &str)] = &[
    ("Enter", "send the message (or run a /command)"),
    ("Alt+Enter, Shift+Enter, Ctrl+J", "new line in the message"),
    ("Esc", "stop the answer; close help"),
    ("Ctrl+C", "stop the answer; again (or when idle) quit"),
    ("Ctrl+D", "quit"),
    ("PgUp / PgDn", "scroll the transcript a page"),
    (
        "Up / Down",
        "move in the message; scroll at its first/last line",
    ),
    ("Mouse wheel", "scroll the transcript"),
    ("Ctrl+End", "jump to the newest text"),
    (
        "+ / -  (empty input), Ctrl+Up/Down",
        "keep ratio up / down by 0.05",
    ),
    ("Ctrl+P", "pruning on / off"),
    ("Ctrl+R", "regenerate the last answer"),
    ("F2", "compare: last question dense vs pruned"),
    ("Ctrl+E", "expand / collapse pasted chips"),
    ("Backspace (empty input)", "drop the last chip"),
    ("Ctrl+U", "delete to the start of the line"),
    (
        "d / n / Esc (message won't fit)",
        "drop oldest turns / new conversation with the docs / cancel",
    ),
    ("F1, ? (empty input)", "this help"),
];

/// Lines the mouse wheel scrolls.
const WHEEL_LINES: usize = 3;

/// The message for one terminal event, if it means anything here.
pub fn map_event(ev: &Event, app: &App) -> Option<Msg> {
    match ev {
        Event::Key(k) if k.kind != KeyEventKind::Release => map_key(k, app),
        Event::Paste(text) => Some(Msg::Paste(text.clone())),
        Event::Mouse(m) => match m.kind {
            MouseEventKind::ScrollUp => Some(Msg::ScrollUp(WHEEL_LINES)),
            MouseEventKind::ScrollDown => Some(Msg::ScrollDown(WHEEL_LINES)),
            _ => None,
        },
        _ => None,
    }
}

fn map_key(k: &KeyEvent, app: &App) -> Option<Msg> {
    let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
    let alt = k.modifiers.contains(KeyModifiers::ALT);
    let shift = k.modifiers.contains(KeyModifiers::SHIFT);
    let empty = app.editor.is_empty();
    if app.help {
        // Any key closes the help; Ctrl+C still quits.
        return Some(match (k.code, ctrl) {
            (KeyCode::Char('c'), true) => Msg::Interrupt,
            _ => Msg::ToggleHelp,
        });
    }
    if app.offer.is_some() {
        // The offer takes the keys until one of its three is pressed; Ctrl+C still quits.
        return match (k.code, ctrl) {
            (KeyCode::Char('c'), true) => Some(Msg::Interrupt),
            (KeyCode::Char('d') | KeyCode::Char('D'), false) => Some(Msg::DropOldest),
            (KeyCode::Char('n') | KeyCode::Char('N'), false) => Some(Msg::NewWithDocuments),
            (KeyCode::Esc, _) => Some(Msg::Stop),
            (KeyCode::F(1), _) => Some(Msg::ToggleHelp),
            _ => None,
        };
    }
    let msg = match k.code {
        KeyCode::Enter if alt || shift || ctrl => Msg::Newline,
        KeyCode::Enter => Msg::Submit,
        KeyCode::Char('j') if ctrl => Msg::Newline,
        KeyCode::Char('c') if ctrl => Msg::Interrupt,
        KeyCode::Char('d') if ctrl => Msg::Quit,
        KeyCode::Char('p') if ctrl => Msg::TogglePruning,
        KeyCode::Char('r') if ctrl => Msg::Regenerate,
        KeyCode::Char('e') if ctrl => Msg::ToggleChips,
        KeyCode::Char('u') if ctrl => Msg::KillLine,
        KeyCode::Char(_) if ctrl => return None,
        KeyCode::Char('+') | KeyCode::Char('=') if empty && app.chips.is_empty() => Msg::RatioUp,
        KeyCode::Char('-') if empty && app.chips.is_empty() => Msg::RatioDown,
        KeyCode::Char('?') if empty => Msg::ToggleHelp,
        KeyCode::Char(c) => Msg::Insert(c),
        KeyCode::Tab => Msg::Insert('\t'),
        KeyCode::Backspace => Msg::Backspace,
        KeyCode::Delete => Msg::Delete,
        KeyCode::Left => Msg::Left,
        KeyCode::Right => Msg::Right,
        KeyCode::Up if ctrl => Msg::RatioUp,
        KeyCode::Down if ctrl => Msg::RatioDown,
        KeyCode::Up => Msg::Up,
        KeyCode::Down => Msg::Down,
        KeyCode::Home => Msg::Home,
        KeyCode::End if ctrl => Msg::ScrollBottom,
        KeyCode::End => Msg::End,
        KeyCode::PageUp => Msg::PageUp,
        KeyCode::PageDown => Msg::PageDown,
        KeyCode::Esc => Msg::Stop,
        KeyCode::F(1) => Msg::ToggleHelp,
        KeyCode::F(2) => Msg::Compare,
        _ => return None,
    };
    Some(msg)
}
