//! A client of an OpenAI-compatible chat-completions server, for the chat screen's remote
//! engine (`[backend] url`): `slimchat serve` on another machine, or vLLM, SGLang, llama-server.
//!
//! Blocking HTTP (ureq) on the caller's thread. A streamed answer is read by a thread of its own
//! that hands lines over a channel, so the caller can stop waiting at once when the person
//! stops the answer; that thread then closes the connection at the next line, which tells the
//! server to stop too.

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::BackendConfig;
use crate::model::template::{Message, Role};
use crate::openai_api::{
    ChatCompletionChunk, ChatCompletionRequest, CommonParams, ErrorBody, ModelList, ServerFacts,
    SlimReport, SlimRequest, StreamOptions, Timings, Usage, WireMessage,
};
use crate::sampling::SamplingConfig;
use crate::{Error, Result};

/// The environment variable read for the server's key when `[backend] api_key` is empty.
pub const BACKEND_KEY_ENV: &str = "SLIMCHAT_BACKEND_KEY";

/// How long to wait for the server to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to one model on one server.
pub struct RemoteClient {
    base: String,
    key: Option<String>,
    agent: ureq::Agent,
    /// The model requests name.
    pub model: String,
    /// Present when the server is slimchat: it prunes, and `slim` requests are honoured.
    pub facts: Option<ServerFacts>,
}

/// How a streamed answer ended.
#[derive(Debug, Clone, Default)]
pub struct RemoteAnswer {
    pub text: String,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
    pub timings: Option<Timings>,
    pub slim: Option<SlimReport>,
    /// From sending the request to the first text, measured here.
    pub ttft_ms: f64,
    pub total_ms: f64,
    /// Text pieces received.
    pub pieces: usize,
    pub cancelled: bool,
}

