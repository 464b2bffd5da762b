//! The wire format of the OpenAI chat-completions API as slimchat speaks it: what `slimchat serve`
//! reads and writes, and what the chat screen sends to a remote engine (`[backend] url`).
//!
//! Requests keep only the fields slimchat acts on; serde ignores the rest, as OpenAI-compatible
//! servers do. slimchat's own additions are one request field, `slim` (pruning for this request),
//! and two response fields: `timings` (named and shaped as llama.cpp's llama-server reports them,
//! plus the time to first token) and `slim` (the schedule that applied and the KV rows each layer
//! kept).

use serde::{Deserialize, Serialize};

use crate::engine::GenStats;

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<WireMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// `POST /v1/completions`: a raw prompt, no chat template.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptField,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// Sampling, stopping, streaming and pruning: the fields both endpoints share.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct CommonParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopField>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// slimchat's extension: pruning for this request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slim: Option<SlimRequest>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `"slim": {"enabled": false}` runs the request dense; `"slim": {"keep": 0.5}` prunes it at
/// that keep ratio. A field left out takes the server's setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
pub struct SlimRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<f32>,
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

/// `prompt`: one string, or a list holding one.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

/// A message as clients send it: `content` is a string, a list of parts (only `text` parts
/// are read) or null (an assistant turn that only called tools).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WireMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

impl WireMessage {
    pub fn new(role: &str, text: &str) -> Self {
        Self {
            role: role.to_string(),
            content: Some(Content::Text(text.to_string())),
        }
    }

    /// The message's text: a string as it is, text parts joined; other parts (images) are an
    /// error, since the model reads text only.
    pub fn text(&self) -> Result<String, String> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(s)) => Ok(s.clone()),
            Some(Content::Parts(parts)) => {
                let mut out = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        (kind, _) => {
                            return Err(format!(
                                "message content part of type {kind:?} is not supported: this model reads text"
                            ))
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// Token counts, as OpenAI reports them.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV was reused from an earlier request.
    pub cached_tokens: u64,
}

/// Timings as llama-server reports them (`prompt_*`: the prefill, `predicted_*`: the decode),
/// plus the time to first token and how long the request waited in the queue.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Timings {
    /// Prompt tokens reused from the cache.
    pub cache_n: u64,
    /// Prompt tokens run through the model.
    pub prompt_n: u64,
    pub prompt_ms: f64,
    pub prompt_per_second: f64,
    pub predicted_n: u64,
    pub predicted_ms: f64,
    pub predicted_per_second: f64,
    /// From the start of the request's run to its first token, on the server.
    pub ttft_ms: f64,
    pub queue_ms: f64,
}

/// What pruning did for this request.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct SlimReport {
    pub enabled: bool,
    pub keep: f64,
    /// The preset whose schedule applied.
    pub preset: String,
    /// KV rows (prompt tokens) each layer kept after the prefill.
    pub kept_per_layer: Vec<usize>,
    /// Why nothing was pruned, when pruning was on but the prompt was too short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Usage {
    pub fn from_stats(s: &GenStats) -> Self {
        Usage {
            prompt_tokens: s.prompt_tokens as u64,
            completion_tokens: s.generated_tokens as u64,
            total_tokens: (s.prompt_tokens + s.generated_tokens) as u64,
            prompt_tokens_details: Some(PromptTokensDetails {
                cached_tokens: s.reused_tokens as u64,
            }),
        }
    }
}

impl Timings {
    /// `total_ms`: the whole run on the engine thread (prefill and decode).
    pub fn from_stats(s: &GenStats, total_ms: f64, queue_ms: f64) -> Self {
        let prompt_ms = if s.prefill_tok_s > 0.0 {
            s.prefilled_tokens as f64 / s.prefill_tok_s * 1e3
        } else {
            0.0
        };
        Timings {
            cache_n: s.reused_tokens as u64,
            prompt_n: s.prefilled_tokens as u64,
            prompt_ms,
            prompt_per_second: s.prefill_tok_s,
            predicted_n: s.generated_tokens as u64,
            predicted_ms: (total_ms - s.ttft_ms).max(0.0),
            predicted_per_second: s.decode_tok_s,
            ttft_ms: s.ttft_ms,
            queue_ms,
        }
    }
}

/// A whole answer (`stream: false`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
    #[serde(default)]
    pub timings: Option<Timings>,
    #[serde(default)]
    pub slim: Option<SlimReport>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: Option<String>,
    pub logprobs: Option<()>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AssistantMessage {
    pub role: String,
    pub content: String,
}

/// One server-sent event of a streamed answer (`stream: true`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<Timings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slim: Option<SlimReport>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    /// Present when the server is slimchat: what the chat screen needs to show its panel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slimchat: Option<ServerFacts>,
}

/// A slimchat server's model: context, depth and pruning settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ServerFacts {
    pub context_length: usize,
    pub n_layers: usize,
    pub slim_enabled: bool,
    pub keep: f64,
}

/// An error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub param: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn new(kind: &str, code: Option<&str>, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                message: crate::error::one_line(&message.into()),
                kind: kind.to_string(),
                param: None,
                code: code.map(str::to_string),
            },
        }
    }
}
