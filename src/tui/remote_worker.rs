//! The engine thread when the chat screen runs on a remote engine (`[backend] url`): the same
//! [`EngineCmd`]s in and [`WorkerEvent`]s out as the local one, answered over HTTP.
//!
//! The time to first token is measured here, from sending the request; the server's own
//! numbers (prefill and decode rates, kept tokens per layer) are shown where it sends them. The
//! pruning knob reaches only a slimchat server; the tokenizer stays on the server, so token
//! counts of what is about to be sent are estimates.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use crate::config::AppConfig;
use crate::engine::{EngineEvent, GenStats, GenerateRequest, PrefillKind, StopReason};
use crate::kv::KvStats;
use crate::openai_api::SlimRequest;
use crate::remote_client::{RemoteAnswer, RemoteClient};
use crate::slim::schedule::SlimConfig;

use super::worker::{EngineCmd, WorkerEvent};

pub(super) fn remote_main(
    cfg: AppConfig,
    cmds: mpsc::Receiver<EngineCmd>,
    events: UnboundedSender<WorkerEvent>,
    cancel: Arc<AtomicBool>,
) {
    let send = |ev: WorkerEvent| {
        let _ = events.send(ev);
    };
    let client = match RemoteClient::connect(&cfg.backend) {
        Ok(c) => c,
        Err(e) => {
            send(WorkerEvent::Error(e.to_string()));
            return;
        }
    };
    let facts = client.facts.clone();
    send(WorkerEvent::Loaded {
        model: client.model.clone(),
        context_length: facts.as_ref().map_or(0, |f| f.context_length),
        n_layers: facts.as_ref().map_or(0, |f| f.n_layers),
        tokenizer: None,
        pruning: facts.is_some(),
        remote: Some(client.url().to_string()),
    });
    let mut slim = cfg.slim.clone();
    while let Ok(cmd) = cmds.recv() {
        match cmd {
            EngineCmd::Quit => break,
            EngineCmd::Cancel | EngineCmd::Reset => {}
            EngineCmd::SetPruning(s) => slim = s,
            EngineCmd::Generate(chat) => {
                match ask(&client, &chat.req, &slim, &cancel, &send) {
                    Ok(stats) => send(WorkerEvent::Stats {
                        stats: Box::new(stats),
                        rss_bytes: 0,
                    }),
                    Err(e) => send(WorkerEvent::Error(e.to_string())),
                }
                send(WorkerEvent::Done);
            }
            EngineCmd::Compare(req, s) => {
                if client.facts.is_none() {
                    send(WorkerEvent::Error(format!(
                        "compare needs a slimchat server to prune: {} is another engine",
                        client.url()
                    )));
                } else if let Err(e) = compare(&client, &req, s, &cancel, &send) {
                    send(WorkerEvent::Error(e.to_string()));
                }
                send(WorkerEvent::Done);
            }
        }
    }
}

/// One answer, streamed to the screen.
fn ask(
    client: &RemoteClient,
    req: &GenerateRequest,
    slim: &SlimConfig,
    cancel: &AtomicBool,
    send: &dyn Fn(WorkerEvent),
) -> crate::Result<GenStats> {
    let ext = SlimRequest {
        enabled: Some(slim.enabled),
        keep: Some(slim.keep_ratio),
    };
    let answer = client.chat(
        &req.messages,
        req.max_tokens,
        &req.sampling,
        Some(ext),
        cancel,
        &mut |t| send(WorkerEvent::Engine(EngineEvent::Token(t.to_string()))),
    )?;
    if let Some(u) = &answer.usage {
        send(WorkerEvent::PromptTokens(u.prompt_tokens as usize));
    }
    Ok(stats_of(&answer, slim.enabled && client.facts.is_some()))
}

/// Dense, then pruned, without the answers on screen; the numbers side by side.
fn compare(
    client: &RemoteClient,
    req: &GenerateRequest,
    slim: SlimConfig,
    cancel: &AtomicBool,
    send: &dyn Fn(WorkerEvent),
) -> crate::Result<()> {
    let run = |enabled: bool| {
        let ext = SlimRequest {
            enabled: Some(enabled),
            keep: Some(slim.keep_ratio),
        };
        client
            .chat(
                &req.messages,
                req.max_tokens,
                &req.sampling,
                Some(ext),
                cancel,
                &mut |_| {},
            )
            .map(|a| stats_of(&a, enabled))
    };
    let dense = run(false)?;
    if cancel.load(Ordering::Relaxed) {
        return Ok(());
    }
    let pruned = run(true)?;
    if !cancel.load(Ordering::Relaxed) {
        send(WorkerEvent::Compared {
            dense: Box::new(dense),
            slim: Box::new(pruned),
            keep_ratio: slim.keep_ratio,
        });
    }
    Ok(())
}

/// The request's numbers as the screen shows them: what the server reported, the time to
/// first token as measured here.
fn stats_of(a: &RemoteAnswer, asked_slim: bool) -> GenStats {
    let usage = a.usage.clone().unwrap_or_default();
    let timings = a.timings.clone().unwrap_or_default();
    let report = a.slim.clone().unwrap_or_default();
    let cached = usage
        .prompt_tokens_details
        .as_ref()
        .map_or(timings.cache_n, |d| d.cached_tokens) as usize;
    let generated = if usage.completion_tokens > 0 {
        usage.completion_tokens as usize
    } else {
        a.pieces
    };
    let decode_tok_s = if timings.predicted_per_second > 0.0 {
        timings.predicted_per_second
    } else if a.total_ms > a.ttft_ms && generated > 1 {
        (generated - 1) as f64 / ((a.total_ms - a.ttft_ms) / 1e3)
    } else {
        0.0
    };
    let stop_reason = match (a.cancelled, a.finish_reason.as_deref()) {
        (true, _) => StopReason::Cancelled,
        (_, Some("length")) => StopReason::MaxTokens,
        _ => StopReason::EndOfTurn,
    };
    let prompt_tokens = usage.prompt_tokens as usize;
    GenStats {
        text: a.text.clone(),
        prompt_tokens,
        reused_tokens: cached,
        prefilled_tokens: prompt_tokens.saturating_sub(cached),
        generated_tokens: generated,
        ttft_ms: a.ttft_ms,
        heal_ms: None,
        prefill_tok_s: timings.prompt_per_second,
        decode_tok_s,
        kv_bytes: 0,
        stop_reason,
        slim: a.slim.as_ref().map_or(asked_slim, |s| s.enabled),
        prefill_kind: if cached > 0 {
            PrefillKind::Reused
        } else {
            PrefillKind::Full
        },
        kept_per_layer: report.kept_per_layer,
        blocks_swapped_per_step: Vec::new(),
        blocks_revived: 0,
        revival_bytes: 0,
        slim_note: report.note,
        slim_preset: report.preset,
        slim_stages: Vec::new(),
        gpu_memory: None,
        kv: KvStats::default(),
    }
}
