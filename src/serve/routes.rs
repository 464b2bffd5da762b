//! The HTTP endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//! `GET /health`, and the bearer-token check in front of `/v1`.

// a request that cannot be served is answered at once: its parsers return the error response
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::model::template::{Message, Role};
use crate::openai_api::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
    ChunkChoice, CommonParams, CompletionRequest, Delta, ErrorBody, ModelCard, ModelList,
    PromptField, ServerFacts, SlimReport, Timings, Usage,
};
use crate::sampling::SamplingConfig;

use super::jobs::{self, Finished, Job, JobError, JobEvent, JobPrompt, JobQueue};

/// What every handler shares.
pub struct ServerState {
    pub queue: JobQueue,
    pub model_id: String,
    pub facts: ServerFacts,
    /// Required as `Authorization: Bearer <key>` on `/v1` when set.
    pub api_key: Option<String>,
    /// The server's sampling settings, which a request's fields override.
    pub sampling: SamplingConfig,
    pub started: u64,
    pub next_id: AtomicU64,
}

type Shared = Arc<ServerState>;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn error(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    message: impl Into<String>,
) -> Response {
    (status, Json(ErrorBody::new(kind, code, message))).into_response()
}

fn bad_request(message: impl Into<String>) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        None,
        message,
    )
}

/// A failed job's status and error body.
fn job_error_body(e: JobError) -> (StatusCode, ErrorBody) {
    match e {
        JobError::Invalid { message, code } => (
            StatusCode::BAD_REQUEST,
            ErrorBody::new("invalid_request_error", code, message),
        ),
        JobError::Engine(message) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorBody::new("server_error", None, message),
        ),
    }
}

fn job_error(e: JobError) -> Response {
    let (status, body) = job_error_body(e);
    (status, Json(body)).into_response()
}

/// Refuses `/v1` requests without the server's bearer token, when it has one.
pub async fn require_key(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        if req.uri().path().starts_with("/v1") {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !same_secret(given.as_bytes(), key.as_bytes()) {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_request_error",
                    Some("invalid_api_key"),
                    "missing or wrong API key: send it as `Authorization: Bearer <key>`",
                );
            }
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference, so timing does not reveal the key.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, &x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

pub async fn health(State(st): State<Shared>) -> Response {
    Json(json!({"status": "ok", "queued": st.queue.waiting()})).into_response()
}

pub async fn models(State(st): State<Shared>) -> Response {
    Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: st.model_id.clone(),
            object: "model".into(),
            created: st.started,
            owned_by: "slimchat".into(),
            slimchat: Some(st.facts.clone()),
        }],
    })
    .into_response()
}

pub async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("not_found"),
        "no such endpoint: slimchat serves /v1/chat/completions, /v1/completions, /v1/models and /health",
    )
}

/// Sets the job's cancel flag when the handler (or its response stream) is dropped: the client
/// went away, or the answer is done (then the flag no longer matters).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The request fields that shape a job, checked.
struct Parsed {
    sampling: SamplingConfig,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn parse_common(st: &ServerState, c: &CommonParams) -> Result<Parsed, Response> {
    if matches!(c.n, Some(n) if n != 1) {
        return Err(bad_request(
            "n must be 1: slimchat answers one choice per request",
        ));
    }
    let mut sampling = st.sampling.clone();
    if let Some(t) = c.temperature {
        sampling.temperature = t;
    }
    if let Some(p) = c.top_p {
        sampling.top_p = p;
    }
    if let Some(s) = c.seed {
        sampling.seed = s;
    }
    sampling.validate().map_err(bad_request)?;
    let stop = c.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > 16 {
        return Err(bad_request("at most 16 stop strings"));
    }
    Ok(Parsed {
        sampling,
        stop,
        stream: c.stream,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
    })
}

fn max_tokens(v: Option<u64>) -> Result<Option<usize>, Response> {
    match v {
        Some(0) => Err(bad_request("max_tokens must be at least 1")),
        Some(n) => Ok(Some(n.min(usize::MAX as u64) as usize)),
        None => Ok(None),
    }
}

fn to_messages(req: &ChatCompletionRequest) -> Result<Vec<Message>, Response> {
    if req.messages.is_empty() {
        return Err(bad_request("messages must not be empty"));
    }
    req.messages
        .iter()
        .map(|m| {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(bad_request(format!(
                    "message role {other:?} is not supported (system, developer, user, assistant)"
                )))
                }
            };
            Ok(Message::new(role, m.text().map_err(bad_request)?))
        })
        .collect()
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("request body: {e}")))
}

