//! The copies of the ops forward's KV tiers on the GPU (src/backend/paged_tier.rs): a layer's
//! prompt blocks offloaded to pinned host memory on the copy stream while later layers compute,
//! blocks fetched back into the fast pool, and the pool regrouped on the device.
//!
//! An offload gathers the slots into a staging buffer on the compute stream (device to device,
//! ordered after the layer that wrote them), and the copy stream moves the staging buffer to
//! pinned memory; the staging buffer belongs to the copy stream, so freeing it waits for that
//! copy and the compute stream never waits for PCIe. A fetch waits for the blocks' offload (its
//! event; long done by the time decode asks), then moves the blocks in one transfer and
//! scatters them into their slots.

use cudarc::driver::{CudaSlice, PinnedHostSlice};

use super::{CudaOps, OrEngine};
use crate::backend::ops::{check_slots, KvPool, KV_BLOCK};
use crate::{Error, Result};

/// A layer's host tier on a GPU: blocks of keys, values and positions in pinned memory.
pub struct CudaHostBlocks {
    /// (blocks, KV_BLOCK, kv_dim) bf16 each, and (blocks, KV_BLOCK) positions; None when empty.
    mem: Option<[PinnedHostSlice<u16>; 2]>,
    pos: Option<PinnedHostSlice<u32>>,
    blocks: usize,
}

impl CudaHostBlocks {
    pub fn len(&self) -> usize {
        self.blocks
    }

    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }
}

/// Rows `i` of a slot-major buffer: slot `i`'s `n` elements.
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
        if m == 0 {
            return Ok(CudaHostBlocks {
                mem: None,
                pos: None,
                blocks: 0,
            });
        }
        let (compute, copy) = (&self.gpu.stream, &self.gpu.copy_stream);
        // staging on the copy stream: its free waits for the copy stream's read only
        let mut k = copy.alloc_zeros::<u16>(m * n).or_engine("alloc")?;
        let mut v = copy.alloc_zeros::<u16>(m * n).or_engine("alloc")?;
        let mut p = copy.alloc_zeros::<u32>(m * KV_BLOCK).or_engine("alloc")?;
        for (i, &s) in slots.iter().enumerate() {
            let s = s as usize;
            (compute.memcpy_dtod(&pool.k.slice(slot(s, n)), &mut k.slice_mut(slot(i, n))))
                .or_engine("dtod")?;
            (compute.memcpy_dtod(&pool.v.slice(slot(s, n)), &mut v.slice_mut(slot(i, n))))
                .or_engine("dtod")?;
            let (from, to) = (slot(s, KV_BLOCK), slot(i, KV_BLOCK));
            (compute.memcpy_dtod(&pool.pos.slice(from), &mut p.slice_mut(to))).or_engine("dtod")?;
        }
        let ctx = &self.gpu.ctx;
        // SAFETY: every element is written by the copies below before any read (reads wait
        // for the slices' events).
        let mut hk = unsafe { ctx.alloc_pinned::<u16>(m * n) }.or_engine("pinned alloc")?;
        let mut hv = unsafe { ctx.alloc_pinned::<u16>(m * n) }.or_engine("pinned alloc")?;
        let mut hp = unsafe { ctx.alloc_pinned::<u32>(m * KV_BLOCK) }.or_engine("pinned alloc")?;
        copy.memcpy_dtoh(&k, &mut hk).or_engine("dtoh")?;
        copy.memcpy_dtoh(&v, &mut hv).or_engine("dtoh")?;
        copy.memcpy_dtoh(&p, &mut hp).or_engine("dtoh")?;
        drop::<[CudaSlice<_>; 2]>([k, v]);
        drop(p);
        Ok(CudaHostBlocks {
            mem: Some([hk, hv]),
            pos: Some(hp),
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
        let (Some([hk, hv]), Some(hp)) = (&host.mem, &host.pos) else {
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
        // waits for the offload's copies (their events)
        let (hk, hv) = (
            hk.as_slice().or_engine("pinned")?,
            hv.as_slice().or_engine("pinned")?,
        );
        let hp = hp.as_slice().or_engine("pinned")?;
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
