//! What the engine thread reports ([`WorkerEvent`]), applied to the chat screen's state: the
//! model loading, prefill progress, streamed tokens, a refused prompt or one offered a drop of
//! the oldest turns (`overflow.rs`), turns left out, the finished answer's
//! numbers (as [`TurnMetrics`] and a metrics.jsonl record), compare results, and the pruned
//! blocks brought back after an answer.

use crate::engine::{EngineEvent, GenStats, PrefillKind, StopReason};

use super::super::agreement::agreement;
use super::super::store::{ChatMessage, Comparison, Role, TurnMetrics};
use super::super::worker::WorkerEvent;
use super::{thousands, App, Effect, LastStats, ModelInfo, Offer};

impl App {
    pub(super) fn on_worker(&mut self, ev: WorkerEvent) -> Vec<Effect> {
        match ev {
            WorkerEvent::LoadProgress(p) => self.loading = Some(p),
            WorkerEvent::Loaded {
                model,
                context_length,
                n_layers,
                tokenizer,
                pruning,
                remote,
            } => {
                self.loading = None;
                if let Some(t) = tokenizer {
                    self.tokens.set_tokenizer(t);
                }
                self.model = Some(ModelInfo {
                    name: model,
                    context_length,
                    n_layers,
                    pruning,
                    remote,
                });
            }
            WorkerEvent::Engine(EngineEvent::PrefillProgress {
                layers_done,
                n_layers,
                tokens,
                rows,
            }) => {
                let clock = self.clock;
                if let Some(r) = &mut self.running {
                    if r.prefill.is_none() || layers_done <= 1 {
                        r.prefill_started = Some(clock);
                    }
                    r.prefill = Some((layers_done, n_layers, tokens, rows));
                }
            }
            WorkerEvent::Engine(EngineEvent::Memory(m)) => {
                if let Some(r) = &mut self.running {
                    r.memory = Some(m);
                }
            }
            WorkerEvent::Engine(EngineEvent::Healing) => {
                let clock = self.clock;
                if let Some(r) = &mut self.running {
                    r.healing = Some(clock);
                }
            }
            WorkerEvent::Engine(EngineEvent::Healed { blocks, ms, .. }) => {
                if let Some(r) = &mut self.running {
                    r.heal_ms = Some(ms);
                }
                self.say(format!(
                    "the answer reads the whole document from its second token: {blocks} pruned blocks back in {:.1} s",
                    ms / 1e3
                ));
            }
            WorkerEvent::Engine(EngineEvent::Token(t)) => {
                let clock = self.clock;
                if let Some(r) = &mut self.running {
                    r.first_token.get_or_insert(clock);
                    r.tokens += 1;
                    // a heal that brought nothing back says nothing more
                    if r.heal_ms.is_none() && r.tokens > 1 {
                        r.healing = None;
                    }
                }
                if let Some(m) = self.conv.messages.last_mut() {
                    if m.role == Role::Assistant && m.partial {
                        m.content.push_str(&t);
                        self.dirty = true;
                    }
                }
            }
            WorkerEvent::PromptTokens(n) => {
                if let Some(r) = &mut self.running {
                    r.prompt_tokens = Some(n);
                }
            }
            WorkerEvent::Refused {
                prompt_tokens,
                context_length,
            } => {
                self.undo_send();
                self.fail(format!(
                    "not sent: the conversation is {} tokens and the model holds {} (answer included); \
                     shorten the message or /clear",
                    thousands(prompt_tokens),
                    thousands(context_length)
                ));
            }
            WorkerEvent::Overflow {
                prompt_tokens,
                context_length,
                turns,
                after_tokens,
            } => self.on_overflow(Offer {
                prompt_tokens,
                context_length,
                turns,
                after_tokens,
            }),
            WorkerEvent::Dropped {
                ids,
                from_tokens,
                to_tokens,
            } => return self.on_dropped(&ids, from_tokens, to_tokens),
            WorkerEvent::Stats { stats, rss_bytes } => return self.on_stats(&stats, rss_bytes),
            WorkerEvent::Compared {
                dense,
                slim,
                keep_ratio,
            } => {
                let mut note = ChatMessage::new(Role::Note, "compare");
                note.comparison = Some(Comparison {
                    dense: dense.text.clone(),
                    dense_ttft_ms: dense.ttft_ms,
                    slim: slim.text.clone(),
                    slim_ttft_ms: slim.ttft_ms,
                    keep_ratio,
                });
                self.conv.messages.push(note);
                self.say(format!(
                    "compare: TTFT dense {:.0} ms, pruned {:.0} ms ({:.2}x); {}",
                    dense.ttft_ms,
                    slim.ttft_ms,
                    slim.ttft_ms / dense.ttft_ms.max(1e-9),
                    agreement(&dense.text, &slim.text).summary()
                ));
                self.set_last(&slim, 0);
                return vec![Effect::Save];
            }
            WorkerEvent::Done => {
                self.running = None;
                self.ctrl_c_armed = false;
                if let Some(m) = self.conv.messages.last_mut() {
                    if m.role == Role::Assistant && m.partial {
                        m.partial = false;
                        if m.content.is_empty() {
                            self.conv.messages.pop();
                        }
                    }
                }
                self.dirty = false;
                return vec![Effect::Save];
            }
            WorkerEvent::Note(text) => self.say(text),
            WorkerEvent::Healed {
                blocks,
                ms,
                kept_per_layer,
            } => {
                if let Some(l) = self.last.as_mut() {
                    l.kept_per_layer = kept_per_layer;
                    l.whole_again = true;
                }
                self.say(format!(
                    "follow-ups read the whole document: {blocks} pruned blocks back in {:.1} s",
                    ms / 1e3
                ));
            }
            WorkerEvent::Error(e) => {
                if self.model.is_none() {
                    self.load_error = Some(e.clone());
                }
                self.fail(e);
            }
        }
        vec![]
    }

