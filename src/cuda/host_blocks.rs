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
//! (long passed when decode asks) and copies each block (each run of blocks adjacent in both
//! stores) from pinned memory straight into its slot on the compute stream, without waiting;
//! the tier keeps its buffers until the last fetch's copies have run. (The first version
//! gathered the blocks on the host, reading cudarc's write-combined pinned memory, and uploaded
//! them from pageable memory: 53 ms a decode step of the 8B shape at 32k on an H200,
//! bench/NOTES.md.) Page-locking memory is slow (the driver pins it page by page), so a dropped
//! host tier gives its pinned buffers to a [`PinnedArena`] that the next prompt's offloads take
//! them from.

use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DevicePtr, DeviceRepr, PinnedHostSlice, PushKernelArg,
    ValidAsZeroBits,
};

use super::ops::{flat, i32_of};
use super::{CudaOps, OrEngine};
use crate::backend::ops::{check_slots, KvPool, Ops, KV_BLOCK};
use crate::{Error, Result};

/// A layer's host tier on a GPU: blocks of keys, values and positions in pinned memory.
pub struct CudaHostBlocks {
    /// None when there are no blocks.
    mem: Option<Pinned>,
    blocks: usize,
    /// Words of keys (and of values) a block holds: the buffers may be longer (the arena
    /// rounds them up).
    block_words: usize,
    /// Where the buffers go when the tier is dropped.
    arena: PinnedArena,
    /// The compute stream after the last fetch's copies out of the buffers.
    read: Mutex<Option<CudaEvent>>,
}

/// (blocks, KV_BLOCK, row words) keys and values of the pool's type, (blocks, KV_BLOCK)
/// positions, and the copy stream's event after they were written.
struct Pinned {
    k: PinnedHostSlice<u16>,
    v: PinnedHostSlice<u16>,
    pos: PinnedHostSlice<u32>,
    landed: CudaEvent,
    /// The three buffers' addresses in the device's address space (keys, values, positions),
    /// where the driver maps them: a fetch is then one kernel that reads them over PCIe.
    mapped: Option<[u64; 3]>,
}

/// The device address of pinned host memory at `host` (the same value under unified
/// addressing), or None where the driver does not map it.
fn device_address<T>(ctx: &cudarc::driver::CudaContext, host: *const T) -> Option<u64> {
    use cudarc::driver::sys;
    ctx.bind_to_thread().ok()?;
    let mut at: sys::CUdeviceptr = 0;
    // SAFETY: `host` is the start of a live allocation of cuMemHostAlloc; the call only
    // writes `at`.
    unsafe { sys::cuMemHostGetDevicePointer_v2(&mut at, host as *mut std::ffi::c_void, 0) }
        .result()
        .ok()
        .map(|()| at)
}

impl CudaHostBlocks {
    /// Keys and values of block `i` in the pinned buffers, once its offload has landed (waits
    /// for it): the spill file writes them and a block read back from it replaces them.
    pub(super) fn block_words(&mut self, i: usize) -> Option<(&mut [u16], &mut [u16])> {
        let (n, blocks) = (self.block_words, self.blocks);
        let mem = self.mem.as_mut().filter(|_| i < blocks)?;
        let k = mem.k.as_mut_slice().ok()?;
        let v = mem.v.as_mut_slice().ok()?;
        Some((&mut k[i * n..][..n], &mut v[i * n..][..n]))
    }
}

impl Drop for CudaHostBlocks {
    fn drop(&mut self) {
        let read = self
            .read
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let read_done = read.is_none_or(|e| e.synchronize().is_ok());
        if let Some(p) = self.mem.take() {
            // the copies into and out of the buffers must be done before anyone reuses or
            // frees them
            if p.landed.synchronize().is_ok() && read_done {
                self.arena.give(p.k, p.v, p.pos);
            }
        }
    }
}

/// Pinned buffers of dropped host tiers, for the next offloads: a request takes the smallest
/// free buffer that holds it, else page-locks a new one (rounded up to 1 MiB). At most
/// [`PinnedArena::KEEP`] buffers of each kind are kept (the smallest go).
#[derive(Default, Clone)]
pub struct PinnedArena(Arc<Mutex<FreeBuffers>>);

#[derive(Default)]
struct FreeBuffers {
    u16s: Vec<PinnedHostSlice<u16>>,
    u32s: Vec<PinnedHostSlice<u32>>,
}

