//! One query row's attention on the GPU (decode), split over the key range and grouped by KV
//! head: the launch of kernels/decode_attention_warps.cu (head sizes 64 and 128) or
//! kernels/decode_attention.cu (the others), then the matching merge of the splits, for
//! [`CudaOps`]'s `attention`.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::kv_types::arg_key_scale;
use super::ops::{i32_of, CudaOps};
use super::OrEngine;
use crate::backend::ops::{Heads, KvPool, RowSlice};
use crate::{Error, Result};

impl CudaOps {
    /// One query row's attention split over the key range, each CTA serving the KV head's query
    /// heads (each K/V row read once for the group), so that a long context keeps every
    /// multiprocessor busy; then one combine per head. Head sizes 64 and 128 run the kernel of
    /// decode_attention_warps.cu that [`super::ops::DecodeTuning`] names (a warp per stream of
    /// keys, coalesced rows) on the CTAs a multiprocessor it says; the others the tree kernel
    /// on up to 64 splits of at least 512 keys.
    /// Checked by `attention` (shapes).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn decode_attention(
        &self,
        q: &CudaSlice<u16>,
        at: RowSlice,
        q_pos: &CudaSlice<u32>,
        pool: &KvPool<Self>,
        table: &CudaSlice<u32>,
        n_keys: usize,
        heads: Heads,
        out: &mut CudaSlice<u16>,
    ) -> Result<()> {
        const THREADS: u32 = 128; // DEC_TILE
        const MAX_GROUP: usize = 8; // DEC_MAX_GROUP and DW_MAX_GROUP
        const WARPS: u32 = 4; // DW_WARPS in decode_attention_warps.cu
        const MERGE_MAX_SPLITS: usize = 1024; // DM_MAX_SPLITS
        const CHUNK: usize = 8; // CHUNK of the kernels decode_attention_warps.cu instantiates
        let group = heads.n_heads / heads.n_kv_heads;
        if group > MAX_GROUP || !heads.n_heads.is_multiple_of(heads.n_kv_heads) {
            return Err(Error::Engine(format!(
                "cuda decode attention: {} query heads over {} KV heads (groups of at most {MAX_GROUP})",
                heads.n_heads, heads.n_kv_heads
            )));
        }
        let warps = matches!(heads.head_dim, 64 | 128);
        let n_splits = match warps {
            // the CTAs a multiprocessor the tuning asks for, at least a warp's chunk of keys
            // each, rounded down: a few CTAs past a whole wave would run as a second wave (at 3
            // a multiprocessor, 50 splits of 8 KV heads are 400 CTAs where 396 fit)
            true => (self.decode.ctas_per_sm.max(1) * self.gpu.multiprocessors as usize
                / heads.n_kv_heads)
                .min(n_keys.div_ceil(CHUNK * WARPS as usize))
                .clamp(1, MERGE_MAX_SPLITS),
            false => n_keys.div_ceil(512).clamp(1, 64),
        };
        // the warp kernel's chunks must not straddle a KV block
        let per_split = n_keys.div_ceil(n_splits).next_multiple_of(CHUNK);
        let s = &self.gpu.stream;
        let parts = heads.n_heads * n_splits;
        // SAFETY (the three): every split writes its m, l and o of every head of its group
        let mut part_m = unsafe { s.alloc::<f32>(parts) }.or_engine("alloc")?;
        let mut part_l = unsafe { s.alloc::<f32>(parts) }.or_engine("alloc")?;
        let mut part_o = unsafe { s.alloc::<f32>(parts * heads.head_dim) }.or_engine("alloc")?;
        let (name, smem) = match warps {
            true => (
                (self.decode.kernel).entry_for(heads.head_dim, group, pool.dtype),
                (self.decode.kernel).shared_bytes_for(heads.head_dim, group, pool.dtype),
            ),
            // bf16 pools only: `attention` widens the others for this kernel
            false => ("decode_attention_split_bf16".to_string(), 0),
        };
        let f = match smem {
            0 => self.f(&name)?,
            _ => self.gpu.kernels.get_with_shared(&name, smem)?,
        };
        let (st, qc, nk, h, kvh, hd, ps) = (
            i32_of(at.stride),
            i32_of(at.offset),
            i32_of(n_keys),
            i32_of(heads.n_heads),
            i32_of(heads.n_kv_heads),
            i32_of(heads.head_dim),
            i32_of(per_split),
        );
        let scale = 1.0 / (heads.head_dim as f32).sqrt();
        let mut b = s.launch_builder(&f);
        b.arg(q)
            .arg(q_pos)
            .arg(&pool.k)
            .arg(&pool.v)
            .arg(&pool.pos)
            .arg(table);
        if warps {
            arg_key_scale(&mut b, &pool.k_scale_on_device);
        }
        b.arg(&mut part_m).arg(&mut part_l).arg(&mut part_o);
        b.arg(&st).arg(&qc).arg(&nk).arg(&h).arg(&kvh);
        if !warps {
            b.arg(&hd);
        }
        b.arg(&ps).arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (n_splits as u32, heads.n_kv_heads as u32, 1),
            block_dim: (if warps { 32 * WARPS } else { THREADS }, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the splits cover keys < n_keys, which the table holds (checked by the
        // caller); the partials hold n_heads * n_splits entries (of head_dim for o); a group
        // is at most DEC_MAX_GROUP (DW_MAX_GROUP) heads (checked); the dynamic shared memory is
        // the staged kernel's layout at this shape (its limit raised to it), 0 for the others.
        unsafe { b.launch(cfg) }.or_engine("decode attention (split)")?;
        let f = self.f(match warps {
            true => "decode_attention_merge_bf16",
            false => "decode_attention_combine_bf16",
        })?;
        let ns = i32_of(n_splits);
        let mut b = s.launch_builder(&f);
        b.arg(&part_m)
            .arg(&part_l)
            .arg(&part_o)
            .arg(out)
            .arg(&ns)
            .arg(&hd);
        let cfg = LaunchConfig {
            grid_dim: (heads.n_heads as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one CTA per head; out holds n_heads * head_dim values (checked by the caller).
        unsafe { b.launch(cfg) }.or_engine("decode_attention_combine_bf16")?;
        Ok(())
    }
}
