//! Memory readings while an answer runs ([`EngineEvent::Memory`]): after each prefill layer and
//! each decode step, at most one every [`MEMORY_EVERY`], so the metrics panel shows the KV
//! growing, the process's resident set and the GPU's memory live rather than at the answer's
//! end; and the request's KV numbers for `run --json` ([`Engine::take_kv_stats`]).

use std::time::{Duration, Instant};

use super::{Engine, EngineEvent};
use crate::device_forward::MemoryProbe;
use crate::kv::KvStats;
use crate::metrics::{rss_bytes, MemoryNow};

/// The shortest time between two readings (a reading costs a read of /proc and, on a GPU, one
/// driver call).
pub const MEMORY_EVERY: Duration = Duration::from_millis(250);

/// Decides when a reading is due.
pub(super) struct MemoryTicker {
    last: Instant,
    probe: Option<MemoryProbe>,
}

impl MemoryTicker {
    /// `probe` reads the device's memory during a prefill (None: only the clock; decode's
    /// readings come from the engine itself, [`Engine::memory_now`]).
    pub(super) fn new(probe: Option<MemoryProbe>) -> Self {
        Self {
            last: Instant::now(),
            probe,
        }
    }

    /// True once [`MEMORY_EVERY`] has passed since the last reading (and starts the next wait).
    pub(super) fn due(&mut self) -> bool {
        if self.last.elapsed() < MEMORY_EVERY {
            return false;
        }
        self.last = Instant::now();
        true
    }

    /// The KV held now, counted by the forward's tiers: a reading when one is due.
    pub(super) fn kv_held(&mut self, fast_bytes: usize, host_bytes: usize) -> Option<EngineEvent> {
        if !self.due() {
            return None;
        }
        Some(EngineEvent::Memory(MemoryNow {
            kv_fast_bytes: fast_bytes,
            kv_host_bytes: host_bytes,
            rss_bytes: rss_bytes(),
            gpu: self.probe.as_ref().and_then(|p| p()),
        }))
    }
}

impl Engine {
    /// Where the conversation's KV is now (fast and host tier), the resident set, and the
    /// GPU's memory when the model runs on one.
    pub fn memory_now(&self) -> MemoryNow {
        let (kv_fast_bytes, kv_host_bytes) = self.forward.kv_tiers();
        MemoryNow {
            kv_fast_bytes,
            kv_host_bytes,
            rss_bytes: rss_bytes(),
            gpu: self.forward.memory(),
        }
    }

    /// The request's KV numbers (the tiers' counters start again): what each tier holds, what
    /// moved, what a dense cache would hold, the budget in force, and a note when the forward
    /// keeps another KV type than the configured one.
    pub fn take_kv_stats(&mut self) -> KvStats {
        let mut stats = self.forward.take_kv_stats();
        stats.kv_dense_bytes = self.cached.len() * self.spec.n_layers * self.forward.kv_row_bytes();
        stats.kv_fast_budget_bytes = self.kv_budget;
        stats.kv_notes.extend(self.kv_note.clone());
        let held = self.forward.kv_dtype();
        if held != self.kv_dtype {
            stats.kv_notes.push(format!(
                "the forward keeps K and V in {} (kv_dtype = {})",
                format!("{held:?}").to_lowercase(),
                format!("{:?}", self.kv_dtype).to_lowercase()
            ));
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_comes_at_most_once_a_period() {
        let mut t = MemoryTicker::new(None);
        assert!(t.kv_held(10, 0).is_none(), "not due yet");
        t.last = Instant::now() - MEMORY_EVERY;
        match t.kv_held(1000, 24) {
            Some(EngineEvent::Memory(m)) => {
                assert_eq!((m.kv_fast_bytes, m.kv_host_bytes), (1000, 24));
                assert!(m.gpu.is_none());
            }
            other => panic!("expected a reading, got {other:?}"),
        }
        assert!(t.kv_held(1, 0).is_none(), "the next is not due at once");
    }
}