/// Take the smallest buffer of `free` holding `n` elements, or page-lock a new one.
fn take_from<T: cudarc::driver::DeviceRepr>(
    free: &mut Vec<PinnedHostSlice<T>>,
    ctx: &Arc<cudarc::driver::CudaContext>,
    n: usize,
) -> Result<PinnedHostSlice<T>> {
    let best = (free.iter().enumerate())
        .filter(|(_, b)| b.len() >= n)
        .min_by_key(|(_, b)| b.len())
        .map(|(i, _)| i);
    match best {
        Some(i) => Ok(free.swap_remove(i)),
        None => {
            let unit = (1 << 20) / std::mem::size_of::<T>();
            // SAFETY: written by device copies before any read (reads wait for `landed`).
            unsafe { ctx.alloc_pinned::<T>(n.div_ceil(unit) * unit) }.or_engine("pinned alloc")
        }
    }
}

/// Keep `b` in `free`, dropping the smallest buffers beyond `keep`.
fn keep_in<T>(free: &mut Vec<PinnedHostSlice<T>>, b: PinnedHostSlice<T>, keep: usize) {
    free.push(b);
    if free.len() > keep {
        free.sort_by_key(|b| std::cmp::Reverse(b.len()));
        free.truncate(keep);
    }
}

impl PinnedArena {
    /// Buffers of each kind kept: a prompt's tiers hold two of u16 and one of u32 a slim layer.
    pub const KEEP: usize = 256;

    fn lock(&self) -> std::sync::MutexGuard<'_, FreeBuffers> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_u16(
        &self,
        ctx: &Arc<cudarc::driver::CudaContext>,
        n: usize,
    ) -> Result<PinnedHostSlice<u16>> {
        take_from(&mut self.lock().u16s, ctx, n)
    }

    fn take_u32(
        &self,
        ctx: &Arc<cudarc::driver::CudaContext>,
        n: usize,
    ) -> Result<PinnedHostSlice<u32>> {
        take_from(&mut self.lock().u32s, ctx, n)
    }

    fn give(&self, k: PinnedHostSlice<u16>, v: PinnedHostSlice<u16>, pos: PinnedHostSlice<u32>) {
        let mut f = self.lock();
        keep_in(&mut f.u16s, k, Self::KEEP);
        keep_in(&mut f.u16s, v, Self::KEEP);
        keep_in(&mut f.u32s, pos, Self::KEEP);
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

/// Copy all of `src` into the front of `dst` on `stream`. cudarc's `memcpy_dtoh` copies as many
/// bytes as the host buffer holds, and a buffer from the arena is often longer than its blocks:
/// it read past the staging buffer (CUDA_ERROR_INVALID_VALUE on the first GPU run).
fn dtoh_front<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    src: &CudaSlice<T>,
    dst: &mut PinnedHostSlice<T>,
) -> Result<()> {
    if dst.len() < src.len() {
        return Err(Error::Engine(format!(
            "cuda dtoh: {} elements into a pinned buffer of {}",
            src.len(),
            dst.len()
        )));
    }
    // waits for the buffer's last copy (none: arena buffers are given back after `landed`)
    let host = dst.as_mut_ptr().or_engine("pinned")?;
    stream.context().bind_to_thread().or_engine("bind")?;
    let (from, _record) = src.device_ptr(stream);
    // SAFETY: `host` holds at least `src.len()` elements and outlives the copy: its owner waits
    // for the copy stream's `landed` event before reading, reusing or freeing it.
    unsafe {
        let front = std::slice::from_raw_parts_mut(host, src.len());
        cudarc::driver::result::memcpy_dtoh_async(front, from, stream.cu_stream())
    }
    .or_engine("dtoh")
}

