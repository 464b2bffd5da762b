//! The application config: typed TOML sections with defaults, unknown keys rejected, read from
//! `config.toml` in the XDG config directory (or a path given on the command line).
//! `config.example.toml` at the repository root lists every key with its default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::attention::AttentionKind;
use crate::backend::linear::LinearMode;
use crate::device::DeviceChoice;
use crate::kv::{KvConfig, KvDtype};
use crate::sampling::SamplingConfig;
use crate::slim::schedule::SlimConfig;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    pub model: ModelConfig,
    pub chat: ChatConfig,
    pub sampling: SamplingConfig,
    pub slim: SlimConfig,
    pub kv: KvConfig,
    pub tui: TuiConfig,
    pub serve: ServeConfig,
    pub backend: BackendConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// "default", a path to a .gguf file, or "hf:owner/name[@revision]/file.gguf".
    pub source: String,
    /// Form of the linear layers' weights: "int8" (the GGUF blocks, 8-bit activations, integer
    /// GEMM and GEMV: fastest, compact), "dense" (f32 weights, exact prefill), "quantized"
    /// (candle's quantized matmul) or "dense-f32" (f32 in decode too: the reference).
    pub linear: LinearMode,
    /// Worker threads for the model (0 = one per core).
    pub threads: usize,
    /// Element type of the KV cache: "q8" (default: int8 with an f16 scale per 32 values; a
    /// prompt's own attention still reads its rows at f16 precision; f16 for a model whose head
    /// size is not a multiple of 32), "f16" or "bf16".
    pub kv_dtype: KvDtype,
    /// Kernel of a prompt's attention: "int8" (default: 8-bit Q·Kᵀ and P·V on the integer dot
    /// product; f32 where the CPU has no AVX-512 VNNI) or "f32" (the exact reference). Decode
    /// steps take the single-row kernel either way.
    pub attention: AttentionKind,
    /// Where the model runs: "auto" (CUDA when built with it and a driver is present, else
    /// the CPU), "cpu" or "cuda" (falls back to the CPU with a note when unavailable).
    pub device: DeviceChoice,
    /// Longest prompt plus answer, in tokens: 0 = the model's own context; otherwise at least
    /// [`MIN_CONTEXT`] and at most the model's (a smaller window: less KV memory, and a long
    /// conversation reaches its end sooner).
    pub context: usize,
}

/// The smallest `[model] context` accepted.
pub const MIN_CONTEXT: usize = 128;

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            source: "default".into(),
            linear: LinearMode::Int8,
            threads: 0,
            kv_dtype: KvDtype::Q8,
            attention: AttentionKind::Int8,
            device: DeviceChoice::default(),
            context: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// System prompt; empty means the chat template's own default.
    pub system_prompt: String,
    /// Longest answer, in tokens.
    pub max_tokens: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            system_prompt: String::new(),
            max_tokens: 512,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TuiConfig {
    /// Redraw interval of the chat screen while an answer runs, in milliseconds.
    pub tick_ms: u64,
    /// Pastes of at least this many characters show as one chip instead of filling the input.
    pub paste_chip_chars: usize,
    /// Capture the mouse (wheel scrolls the transcript; the terminal's own selection needs Shift).
    pub mouse: bool,
}

impl Default for TuiConfig {
    fn default() -> Self {
        Self {
            tick_ms: 50,
            paste_chip_chars: 800,
            mouse: true,
        }
    }
}

/// `slimchat serve`: where it listens and how many requests may wait.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Address to listen on. Anything but a loopback address needs an API key.
    pub host: String,
    pub port: u16,
    /// Bearer token clients must send (empty: none; `$SLIMCHAT_API_KEY` is read when empty).
    pub api_key: String,
    /// Requests that may wait behind the running one; more are answered 503 with Retry-After.
    pub queue: usize,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: String::new(),
            queue: 8,
        }
    }
}

/// The chat screen on a remote engine: an OpenAI-compatible server (slimchat serve, llama-server,
/// vLLM, SGLang, ...) instead of the local model.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// Base URL of the API, e.g. `http://127.0.0.1:8080/v1` (empty: the local engine).
    pub url: String,
    /// Bearer token for the server (empty: none; `$SLIMCHAT_BACKEND_KEY` is read when empty).
    pub api_key: String,
    /// Model name to request (empty: the first one the server lists).
    pub model: String,
}

impl AppConfig {
    /// Parse TOML text; any error (syntax, unknown key, bad value) is one line.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let cfg: AppConfig = toml::from_str(text)
            .map_err(|e| Error::Config(format!("{origin}: {}", one_line(&e.to_string()))))?;
        cfg.sampling
            .validate()
            .map_err(|e| Error::Config(format!("{origin}: [sampling] {e}")))?;
        cfg.slim
            .validate_keys()
            .map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        cfg.kv
            .validate()
            .map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        if !(10..=1000).contains(&cfg.tui.tick_ms) {
            return Err(Error::Config(format!(
                "{origin}: [tui] tick_ms must be between 10 and 1000"
            )));
        }
        if cfg.model.context != 0 && cfg.model.context < MIN_CONTEXT {
            return Err(Error::Config(format!(
                "{origin}: [model] context must be 0 (the model's own) or at least {MIN_CONTEXT} tokens, got {}",
                cfg.model.context
            )));
        }
        if cfg.serve.queue == 0 {
            return Err(Error::Config(format!(
                "{origin}: [serve] queue must be at least 1"
            )));
        }
        check_backend_url(&cfg.backend.url)
            .map_err(|e| Error::Config(format!("{origin}: [backend] {e}")))?;
        if cfg.chat.max_tokens == 0 {
            return Err(Error::Config(format!(
                "{origin}: [chat] max_tokens must be at least 1"
            )));
        }
        Ok(cfg)
    }

    /// Load from `path`, or from the default location if `path` is None; a missing default
    /// file means the defaults, a missing explicit file is an error.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => match default_path() {
                Some(p) => (p, false),
                None => return Ok(Self::default()),
            },
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Self::default()),
            Err(e) => Err(Error::Config(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }
}

/// `$SLIMCHAT_CONFIG`, else `<XDG config dir>/slimchat/config.toml`.
/// A remote engine's address is an http(s) URL; empty means the local engine.
pub fn check_backend_url(url: &str) -> std::result::Result<(), String> {
    if url.is_empty() || url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(format!(
            "url must start with http:// or https://, got {url:?}"
        ))
    }
}

pub fn default_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SLIMCHAT_CONFIG") {
        return Some(PathBuf::from(p));
    }
    directories::ProjectDirs::from("", "", "slimchat").map(|d| d.config_dir().join("config.toml"))
}

/// toml's messages span several lines (with a source excerpt); keep the first and the caret note.
fn one_line(msg: &str) -> String {
    let lines: Vec<&str> = msg
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let head = lines.first().copied().unwrap_or("");
    match lines.last() {
        Some(last) if lines.len() > 1 => format!("{head} {last}").replace("  ", " "),
        _ => head.to_string(),
    }
}