impl RemoteClient {
    /// Asks the server for its models and picks the configured one (or the first).
    pub fn connect(cfg: &BackendConfig) -> Result<Self> {
        let base = cfg.url.trim_end_matches('/').to_string();
        let key = Some(cfg.api_key.clone())
            .filter(|k| !k.is_empty())
            .or_else(|| {
                std::env::var(BACKEND_KEY_ENV)
                    .ok()
                    .filter(|k| !k.is_empty())
            });
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .build();
        let mut client = RemoteClient {
            base,
            key,
            agent,
            model: cfg.model.clone(),
            facts: None,
        };
        let list: ModelList = client
            .get("/models")?
            .into_json()
            .map_err(|e| client.error(&format!("its /models answer is not a model list: {e}")))?;
        let card = if cfg.model.is_empty() {
            list.data.into_iter().next()
        } else {
            list.data.into_iter().find(|m| m.id == cfg.model)
        };
        match card {
            Some(card) => {
                client.model = card.id;
                client.facts = card.slimchat;
            }
            // a server may serve a model it does not list: ask for the configured name anyway
            None if !cfg.model.is_empty() => {}
            None => return Err(client.error("it lists no model")),
        }
        Ok(client)
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn error(&self, what: &str) -> Error {
        Error::Engine(format!("server {}: {what}", self.base))
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let req = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.key {
            Some(k) => req.set("Authorization", &format!("Bearer {k}")),
            None => req,
        }
    }

    fn get(&self, path: &str) -> Result<ureq::Response> {
        self.request("GET", path)
            .call()
            .map_err(|e| self.http_error(e))
    }

    /// One line for a failed call: the server's own error message where it sent one.
    fn http_error(&self, e: ureq::Error) -> Error {
        match e {
            ureq::Error::Status(code, resp) => {
                let body = resp.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<ErrorBody>(&body)
                    .map(|b| b.error.message)
                    .unwrap_or_else(|_| body.chars().take(200).collect());
                self.error(&format!("HTTP {code}: {msg}"))
            }
            // the transport's own text repeats the URL: its kind and message say enough
            ureq::Error::Transport(t) => {
                let mut why = t.kind().to_string();
                if let Some(m) = t.message() {
                    why = format!("{why}: {m}");
                }
                if let Some(src) = std::error::Error::source(&t) {
                    why = format!("{why}: {src}");
                }
                self.error(&format!("cannot reach it ({why})"))
            }
        }
    }

    /// Streams an answer to `messages`, calling `on_text` with each piece, until the server
    /// ends it or `cancel` is set.
    pub fn chat(
        &self,
        messages: &[Message],
        max_tokens: usize,
        sampling: &SamplingConfig,
        slim: Option<SlimRequest>,
        cancel: &AtomicBool,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<RemoteAnswer> {
        let body = ChatCompletionRequest {
            model: Some(self.model.clone()),
            messages: messages.iter().map(wire).collect(),
            max_tokens: Some(max_tokens as u64),
            max_completion_tokens: None,
            common: CommonParams {
                temperature: Some(sampling.temperature),
                top_p: Some(sampling.top_p),
                seed: Some(sampling.seed),
                stream: true,
                stream_options: Some(StreamOptions {
                    include_usage: true,
                }),
                // only a slimchat server knows the field; others ignore it, but say nothing then
                slim: slim.filter(|_| self.facts.is_some()),
                ..Default::default()
            },
        };
        let start = Instant::now();
        let resp = self
            .request("POST", "/chat/completions")
            .send_json(&body)
            .map_err(|e| self.http_error(e))?;
        let stop_reading = Arc::new(AtomicBool::new(false));
        let lines = spawn_line_reader(resp, stop_reading.clone());
        let mut answer = RemoteAnswer::default();
        let mut first = None;
        let result = loop {
            if cancel.load(Ordering::Relaxed) {
                answer.cancelled = true;
                break Ok(());
            }
            let line = match lines.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(line)) => line,
                Ok(Err(e)) => break Err(self.error(&format!("the answer broke off: {e}"))),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break Ok(()),
            };
            let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                continue; // comments (keep-alives), event names, blank separators
            };
            if data == "[DONE]" {
                break Ok(());
            }
            if let Ok(err) = serde_json::from_str::<ErrorBody>(data) {
                break Err(self.error(&err.error.message));
            }
            let chunk: ChatCompletionChunk = match serde_json::from_str(data) {
                Ok(c) => c,
                Err(e) => break Err(self.error(&format!("a streamed chunk does not parse: {e}"))),
            };
            for choice in chunk.choices {
                if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                    first.get_or_insert_with(|| start.elapsed());
                    answer.pieces += 1;
                    answer.text.push_str(&text);
                    on_text(&text);
                }
                if choice.finish_reason.is_some() {
                    answer.finish_reason = choice.finish_reason;
                }
            }
            answer.usage = chunk.usage.or(answer.usage.take());
            answer.timings = chunk.timings.or(answer.timings.take());
            answer.slim = chunk.slim.or(answer.slim.take());
        };
        // the reader closes the connection at its next line: the server stops the answer
        stop_reading.store(true, Ordering::Relaxed);
        result?;
        let total = start.elapsed();
        answer.ttft_ms = first.unwrap_or(total).as_secs_f64() * 1e3;
        answer.total_ms = total.as_secs_f64() * 1e3;
        Ok(answer)
    }
}

fn wire(m: &Message) -> WireMessage {
    let role = match m.role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    };
    WireMessage::new(role, &m.content)
}

type Line = std::result::Result<String, String>;

/// Reads the response body line by line on a thread of its own; it stops, dropping the
/// connection, when `stop` is set or the receiver is gone.
fn spawn_line_reader(
    resp: ureq::Response,
    stop: Arc<AtomicBool>,
) -> std::sync::mpsc::Receiver<Line> {
    let (tx, rx) = channel();
    std::thread::Builder::new()
        .name("slimchat-remote-read".into())
        .spawn(move || {
            let mut reader = BufReader::new(resp.into_reader());
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) => {
                        if stop.load(Ordering::Relaxed)
                            || tx.send(Ok(line.trim_end().to_string())).is_err()
                        {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        break;
                    }
                }
            }
        })
        .expect("spawn the reader thread");
    rx
}
