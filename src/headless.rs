//! `slimchat run --conversation`: a saved conversation continued headless, one message at a
//! time, saved after the answer through the chat screen's store. When the message does not
//! leave room for an answer, `--overflow` says what happens: `error` (the default: refused as
//! a single prompt is, with a line naming the flag), `drop-oldest` (the fewest oldest turns
//! without documents are left out of the prompt and marked in the file, as the chat screen's `d`
//! does) or `new` (a new conversation with the same system prompt and documents gets the
//! message; the old one is left as it was, as the chat screen's `n` does).

use std::sync::atomic::AtomicBool;

use crate::context_fit::{self, Fit};
use crate::engine::{Engine, EngineEvent, GenStats, GenerateRequest};
use crate::model::template::{Message, Role as TemplateRole};
use crate::sampling::SamplingConfig;
use crate::tui::app::thousands;
use crate::tui::store::{Attachment, ChatMessage, Conversation, Role, Store, TurnMetrics};
use crate::tui::turns;
use crate::{Error, Result};

/// What `run --conversation` does with a message that leaves no room for an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    #[default]
    Error,
    DropOldest,
    New,
}

impl Overflow {
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "error" => Ok(Self::Error),
            "drop-oldest" => Ok(Self::DropOldest),
            "new" => Ok(Self::New),
            _ => Err(format!("expected drop-oldest, new or error, got {s}")),
        }
    }
}

/// One message to add to a saved conversation.
#[derive(Debug, Clone)]
pub struct Turn {
    /// `"new"`, `"latest"` or a conversation id (`slimchat --list`).
    pub conversation: String,
    /// The typed text.
    pub text: String,
    /// Documents sent with it (kept when old turns are left out).
    pub attachments: Vec<Attachment>,
    /// Replaces the conversation's system prompt when given.
    pub system: Option<String>,
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    pub overflow: Overflow,
}

/// What happened to the conversation.
#[derive(Debug)]
pub struct Answered {
    pub stats: GenStats,
    /// The conversation now holding the message and its answer (a new one after `new`).
    pub conversation: String,
    /// One line per thing the person should know (turns left out, a new conversation).
    pub notes: Vec<String>,
}

/// The attachments of `run --attach`: each file's UTF-8 text, labelled with its path.
pub fn read_attachments(paths: &[std::path::PathBuf]) -> Result<Vec<Attachment>> {
    paths
        .iter()
        .map(|path| {
            Ok(Attachment {
                label: path.display().to_string(),
                text: crate::tui::read_text(path).map_err(Error::Prompt)?,
            })
        })
        .collect()
}

/// One prompt with no conversation: the system prompt (if any), then the attachments and the
/// text as one user message, as the chat screen sends them.
pub fn single(
    system: &str,
    text: String,
    attachments: Vec<Attachment>,
    max_tokens: usize,
    sampling: SamplingConfig,
) -> GenerateRequest {
    let mut user = ChatMessage::new(Role::User, text);
    user.attachments = attachments;
    let mut messages = Vec::new();
    if !system.is_empty() {
        messages.push(Message::new(TemplateRole::System, system));
    }
    messages.push(Message::new(TemplateRole::User, user.full_text()));
    GenerateRequest {
        messages,
        max_tokens,
        sampling,
    }
}

