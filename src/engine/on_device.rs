//! The engine's prefill on a device forward (`--device cuda`): a follow-up runs its new tokens
//! after the cached conversation, any other prompt is prefilled whole on the device.

use super::memory::MemoryTicker;
use super::{Engine, EngineEvent, PrefillKind};
use crate::kv::{KvDtype, KvStats};
use crate::Result;

impl Engine {
    /// [`Engine::prefill`] on the device forward: a prompt that continues the cached one runs
    /// its new tokens only, when the context has room for them and the answer (the device's
    /// pools grow as they need); any other is prefilled whole, pruned when SlimInfer is on,
    /// with room for the answer.
    pub(super) fn prefill_on_device(
        &mut self,
        prompt: &[u32],
        on_event: &mut dyn FnMut(EngineEvent),
    ) -> Result<(Vec<f32>, usize)> {
        let device = self.device.as_mut().expect("checked by the caller");
        let shared = (self.cached.iter().zip(prompt))
            .take_while(|(a, b)| a == b)
            .count();
        let new = prompt.len() - shared;
        if shared > 0
            && shared == self.cached.len()
            && new > 0
            && new + self.answer_reserve <= device.room()
        {
            let logits = device.extend(&prompt[shared..]);
            return self.after_device_prefill(prompt, logits, PrefillKind::Reused, shared);
        }
        self.reset();
        let n_layers = self.model.spec.n_layers;
        let total = prompt.len();
        let slim = (self.slim.enabled).then_some(&self.slim);
        let headroom = (self.context.saturating_sub(prompt.len())).min(self.answer_reserve);
        let device = self.device.as_mut().expect("checked by the caller");
        let mut memory = MemoryTicker::new(0, 0, Some(device.memory_probe()));
        let logits = device.prefill(prompt, slim, headroom, &mut |at| {
            on_event(EngineEvent::PrefillProgress {
                layers_done: at.layer + 1,
                n_layers,
                tokens: total,
                rows: at.rows,
            });
            if let Some(reading) = memory.kv_held(at.kv_fast_bytes, at.kv_host_bytes) {
                on_event(reading);
            }
        });
        self.after_device_prefill(prompt, logits, PrefillKind::Full, 0)
    }

    /// [`Engine::take_kv_stats`] on the device forward (None on the CPU engine): its tiers'
    /// numbers, what a dense cache would hold, and a note when the configured KV element type
    /// is not the device's.
    pub(super) fn device_kv_stats(&mut self) -> Option<KvStats> {
        let configured = self.kv_dtype();
        let n_layers = self.model.spec.n_layers;
        let d = self.device.as_mut()?;
        let mut stats = d.take_kv_stats();
        stats.kv_dense_bytes = self.cached.len() * n_layers * d.kv_row_bytes();
        if configured != KvDtype::Bf16 {
            stats.kv_notes.push(format!(
                "the device forward keeps K and V in bf16 (kv_dtype = {} applies to the CPU engine)",
                format!("{configured:?}").to_lowercase()
            ));
        }
        Some(stats)
    }

    /// The cache holds `prompt` when the device's run succeeded; a failed one may have written
    /// some layers only: start clean next time.
    fn after_device_prefill(
        &mut self,
        prompt: &[u32],
        logits: Result<Vec<f32>>,
        kind: PrefillKind,
        reused: usize,
    ) -> Result<(Vec<f32>, usize)> {
        match logits {
            Ok(logits) => {
                self.last_prefill_kind = kind;
                self.cached = prompt.to_vec();
                Ok((logits, reused))
            }
            Err(e) => {
                self.reset();
                Err(e)
            }
        }
    }
}
