//! The engine thread. It owns the [`Engine`] and takes [`EngineCmd`]s from the screen; it
//! answers with [`WorkerEvent`]s on a tokio channel, so the screen never waits on the model.
//! Cancelling is a shared flag the screen sets directly: a running `generate` sees it at the
//! next token.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::config::AppConfig;
use crate::context_fit::{self, ChatRequest, Fit};
use crate::engine::{Engine, EngineEvent, GenStats, GenerateRequest};
use crate::model::source::DownloadProgress;
use crate::slim::schedule::SlimConfig;
use crate::tui::tokens::SharedTokenizer;

/// What the screen asks of the engine thread.
#[derive(Debug, Clone)]
pub enum EngineCmd {
    /// Answer the conversation. When it leaves no room for the answer and leaving out the
    /// oldest turns would: they are left out ([`WorkerEvent::Dropped`]) if the request says so,
    /// else nothing runs and [`WorkerEvent::Overflow`] offers it; refused
    /// ([`WorkerEvent::Refused`]) when nothing can make it fit.
    Generate(ChatRequest),
    /// Stop the running request (the handle also sets the flag at once).
    Cancel,
    /// Pruning settings for the next request on.
    SetPruning(SlimConfig),
    /// Forget the cached conversation.
    Reset,
    /// Run the request dense, then pruned with this config, each from an empty cache.
    Compare(GenerateRequest, SlimConfig),
    Quit,
}

/// What the engine thread reports.
#[derive(Debug, Clone)]
pub enum WorkerEvent {
    /// Model download or unpack progress.
    LoadProgress(DownloadProgress),
    Loaded {
        model: String,
        context_length: usize,
        n_layers: usize,
        /// For exact token counts of what the person is about to send.
        tokenizer: Option<SharedTokenizer>,
        /// Whether the pruning knob reaches the engine (a remote engine other than slimchat
        /// does not prune).
        pruning: bool,
        /// The server's URL when the engine is remote.
        remote: Option<String>,
    },
    /// The request's prefill progress, answer text and memory, as the engine reports them.
    Engine(EngineEvent),
    /// The request's prompt, as the model sees it, is this many tokens (sent before prefill).
    PromptTokens(usize),
    /// The prompt does not fit in the model's context; nothing was run.
    Refused {
        prompt_tokens: usize,
        context_length: usize,
    },
    /// The message leaves no room for the answer; leaving out the `turns` oldest turns would
    /// bring the conversation from `prompt_tokens` to `after_tokens`. Nothing was run.
    Overflow {
        prompt_tokens: usize,
        context_length: usize,
        turns: usize,
        after_tokens: usize,
    },
    /// The turns whose user messages are at `ids` were left out, taking the prompt from
    /// `from_tokens` to `to_tokens` (sent before the prefill).
    Dropped {
        ids: Vec<usize>,
        from_tokens: usize,
        to_tokens: usize,
    },
    /// Numbers of the request that just finished, with the process RSS.
    Stats {
        stats: Box<GenStats>,
        rss_bytes: u64,
    },
    /// The results of a compare: dense then pruned.
    Compared {
        dense: Box<GenStats>,
        slim: Box<GenStats>,
        keep_ratio: f32,
    },
    /// Something the person should know that is no error (the model's chat template was
    /// replaced at load, say).
    Note(String),
    /// After an answer, while the screen waited: the blocks the prompt's pruning dropped are
    /// back (`blocks` block-stage pairs, in `ms`), so a follow-up reads the whole document;
    /// every layer now keeps `kept_per_layer` rows.
    Healed {
        blocks: usize,
        ms: f64,
        kept_per_layer: Vec<usize>,
    },
    /// The request ended (after `Stats`, `Refused`, `Compared` or `Error`).
    Done,
    Error(String),
}