    fn set_last(&mut self, s: &GenStats, rss_bytes: u64) {
        let rss_bytes = if rss_bytes == 0 {
            self.last.as_ref().map_or(0, |l| l.rss_bytes)
        } else {
            rss_bytes
        };
        // an answer that brought the pruned blocks back, or a follow-up over a cache whose
        // pruned blocks came back (before it, or in it)
        let whole_again = s.heal_ms.is_some()
            || s.prefill_kind == PrefillKind::Reused
                && (s.blocks_revived > 0 || self.last.as_ref().is_some_and(|l| l.whole_again));
        self.last = Some(LastStats {
            whole_again,
            heal_ms: s.heal_ms,
            stopped_before_answer: s.stop_reason == StopReason::Cancelled
                && s.generated_tokens == 0,
            ttft_ms: s.ttft_ms,
            prefill_tok_s: s.prefill_tok_s,
            decode_tok_s: s.decode_tok_s,
            prompt_tokens: s.prompt_tokens,
            generated_tokens: s.generated_tokens,
            kv_bytes: s.kv_bytes,
            kv_fast_bytes: s.kv.kv_fast_bytes,
            kv_host_bytes: s.kv.kv_host_bytes,
            rss_bytes,
            kept_per_layer: s.kept_per_layer.clone(),
            slim: s.slim,
            slim_preset: s.slim_preset.clone(),
            gpu_memory: s.gpu_memory,
        });
    }

    fn on_stats(&mut self, s: &GenStats, rss_bytes: u64) -> Vec<Effect> {
        self.set_last(s, rss_bytes);
        if s.stop_reason == StopReason::Cancelled {
            self.say(match s.generated_tokens {
                0 => "stopped before the first token",
                _ => "stopped",
            });
        }
        let metrics = TurnMetrics {
            ttft_ms: s.ttft_ms,
            prefill_tok_s: s.prefill_tok_s,
            decode_tok_s: s.decode_tok_s,
            prompt_tokens: s.prompt_tokens,
            generated_tokens: s.generated_tokens,
            kv_bytes: s.kv_bytes,
            slim: s.slim,
            keep_ratio: self.slim.keep_ratio,
            stop_reason: serde_json::to_value(s.stop_reason)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        };
        let turn = self
            .conv
            .messages
            .iter()
            .filter(|m| m.role == Role::User)
            .count();
        if let Some(m) = self.conv.messages.last_mut() {
            if m.role == Role::Assistant {
                // The engine's text is the whole answer; tokens may have been coalesced.
                m.content = s.text.clone();
                m.metrics = Some(metrics.clone());
            }
        }
        let mut record = serde_json::to_value(&metrics).unwrap_or_default();
        record["conversation"] = self.conv.id.clone().into();
        record["turn"] = turn.into();
        record["reused_tokens"] = s.reused_tokens.into();
        record["kept_per_layer"] = s.kept_per_layer.clone().into();
        record["rss_bytes"] = rss_bytes.into();
        vec![Effect::Metrics(record)]
    }
}
