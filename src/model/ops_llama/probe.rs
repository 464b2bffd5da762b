//! Where a forward's time goes: the forward marks the end of each part of a layer (norm and
//! q|k|v, RoPE and the KV append, the decode set, attention, o, MLP) and of a step's setup and
//! head; while a probe runs, each mark adds the time since the mark before to its part.
//!
//! Two modes answer two questions. [`ProbeMode::Sync`] waits for the device at every mark, so a
//! part's time is its enqueue plus its execution (what the device spends on it, when the host
//! keeps up). [`ProbeMode::Enqueue`] never waits, so a part's time is what the host spends
//! issuing it (launch costs, uploads that synchronise, host work between ops). A step whose
//! enqueue time is close to its synced time is bound by the host, not the device.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::backend::ops::Ops;
use crate::Result;

/// Whether a mark waits for the device first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ProbeMode {
    Sync,
    Enqueue,
}

/// One part's total over the probe: milliseconds and marks.
#[derive(Debug, Clone, Serialize)]
pub struct ProbePart {
    pub part: &'static str,
    pub ms: f64,
    pub marks: usize,
}

struct Running {
    mode: ProbeMode,
    last: Instant,
    parts: Vec<ProbePart>,
}

/// The forward's probe: off (a mark is one relaxed load) until [`OpProbe::start`].
#[derive(Default)]
pub struct OpProbe {
    on: AtomicBool,
    run: Mutex<Option<Running>>,
}

impl OpProbe {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start timing from now (after the device finished what was queued).
    pub fn start<O: Ops>(&self, ops: &O, mode: ProbeMode) -> Result<()> {
        ops.sync()?;
        *self.lock() = Some(Running {
            mode,
            last: Instant::now(),
            parts: Vec::new(),
        });
        self.on.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The end of `part`: its time since the previous mark, when a probe runs.
    pub fn mark<O: Ops>(&self, ops: &O, part: &'static str) -> Result<()> {
        if !self.on.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut guard = self.lock();
        let Some(run) = guard.as_mut() else {
            return Ok(());
        };
        if run.mode == ProbeMode::Sync {
            ops.sync()?;
        }
        let now = Instant::now();
        let ms = now.duration_since(run.last).as_secs_f64() * 1e3;
        run.last = now;
        match run.parts.iter_mut().find(|p| p.part == part) {
            Some(p) => {
                p.ms += ms;
                p.marks += 1;
            }
            None => run.parts.push(ProbePart { part, ms, marks: 1 }),
        }
        Ok(())
    }

    /// Stop, returning each part's total in the order the parts were first marked.
    pub fn finish(&self) -> Vec<ProbePart> {
        self.on.store(false, Ordering::Relaxed);
        self.lock().take().map(|r| r.parts).unwrap_or_default()
    }
}
