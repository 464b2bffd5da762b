//! KV pools of the element types other than bf16 on the GPU, as the CPU engine stores them
//! (src/backend/kv_format.rs: f16, and Q8 groups with the keys divided by the layer's channel
//! scale): the channel scale set by a Q8 layer's first append, and the pool widened to bf16
//! where a kernel reads bf16 tiles (prefill attention on tensor cores), each widening into one
//! scratch pool. The appends (kernels/kv_blocks.cu), decode attention and the block scores read
//! and write the types where they lie (kernels/kv_types.cuh).

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaSlice, LaunchArgs, PushKernelArg};

use super::ops::{flat, i32_of, CudaOps};
use super::OrEngine;
use crate::backend::kv_format::{key_scale_from_amax, KvDtype, SCALE_MIN_ROWS};
use crate::backend::ops::{KvPool, Ops, RowSlice, KV_BLOCK};
use crate::Result;

/// The element type's code in kernels/kv_types.cuh.
pub(super) fn kv_type_code(dtype: KvDtype) -> i32 {
    match dtype {
        KvDtype::Bf16 => 0,
        KvDtype::F16 => 1,
        KvDtype::Q8 => 2,
    }
}

/// A null device pointer, for a kernel's optional pointer arguments.
pub(super) const NULL: u64 = 0;

/// Push a pool's key channel scale (`KvPool::k_scale_on_device`), or a null pointer where it
/// has none: the kernels of kernels/kv_types.cuh's pools take it so.
pub(super) fn arg_key_scale<'a>(b: &mut LaunchArgs<'a>, scale: &'a Option<CudaSlice<f32>>) {
    match scale {
        Some(scale) => b.arg(scale),
        None => b.arg(&NULL),
    };
}

/// A layer's rows widened to bf16: slot i holds block i (`table` is 0, 1, ..).
pub(super) struct WidePool {
    pub pool: KvPool<CudaOps>,
    pub table: CudaSlice<u32>,
}

/// The scratch pool widenings reuse, grown to the longest layer seen.
pub(super) type WideScratch = Arc<Mutex<Option<WidePool>>>;

/// What a prefill's attention reads of its own rows unrounded: q's buffer (the rows `at`, the
/// keys and values at columns `cols` from `at.offset`) and the rows' positions.
pub(super) struct FreshRows<'a> {
    pub qkv: &'a CudaSlice<u16>,
    pub at: RowSlice,
    pub cols: (usize, usize),
    pub q_pos: &'a CudaSlice<u32>,
}

impl CudaOps {
    /// A Q8 pool's channel scale from the keys of its first append (every channel 1 when they
    /// are too few rows to set it), on the host and the device.
    pub(super) fn set_key_scale(
        &self,
        qkv: &CudaSlice<u16>,
        at: RowSlice,
        k_col: usize,
        pool: &mut KvPool<Self>,
    ) -> Result<()> {
        let d = pool.kv_dim;
        pool.k_scale = if at.rows >= SCALE_MIN_ROWS {
            let mut amax = self.zeros_f32(d)?;
            let f = self.f("key_channel_amax")?;
            let (r, st, kc, dd) = (
                i32_of(at.rows),
                i32_of(at.stride),
                i32_of(at.offset + k_col),
                i32_of(d),
            );
            let mut b = self.gpu.stream.launch_builder(&f);
            b.arg(qkv).arg(&mut amax).arg(&r).arg(&st).arg(&kc).arg(&dd);
            // SAFETY: the rows lie in qkv (checked by the caller); amax holds kv_dim values.
            unsafe { b.launch(flat(d)) }.or_engine("key_channel_amax")?;
            key_scale_from_amax(self.download_f32(&amax)?)
        } else {
            vec![1.0; d]
        };
        pool.k_scale_on_device = Some(self.upload_f32(&pool.k_scale)?);
        Ok(())
    }

    /// The first `n_keys` rows of `pool` (through `table`) widened to bf16 in the scratch pool,
    /// Q8 keys multiplied back by their channel scale; `fresh` rows (the last ones, where their
    /// positions match) taken from q's buffer instead. The guard holds the widened pool.
    pub(super) fn widened(
        &self,
        pool: &KvPool<Self>,
        table: &CudaSlice<u32>,
        n_keys: usize,
        fresh: Option<FreshRows<'_>>,
    ) -> Result<MutexGuard<'_, Option<WidePool>>> {
        let blocks = n_keys.div_ceil(KV_BLOCK);
        let mut wide = self.wide.lock().unwrap_or_else(|e| e.into_inner());
        if (wide.as_ref()).is_none_or(|w| w.pool.slots < blocks || w.pool.kv_dim != pool.kv_dim) {
            *wide = None; // the old one's memory first
            let slots = blocks.next_multiple_of(16);
            let ids: Vec<u32> = (0..slots as u32).collect();
            *wide = Some(WidePool {
                pool: KvPool::typed(self, slots, pool.kv_dim, KvDtype::Bf16)?,
                table: self.upload_u32(&ids)?,
            });
        }
        let w = wide.as_mut().expect("made above");
        let f = self.f("kv_widen_bf16")?;
        let (kind, nk, d) = (
            kv_type_code(pool.dtype),
            i32_of(n_keys),
            i32_of(pool.kv_dim),
        );
        let (rows, st, kc, vc) = match &fresh {
            Some(f) => (
                i32_of(f.at.rows),
                i32_of(f.at.stride),
                i32_of(f.at.offset + f.cols.0),
                i32_of(f.at.offset + f.cols.1),
            ),
            None => (0, 0, 0, 0),
        };
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&pool.k).arg(&pool.v).arg(&pool.pos).arg(table);
        arg_key_scale(&mut b, &pool.k_scale_on_device);
        b.arg(&kind).arg(&nk).arg(&d);
        match &fresh {
            Some(f) => b.arg(f.qkv).arg(f.q_pos),
            None => b.arg(&NULL).arg(&NULL),
        };
        b.arg(&rows).arg(&st).arg(&kc).arg(&vc);
        b.arg(&mut w.pool.k).arg(&mut w.pool.v).arg(&mut w.pool.pos);
        // SAFETY: the table covers n_keys rows of this pool (checked by the caller); the
        // scratch holds at least ceil(n_keys / KV_BLOCK) slots of kv_dim; the fresh rows lie in
        // q's buffer (the rows just appended from it), their positions `rows` entries.
        unsafe { b.launch(flat(n_keys * pool.kv_dim)) }.or_engine("kv_widen_bf16")?;
        Ok(wide)
    }
}
