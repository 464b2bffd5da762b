//! The copies of the ops forward's KV tiers on the GPU (src/backend/paged_tier.rs): a layer's
//! prompt blocks offloaded to pinned host memory on the copy stream while later layers compute,
//! blocks fetched back into the fast pool, and the pool regrouped on the device.
//!
//! The streams are ordered with explicit events (cudarc's per-buffer tracking is off, see
//! src/cuda/gpu.rs). An offload gathers the slots into a staging buffer on the compute stream
//! (device to device, after the layer that wrote them); the copy stream waits for that gather
//! only, moves the staging buffer to pinned memory and records the blocks' `landed` event. The
//! staging buffer is freed once its copy has passed (checked at the next offload or fetch:
//! [`StagingQueue`]), so the compute stream never waits for PCIe. A fetch waits for `landed`
//! (long passed when decode asks), moves the blocks in one transfer and scatters them on the
//! device.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaEvent, CudaSlice, PinnedHostSlice};

use super::{CudaOps, OrEngine};
use crate::backend::ops::{check_slots, KvPool, KV_BLOCK};
use crate::{Error, Result};

/// A layer's host tier on a GPU: blocks of keys, values and positions in pinned memory.
pub struct CudaHostBlocks {
    /// None when there are no blocks.
    mem: Option<Pinned>,
    blocks: usize,
}

/// (blocks, KV_BLOCK, kv_dim) bf16 keys and values, (blocks, KV_BLOCK) positions, and the copy
/// stream's event after they were written.
struct Pinned {
    k: PinnedHostSlice<u16>,
    v: PinnedHostSlice<u16>,
    pos: PinnedHostSlice<u32>,
    landed: CudaEvent,
}

impl CudaHostBlocks {
    pub fn len(&self) -> usize {
        self.blocks
    }

    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }
}

impl Drop for CudaHostBlocks {
    fn drop(&mut self) {
        // the pinned memory must outlive the copies into it
        if let Some(p) = &self.mem {
            let _ = p.landed.synchronize();
        }
    }
}

/// Staging buffers of offloads whose copies to the host may still be running, each with the
/// copy stream's event after its copy: freed (on the compute stream) once the event passed.
#[derive(Default, Clone)]
pub struct StagingQueue(Arc<Mutex<Vec<Staging>>>);

struct Staging {
    done: CudaEvent,
    _k: CudaSlice<u16>,
    _v: CudaSlice<u16>,
    _pos: CudaSlice<u32>,
}

impl StagingQueue {
    fn push(&self, s: Staging) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    }

    /// Free the buffers whose copies are done (never waits).
    fn release_done(&self) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|s| !s.done.is_complete());
    }
}

/// Slot `i` of a slot-major buffer of `n` elements a slot.
fn slot(i: usize, n: usize) -> std::ops::Range<usize> {
    i * n..(i + 1) * n
}

impl CudaOps {
    /// [`crate::backend::ops::Ops::kv_offload`] on the GPU.
    pub(super) fn offload_slots(
        &self,
        pool: &KvPool<Self>,
        slots: &[u32],
    ) -> Result<CudaHostBlocks> {
        check_slots("cuda kv_offload", pool.slots, slots.iter().copied())?;
        let (n, m) = (KV_BLOCK * pool.kv_dim, slots.len());
        self.staging.release_done();
        if m == 0 {
            return Ok(CudaHostBlocks {
                mem: None,
                blocks: 0,
            });
        }
        let (compute, copy) = (&self.gpu.stream, &self.gpu.copy_stream);
        // SAFETY: every element is written by the gathers below before the copy reads it.
        let mut k = unsafe { compute.alloc::<u16>(m * n) }.or_engine("alloc")?;
        let mut v = unsafe { compute.alloc::<u16>(m * n) }.or_engine("alloc")?;
        let mut p = unsafe { compute.alloc::<u32>(m * KV_BLOCK) }.or_engine("alloc")?;
        for (i, &s) in slots.iter().enumerate() {
            let s = s as usize;
            (compute.memcpy_dtod(&pool.k.slice(slot(s, n)), &mut k.slice_mut(slot(i, n))))
                .or_engine("dtod")?;
            (compute.memcpy_dtod(&pool.v.slice(slot(s, n)), &mut v.slice_mut(slot(i, n))))
                .or_engine("dtod")?;
            let (from, to) = (slot(s, KV_BLOCK), slot(i, KV_BLOCK));
            (compute.memcpy_dtod(&pool.pos.slice(from), &mut p.slice_mut(to))).or_engine("dtod")?;
        }
        let gathered = compute.record_event(None).or_engine("record")?;
        copy.wait(&gathered).or_engine("wait")?;
        let ctx = &self.gpu.ctx;
        // SAFETY: written by the copies below; read only after `landed`.
        let mut hk = unsafe { ctx.alloc_pinned::<u16>(m * n) }.or_engine("pinned alloc")?;
        let mut hv = unsafe { ctx.alloc_pinned::<u16>(m * n) }.or_engine("pinned alloc")?;
        let mut hp = unsafe { ctx.alloc_pinned::<u32>(m * KV_BLOCK) }.or_engine("pinned alloc")?;
        copy.memcpy_dtoh(&k, &mut hk).or_engine("dtoh")?;
        copy.memcpy_dtoh(&v, &mut hv).or_engine("dtoh")?;
        copy.memcpy_dtoh(&p, &mut hp).or_engine("dtoh")?;
        let landed = copy.record_event(None).or_engine("record")?;
        let done = copy.record_event(None).or_engine("record")?;
        self.staging.push(Staging {
            done,
            _k: k,
            _v: v,
            _pos: p,
        });
        Ok(CudaHostBlocks {
            mem: Some(Pinned {
                k: hk,
                v: hv,
                pos: hp,
                landed,
            }),
            blocks: m,
        })
    }

