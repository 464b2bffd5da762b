//! Fitting a conversation into the context: whether the next message leaves room for an
//! answer, and if not, which of the oldest turns to leave out so that it does.
//!
//! A conversation reaches the model as a [`ChatRequest`]: every message (system prompt, earlier
//! turns, the new message) plus the turns that may be left out, oldest first. Turns that carry
//! documents are never listed there, so the system prompt and the documents stay; when they come
//! first the prompt after a drop starts with the same tokens as before, and the engine reuses
//! their KV (see [`crate::engine::Engine::prefill`]).

use std::ops::Range;

use crate::engine::{Engine, GenerateRequest};
use crate::model::template::Message;
use crate::Result;

/// One earlier turn that may be left out: its messages in [`ChatRequest::req`] and the caller's
/// id for it (the chat screen uses the index of the turn's user message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Droppable {
    pub messages: Range<usize>,
    pub id: usize,
}

/// A conversation to answer, with what may be left out of it when it does not fit.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// Every message, the new one last.
    pub req: GenerateRequest,
    /// The earlier turns that may be left out, oldest first (disjoint, in order).
    pub droppable: Vec<Droppable>,
    /// Leave out the oldest turns without asking when the message does not fit.
    pub drop_oldest: bool,
}

impl ChatRequest {
    /// The request without the first `k` droppable turns.
    pub fn without_oldest(&self, k: usize) -> GenerateRequest {
        let mut skip = vec![false; self.req.messages.len()];
        for d in &self.droppable[..k.min(self.droppable.len())] {
            for i in d.messages.clone() {
                if let Some(s) = skip.get_mut(i) {
                    *s = true;
                }
            }
        }
        let messages: Vec<Message> = (self.req.messages.iter().zip(&skip))
            .filter(|(_, s)| !**s)
            .map(|(m, _)| m.clone())
            .collect();
        GenerateRequest {
            messages,
            ..self.req.clone()
        }
    }
}

/// Tokens kept free for the answer when deciding whether a message fits: the answer's length,
/// at most a quarter of the context, at least one.
pub fn answer_room(max_tokens: usize, context: usize) -> usize {
    max_tokens.min(context / 4).max(1)
}

/// What to do with a conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum Fit {
    /// Send `prompt`, every turn in: it leaves room for the answer, or nothing can be left out
    /// and it is still shorter than the context (the answer may then stop at the context's end).
    Send { prompt: Vec<u32> },
    /// The whole conversation (`full_tokens`) leaves no room for the answer; leaving out the
    /// oldest droppable turns with these `ids` does, and gives `prompt`.
    Drop {
        ids: Vec<usize>,
        prompt: Vec<u32>,
        full_tokens: usize,
    },
    /// `prompt_tokens` do not fit in `context_length`, and leaving out every droppable turn
    /// does not help (`without_turns`: the tokens then, when any turn could be left out).
    TooLong {
        prompt_tokens: usize,
        context_length: usize,
        without_turns: Option<usize>,
    },
}

/// Decides how `chat` goes to the model (token counts from the engine's own template and
/// tokenizer). Leaving out turns drops the fewest oldest ones that make room for the answer.
pub fn fit(engine: &Engine, chat: &ChatRequest) -> Result<Fit> {
    let ctx = engine.context_length();
    let room = answer_room(chat.req.max_tokens, ctx);
    let full = engine.encode_chat(&chat.req.messages)?;
    if full.len() + room <= ctx {
        return Ok(Fit::Send { prompt: full });
    }
    let encode = |k: usize| engine.encode_chat(&chat.without_oldest(k).messages);
    let n = chat.droppable.len();
    let all_out = if n > 0 { Some(encode(n)?) } else { None };
    match &all_out {
        Some(p) if p.len() + room <= ctx => {
            // the smallest k that fits: the prompt shrinks as turns go, so search for it
            let (mut lo, mut hi) = (1, n); // encode(hi) fits; encode(lo - 1) does not
            let mut best = p.clone(); // always the prompt without the first `hi` turns
            while lo < hi {
                let mid = (lo + hi) / 2;
                let p = encode(mid)?;
                if p.len() + room <= ctx {
                    hi = mid;
                    best = p;
                } else {
                    lo = mid + 1;
                }
            }
            Ok(Fit::Drop {
                ids: chat.droppable[..hi].iter().map(|d| d.id).collect(),
                prompt: best,
                full_tokens: full.len(),
            })
        }
        _ if full.len() < ctx => Ok(Fit::Send { prompt: full }),
        _ => Ok(Fit::TooLong {
            prompt_tokens: full.len(),
            context_length: ctx,
            without_turns: all_out.map(|p| p.len()),
        }),
    }
}