/// The screen's handle on the engine thread.
pub struct Worker {
    cmds: mpsc::Sender<EngineCmd>,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread, which resolves (maybe downloads) and loads the model first, or
    /// connects to the remote engine `[backend] url` names.
    pub fn spawn(cfg: &AppConfig) -> (Worker, UnboundedReceiver<WorkerEvent>) {
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (ev_tx, ev_rx) = unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = cancel.clone();
        let cfg = cfg.clone();
        let thread = std::thread::Builder::new()
            .name("slimchat-engine".into())
            .spawn(move || {
                if cfg.backend.url.is_empty() {
                    worker_main(cfg, cmd_rx, ev_tx, flag)
                } else {
                    super::remote_worker::remote_main(cfg, cmd_rx, ev_tx, flag)
                }
            })
            .expect("spawn the engine thread");
        (
            Worker {
                cmds: cmd_tx,
                cancel,
                thread: Some(thread),
            },
            ev_rx,
        )
    }

    /// Sends a command; `Cancel` also sets the flag at once, and a new request clears it.
    pub fn send(&self, cmd: EngineCmd) {
        match cmd {
            EngineCmd::Cancel => self.cancel.store(true, Ordering::Relaxed),
            EngineCmd::Generate(_) | EngineCmd::Compare(..) => {
                self.cancel.store(false, Ordering::Relaxed)
            }
            _ => {}
        }
        let _ = self.cmds.send(cmd);
    }
}

impl Drop for Worker {
    /// Stops the running request and tells the thread to end, without waiting for it: a
    /// prefill or a download in progress must not hold up quitting.
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        let _ = self.cmds.send(EngineCmd::Quit);
        drop(self.thread.take());
    }
}

fn worker_main(
    cfg: AppConfig,
    cmds: mpsc::Receiver<EngineCmd>,
    events: UnboundedSender<WorkerEvent>,
    cancel: Arc<AtomicBool>,
) {
    let send = |ev: WorkerEvent| {
        let _ = events.send(ev);
    };
    let mut engine = match load(&cfg, &send) {
        Ok(e) => e,
        Err(e) => {
            send(WorkerEvent::Error(format!("cannot load the model: {e}")));
            return;
        }
    };
    send(WorkerEvent::Loaded {
        model: crate::model::source::display_name(&cfg.model.source),
        context_length: engine.context_length(),
        n_layers: engine.spec.n_layers,
        tokenizer: Some(SharedTokenizer(Arc::new(engine.tokenizer.clone()))),
        pruning: true,
        remote: None,
    });
    if let Some(note) = engine.template.note() {
        send(WorkerEvent::Note(note.to_string()));
    }
    let mut pending = None;
    while let Some(cmd) = pending.take().or_else(|| cmds.recv().ok()) {
        match cmd {
            EngineCmd::Quit => break,
            EngineCmd::Cancel => {}
            EngineCmd::Reset => engine.reset(),
            EngineCmd::SetPruning(slim) => {
                if let Err(e) = engine.set_slim(slim) {
                    send(WorkerEvent::Error(e.to_string()));
                }
            }
            EngineCmd::Generate(chat) => {
                match answer(&mut engine, &chat, &cancel, &send) {
                    Ok(Some(stats)) => send(WorkerEvent::Stats {
                        stats: Box::new(stats),
                        rss_bytes: crate::metrics::rss_bytes(),
                    }),
                    Ok(None) => {}
                    Err(e) => send(WorkerEvent::Error(e.to_string())),
                }
                send(WorkerEvent::Done);
                // while the person reads the answer, unless something else is already asked
                match cmds.try_recv() {
                    Ok(next) => pending = Some(next),
                    Err(_) => heal(&mut engine, &send),
                }
            }
            EngineCmd::Compare(req, slim) => {
                if let Err(e) = compare(&mut engine, &req, slim, &cancel, &send) {
                    send(WorkerEvent::Error(e.to_string()));
                }
                send(WorkerEvent::Done);
            }
        }
    }
}

/// Brings back what the last prompt's pruning dropped ([`Engine::heal`]), so that a follow-up
/// reads the whole document without paying for it in its own time to first token.
fn heal(engine: &mut Engine, send: &dyn Fn(WorkerEvent)) {
    let t0 = std::time::Instant::now();
    match engine.heal() {
        Ok(0) => {}
        Ok(blocks) => send(WorkerEvent::Healed {
            blocks,
            ms: t0.elapsed().as_secs_f64() * 1e3,
            kept_per_layer: engine.kept_per_layer(),
        }),
        Err(e) => send(WorkerEvent::Error(format!(
            "bringing back the pruned blocks: {e}"
        ))),
    }
}

