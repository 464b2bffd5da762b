//! How a conversation reaches the forward: a follow-up reuses the longest cached prefix its
//! pruning allows and runs only its new tokens, any other prompt is prefilled whole (pruned
//! when SlimInfer is on) after its fast-tier KV is checked against `[kv] fast_budget`; then one
//! token at a time, and teacher forcing.

use std::sync::atomic::AtomicBool;

use super::memory::MemoryTicker;
use super::{Engine, EngineEvent, PrefillKind};
use crate::kv::config::Budget;
use crate::model::ops_llama::KvPlacement;
use crate::slim::session::{AfterHeal, SlimSession};
use crate::{Error, Result};

impl Engine {
    /// Error unless a prompt of `n` tokens leaves room for at least one answer token.
    pub fn check_fits(&self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::Prompt("empty prompt".into()));
        }
        if n >= self.context_length() {
            return Err(Error::Prompt(format!(
                "the prompt is {n} tokens but the model's context is {} tokens (the answer needs room too)",
                self.context_length()
            )));
        }
        Ok(())
    }

    /// Make the cache hold exactly `prompt`, reusing the longest cached prefix, and return
    /// the logits after the last prompt token and how many tokens were reused. A fresh prompt
    /// is pruned when SlimInfer is on; a follow-up keeps the earlier turns' pruned KV.
    pub fn prefill(
        &mut self,
        prompt: &[u32],
        on_event: &mut dyn FnMut(EngineEvent),
    ) -> Result<(Vec<f32>, usize)> {
        self.prefill_until(prompt, &AtomicBool::new(false), on_event)
    }

    /// [`Self::prefill`], stopped between two layers once `stop` is set:
    /// [`Error::Cancelled`], and the cache is empty.
    pub fn prefill_until(
        &mut self,
        prompt: &[u32],
        stop: &AtomicBool,
        on_event: &mut dyn FnMut(EngineEvent),
    ) -> Result<(Vec<f32>, usize)> {
        let (mut reused, kind) = self.reusable(prompt);
        // the fast tier must fit before anything changes: a clear error, not a crash mid-answer
        self.plan_kv(prompt.len(), reused == 0)?;
        self.last_prefill_kind = kind;
        // a cache that cannot be cut where the prompt parts from it is prefilled again whole
        if reused > 0 && self.forward.truncate_from(reused).is_err() {
            (reused, self.last_prefill_kind) = (0, PrefillKind::Reprefilled);
        }
        let logits = if reused == 0 {
            self.reset();
            self.prefill_whole(prompt, stop, on_event)
        } else {
            // a new message may need what the first question's pruning dropped (a prompt the
            // cache already holds whole is the same question again: regenerated, not healed)
            if !self.cached.starts_with(prompt) {
                self.start_heal(prompt.len(), AfterHeal::DecodeSets);
            }
            self.forward.extend_until(&prompt[reused..], stop)
        };
        match logits {
            Ok(logits) => {
                if let Some(session) = self.forward.session_mut() {
                    session.take_swaps();
                }
                let fresh_answer = reused == 0 && self.slim.heal_answers;
                self.heal_next_step =
                    fresh_answer && (self.forward.session()).is_some_and(SlimSession::can_heal);
                if fresh_answer && !self.heal_next_step && self.heal_fits(prompt.len() + 1) {
                    // nothing pruned: the answer reads every block from its first step
                    if let Some(session) = self.forward.session_mut() {
                        session.attend_whole_prompt();
                    }
                }
                self.cached = prompt.to_vec();
                Ok((logits, reused))
            }
            Err(e) => {
                // a failed forward may have written some layers only: start clean next time
                self.reset();
                Err(e)
            }
        }
    }

    /// Bring back now, rather than in the next follow-up's prefill, every block the cached
    /// prompt's pruning dropped (`heal_followups`): the chat screen calls this while the person
    /// reads an answer. The conversation's last token runs again to carry the rows (its logits
    /// are not needed). Returns the (block, stage) pairs brought back: 0 when nothing was
    /// pruned, the option is off, or the cache ends in the prompt (a follow-up then heals).
    pub fn heal(&mut self) -> Result<usize> {
        let n = self.cached.len();
        let past_prompt = (self.forward.session()).is_some_and(|s| n > s.prompt_len());
        if !past_prompt || !self.start_heal(n, AfterHeal::DecodeSets) {
            return Ok(0);
        }
        let last = self.cached[n - 1];
        let rerun = (self.forward.truncate_from(n - 1)).and_then(|()| self.forward.extend(&[last]));
        if let Err(e) = rerun {
            self.reset();
            return Err(e);
        }
        Ok(match self.forward.session_mut() {
            Some(session) => {
                session.take_swaps();
                session.take_revived()
            }
            None => 0,
        })
    }

    /// Ask the session to bring every pruned block back on the next forward (`decode`: what
    /// decode attends to then), when something was pruned and a conversation of `tokens`
    /// tokens with every row at every layer stays within `[kv] fast_budget` (a healed slim
    /// layer keeps all its blocks in the fast tier). Whether it will.
    fn start_heal(&mut self, tokens: usize, decode: AfterHeal) -> bool {
        let wanted = match decode {
            AfterHeal::DecodeSets => self.slim.heal_followups,
            AfterHeal::EveryBlock => self.slim.heal_answers,
        };
        wanted
            && self.heal_fits(tokens)
            && (self.forward.session_mut()).is_some_and(|s| s.heal(decode))
    }

    /// Whether a conversation of `tokens` tokens with every row at every layer stays within
    /// `[kv] fast_budget`.
    fn heal_fits(&self, tokens: usize) -> bool {
        let (n_layers, row) = (self.spec.n_layers, self.forward.kv_row_bytes());
        let whole = n_layers * (tokens + self.answer_reserve).min(self.context_length()) * row;
        match (self.forward.kv_placement(), self.kv_cfg.budget()) {
            (KvPlacement::Resident, _) | (_, Ok(Budget::Auto)) => true,
            (_, Ok(Budget::Bytes(b))) => whole <= b,
            (_, Ok(Budget::Tokens(t))) => whole <= t * n_layers * row,
            (_, Err(_)) => false,
        }
    }

    /// Whether the next [`Self::step`] brings back what the prompt's pruning dropped
    /// (`heal_answers`: it is the answer's first step past a fresh pruned prefill, and the
    /// whole conversation fits the fast tier).
    pub fn heals_next_step(&self) -> bool {
        self.heal_next_step && self.heal_fits(self.cached.len() + 1)
    }

    /// How many of `prompt`'s tokens the cache can keep, and how the prompt gets in.
    fn reusable(&self, prompt: &[u32]) -> (usize, PrefillKind) {
        let shared = (self.cached.iter().zip(prompt))
            .take_while(|(a, b)| a == b)
            .count();
        // at least one token must run to produce logits
        let reused = shared.min(prompt.len() - 1);
        let again = |reused| match reused {
            0 => (0, PrefillKind::Full),
            _ => (0, PrefillKind::Reprefilled),
        };
        match self.forward.session() {
            // pruned rows cannot be recomputed in place: a change inside the pruned prompt, or
            // the re-prefill option, starts over
            Some(s) if reused < s.prompt_len() || self.slim.reprefill_followups => again(reused),
            Some(_) => (reused, PrefillKind::Reused),
            // the cache was prefilled dense (pruning was off), and a session prunes from
            // position 0: a follow-up reuses the dense rows, but a prompt that is mostly new (a
            // new document) starts over, pruned
            None if self.slim.enabled && reused > 0 && prompt.len() - reused > reused => {
                again(reused)
            }
            None if reused > 0 => (reused, PrefillKind::Reused),
            None => (0, PrefillKind::Full),
        }
    }

    /// The whole prompt through the forward from an empty cache, pruned when SlimInfer is on,
    /// with room for the answer; progress and memory readings as its layers finish.
    fn prefill_whole(
        &mut self,
        prompt: &[u32],
        stop: &AtomicBool,
        on_event: &mut dyn FnMut(EngineEvent),
    ) -> Result<Vec<f32>> {
        let n_layers = self.spec.n_layers;
        let total = prompt.len();
        let slim = (self.slim.enabled).then_some(&self.slim);
        let headroom = (self.context.saturating_sub(total)).min(self.answer_reserve);
        let mut memory = MemoryTicker::new(Some(self.forward.memory_probe()));
        self.forward
            .prefill(prompt, slim, headroom, stop, &mut |at| {
                on_event(EngineEvent::PrefillProgress {
                    layers_done: at.layer + 1,
                    n_layers,
                    tokens: total,
                    rows: at.rows,
                });
                if let Some(reading) = memory.kv_held(at.kv_fast_bytes, at.kv_host_bytes) {
                    on_event(reading);
                }
            })
    }

    /// Check that the fast tier holds a prompt of `prompt_tokens` tokens (the whole
    /// conversation) and its answer within `[kv] fast_budget`: every row of a layer that
    /// attends to all of them, a tiered slim layer's decode set and the rows past the prompt.
    /// `fresh`: the prompt will not reuse the cached session. An error when it does not fit.
    pub(super) fn plan_kv(&mut self, prompt_tokens: usize, fresh: bool) -> Result<()> {
        if self.forward.kv_placement() == KvPlacement::Resident {
            self.kv_budget = None;
            return Ok(());
        }
        let n_layers = self.spec.n_layers;
        let (stages, prompt_len) = match self.forward.session() {
            Some(s) if !fresh => (s.stages(), s.prompt_len()),
            _ if self.slim.enabled => (self.slim.resolve(n_layers, prompt_tokens), prompt_tokens),
            _ => (Vec::new(), prompt_tokens),
        };
        let total = (prompt_tokens + self.answer_reserve).min(self.context_length());
        let (row, bs) = (self.forward.kv_row_bytes(), self.slim.block_size);
        let (mut whole, mut sets, mut tail) = (0, 0, 0);
        for layer in 0..n_layers {
            match stages.iter().rev().find(|s| s.start_layer <= layer) {
                Some(st) => {
                    sets += st.decode_blocks.min(st.keep_blocks) * bs * row;
                    tail += total.saturating_sub(prompt_len) * row;
                }
                None => whole += total * row,
            }
        }
        let need = whole + sets + tail;
        let budget = match self.kv_cfg.budget().map_err(Error::Config)? {
            Budget::Auto => need,
            Budget::Bytes(b) => b,
            Budget::Tokens(t) => t * n_layers * row,
        };
        if need > budget {
            return Err(Error::Config(format!(
                "[kv] fast_budget of {} is too small for this request: it needs {} (layers attending to every row {}, the slim layers' decode sets {}, rows past the prompt {}); raise [kv] fast_budget or lower [slim] decode_keep",
                mib(budget),
                mib(need),
                mib(whole),
                mib(sets),
                mib(tail)
            )));
        }
        self.kv_budget = Some(budget);
        Ok(())
    }

    /// Teacher-forced logits: run `tokens` at positions 0.. from an empty cache, dense whatever
    /// the pruning setting, and return the logits of rows `from..` as (tokens.len() - from,
    /// vocab), row-major. The cache is empty afterwards.
    pub fn logits_from(&mut self, tokens: &[u32], from: usize) -> Result<Vec<f32>> {
        if tokens.len() > self.context_length() {
            return Err(Error::Prompt(format!(
                "{} tokens do not fit the model's context of {}",
                tokens.len(),
                self.context_length()
            )));
        }
        self.reset();
        let logits = self.forward.logits_from(tokens, from);
        self.reset();
        logits
    }

    /// [`Self::step`] when it heals, with the events around it: `Healing` before, `Healed`
    /// after when blocks came back. Returns the logits and the heal's time (None when nothing
    /// came back). Stopped between two layers once `stop` is set: [`Error::Cancelled`], and the
    /// cache is empty (the next prompt is prefilled whole).
    pub(super) fn step_healing(
        &mut self,
        token: u32,
        stop: &AtomicBool,
        on_event: &mut dyn FnMut(EngineEvent),
    ) -> Result<(Vec<f32>, Option<f64>)> {
        on_event(EngineEvent::Healing);
        let t0 = std::time::Instant::now();
        let logits = self.step_until(token, stop)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let blocks = (self.forward.session()).map_or(0, SlimSession::revived);
        if blocks == 0 {
            return Ok((logits, None));
        }
        let kept_per_layer = self.kept_per_layer();
        on_event(EngineEvent::Healed {
            blocks,
            ms,
            kept_per_layer,
        });
        Ok((logits, Some(ms)))
    }

    /// Run one generated token through the model; the answer's first after a fresh pruned
    /// prefill also brings back what the pruning dropped, with `heal_answers`.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        self.step_until(token, &AtomicBool::new(false))
    }

    /// [`Self::step`], stopped between two layers once `stop` is set.
    fn step_until(&mut self, token: u32, stop: &AtomicBool) -> Result<Vec<f32>> {
        if std::mem::take(&mut self.heal_next_step) {
            self.start_heal(self.cached.len() + 1, AfterHeal::EveryBlock);
        }
        match self.forward.extend_until(&[token], stop) {
            Ok(logits) => {
                self.cached.push(token);
                let swaps = self.forward.session_mut().map(SlimSession::take_swaps);
                self.swaps.extend(swaps);
                Ok(logits)
            }
            Err(e) => {
                // some layers may hold this token already: start clean next time
                self.reset();
                Err(e)
            }
        }
    }
}

fn mib(b: usize) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}
