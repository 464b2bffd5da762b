//! Memory readings while an answer runs ([`EngineEvent::Memory`]): after each prefill layer and
//! each decode step, at most one every [`MEMORY_EVERY`], so the metrics panel shows the KV
//! growing, the process's resident set and the GPU's memory live rather than at the answer's end.

use std::time::{Duration, Instant};

use super::{Engine, EngineEvent};
use crate::device_forward::MemoryProbe;
use crate::metrics::{rss_bytes, MemoryNow};

/// The shortest time between two readings (a reading costs a read of /proc and, on a GPU, one
/// driver call).
pub const MEMORY_EVERY: Duration = Duration::from_millis(250);

/// Decides when a reading is due, and during a prefill counts the KV its layers have written.
pub(super) struct MemoryTicker {
    last: Instant,
    /// KV bytes held before this prefill (a follow-up's earlier turns).
    kv_before: usize,
    /// Bytes of one row of K and V in one layer.
    row_bytes: usize,
    /// Rows this prefill's layers have written so far.
    rows_written: usize,
    probe: Option<MemoryProbe>,
}

impl MemoryTicker {
    pub(super) fn new(kv_before: usize, row_bytes: usize, probe: Option<MemoryProbe>) -> Self {
        Self {
            last: Instant::now(),
            kv_before,
            row_bytes,
            rows_written: 0,
            probe,
        }
    }

    /// Only the clock: decode's readings come from the engine itself ([`Engine::memory_now`]).
    pub(super) fn clock() -> Self {
        Self::new(0, 0, None)
    }

    /// True once [`MEMORY_EVERY`] has passed since the last reading (and starts the next wait).
    pub(super) fn due(&mut self) -> bool {
        if self.last.elapsed() < MEMORY_EVERY {
            return false;
        }
        self.last = Instant::now();
        true
    }

    /// A prefill layer wrote `rows` rows: a reading when one is due. The KV written so far is
    /// counted as fast-tier bytes (the KV manager sorts a layer's blocks into tiers when the
    /// prefill ends).
    pub(super) fn layer_written(&mut self, rows: usize) -> Option<EngineEvent> {
        self.rows_written += rows;
        self.kv_held(self.kv_before + self.rows_written * self.row_bytes, 0)
    }

    /// The KV held now, counted by whoever holds it (a device forward's tiers): a reading when
    /// one is due.
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
        let (kv_fast_bytes, kv_host_bytes) = self.kv_stats_now();
        MemoryNow {
            kv_fast_bytes,
            kv_host_bytes,
            rss_bytes: rss_bytes(),
            gpu: self.device.as_ref().and_then(|d| d.memory()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefill_reading_counts_the_rows_written_so_far() {
        let mut t = MemoryTicker::new(1000, 10, None);
        // the first layer comes before MEMORY_EVERY has passed: no reading, rows still counted
        assert!(t.layer_written(5).is_none());
        t.last = Instant::now() - MEMORY_EVERY;
        match t.layer_written(7) {
            Some(EngineEvent::Memory(m)) => {
                assert_eq!(m.kv_fast_bytes, 1000 + 12 * 10);
                assert_eq!(m.kv_host_bytes, 0);
                assert!(m.gpu.is_none());
            }
            other => panic!("expected a reading, got {other:?}"),
        }
        // and the next is not due at once
        assert!(t.layer_written(1).is_none());
    }
}
