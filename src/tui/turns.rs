//! A saved conversation as the model gets it, in turns. A turn is a user message and what
//! follows it up to the next one. Every message not left out goes to the model; the earlier
//! turns whose user message carries no attachment may be left out, oldest first, when the next
//! message does not fit (a turn with a pasted or `/read` document is kept, so the documents stay
//! and, when they come first, the prompt keeps its cached prefix). Left-out turns stay in the
//! conversation, marked. A new conversation can start with the documents of an old one.

use crate::context_fit::{ChatRequest, Droppable};
use crate::engine::GenerateRequest;
use crate::model::template::{Message, Role as TemplateRole};
use crate::sampling::SamplingConfig;

use super::store::{Attachment, Conversation, Role};

/// The conversation as the model sees it: the system prompt, then every user message and
/// answer not left out; the earlier turns without documents are listed as droppable, by the
/// index of their user message.
pub fn chat_request(
    conv: &Conversation,
    max_tokens: usize,
    sampling: &SamplingConfig,
    drop_oldest: bool,
) -> ChatRequest {
    let mut messages = Vec::new();
    if !conv.system.is_empty() {
        messages.push(Message {
            role: TemplateRole::System,
            content: conv.system.clone(),
        });
    }
    // (user message index, first message, droppable) of each turn sent
    let mut turns: Vec<(usize, usize, bool)> = Vec::new();
    for (i, m) in conv.messages.iter().enumerate() {
        if m.out_of_context {
            continue;
        }
        let role = match m.role {
            Role::User => {
                turns.push((i, messages.len(), m.attachments.is_empty()));
                TemplateRole::User
            }
            Role::Assistant if !m.content.is_empty() => TemplateRole::Assistant,
            _ => continue,
        };
        messages.push(Message {
            role,
            content: m.full_text(),
        });
    }
    let ends: Vec<usize> = turns
        .iter()
        .skip(1)
        .map(|t| t.1)
        .chain(std::iter::once(messages.len()))
        .collect();
    // the last turn is the message being answered: never left out
    let earlier = turns.len().saturating_sub(1);
    let droppable = turns[..earlier]
        .iter()
        .zip(&ends)
        .filter(|(t, _)| t.2)
        .map(|(t, &end)| Droppable {
            messages: t.1..end,
            id: t.0,
        })
        .collect();
    ChatRequest {
        req: GenerateRequest {
            messages,
            max_tokens,
            sampling: sampling.clone(),
        },
        droppable,
        drop_oldest,
    }
}

/// Marks the turns whose user messages are at `ids` as left out of the model's context: the
/// user message and everything after it up to the next user message. Returns how many turns.
pub fn mark_out_of_context(conv: &mut Conversation, ids: &[usize]) -> usize {
    let mut marked = 0;
    for &id in ids {
        if conv.messages.get(id).map(|m| m.role) != Some(Role::User) {
            continue;
        }
        marked += 1;
        conv.messages[id].out_of_context = true;
        for m in conv.messages[id + 1..].iter_mut() {
            if m.role == Role::User {
                break;
            }
            m.out_of_context = true;
        }
    }
    marked
}

/// Every document (pasted text or `/read` file) of the conversation's user messages, in order.
pub fn documents(conv: &Conversation) -> Vec<Attachment> {
    conv.messages
        .iter()
        .filter(|m| m.role == Role::User)
        .flat_map(|m| m.attachments.iter().cloned())
        .collect()
}

/// A new, empty conversation with `old`'s system prompt and an id of its own (the old one stays
/// saved as it is); its first message should carry [`documents`] of the old one.
pub fn successor(old: &Conversation) -> Conversation {
    let mut conv = Conversation::new(old.system.clone());
    if conv.id <= old.id {
        // started within the same millisecond: an id that still sorts after the old one
        conv.id = format!("{}-1", old.id);
    }
    conv
}
