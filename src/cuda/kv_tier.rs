//! The KV manager's host tier on the GPU: blocks of 64 rows of one layer's K and V, keyed by
//! (layer, block id), in pinned host memory, moved on the copy stream and ordered against the
//! compute stream with events, so that copies overlap the layers that do not need them.
//!
//! - Prefill (offload): when a slim layer has written its rows, its prompt blocks are copied to
//!   the host tier (the backing copy that lets decode swap blocks out and back), while later
//!   layers compute.
//! - Decode (fetch): blocks that become active at a stage are copied host → device right after
//!   the layer before the stage, overlapping the stage's first layers; each layer that reads them
//!   waits on its copy's event. The wait is the *stall*: the time from the compute stream
//!   reaching the wait to the copy being done (zero when the copy finished first).
//!
//! The fast tier is the layer's device pool (`crate::backend::paged_kv::LayerCache`); the CPU KV
//! manager (src/kv/) is separate and untouched.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cudarc::driver::sys::{CUdeviceptr, CUevent_flags};
use cudarc::driver::{result, CudaEvent, DevicePtr, PinnedHostSlice};
use serde::Serialize;

use super::{CudaOps, Gpu, OrEngine};
use crate::backend::ops::KV_BLOCK;
use crate::backend::paged_kv::{LayerCache, LayerHooks};
use crate::{Error, Result};

/// Totals of the tier's work.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct TierStats {
    pub offloaded_blocks: usize,
    pub fetched_blocks: usize,
    pub offload_bytes: usize,
    pub fetch_bytes: usize,
    /// Copy-stream time of the fetches, from the first issued to the last done.
    pub fetch_ms: f64,
    /// Time the compute stream waited on fetches.
    pub stall_ms: f64,
    /// Bytes of pinned host memory.
    pub host_bytes: usize,
}

/// One block copy: a device slot of a layer's pool and a host slot.
#[derive(Debug, Clone, Copy)]
struct BlockCopy {
    layer: usize,
    host_slot: usize,
    /// Device addresses of the slot's keys and values.
    k_dev: CUdeviceptr,
    v_dev: CUdeviceptr,
}

pub struct KvTier {
    gpu: Arc<Gpu>,
    /// Elements per slot of K (and of V): KV_BLOCK * kv_dim.
    slot_elems: usize,
    /// (capacity, slot_elems) each; kept alive for the raw pointers below
    _k: PinnedHostSlice<u16>,
    _v: PinnedHostSlice<u16>,
    k_host: *mut u16,
    v_host: *mut u16,
    capacity: usize,
    index: HashMap<(usize, u32), usize>,
    /// Prefill: offload the prompt blocks of layers >= this one.
    offload_from: Option<usize>,
    /// Decode: fetches to issue once layer `key` (the layer before their stage) has its K/V.
    planned: BTreeMap<usize, Vec<BlockCopy>>,
    /// Fetch done, per layer that waits on it.
    ready: HashMap<usize, CudaEvent>,
    /// (compute reached the wait, copy done) per wait, and each fetch's start.
    waits: Vec<(CudaEvent, CudaEvent)>,
    fetch_spans: Vec<(CudaEvent, CudaEvent)>,
    pub stats: TierStats,
}

impl KvTier {
    /// A host tier of `capacity` blocks of `kv_dim`-wide rows.
    pub fn new(gpu: Arc<Gpu>, capacity: usize, kv_dim: usize) -> Result<Self> {
        let slot_elems = KV_BLOCK * kv_dim;
        let n = capacity.max(1) * slot_elems;
        // SAFETY: the memory is written by device copies before any read.
        let mut k = unsafe { gpu.ctx.alloc_pinned::<u16>(n) }.or_engine("pinned alloc")?;
        let mut v = unsafe { gpu.ctx.alloc_pinned::<u16>(n) }.or_engine("pinned alloc")?;
        let k_host = k.as_mut_ptr().or_engine("pinned ptr")?;
        let v_host = v.as_mut_ptr().or_engine("pinned ptr")?;
        Ok(Self {
            gpu,
            slot_elems,
            _k: k,
            _v: v,
            k_host,
            v_host,
            capacity,
            index: HashMap::new(),
            offload_from: None,
            planned: BTreeMap::new(),
            ready: HashMap::new(),
            waits: Vec::new(),
            fetch_spans: Vec::new(),
            stats: TierStats {
                host_bytes: 2 * n * 2,
                ..Default::default()
            },
        })
    }

