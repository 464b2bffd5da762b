//! Process memory, read from /proc on Linux (zero elsewhere), and GPU memory when a CUDA
//! device is in use.

use serde::Serialize;

/// Device memory, in bytes: the device's total and free, and what this process took.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct GpuMemory {
    pub gpu_total_bytes: u64,
    pub gpu_free_bytes: u64,
    pub gpu_own_bytes: u64,
}

/// Memory while an answer runs, for the metrics panel: the KV cache in the fast tier (device
/// memory on a GPU) and in the host tier, this process's resident set, and the GPU's memory
/// when one is in use. During a prefill the KV is what the layers have written so far.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct MemoryNow {
    pub kv_fast_bytes: usize,
    pub kv_host_bytes: usize,
    pub rss_bytes: u64,
    pub gpu: Option<GpuMemory>,
}

/// Peak resident set size of this process, in bytes (VmHWM).
pub fn peak_rss_bytes() -> u64 {
    proc_status_kib("VmHWM:") * 1024
}

/// Current resident set size of this process, in bytes (VmRSS).
pub fn rss_bytes() -> u64 {
    proc_status_kib("VmRSS:") * 1024
}

fn proc_status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