/// Queues a job and waits for it to start. Returns its events and the guard that cancels it.
async fn submit(
    st: &ServerState,
    prompt: JobPrompt,
    max_tokens: Option<usize>,
    p: &Parsed,
    slim: crate::openai_api::SlimRequest,
    id: &str,
) -> Result<(UnboundedReceiver<JobEvent>, CancelOnDrop), Response> {
    let (tx, mut rx) = jobs::channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let guard = CancelOnDrop(cancel.clone());
    let job = Job {
        id: id.to_string(),
        prompt,
        max_tokens,
        sampling: p.sampling.clone(),
        stop: p.stop.clone(),
        slim,
        cancel,
        events: tx,
        queued_at: Instant::now(),
    };
    if let Err(busy) = st.queue.submit(job) {
        let mut r = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("queue_full"),
            format!(
                "the server is busy: {} requests are waiting; retry shortly",
                busy.queued
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Err(r);
    }
    match rx.recv().await {
        Some(JobEvent::Started) => Ok((rx, guard)),
        Some(JobEvent::Failed(e)) => Err(job_error(e)),
        _ => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            "the engine stopped before answering",
        )),
    }
}

/// A keep ratio as people write it (0.6, not 0.6000000238418579).
fn round3(x: f32) -> f64 {
    (x as f64 * 1000.0).round() / 1000.0
}

fn slim_report(f: &Finished) -> SlimReport {
    SlimReport {
        enabled: f.stats.slim,
        keep: round3(f.keep),
        preset: f.stats.slim_preset.clone(),
        kept_per_layer: f.stats.kept_per_layer.clone(),
        note: f.stats.slim_note.clone(),
    }
}

/// Which endpoint's shapes a response takes.
#[derive(Clone, Copy)]
enum Shape {
    Chat,
    Text,
}

struct Reply {
    id: String,
    created: u64,
    model: String,
    shape: Shape,
}

impl Reply {
    fn new(st: &ServerState, shape: Shape) -> Self {
        let n = st.next_id.fetch_add(1, Ordering::Relaxed);
        let prefix = match shape {
            Shape::Chat => "chatcmpl",
            Shape::Text => "cmpl",
        };
        Reply {
            id: format!("{prefix}-{:x}-{n}", st.started),
            created: unix_now(),
            model: st.model_id.clone(),
            shape,
        }
    }

    /// A streamed piece: a role or text delta, or the end with its reason and numbers.
    fn chunk(&self, delta: Delta, finish: Option<&Finished>) -> Value {
        let finish_reason = finish.map(|f| f.finish_reason.to_string());
        let timings = finish.map(|f| Timings::from_stats(&f.stats, f.total_ms, f.queue_ms));
        let slim = finish.map(slim_report);
        match self.shape {
            Shape::Chat => serde_json::to_value(ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![ChunkChoice {
                    index: 0,
                    delta,
                    finish_reason,
                }],
                usage: None,
                timings,
                slim,
            })
            .unwrap_or(Value::Null),
            Shape::Text => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": delta.content.unwrap_or_default(),
                             "finish_reason": finish_reason, "logprobs": null}],
                "timings": timings, "slim": slim,
            }),
        }
    }

    fn usage_chunk(&self, f: &Finished) -> Value {
        let object = match self.shape {
            Shape::Chat => "chat.completion.chunk",
            Shape::Text => "text_completion",
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [], "usage": Usage::from_stats(&f.stats),
        })
    }

    fn whole(&self, text: String, f: &Finished) -> Value {
        let usage = Usage::from_stats(&f.stats);
        let timings = Timings::from_stats(&f.stats, f.total_ms, f.queue_ms);
        match self.shape {
            Shape::Chat => serde_json::to_value(ChatCompletion {
                id: self.id.clone(),
                object: "chat.completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: vec![Choice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant".into(),
                        content: text,
                    },
                    finish_reason: Some(f.finish_reason.to_string()),
                    logprobs: None,
                }],
                usage,
                timings: Some(timings),
                slim: Some(slim_report(f)),
            })
            .unwrap_or(Value::Null),
            Shape::Text => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": text, "finish_reason": f.finish_reason,
                             "logprobs": null}],
                "usage": usage, "timings": timings, "slim": slim_report(f),
            }),
        }
    }
}

