//! `slimchat serve`: the pruned engine behind an OpenAI-compatible HTTP API.
//!
//! One engine thread answers requests in the order they came ([`jobs`]); the HTTP side is axum
//! on a single-threaded tokio runtime ([`routes`]), which only parses, queues and streams. A
//! request whose conversation extends the one the engine answered last (a follow-up question
//! about the same document) reuses that conversation's KV cache.

pub mod jobs;
pub mod routes;
pub mod stop_strings;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use crate::config::AppConfig;
use crate::engine::Engine;
use crate::openai_api::ServerFacts;
use crate::{Error, Result};

use routes::ServerState;

/// Largest request body: a long document as JSON, with room to spare.
const MAX_BODY_BYTES: usize = 64 << 20;

/// The environment variable that holds the API key when no flag or config gives one.
pub const API_KEY_ENV: &str = "SLIMCHAT_API_KEY";

/// Where and how to serve, from `[serve]` and the flags.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    /// Requests that may wait behind the running one; more are refused with 503.
    pub queue: usize,
    /// The model's name in `/v1/models` and in responses.
    pub model_id: String,
}

/// Whether `host` names this machine only.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuses to listen beyond this machine without an API key.
pub fn check_options(opts: &ServeOptions) -> Result<()> {
    if !is_loopback(&opts.host) && opts.api_key.is_none() {
        return Err(Error::Usage(format!(
            "serve: --host {} reaches beyond this machine: set an API key (--api-key, ${API_KEY_ENV} or [serve] api_key)",
            opts.host
        )));
    }
    if opts.queue == 0 {
        return Err(Error::Usage("serve: queue must be at least 1".into()));
    }
    Ok(())
}

/// The address to bind: an IP, or `localhost`.
fn bind_addr(host: &str, port: u16) -> Result<SocketAddr> {
    let ip: IpAddr = if host == "localhost" {
        IpAddr::from([127, 0, 0, 1])
    } else {
        host.parse()
            .map_err(|_| Error::Usage(format!("serve: --host {host:?} is not an IP address")))?
    };
    Ok(SocketAddr::new(ip, port))
}

/// Serves `engine` until Ctrl-C. Prints one line with the address once it listens (the port
/// chosen by the system when `port` is 0).
pub fn run(cfg: &AppConfig, engine: Engine, opts: ServeOptions) -> Result<()> {
    check_options(&opts)?;
    let addr = bind_addr(&opts.host, opts.port)?;
    let facts = ServerFacts {
        context_length: engine.context_length(),
        n_layers: engine.spec.n_layers,
        slim_enabled: cfg.slim.enabled,
        keep: (cfg.slim.keep_ratio as f64 * 1000.0).round() / 1000.0,
    };
    let queue = jobs::start(engine, opts.queue, cfg.slim.clone(), cfg.chat.max_tokens);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let state = Arc::new(ServerState {
        queue,
        model_id: opts.model_id.clone(),
        facts,
        api_key: opts.api_key.clone(),
        sampling: cfg.sampling.clone(),
        started,
        next_id: AtomicU64::new(1),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/models", get(routes::models))
        .route("/health", get(routes::health))
        .fallback(routes::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::require_key,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            Error::Io(std::io::Error::new(
                e.kind(),
                format!("cannot listen on {addr}: {e}"),
            ))
        })?;
        let bound = listener.local_addr()?;
        println!(
            "slimchat serve: {} on http://{bound}/v1 (queue {}{})",
            opts.model_id,
            opts.queue,
            if opts.api_key.is_some() {
                ", API key required"
            } else {
                ""
            }
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .map_err(Error::Io)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(host: &str, key: Option<&str>) -> ServeOptions {
        ServeOptions {
            host: host.into(),
            port: 0,
            api_key: key.map(str::to_string),
            queue: 4,
            model_id: "m".into(),
        }
    }

    #[test]
    fn a_public_host_needs_a_key() {
        assert!(check_options(&opts("127.0.0.1", None)).is_ok());
        assert!(check_options(&opts("localhost", None)).is_ok());
        assert!(check_options(&opts("::1", None)).is_ok());
        let e = check_options(&opts("0.0.0.0", None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("API key"), "{e}");
        assert!(check_options(&opts("0.0.0.0", Some("k"))).is_ok());
    }
}
