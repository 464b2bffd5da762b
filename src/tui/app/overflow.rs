//! When the next message does not fit in the context: the offer (leave out the oldest turns,
//! or start a new conversation with the same documents, or Esc), and what each key does. The
//! message waits in the input meanwhile, so Esc leaves it there to edit.

use super::super::store::{ChatMessage, Role};
use super::super::turns;
use super::{thousands, App, Effect};

/// What the engine said leaving out the oldest turns would do.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer {
    /// The conversation with the new message, in tokens.
    pub prompt_tokens: usize,
    pub context_length: usize,
    /// Oldest turns to leave out.
    pub turns: usize,
    /// The prompt without them.
    pub after_tokens: usize,
}

impl Offer {
    /// The offer's line, for the status line.
    pub fn line(&self) -> String {
        format!(
            "⚠ {} tokens leave no room for an answer in {} · d: drop the {} oldest turn{} ({} tokens left) and send · n: send in a new conversation with the same documents · Esc: cancel",
            thousands(self.prompt_tokens),
            thousands(self.context_length),
            self.turns,
            if self.turns == 1 { "" } else { "s" },
            thousands(self.after_tokens),
        )
    }
}

impl App {
    /// The engine found the message too long for the conversation: it goes back into the input
    /// and the offer shows.
    pub(super) fn on_overflow(&mut self, offer: Offer) {
        self.undo_send();
        self.status = None;
        self.offer = Some(offer);
    }

    /// Esc on the offer: nothing is sent, the message stays in the input.
    pub(super) fn cancel_offer(&mut self) {
        self.offer = None;
        self.say("not sent: the message is back in the input");
    }

    /// `d`: send again, leaving out the oldest turns the engine names (it marks them when it
    /// reports [`super::WorkerEvent::Dropped`]).
    pub(super) fn drop_oldest(&mut self) -> Vec<Effect> {
        if self.offer.is_none() || self.busy() {
            return vec![];
        }
        self.offer = None;
        self.submit(true)
    }

    /// `n`: the old conversation stays saved as it is; a new one starts with its system prompt
    /// and every document of it, and the message is sent there.
    pub(super) fn new_with_documents(&mut self) -> Vec<Effect> {
        if self.offer.is_none() || self.busy() {
            return vec![];
        }
        self.offer = None;
        let old = self.conv.id.clone();
        let mut docs = turns::documents(&self.conv);
        let n = docs.len();
        docs.append(&mut self.chips);
        self.chips = docs;
        self.conv = turns::successor(&self.conv);
        self.last = None;
        self.scroll = 0;
        let effects = self.submit(false);
        self.say(format!(
            "new conversation with {n} document{} of {old} (which stays saved as it was)",
            if n == 1 { "" } else { "s" }
        ));
        effects
    }

    /// The engine left these turns out of the prompt: mark them (dimmed on screen, kept in the
    /// saved conversation).
    pub(super) fn on_dropped(&mut self, ids: &[usize], from: usize, to: usize) -> Vec<Effect> {
        let n = turns::mark_out_of_context(&mut self.conv, ids);
        self.say(format!(
            "left the {n} oldest turn{} out of the model's context ({} -> {} tokens); they stay on screen and in the saved conversation",
            if n == 1 { "" } else { "s" },
            thousands(from),
            thousands(to)
        ));
        vec![Effect::Save]
    }

    /// Puts a refused message back into the input, chips included.
    pub(super) fn undo_send(&mut self) {
        if matches!(self.conv.messages.last(), Some(m) if m.role == Role::Assistant && m.partial) {
            self.conv.messages.pop();
        }
        if matches!(self.conv.messages.last(), Some(m) if m.role == Role::User) {
            let user: ChatMessage = self.conv.messages.pop().expect("checked");
            let mut chips = user.attachments;
            chips.append(&mut self.chips);
            self.chips = chips;
            if self.editor.is_empty() {
                self.editor.set_text(&user.content);
            }
        }
    }
}