    /// Offload the prompt blocks of every layer from `first_layer` on during the next prefill.
    pub fn offload_from(&mut self, first_layer: Option<usize>) {
        self.offload_from = first_layer;
    }

    pub fn holds(&self, layer: usize, block: u32) -> bool {
        self.index.contains_key(&(layer, block))
    }

    /// Plan fetching `blocks` of `layer` back into their device slots right after layer
    /// `issue_after` has run (during the next forward).
    pub fn plan_fetch(
        &mut self,
        issue_after: usize,
        layer: usize,
        kv: &LayerCache<CudaOps>,
        blocks: &[u32],
    ) -> Result<()> {
        let s = &self.gpu.stream;
        let (k_base, _g) = kv.pool.k.device_ptr(s);
        let (v_base, _g) = kv.pool.v.device_ptr(s);
        for &b in blocks {
            let host_slot = *self.index.get(&(layer, b)).ok_or_else(|| {
                Error::Engine(format!(
                    "kv tier: block {b} of layer {layer} is not on the host"
                ))
            })?;
            let slot = kv.slot_of_block(b).ok_or_else(|| {
                Error::Engine(format!(
                    "kv tier: block {b} of layer {layer} has no device slot"
                ))
            })? as u64;
            let bytes = (self.slot_elems * 2) as u64;
            self.planned
                .entry(issue_after)
                .or_default()
                .push(BlockCopy {
                    layer,
                    host_slot,
                    k_dev: k_base + slot * bytes,
                    v_dev: v_base + slot * bytes,
                });
        }
        Ok(())
    }

    fn timing_event(&self) -> Result<CudaEvent> {
        self.gpu
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .or_engine("event")
    }

    /// Copy the layer's prompt blocks that the tier does not hold yet to the host, after the
    /// compute stream's work so far (which wrote them).
    fn offload(&mut self, layer: usize, kv: &LayerCache<CudaOps>, prompt_len: usize) -> Result<()> {
        let (compute, copy) = (&self.gpu.stream, &self.gpu.copy_stream);
        let written = compute.record_event(None).or_engine("record")?;
        copy.wait(&written).or_engine("wait")?;
        let (k_base, _g) = kv.pool.k.device_ptr(compute);
        let (v_base, _g) = kv.pool.v.device_ptr(compute);
        let prompt_rows = kv.positions.partition_point(|&p| (p as usize) < prompt_len);
        for first in (0..prompt_rows).step_by(KV_BLOCK) {
            let block = kv.positions[first] / KV_BLOCK as u32;
            if self.index.contains_key(&(layer, block)) {
                continue;
            }
            let host_slot = self.index.len();
            if host_slot >= self.capacity {
                return Err(Error::Engine(format!(
                    "kv tier: host tier of {} blocks is full",
                    self.capacity
                )));
            }
            let dev = kv.table[first / KV_BLOCK] as u64 * (self.slot_elems * 2) as u64;
            // SAFETY: host slot `host_slot` lies inside the pinned buffers (capacity checked);
            // the device slot lies inside the pool; the copy stream waited for the writes.
            unsafe {
                let kh = std::slice::from_raw_parts_mut(
                    self.k_host.add(host_slot * self.slot_elems),
                    self.slot_elems,
                );
                let vh = std::slice::from_raw_parts_mut(
                    self.v_host.add(host_slot * self.slot_elems),
                    self.slot_elems,
                );
                result::memcpy_dtoh_async(kh, k_base + dev, copy.cu_stream()).or_engine("d2h")?;
                result::memcpy_dtoh_async(vh, v_base + dev, copy.cu_stream()).or_engine("d2h")?;
            }
            self.index.insert((layer, block), host_slot);
            self.stats.offloaded_blocks += 1;
            self.stats.offload_bytes += 2 * self.slot_elems * 2;
        }
        Ok(())
    }