pub async fn chat_completions(State(st): State<Shared>, body: Bytes) -> Response {
    let req: ChatCompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let run = async {
        let messages = to_messages(&req)?;
        let p = parse_common(&st, &req.common)?;
        let max = max_tokens(req.max_completion_tokens.or(req.max_tokens))?;
        let slim = req.common.slim.unwrap_or_default();
        let reply = Reply::new(&st, Shape::Chat);
        let (rx, guard) = submit(&st, JobPrompt::Chat(messages), max, &p, slim, &reply.id).await?;
        Ok::<_, Response>(respond(reply, &p, rx, guard).await)
    };
    run.await.unwrap_or_else(|r| r)
}

pub async fn completions(State(st): State<Shared>, body: Bytes) -> Response {
    let req: CompletionRequest = match parse(&body) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let run = async {
        let text = match req.prompt.clone() {
            PromptField::One(s) => s,
            PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
            PromptField::Many(_) => {
                return Err(bad_request(
                    "prompt must be one string: slimchat answers one prompt per request",
                ))
            }
        };
        let p = parse_common(&st, &req.common)?;
        let max = max_tokens(req.max_tokens)?;
        let slim = req.common.slim.unwrap_or_default();
        let reply = Reply::new(&st, Shape::Text);
        let (rx, guard) = submit(&st, JobPrompt::Text(text), max, &p, slim, &reply.id).await?;
        Ok::<_, Response>(respond(reply, &p, rx, guard).await)
    };
    run.await.unwrap_or_else(|r| r)
}

async fn respond(
    reply: Reply,
    p: &Parsed,
    rx: UnboundedReceiver<JobEvent>,
    guard: CancelOnDrop,
) -> Response {
    if p.stream {
        stream(reply, p.include_usage, rx, guard).into_response()
    } else {
        whole(reply, rx, guard).await
    }
}

/// Waits for the whole answer (`stream: false`).
async fn whole(
    reply: Reply,
    mut rx: UnboundedReceiver<JobEvent>,
    _guard: CancelOnDrop,
) -> Response {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            JobEvent::Text(t) => text.push_str(&t),
            JobEvent::Finished(f) => {
                return Json(reply.whole(text, &f)).into_response();
            }
            JobEvent::Failed(e) => return job_error(e),
            JobEvent::Started => {}
        }
    }
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        None,
        "the engine stopped before the answer ended",
    )
}

/// Server-sent events (`stream: true`): a role delta, text deltas, a last chunk with the finish
/// reason, timings and pruning report, the usage chunk when asked for, then `[DONE]`. Dropping
/// the stream (the client disconnected) cancels the job.
fn stream(
    reply: Reply,
    include_usage: bool,
    rx: UnboundedReceiver<JobEvent>,
    guard: CancelOnDrop,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    struct State {
        reply: Reply,
        rx: UnboundedReceiver<JobEvent>,
        _guard: CancelOnDrop,
        pending: VecDeque<Event>,
        done: bool,
        include_usage: bool,
    }
    let data = |v: Value| Event::default().data(v.to_string());
    let first = reply.chunk(
        Delta {
            role: Some("assistant".into()),
            content: Some(String::new()),
        },
        None,
    );
    let state = State {
        reply,
        rx,
        _guard: guard,
        pending: VecDeque::from([data(first)]),
        done: false,
        include_usage,
    };
    let events = futures_util::stream::unfold(state, move |mut s| async move {
        loop {
            if let Some(ev) = s.pending.pop_front() {
                return Some((Ok(ev), s));
            }
            if s.done {
                return None;
            }
            match s.rx.recv().await {
                Some(JobEvent::Text(t)) => {
                    let delta = Delta {
                        role: None,
                        content: Some(t),
                    };
                    s.pending.push_back(data(s.reply.chunk(delta, None)));
                }
                Some(JobEvent::Finished(f)) => {
                    s.pending
                        .push_back(data(s.reply.chunk(Delta::default(), Some(&f))));
                    if s.include_usage {
                        s.pending.push_back(data(s.reply.usage_chunk(&f)));
                    }
                    s.pending.push_back(Event::default().data("[DONE]"));
                    s.done = true;
                }
                Some(JobEvent::Failed(e)) => {
                    let (_, body) = job_error_body(e);
                    s.pending
                        .push_back(data(serde_json::to_value(body).unwrap_or(Value::Null)));
                    s.pending.push_back(Event::default().data("[DONE]"));
                    s.done = true;
                }
                Some(JobEvent::Started) => {}
                None => s.done = true,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
