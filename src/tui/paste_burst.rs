//! Pastes that the terminal types key by key. Without bracketed paste (a terminal or a
//! multiplexer that does not support it, or a paste tool that types), a paste arrives as one
//! key event per character, its line breaks as Enter. Read as typed keys, the first line break
//! sent the first line alone, the next ones met "an answer is running" and were lost, and the
//! Enter the person then pressed did not send the message (it met the running answer too).
//!
//! [`filter`] tells the two apart by how the keys arrive. The event loop takes every event that
//! has already arrived as one batch; a terminal writes a paste at once, so its keys come in
//! batches, while a person's Enter comes after a pause, alone or after a few keys queued while
//! the screen was busy. An Enter is part of a paste when more keys were waiting behind it, or
//! when at least [`MIN_RUN`] keys came before it in its batch (a paste's last line break, or
//! the last one of a read); the paste's line breaks become new lines in the input and the
//! person's Enter sends. While a paste arrives, the keys that mean something else on an empty
//! input (`+`, `-`, `?`) are text too.
//!
//! A program that types text and then Enter in the same instant looks like a paste: tests that
//! drive the real binary pause before Enter, as a person does.

use crossterm::event::{Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::app::Msg;

/// Keys before an Enter in its batch for it to count as the paste's own when nothing waits
/// behind it (a person typing while the screen was busy queues a few keys at most).
pub const MIN_RUN: usize = 8;

/// The message to apply for `ev`, which the key map made `msg`: an Enter or a shortcut key
/// inside a paste becomes text. `keys_before` counts the key events before it in its batch;
/// `more_waiting` says whether another key event had already arrived behind it.
pub fn filter(ev: &Event, msg: Msg, keys_before: usize, more_waiting: bool) -> Msg {
    let Event::Key(k) = ev else {
        return msg;
    };
    let in_paste = more_waiting || keys_before >= MIN_RUN;
    if k.kind == KeyEventKind::Release || !in_paste || !plain(k) {
        return msg;
    }
    match (k.code, msg) {
        (KeyCode::Enter, Msg::Submit) => Msg::Newline,
        (KeyCode::Char(c), Msg::RatioUp | Msg::RatioDown | Msg::ToggleHelp) => Msg::Insert(c),
        (_, msg) => msg,
    }
}

/// No modifier but Shift (a terminal types capitals with Shift).
fn plain(k: &KeyEvent) -> bool {
    (k.modifiers - KeyModifiers::SHIFT).is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode) -> Event {
        Event::Key(KeyEvent::new(code, KeyModifiers::NONE))
    }

    /// Feeds `text` as the terminal types it (CR for a line break) in batches of `batch` keys
    /// (the keys of a batch arrived together, as the event loop takes them); returns the
    /// messages.
    fn typed(text: &str, batch: usize) -> Vec<String> {
        let keys: Vec<char> = text.chars().collect();
        let mut out = Vec::new();
        for (i, &c) in keys.iter().enumerate() {
            let (code, msg) = match c {
                '\r' => (KeyCode::Enter, Msg::Submit),
                '-' => (KeyCode::Char('-'), Msg::RatioDown),
                '?' => (KeyCode::Char('?'), Msg::ToggleHelp),
                c => (KeyCode::Char(c), Msg::Insert(c)),
            };
            let more = (i + 1) % batch != 0 && i + 1 < keys.len();
            out.push(format!("{:?}", filter(&key(code), msg, i % batch, more)));
        }
        out
    }

    #[test]
    fn line_breaks_of_a_typed_paste_are_newlines_and_the_next_enter_sends() {
        let got = typed("-first line\rsecond line?\rthird line\r", 1000);
        assert_eq!(got[0], "Insert('-')", "a leading '-' is text, not the knob");
        assert!(got.contains(&"Insert('?')".to_string()), "{got:?}");
        assert_eq!(got.iter().filter(|m| *m == "Newline").count(), 3, "{got:?}");
        assert!(!got.iter().any(|m| m == "Submit"), "{got:?}");
        // the person presses Enter afterwards: a batch of its own, and it sends
        assert_eq!(typed("\r", 1000), ["Submit"]);
    }

    #[test]
    fn a_paste_split_across_reads_keeps_its_line_breaks() {
        // batches of 10 keys: the Enter closing a batch has nothing behind it yet, but 9 keys
        // before it; the one opening a batch has the rest of the paste behind it
        let got = typed("abcdefghi\rjklmnopqrs\rtuv", 10);
        assert_eq!(got[9], "Newline");
        assert_eq!(got[10], "Insert('j')");
        assert_eq!(got[20], "Newline");
        assert!(!got.iter().any(|m| m == "Submit"), "{got:?}");
    }

    #[test]
    fn typing_sends_with_enter_even_when_keys_queue_up() {
        // a person typing: one key per batch, every Enter sends
        let got = typed("hi\rok\r", 1);
        assert_eq!((got[2].as_str(), got[5].as_str()), ("Submit", "Submit"));
        // the screen was busy: "yes" and Enter were taken together, Enter last: it sends
        assert_eq!(typed("yes\r", 100)[3], "Submit");
        // '-' and '?' typed alone on an empty input are still the knob and the help
        assert_eq!(typed("-", 1), ["RatioDown"]);
        assert_eq!(typed("?", 1), ["ToggleHelp"]);
    }

    #[test]
    fn modified_enter_and_other_events_pass_through() {
        let alt = Event::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::ALT));
        assert!(matches!(filter(&alt, Msg::Newline, 0, true), Msg::Newline));
        let ctrl_c = Event::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(matches!(
            filter(&ctrl_c, Msg::Interrupt, 20, true),
            Msg::Interrupt
        ));
        let paste = Event::Paste("x\ny".into());
        assert!(matches!(
            filter(&paste, Msg::Paste("x\ny".into()), 20, false),
            Msg::Paste(_)
        ));
    }
}