    /// Issue the fetches planned after `layer`, each layer's copies followed by its event.
    fn issue(&mut self, layer: usize) -> Result<()> {
        let Some(copies) = self.planned.remove(&layer) else {
            return Ok(());
        };
        let (compute, copy) = (&self.gpu.stream, &self.gpu.copy_stream);
        // the slots may still be read by work queued before this point
        let queued = compute.record_event(None).or_engine("record")?;
        copy.wait(&queued).or_engine("wait")?;
        let start = self.timing_event()?;
        start.record(copy).or_engine("record")?;
        let mut by_layer: BTreeMap<usize, Vec<BlockCopy>> = BTreeMap::new();
        for c in copies {
            by_layer.entry(c.layer).or_default().push(c);
        }
        let mut last = None;
        for (target, copies) in by_layer {
            for c in &copies {
                // SAFETY: the host slot was filled by `offload`; the device slot is in the pool.
                unsafe {
                    let kh = std::slice::from_raw_parts(
                        self.k_host.add(c.host_slot * self.slot_elems),
                        self.slot_elems,
                    );
                    let vh = std::slice::from_raw_parts(
                        self.v_host.add(c.host_slot * self.slot_elems),
                        self.slot_elems,
                    );
                    result::memcpy_htod_async(c.k_dev, kh, copy.cu_stream()).or_engine("h2d")?;
                    result::memcpy_htod_async(c.v_dev, vh, copy.cu_stream()).or_engine("h2d")?;
                }
                self.stats.fetched_blocks += 1;
                self.stats.fetch_bytes += 2 * self.slot_elems * 2;
            }
            let done = self.timing_event()?;
            done.record(copy).or_engine("record")?;
            self.ready.insert(target, done);
            last = Some(target);
        }
        if last.is_some() {
            let end = self.timing_event()?;
            end.record(copy).or_engine("record")?;
            self.fetch_spans.push((start, end));
        }
        Ok(())
    }

    /// After the forward has synchronised: fold the event timings into the stats.
    pub fn settle(&mut self) -> Result<()> {
        self.gpu
            .copy_stream
            .synchronize()
            .or_engine("sync copies")?;
        for (reached, done) in self.waits.drain(..) {
            let ms = reached.elapsed_ms(&done).or_engine("elapsed")? as f64;
            self.stats.stall_ms += ms.max(0.0);
        }
        for (start, end) in self.fetch_spans.drain(..) {
            self.stats.fetch_ms += start.elapsed_ms(&end).or_engine("elapsed")? as f64;
        }
        Ok(())
    }

    /// Wait for the offloads of a prefill (they run behind the compute stream).
    pub fn wait_offloads(&self) -> Result<()> {
        self.gpu.copy_stream.synchronize().or_engine("sync copies")
    }
}

/// The tier as the forward's per-layer hooks. `prompt_len` is the prefill's prompt length.
pub struct TierHooks<'t> {
    pub tier: &'t mut KvTier,
    pub prompt_len: usize,
}

impl LayerHooks<CudaOps> for TierHooks<'_> {
    fn kv_written(&mut self, _ops: &CudaOps, layer: usize, kv: &LayerCache<CudaOps>) -> Result<()> {
        if self.tier.offload_from.is_some_and(|first| layer >= first) {
            self.tier.offload(layer, kv, self.prompt_len)?;
        }
        // the blocks a stage needs are known once the layer before it has its queries (the
        // decision's input): their copies overlap that layer's attention and MLP and the
        // stage's first QKV
        self.tier.issue(layer)
    }

    fn before_attention(
        &mut self,
        _ops: &CudaOps,
        layer: usize,
        _kv: &LayerCache<CudaOps>,
    ) -> Result<()> {
        if let Some(done) = self.tier.ready.remove(&layer) {
            let compute = &self.tier.gpu.stream;
            let reached = self.tier.timing_event()?;
            reached.record(compute).or_engine("record")?;
            compute.wait(&done).or_engine("wait")?;
            self.tier.waits.push((reached, done));
        }
        Ok(())
    }
}
