//! Prefill attention on tensor cores: the launch of kernels/attention_mma.cu for [`CudaOps`]'s
//! `attention`, and which shapes it takes (the others run attention.cu on FMA units).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::ops::{i32_of, CudaOps};
use super::OrEngine;
use crate::backend::ops::{Heads, KvPool, RowSlice};
use crate::Result;

/// Warps of a CTA of the tensor-core prefill attention (MMA_WARPS in attention_mma.cu).
const MMA_WARPS: usize = 8;

/// The tensor-core prefill attention's 16-row query tiles per query head of a CTA (its warps
/// are every head of a GQA group times these), or None where it does not apply: head sizes
/// other than 64 and 128, or a group wider than [`MMA_WARPS`] (the FMA kernel runs those).
pub(super) fn mma_tiles(heads: Heads) -> Option<usize> {
    let group = heads.n_heads / heads.n_kv_heads.max(1);
    let fits = matches!(heads.head_dim, 64 | 128)
        && heads.n_heads.is_multiple_of(heads.n_kv_heads.max(1))
        && (1..=MMA_WARPS).contains(&group);
    fits.then(|| MMA_WARPS / group)
}

impl CudaOps {
    /// Prefill attention on tensor cores (attention_mma.cu): one CTA per KV head and
    /// `16 * tiles` query rows of each head of its group, so every K/V tile is loaded once for
    /// the whole group. The caller checked the shapes and [`mma_tiles`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_mma(
        &self,
        q: &CudaSlice<u16>,
        at: RowSlice,
        q_pos: &CudaSlice<u32>,
        pool: &KvPool<Self>,
        table: &CudaSlice<u32>,
        n_keys: usize,
        heads: Heads,
        tiles: usize,
        out: &mut CudaSlice<u16>,
    ) -> Result<()> {
        let f = self.f(&format!("attention_mma_hd{}_bf16", heads.head_dim))?;
        let group = heads.n_heads / heads.n_kv_heads;
        let (nq, st, qc, nk, h, kvh, tl) = (
            i32_of(at.rows),
            i32_of(at.stride),
            i32_of(at.offset),
            i32_of(n_keys),
            i32_of(heads.n_heads),
            i32_of(heads.n_kv_heads),
            i32_of(tiles),
        );
        let scale_log2 = std::f32::consts::LOG2_E / (heads.head_dim as f32).sqrt();
        let cfg = LaunchConfig {
            grid_dim: (
                at.rows.div_ceil(16 * tiles) as u32,
                heads.n_kv_heads as u32,
                1,
            ),
            block_dim: ((32 * group * tiles) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(q)
            .arg(q_pos)
            .arg(&pool.k)
            .arg(&pool.v)
            .arg(&pool.pos)
            .arg(table)
            .arg(out);
        b.arg(&nq)
            .arg(&st)
            .arg(&qc)
            .arg(&nk)
            .arg(&h)
            .arg(&kvh)
            .arg(&tl)
            .arg(&scale_log2);
        // SAFETY: shapes checked by the caller; the table names slots of this pool.
        unsafe { b.launch(cfg) }.or_engine("attention_mma_bf16")?;
        Ok(())
    }
}
