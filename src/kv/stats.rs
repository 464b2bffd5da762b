//! The KV numbers of one request, as `run --json` and the engine's events carry them.

use serde::Serialize;

/// The KV numbers of a request: what each tier holds, what moved, how long compute waited.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KvStats {
    /// Every block stayed in the fast tier (`--kv-resident`; no manager).
    pub kv_resident: bool,
    /// The budget in force, bytes (None: resident).
    pub kv_fast_budget_bytes: Option<usize>,
    pub kv_fast_bytes: usize,
    pub kv_fast_bytes_peak: usize,
    /// Host-tier bytes (complete backing copies of the slim layers).
    pub kv_host_bytes: usize,
    /// What a dense cache would hold for the same tokens.
    pub kv_dense_bytes: usize,
    pub kv_fast_bytes_per_layer: Vec<usize>,
    pub kv_host_bytes_per_layer: Vec<usize>,
    pub kv_blocks_moved: usize,
    pub kv_bytes_copied: usize,
    /// Per decode step (the prefill's moves are in the totals only).
    pub kv_blocks_moved_per_step: Vec<usize>,
    pub kv_bytes_copied_per_step: Vec<usize>,
    /// Time the forward waited for a copy, over the whole request.
    pub kv_stall_ms: f64,
    /// Time of that wait during decode steps.
    pub kv_decode_stall_ms: f64,
    pub kv_spilled_blocks: usize,
    pub kv_spill_bytes: usize,
    pub kv_spill_reads: usize,
    pub kv_spill_corrupt_blocks: usize,
    /// Fallbacks and faults, one line each.
    pub kv_notes: Vec<String>,
}
