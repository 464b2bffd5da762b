//! The server's engine thread and its bounded FIFO queue.
//!
//! One engine answers one request at a time. HTTP handlers hand it [`Job`]s through a queue of
//! fixed length; a full queue is refused at once ([`Busy`]) so the handler can answer 503. Each
//! job carries its own cancel flag, which the handler sets when its client goes away: a queued
//! job is then skipped, and a running one stops at its next decode step. Events flow back on a
//! per-job channel.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::engine::{Engine, EngineEvent, GenStats, StopReason};
use crate::error::panic_message;
use crate::model::template::Message;
use crate::openai_api::SlimRequest;
use crate::sampling::SamplingConfig;
use crate::slim::schedule::SlimConfig;
use crate::Error;

use super::stop_strings::StopMatcher;

/// What to answer.
#[derive(Debug, Clone)]
pub enum JobPrompt {
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<Message>),
    /// Raw text (`/v1/completions`): tokenized as it is, BOS in front when the model wants one.
    Text(String),
}

/// One request for the engine thread.
#[derive(Debug)]
pub struct Job {
    /// The response's id, for the server's log.
    pub id: String,
    pub prompt: JobPrompt,
    /// None: as many as the context leaves room for, up to the server's default.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingConfig,
    pub stop: Vec<String>,
    pub slim: SlimRequest,
    pub cancel: Arc<AtomicBool>,
    pub events: UnboundedSender<JobEvent>,
    pub queued_at: Instant,
}

/// What the engine thread reports for a job.
#[derive(Debug)]
pub enum JobEvent {
    /// The job left the queue: its prompt fits and the prefill begins.
    Started,
    /// Answer text, stop strings already cut.
    Text(String),
    Finished(Box<Finished>),
    Failed(JobError),
}

#[derive(Debug)]
pub struct Finished {
    pub stats: GenStats,
    /// `"stop"` (end of turn or a stop string) or `"length"` (max tokens or a full context).
    pub finish_reason: &'static str,
    /// The whole run on the engine thread (prefill and decode), in ms.
    pub total_ms: f64,
    pub queue_ms: f64,
    /// The keep ratio the request ran with.
    pub keep: f32,
}

/// Why a job did not run to its end.
#[derive(Debug, Clone)]
pub enum JobError {
    /// The request asks for something impossible (HTTP 400).
    Invalid {
        message: String,
        code: Option<&'static str>,
    },
    /// The engine failed (HTTP 500).
    Engine(String),
}

/// The queue is full.
#[derive(Debug)]
pub struct Busy {
    pub queued: usize,
}

/// The handlers' side of the engine thread.
#[derive(Clone)]
pub struct JobQueue {
    tx: SyncSender<Job>,
    /// Jobs sent and not yet taken by the engine thread.
    waiting: Arc<AtomicUsize>,
}

impl JobQueue {
    /// Queues a job, or refuses it when `capacity` jobs are already waiting.
    pub fn submit(&self, job: Job) -> Result<(), Busy> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                let queued = self.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
                Err(Busy { queued })
            }
        }
    }

    /// Jobs waiting for the engine now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// Starts the engine thread with `capacity` places in its queue. `defaults`: the server's
/// pruning settings, which a request's `slim` field overrides; `max_tokens`: the answer length
/// when a request names none.
pub fn start(engine: Engine, capacity: usize, defaults: SlimConfig, max_tokens: usize) -> JobQueue {
    let (tx, rx) = sync_channel(capacity.max(1));
    let waiting = Arc::new(AtomicUsize::new(0));
    let counter = waiting.clone();
    std::thread::Builder::new()
        .name("slimchat-serve-engine".into())
        .spawn(move || {
            let mut runner = Runner {
                engine,
                defaults: defaults.clone(),
                applied: defaults,
                max_tokens,
            };
            runner.serve(rx, &counter)
        })
        .expect("spawn the engine thread");
    JobQueue { tx, waiting }
}

struct Runner {
    engine: Engine,
    defaults: SlimConfig,
    /// The pruning settings the engine holds now.
    applied: SlimConfig,
    max_tokens: usize,
}

impl Runner {
    fn serve(&mut self, rx: Receiver<Job>, waiting: &AtomicUsize) {
        while let Ok(job) = rx.recv() {
            waiting.fetch_sub(1, Ordering::SeqCst);
            if job.cancel.load(Ordering::Relaxed) || job.events.is_closed() {
                continue;
            }
            let events = job.events.clone();
            // a bug in the engine fails its request, not the server: the thread would be gone
            // and every later request refused
            let outcome =
                panic::catch_unwind(AssertUnwindSafe(|| self.run(job))).unwrap_or_else(|payload| {
                    self.engine.reset();
                    Err(JobError::Engine(format!(
                        "the engine failed: {}",
                        panic_message(payload.as_ref())
                    )))
                });
            let event = match outcome {
                Ok(done) => JobEvent::Finished(Box::new(done)),
                Err(e) => JobEvent::Failed(e),
            };
            let _ = events.send(event);
        }
    }