/// Adds `turn` to its conversation, answers it (text through `on_event`) and saves the
/// conversation; nothing is saved when it fails.
pub fn answer(
    engine: &mut Engine,
    store: &Store,
    turn: &Turn,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(EngineEvent),
) -> Result<Answered> {
    let mut conv = match turn.conversation.as_str() {
        "new" => Conversation::new(String::new()),
        "latest" => store.latest()?.ok_or_else(|| {
            Error::Usage(format!(
                "no saved conversation in {} to continue; --conversation new starts one",
                store.dir.display()
            ))
        })?,
        id => store.load(id)?,
    };
    if let Some(system) = &turn.system {
        conv.system = system.clone();
    }
    let mut user = ChatMessage::new(Role::User, turn.text.clone());
    user.attachments = turn.attachments.clone();
    let old_docs = turns::documents(&conv);
    let earlier = !conv.messages.is_empty();
    conv.messages.push(user.clone());
    let mut notes = Vec::new();
    let prompt = match fit(engine, &conv, turn)? {
        Fit::Send { prompt } => prompt,
        Fit::Drop {
            ids,
            prompt,
            full_tokens,
        } if turn.overflow == Overflow::DropOldest => {
            let n = turns::mark_out_of_context(&mut conv, &ids);
            notes.push(format!(
                "left the {n} oldest turn{} of conversation {} out of the model's context ({} -> {} tokens); they stay in the saved conversation",
                if n == 1 { "" } else { "s" },
                conv.id,
                thousands(full_tokens),
                thousands(prompt.len())
            ));
            prompt
        }
        Fit::Drop { full_tokens, .. }
            if turn.overflow == Overflow::Error && full_tokens < engine.context_length() =>
        {
            // as a single prompt: sent while it fits, the answer stopping at the context's end
            engine.encode_chat(
                &turns::chat_request(&conv, turn.max_tokens, &turn.sampling, false)
                    .req
                    .messages,
            )?
        }
        other if turn.overflow == Overflow::New && earlier => {
            let old = conv.id.clone();
            let mut docs = old_docs;
            let n = docs.len();
            conv = turns::successor(&conv);
            docs.extend(user.attachments.iter().cloned());
            user.attachments = docs;
            conv.messages.push(user);
            notes.push(format!(
                "conversation {old} is full ({} tokens with this message): started {} with its system prompt and {n} document{} (the old one is left as it was)",
                thousands(tokens_of(&other)),
                conv.id,
                if n == 1 { "" } else { "s" }
            ));
            match fit(engine, &conv, turn)? {
                Fit::Send { prompt } => prompt,
                other => return Err(too_long(&other, engine.context_length(), turn, false)),
            }
        }
        other => return Err(too_long(&other, engine.context_length(), turn, earlier)),
    };
    let stats =
        engine.generate_from_tokens(&prompt, turn.max_tokens, &turn.sampling, cancel, on_event)?;
    let mut reply = ChatMessage::new(Role::Assistant, stats.text.clone());
    reply.metrics = Some(TurnMetrics {
        ttft_ms: stats.ttft_ms,
        prefill_tok_s: stats.prefill_tok_s,
        decode_tok_s: stats.decode_tok_s,
        prompt_tokens: stats.prompt_tokens,
        generated_tokens: stats.generated_tokens,
        kv_bytes: stats.kv_bytes,
        slim: stats.slim,
        keep_ratio: engine.slim_config().keep_ratio,
        stop_reason: serde_json::to_value(stats.stop_reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
    });
    conv.messages.push(reply);
    store.save(&conv)?;
    Ok(Answered {
        stats,
        conversation: conv.id,
        notes,
    })
}

fn fit(engine: &Engine, conv: &Conversation, turn: &Turn) -> Result<Fit> {
    let chat = turns::chat_request(conv, turn.max_tokens, &turn.sampling, false);
    context_fit::fit(engine, &chat)
}

fn tokens_of(fit: &Fit) -> usize {
    match fit {
        Fit::Send { prompt } => prompt.len(),
        Fit::Drop { full_tokens, .. } => *full_tokens,
        Fit::TooLong { prompt_tokens, .. } => *prompt_tokens,
    }
}

/// The one-line refusal, naming what `--overflow` could do (`earlier`: the conversation had
/// turns before this message).
fn too_long(fit: &Fit, ctx: usize, turn: &Turn, earlier: bool) -> Error {
    let n = tokens_of(fit);
    let hint = match (fit, turn.overflow) {
        (Fit::Drop { .. }, Overflow::Error) => {
            "; --overflow drop-oldest leaves out the oldest turns, --overflow new starts a new conversation with the same documents".to_string()
        }
        (Fit::TooLong { .. }, Overflow::Error | Overflow::DropOldest) if earlier => {
            "; leaving out its turns without documents does not make room: --overflow new starts a new conversation with the same documents".to_string()
        }
        (Fit::TooLong { without_turns: Some(k), .. }, _) => format!(
            "; even without its earlier turns it is {} tokens: shorten the message or the documents",
            thousands(*k)
        ),
        _ => "; shorten the message or the documents".to_string(),
    };
    Error::Prompt(format!(
        "the conversation with this message is {} tokens but the model's context is {} tokens (the answer needs room too){hint}",
        thousands(n),
        thousands(ctx)
    ))
}
