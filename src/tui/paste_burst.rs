//! Pastes that the terminal types key by key. Without bracketed paste (a terminal or a
//! multiplexer that does not support it, or a paste tool that types), a paste arrives as one
//! key event per character, its line breaks as Enter. Read as typed keys, the first line break
//! sent the first line alone, the next ones met "an answer is running" and were lost, and the
//! Enter the person then pressed did not send the message (it met the running answer too).
//!
//! [`PasteBurst`] tells the two apart by how the keys arrive: an Enter is part of a paste when
//! more keys were already waiting behind it, or when it comes within [`GAP`] of the key before
//! it at the end of a run of at least [`MIN_RUN`] such keys. A person's Enter comes after a
//! pause and alone, so it sends; the paste's line breaks become new lines in the input. While a
//! paste is arriving, the keys that mean something else on an empty input (`+`, `-`, `?`) are
//! text too.

use std::time::Duration;

use crossterm::event::{Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::app::Msg;

/// Keys closer together than this belong to one burst (a person's fastest key repeat is
/// ~30 ms apart; keys the terminal types arrive together).
pub const GAP: Duration = Duration::from_millis(10);
/// Keys of a burst before an Enter that has nothing behind it for it to count as the paste's
/// own (a person typing while the screen was busy queues a few keys at most).
pub const MIN_RUN: usize = 8;

#[derive(Debug, Default, Clone)]
pub struct PasteBurst {
    /// When the last key event arrived.
    last: Option<Duration>,
    /// Key events before the last one in its burst.
    run: usize,
}

impl PasteBurst {
    /// Takes one terminal event, arrived at `at`, and the message the key map made of it;
    /// `more_waiting` says whether another key event had already arrived behind it. Returns
    /// the message to apply: an Enter or a shortcut key inside a paste becomes text.
    pub fn filter(&mut self, ev: &Event, msg: Msg, at: Duration, more_waiting: bool) -> Msg {
        let Event::Key(k) = ev else {
            return msg;
        };
        if k.kind == KeyEventKind::Release {
            return msg;
        }
        let fast = self.last.is_some_and(|t| at.saturating_sub(t) <= GAP);
        self.run = if fast { self.run + 1 } else { 0 };
        self.last = Some(at);
        let in_paste = more_waiting || (fast && self.run >= MIN_RUN);
        if !in_paste || !plain(k) {
            return msg;
        }
        match (k.code, msg) {
            (KeyCode::Enter, Msg::Submit) => Msg::Newline,
            (KeyCode::Char(c), Msg::RatioUp | Msg::RatioDown | Msg::ToggleHelp) => Msg::Insert(c),
            (_, msg) => msg,
        }
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

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Feeds `text` as the terminal types it (CR for a line break), `step` apart starting at
    /// `t0`, as batches of `batch` keys (the keys of a batch arrived together); returns the
    /// messages.
    fn typed(b: &mut PasteBurst, text: &str, t0: u64, step: u64, batch: usize) -> Vec<String> {
        let keys: Vec<char> = text.chars().collect();
        let mut out = Vec::new();
        for (i, &c) in keys.iter().enumerate() {
            let (code, msg) = match c {
                '\r' => (KeyCode::Enter, Msg::Submit),
                '-' => (KeyCode::Char('-'), Msg::RatioDown),
                c => (KeyCode::Char(c), Msg::Insert(c)),
            };
            let more = (i + 1) % batch != 0 && i + 1 < keys.len();
            let m = b.filter(&key(code), msg, ms(t0 + step * i as u64), more);
            out.push(format!("{m:?}"));
        }
        out
    }

    #[test]
    fn line_breaks_of_a_typed_paste_are_newlines_and_the_next_enter_sends() {
        let mut b = PasteBurst::default();
        // one batch, as a terminal writes a short paste
        let got = typed(&mut b, "-first line\rsecond line\rthird\r", 1000, 0, 1000);
        assert_eq!(got[0], "Insert('-')", "a leading '-' is text, not the knob");
        assert_eq!(got.iter().filter(|m| *m == "Newline").count(), 3, "{got:?}");
        assert!(!got.iter().any(|m| m == "Submit"), "{got:?}");
        // the person presses Enter half a second later: it sends
        let m = b.filter(&key(KeyCode::Enter), Msg::Submit, ms(1500), false);
        assert!(matches!(m, Msg::Submit), "{m:?}");
    }

    #[test]
    fn a_paste_split_across_reads_keeps_its_line_breaks() {
        let mut b = PasteBurst::default();
        // batches of 5 keys, each key 1 ms apart: the Enter closing a batch has nothing
        // behind it yet, but ends a run of fast keys
        let got = typed(&mut b, "abcdefghi\rjklmnopqr\rstu", 0, 1, 5);
        assert_eq!(got.iter().filter(|m| *m == "Newline").count(), 2, "{got:?}");
        // and an Enter arriving after the paste's last key, but 200 ms later, sends
        let m = b.filter(&key(KeyCode::Enter), Msg::Submit, ms(223), false);
        assert!(matches!(m, Msg::Submit));
    }

    #[test]
    fn typing_sends_with_enter_even_when_keys_queue_up() {
        let mut b = PasteBurst::default();
        // a person typing 8 keys a second: every Enter sends
        let got = typed(&mut b, "hi\rok\r", 0, 120, 1);
        assert_eq!(got[2], "Submit");
        assert_eq!(got[5], "Submit");
        // the screen was busy: "yes" and Enter were taken together, Enter last: it sends
        let got = typed(&mut b, "yes\r", 5000, 0, 100);
        assert_eq!(got[3], "Submit", "{got:?}");
        // '-' typed alone on an empty input is still the knob
        let m = b.filter(&key(KeyCode::Char('-')), Msg::RatioDown, ms(9000), false);
        assert!(matches!(m, Msg::RatioDown));
    }

    #[test]
    fn modified_enter_and_other_events_pass_through() {
        let mut b = PasteBurst::default();
        let alt = Event::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::ALT));
        assert!(matches!(
            b.filter(&alt, Msg::Newline, ms(0), true),
            Msg::Newline
        ));
        let ctrl_c = Event::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(matches!(
            b.filter(&ctrl_c, Msg::Interrupt, ms(1), true),
            Msg::Interrupt
        ));
        let paste = Event::Paste("x\ny".into());
        assert!(matches!(
            b.filter(&paste, Msg::Paste("x\ny".into()), ms(2), false),
            Msg::Paste(_)
        ));
    }
}
