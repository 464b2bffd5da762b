//! When the chat screen saves its conversation, and what a failed save does. A streaming answer
//! is saved every [`SAVE_INTERVAL`]; a save that fails (a full disk, a file-size limit) puts one
//! line in the status line and one in the log, keeps the conversation in memory (the file on
//! disk stays the last whole version), and is retried every [`Saver::retry`] and at every later
//! save until one works, which the status line then says.

use std::time::{Duration, Instant};

use super::app::{update, App, Msg};
use super::store::Store;

/// Saves while an answer streams happen at most this often.
pub const SAVE_INTERVAL: Duration = Duration::from_millis(250);
/// After a failed save, the next attempt comes this much later (or at the next save asked for).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Saver {
    last: Instant,
    /// Failed attempts since the last save that worked.
    failures: usize,
    pub retry: Duration,
}

impl Default for Saver {
    fn default() -> Self {
        Self {
            last: Instant::now(),
            failures: 0,
            retry: RETRY_INTERVAL,
        }
    }
}

impl Saver {
    /// True while the last attempt failed.
    pub fn failing(&self) -> bool {
        self.failures > 0
    }

    /// Saves now; false when it failed (then the status line and the log say why, once per
    /// run of failures).
    pub fn save(&mut self, app: &mut App, store: &Store) -> bool {
        self.last = Instant::now();
        if app.conv.messages.is_empty() {
            return true;
        }
        match store.save(&app.conv) {
            Ok(()) => {
                app.dirty = false;
                if self.failures > 0 {
                    store.log(&format!(
                        "saved conversation {} after {} failed attempt(s)",
                        app.conv.id, self.failures
                    ));
                    update(
                        app,
                        Msg::Notice("conversation saved again: nothing was lost".into()),
                    );
                    self.failures = 0;
                }
                true
            }
            Err(e) => {
                if self.failures == 0 {
                    store.log(&format!(
                        "save of conversation {} failed: {e}; kept in memory, retrying",
                        app.conv.id
                    ));
                    update(
                        app,
                        Msg::IoError(format!(
                            "cannot save the conversation ({e}): kept in memory, retried every {} s",
                            self.retry.as_secs().max(1)
                        )),
                    );
                }
                self.failures += 1;
                false
            }
        }
    }

    /// On every tick: saves a changed conversation every [`SAVE_INTERVAL`], and retries a
    /// failed save every [`Saver::retry`].
    pub fn tick(&mut self, app: &mut App, store: &Store) {
        let due = if self.failing() {
            self.retry
        } else if app.dirty {
            SAVE_INTERVAL
        } else {
            return;
        };
        if self.last.elapsed() >= due {
            self.save(app, store);
        }
    }
}