fn load(cfg: &AppConfig, send: &dyn Fn(WorkerEvent)) -> crate::Result<Engine> {
    Engine::load_configured(cfg, &mut |p| send(WorkerEvent::LoadProgress(p.clone())))
}

/// Answers a conversation: as it is when it fits, without its oldest turns when the request
/// says so, else (None) offers that or refuses; a prompt is never truncated.
fn answer(
    engine: &mut Engine,
    chat: &ChatRequest,
    cancel: &AtomicBool,
    send: &dyn Fn(WorkerEvent),
) -> crate::Result<Option<GenStats>> {
    let context_length = engine.context_length();
    let prompt = match context_fit::fit(engine, chat)? {
        Fit::Send { prompt } => prompt,
        Fit::Drop {
            ids,
            prompt,
            full_tokens,
        } if chat.drop_oldest => {
            send(WorkerEvent::Dropped {
                ids,
                from_tokens: full_tokens,
                to_tokens: prompt.len(),
            });
            prompt
        }
        Fit::Drop {
            ids,
            prompt,
            full_tokens,
        } => {
            send(WorkerEvent::Overflow {
                prompt_tokens: full_tokens,
                context_length,
                turns: ids.len(),
                after_tokens: prompt.len(),
            });
            return Ok(None);
        }
        Fit::TooLong { prompt_tokens, .. } => {
            send(WorkerEvent::Refused {
                prompt_tokens,
                context_length,
            });
            return Ok(None);
        }
    };
    run_prompt(engine, &prompt, &chat.req, cancel, send)
}

/// Streams the answer to `prompt` (already templated).
fn run_prompt(
    engine: &mut Engine,
    prompt: &[u32],
    req: &GenerateRequest,
    cancel: &AtomicBool,
    send: &dyn Fn(WorkerEvent),
) -> crate::Result<Option<GenStats>> {
    send(WorkerEvent::PromptTokens(prompt.len()));
    let stats =
        engine.generate_from_tokens(prompt, req.max_tokens, &req.sampling, cancel, &mut |ev| {
            send(WorkerEvent::Engine(ev))
        })?;
    Ok(Some(stats))
}

/// Runs one request, refusing (None) a prompt that does not fit instead of truncating it.
fn generate(
    engine: &mut Engine,
    req: &GenerateRequest,
    cancel: &AtomicBool,
    send: &dyn Fn(WorkerEvent),
) -> crate::Result<Option<GenStats>> {
    let prompt = engine.encode_chat(&req.messages)?;
    if prompt.len() >= engine.context_length() {
        send(WorkerEvent::Refused {
            prompt_tokens: prompt.len(),
            context_length: engine.context_length(),
        });
        return Ok(None);
    }
    run_prompt(engine, &prompt, req, cancel, send)
}

/// Dense, then pruned, each after `reset` so both prefill the whole prompt; the engine's own
/// pruning settings are restored and the cache emptied afterwards.
fn compare(
    engine: &mut Engine,
    req: &GenerateRequest,
    slim: SlimConfig,
    cancel: &AtomicBool,
    send: &dyn Fn(WorkerEvent),
) -> crate::Result<()> {
    let saved = engine.slim_config().clone();
    let run = |engine: &mut Engine, cfg: SlimConfig| -> crate::Result<Option<GenStats>> {
        engine.set_slim(cfg)?;
        engine.reset();
        generate(engine, req, cancel, &|ev| match ev {
            WorkerEvent::Engine(EngineEvent::Token(_)) => {}
            other => send(other),
        })
    };
    let dense = run(
        engine,
        SlimConfig {
            enabled: false,
            ..slim.clone()
        },
    );
    let keep_ratio = slim.keep_ratio;
    let pruned = match &dense {
        Ok(Some(_)) if !cancel.load(Ordering::Relaxed) => run(
            engine,
            SlimConfig {
                enabled: true,
                ..slim
            },
        ),
        _ => Ok(None),
    };
    engine.reset();
    engine.set_slim(saved)?;
    if let (Some(dense), Some(slim)) = (dense?, pruned?) {
        send(WorkerEvent::Compared {
            dense: Box::new(dense),
            slim: Box::new(slim),
            keep_ratio,
        });
    }
    Ok(())
}