    /// [`crate::backend::ops::Ops::kv_fetch`] on the GPU.
    pub(super) fn fetch_slots(
        &self,
        host: &CudaHostBlocks,
        writes: &[(usize, u32)],
        pool: &mut KvPool<Self>,
    ) -> Result<()> {
        check_slots("cuda kv_fetch", pool.slots, writes.iter().map(|w| w.1))?;
        if writes.is_empty() {
            return Ok(());
        }
        self.staging.release_done();
        let Some(mem) = &host.mem else {
            return Err(Error::Engine(
                "cuda kv_fetch: the host store is empty".into(),
            ));
        };
        if let Some(&(b, _)) = writes.iter().find(|w| w.0 >= host.blocks) {
            return Err(Error::Engine(format!(
                "cuda kv_fetch: block {b} of a host store of {}",
                host.blocks
            )));
        }
        let n = KV_BLOCK * pool.kv_dim;
        mem.landed.synchronize().or_engine("wait for the offload")?;
        let hk = mem.k.as_slice().or_engine("pinned")?;
        let hv = mem.v.as_slice().or_engine("pinned")?;
        let hp = mem.pos.as_slice().or_engine("pinned")?;
        let gather = |all: &[u16], w: usize| -> Vec<u16> {
            (writes.iter())
                .flat_map(|&(b, _)| all[slot(b, w)].iter().copied())
                .collect()
        };
        let (k, v) = (gather(hk, n), gather(hv, n));
        let p: Vec<u32> = (writes.iter())
            .flat_map(|&(b, _)| hp[slot(b, KV_BLOCK)].iter().copied())
            .collect();
        let s = &self.gpu.stream;
        let (k, v) = (
            s.clone_htod(&k).or_engine("htod")?,
            s.clone_htod(&v).or_engine("htod")?,
        );
        let p = s.clone_htod(&p).or_engine("htod")?;
        for (i, &(_, dst)) in writes.iter().enumerate() {
            let d = dst as usize;
            (s.memcpy_dtod(&k.slice(slot(i, n)), &mut pool.k.slice_mut(slot(d, n))))
                .or_engine("dtod")?;
            (s.memcpy_dtod(&v.slice(slot(i, n)), &mut pool.v.slice_mut(slot(d, n))))
                .or_engine("dtod")?;
            let (from, to) = (slot(i, KV_BLOCK), slot(d, KV_BLOCK));
            (s.memcpy_dtod(&p.slice(from), &mut pool.pos.slice_mut(to))).or_engine("dtod")?;
        }
        Ok(())
    }

    /// [`crate::backend::ops::Ops::kv_pool_regrouped`] on the GPU: device-to-device copies on
    /// the compute stream.
    pub(super) fn regroup_pool(
        &self,
        src: &KvPool<Self>,
        moves: &[(u32, u32)],
        slots: usize,
    ) -> Result<KvPool<Self>> {
        let n = KV_BLOCK * src.kv_dim;
        check_slots(
            "cuda kv_pool_regrouped",
            src.slots,
            moves.iter().map(|m| m.0),
        )?;
        check_slots("cuda kv_pool_regrouped", slots, moves.iter().map(|m| m.1))?;
        let mut pool = KvPool::new(self, slots, src.kv_dim)?;
        let s = &self.gpu.stream;
        for &(a, b) in moves {
            let (a, b) = (a as usize, b as usize);
            (s.memcpy_dtod(&src.k.slice(slot(a, n)), &mut pool.k.slice_mut(slot(b, n))))
                .or_engine("dtod")?;
            (s.memcpy_dtod(&src.v.slice(slot(a, n)), &mut pool.v.slice_mut(slot(b, n))))
                .or_engine("dtod")?;
            let (from, to) = (slot(a, KV_BLOCK), slot(b, KV_BLOCK));
            (s.memcpy_dtod(&src.pos.slice(from), &mut pool.pos.slice_mut(to))).or_engine("dtod")?;
        }
        Ok(pool)
    }
}