/// `writes` (host block, slot) as runs (first block, first slot, blocks) of blocks adjacent on
/// both sides, in order.
fn runs(writes: &[(usize, u32)]) -> Vec<(usize, u32, usize)> {
    let mut out: Vec<(usize, u32, usize)> = Vec::new();
    for &(b, d) in writes {
        match out.last_mut() {
            Some((b0, d0, len)) if *b0 + *len == b && *d0 as usize + *len == d as usize => {
                *len += 1
            }
            _ => out.push((b, d, 1)),
        }
    }
    out
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
        let (n, m) = (KV_BLOCK * pool.row_words(), slots.len());
        self.staging.release_done();
        if m == 0 {
            return Ok(CudaHostBlocks {
                mem: None,
                blocks: 0,
                block_words: n,
                arena: self.pinned.clone(),
                read: Mutex::new(None),
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
        let (ctx, arena) = (&self.gpu.ctx, &self.pinned);
        let (mut hk, mut hv) = (arena.take_u16(ctx, m * n)?, arena.take_u16(ctx, m * n)?);
        let mut hp = arena.take_u32(ctx, m * KV_BLOCK)?;
        dtoh_front(copy, &k, &mut hk)?;
        dtoh_front(copy, &v, &mut hv)?;
        dtoh_front(copy, &p, &mut hp)?;
        let landed = copy.record_event(None).or_engine("record")?;
        let done = copy.record_event(None).or_engine("record")?;
        let mapped = (|| {
            let at = |p: Option<*const u8>| device_address(ctx, p?);
            Some([
                at(hk.as_ptr().ok().map(|p| p.cast()))?,
                at(hv.as_ptr().ok().map(|p| p.cast()))?,
                at(hp.as_ptr().ok().map(|p| p.cast()))?,
            ])
        })();
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
                mapped,
            }),
            blocks: m,
            block_words: n,
            arena: self.pinned.clone(),
            read: Mutex::new(None),
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
        let n = KV_BLOCK * pool.row_words();
        mem.landed.synchronize().or_engine("wait for the offload")?;
        let s = &self.gpu.stream;
        match mem.mapped {
            // one kernel reads every block over PCIe into its slot
            Some([hk, hv, hp]) if n.is_multiple_of(8) => {
                let pairs: Vec<u32> = (writes.iter()).flat_map(|&(b, d)| [b as u32, d]).collect();
                let pairs = s.clone_htod(&pairs).or_engine("htod")?;
                let (count, pieces) = (i32_of(writes.len()), i32_of(n / 8));
                let f = self.f("kv_fetch_blocks")?;
                let mut b = s.launch_builder(&f);
                b.arg(&hk).arg(&hv).arg(&hp);
                b.arg(&mut pool.k).arg(&mut pool.v).arg(&mut pool.pos);
                b.arg(&pairs).arg(&count).arg(&pieces);
                let total = writes.len() * (2 * n / 8 + KV_BLOCK / 4);
                // SAFETY: the host addresses are the tier's mapped buffers (blocks checked
                // above, slots by check_slots); the pools hold n elements a slot (n / 8
                // 16-byte pieces, cudarc's allocations are 256-byte aligned).
                unsafe { b.launch(flat(total)) }.or_engine("kv_fetch_blocks")?;
            }
            _ => self.fetch_by_copies(mem, writes, pool)?,
        }
        // the pinned buffers stay until these copies have run (see Drop)
        let read = s.record_event(None).or_engine("record")?;
        *host.read.lock().unwrap_or_else(|e| e.into_inner()) = Some(read);
        Ok(())
    }

    /// A fetch as one copy a run of blocks (adjacent in both stores) and store, straight from
    /// pinned memory into the slots on the compute stream: where the driver does not map the
    /// host tier.
    fn fetch_by_copies(
        &self,
        mem: &Pinned,
        writes: &[(usize, u32)],
        pool: &mut KvPool<Self>,
    ) -> Result<()> {
        let n = KV_BLOCK * pool.row_words();
        let hk = mem.k.as_slice().or_engine("pinned")?;
        let hv = mem.v.as_slice().or_engine("pinned")?;
        let hp = mem.pos.as_slice().or_engine("pinned")?;
        let s = &self.gpu.stream;
        for run in runs(writes) {
            let (b, d, len) = (run.0, run.1 as usize, run.2);
            let (from, to) = (b * n..(b + len) * n, d * n..(d + len) * n);
            s.memcpy_htod(&hk[from.clone()], &mut pool.k.slice_mut(to.clone()))
                .or_engine("htod")?;
            s.memcpy_htod(&hv[from], &mut pool.v.slice_mut(to))
                .or_engine("htod")?;
            let (from, to) = (
                b * KV_BLOCK..(b + len) * KV_BLOCK,
                d * KV_BLOCK..(d + len) * KV_BLOCK,
            );
            s.memcpy_htod(&hp[from], &mut pool.pos.slice_mut(to))
                .or_engine("htod")?;
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
        let n = KV_BLOCK * src.row_words();
        check_slots(
            "cuda kv_pool_regrouped",
            src.slots,
            moves.iter().map(|m| m.0),
        )?;
        check_slots("cuda kv_pool_regrouped", slots, moves.iter().map(|m| m.1))?;
        let mut pool = KvPool::typed(self, slots, src.kv_dim, src.dtype)?;
        pool.k_scale = src.k_scale.clone();
        if src.k_scale_on_device.is_some() {
            pool.k_scale_on_device = Some(self.upload_f32(&src.k_scale)?);
        }
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
