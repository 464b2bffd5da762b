//! One GPU: its context, the compute stream (every kernel and GEMM), the copy stream (the KV
//! manager's transfers), cuBLAS, the kernel cache, and memory figures for the metrics.

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaStream};

use super::kernels::Kernels;
use super::probe::probe;
use super::OrEngine;
use crate::{Error, Result};

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    /// Kernels and GEMMs, in order.
    pub stream: Arc<CudaStream>,
    /// Host <-> device KV block copies, ordered against `stream` with events.
    pub copy_stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    pub kernels: Kernels,
    /// Compute capability as major * 10 + minor (90 on an H100 or H200).
    pub cc: u32,
    pub name: String,
    pub multiprocessors: u32,
    /// Device memory free when this context was made: the baseline of `own_bytes`.
    free_at_start: usize,
}

/// Device memory; `gpu_own_bytes` is what this process took since its context was made
/// (buffers, cuBLAS workspace, modules).
pub use crate::metrics::GpuMemory as VramInfo;

impl Gpu {
    /// Device `ordinal`, after checking that the driver and libraries are there.
    pub fn new(ordinal: usize) -> Result<Self> {
        probe().map_err(|e| Error::Engine(format!("cuda: {e}")))?;
        let ctx = CudaContext::new(ordinal).or_engine("open device")?;
        // Streams are ordered explicitly with events (the KV manager's copies), so cudarc's
        // per-buffer event tracking is off: it would add an event pair to every launch.
        // SAFETY: called before any buffer or stream exists on this context.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability().or_engine("compute capability")?;
        let cc = (major * 10 + minor) as u32;
        let stream = ctx.new_stream().or_engine("compute stream")?;
        let copy_stream = ctx.new_stream().or_engine("copy stream")?;
        let blas = CudaBlas::new(stream.clone()).or_engine("cuBLAS")?;
        let name = ctx.name().or_engine("device name")?;
        let multiprocessors = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .or_engine("attribute")? as u32;
        let (free_at_start, _) = ctx.mem_get_info().or_engine("memory info")?;
        Ok(Self {
            kernels: Kernels::new(ctx.clone(), cc),
            ctx,
            stream,
            copy_stream,
            blas,
            cc,
            name,
            multiprocessors,
            free_at_start,
        })
    }

    pub fn vram(&self) -> Result<VramInfo> {
        let (free, total) = self.ctx.mem_get_info().or_engine("memory info")?;
        Ok(VramInfo {
            gpu_total_bytes: total as u64,
            gpu_free_bytes: free as u64,
            gpu_own_bytes: self.free_at_start.saturating_sub(free) as u64,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "{} (sm_{}, {} SMs)",
            self.name, self.cc, self.multiprocessors
        )
    }
}
