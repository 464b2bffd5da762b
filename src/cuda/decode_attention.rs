//! One query row's attention on the GPU (decode), split over the key range and grouped by KV
//! head: the launch of kernels/decode_attention.cu for [`CudaOps`]'s `attention`.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::ops::{i32_of, CudaOps};
use super::OrEngine;
use crate::backend::ops::{Heads, KvPool, RowSlice};
use crate::{Error, Result};

impl CudaOps {
    /// One query row's attention split over the key range (kernels/decode_attention.cu): up to
    /// 64 splits of at least 512 keys per KV head, each CTA serving the KV head's query heads
    /// (each K/V row read once for the group), so that a long context keeps every
    /// multiprocessor busy; then one combine per head. Checked by `attention` (shapes).
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
        const MAX_GROUP: usize = 8; // DEC_MAX_GROUP
        let group = heads.n_heads / heads.n_kv_heads;
        if group > MAX_GROUP || !heads.n_heads.is_multiple_of(heads.n_kv_heads) {
            return Err(Error::Engine(format!(
                "cuda decode attention: {} query heads over {} KV heads (groups of at most {MAX_GROUP})",
                heads.n_heads, heads.n_kv_heads
            )));
        }
        let n_splits = n_keys.div_ceil(512).clamp(1, 64);
        let per_split = n_keys.div_ceil(n_splits);
        let s = &self.gpu.stream;
        let parts = heads.n_heads * n_splits;
        let mut part_m = s.alloc_zeros::<f32>(parts).or_engine("alloc")?;
        let mut part_l = s.alloc_zeros::<f32>(parts).or_engine("alloc")?;
        let mut part_o = (s.alloc_zeros::<f32>(parts * heads.head_dim)).or_engine("alloc")?;
        let f = self.f("decode_attention_split_bf16")?;
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
        b.arg(&mut part_m).arg(&mut part_l).arg(&mut part_o);
        b.arg(&st)
            .arg(&qc)
            .arg(&nk)
            .arg(&h)
            .arg(&kvh)
            .arg(&hd)
            .arg(&ps)
            .arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (n_splits as u32, heads.n_kv_heads as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the splits cover keys < n_keys, which the table holds (checked by the
        // caller); the partials hold n_heads * n_splits entries (of head_dim for o); a group
        // is at most DEC_MAX_GROUP heads (checked).
        unsafe { b.launch(cfg) }.or_engine("decode_attention_split_bf16")?;
        let f = self.f("decode_attention_combine_bf16")?;
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