    fn run(&mut self, job: Job) -> Result<Finished, JobError> {
        let queue_ms = job.queued_at.elapsed().as_secs_f64() * 1e3;
        let slim = self.slim_for(&job.slim)?;
        let prompt = match &job.prompt {
            JobPrompt::Chat(messages) => self.engine.encode_chat(messages),
            JobPrompt::Text(text) => self.engine.encode(text),
        }
        .map_err(invalid)?;
        let context = self.engine.context_length();
        if prompt.len() >= context {
            return Err(JobError::Invalid {
                message: format!(
                    "the prompt is {} tokens but the model's context is {context} tokens (the answer needs room too)",
                    prompt.len()
                ),
                code: Some("context_length_exceeded"),
            });
        }
        let room = context - prompt.len();
        let max_tokens = job.max_tokens.unwrap_or(self.max_tokens).min(room);
        self.apply(slim).map_err(invalid)?;
        let _ = job.events.send(JobEvent::Started);
        let mut matcher = StopMatcher::new(job.stop.clone());
        let cancel = &job.cancel;
        let events = &job.events;
        let start = Instant::now();
        let result = self.engine.generate_from_tokens(
            &prompt,
            max_tokens,
            &job.sampling,
            cancel,
            &mut |ev| {
                if let EngineEvent::Token(piece) = ev {
                    let text = matcher.push(&piece);
                    if !text.is_empty() && events.send(JobEvent::Text(text)).is_err() {
                        // the handler is gone: its client disconnected
                        cancel.store(true, Ordering::Relaxed);
                    }
                    if matcher.stopped() {
                        cancel.store(true, Ordering::Relaxed);
                    }
                }
            },
        );
        let stats = result.map_err(|e| match e {
            Error::Prompt(m) => JobError::Invalid {
                message: m,
                code: Some("context_length_exceeded"),
            },
            other => JobError::Engine(other.to_string()),
        })?;
        if !matcher.stopped() {
            let tail = matcher.finish();
            if !tail.is_empty() {
                let _ = events.send(JobEvent::Text(tail));
            }
        }
        let finish_reason = if matcher.stopped() {
            "stop"
        } else {
            match stats.stop_reason {
                StopReason::EndOfTurn | StopReason::Cancelled => "stop",
                StopReason::MaxTokens | StopReason::ContextFull => "length",
            }
        };
        let total_ms = start.elapsed().as_secs_f64() * 1e3;
        log_done(&job.id, &stats, finish_reason, matcher.stopped());
        Ok(Finished {
            stats,
            finish_reason,
            total_ms,
            queue_ms,
            keep: self.applied.keep_ratio,
        })
    }

    /// The server's pruning settings with the request's overrides.
    fn slim_for(&self, req: &SlimRequest) -> Result<SlimConfig, JobError> {
        let mut slim = self.defaults.clone();
        if let Some(on) = req.enabled {
            slim.enabled = on;
        }
        if let Some(keep) = req.keep {
            if !(keep > 0.0 && keep <= 1.0) {
                return Err(JobError::Invalid {
                    message: format!("slim.keep must be in (0, 1], got {keep}"),
                    code: None,
                });
            }
            slim.keep_ratio = keep;
        }
        Ok(slim)
    }

    /// Sets the engine's pruning for the next run. A dense request after a pruned one starts
    /// from an empty cache: reusing the pruned rows would answer it pruned.
    fn apply(&mut self, slim: SlimConfig) -> crate::Result<()> {
        if !slim.enabled && self.engine.slim_trace().is_some() {
            self.engine.reset();
        }
        if slim != self.applied {
            self.engine.set_slim(slim.clone())?;
            self.applied = slim;
        }
        Ok(())
    }
}

/// One line on stderr per answered request.
fn log_done(id: &str, s: &GenStats, finish_reason: &str, stop_string: bool) {
    let why = match s.stop_reason {
        StopReason::Cancelled if !stop_string => "cancelled: the client went away",
        _ => finish_reason,
    };
    eprintln!(
        "slimchat serve: {id}: {} prompt tokens ({} cached), {} generated, TTFT {:.0} ms, {:.1} tok/s, {why}{}",
        s.prompt_tokens,
        s.reused_tokens,
        s.generated_tokens,
        s.ttft_ms,
        s.decode_tok_s,
        if s.slim { ", pruning on" } else { "" }
    );
}

fn invalid(e: Error) -> JobError {
    JobError::Invalid {
        message: e.to_string(),
        code: None,
    }
}

/// A job's event channel.
pub fn channel() -> (UnboundedSender<JobEvent>, UnboundedReceiver<JobEvent>) {
    unbounded_channel()
}
