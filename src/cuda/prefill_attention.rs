//! Prefill attention on tensor cores: the launches of kernels/attention_mma.cu and
//! kernels/attention_mma_pipelined.cu for [`CudaOps`]'s `attention`, and which shapes each takes
//! (the others run attention.cu on FMA units).

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::ops::{i32_of, CudaOps, PrefillFootprint, PrefillKernel};
use super::OrEngine;
use crate::backend::ops::{Heads, KvPool, RowSlice, KV_BLOCK};
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

/// Warps of a CTA of the pipelined kernel, at most (PIPE_WARPS in attention_mma_pipelined.cu,
/// whose `__launch_bounds__` asks for two such CTAs an SM).
const PIPE_WARPS: usize = 8;

/// The pipelined kernel's 16-row query tiles per query head of a CTA, or None where it does not
/// apply: the shapes of [`mma_tiles`], and the query rows' 16-byte pieces aligned (the row
/// stride and the column offset multiples of 8 bf16), as its cp.async copies need.
pub(super) fn pipelined_tiles(heads: Heads, at: RowSlice) -> Option<usize> {
    let group = heads.n_heads / heads.n_kv_heads.max(1);
    let aligned = at.stride.is_multiple_of(8) && at.offset.is_multiple_of(8);
    mma_tiles(heads)
        .filter(|_| aligned)
        .map(|_| PIPE_WARPS / group)
}

/// The pipelined kernel's dynamic shared memory for `warps` warps: each warp's 16 query rows,
/// two K and two V tiles (rows of head_dim + 8 bf16), two tiles' key positions.
pub(super) fn pipelined_shared_bytes(head_dim: usize, warps: usize) -> usize {
    (16 * warps + 4 * KV_BLOCK) * (head_dim + 8) * 2 + 2 * KV_BLOCK * 4
}

/// The pipelined kernel's function attributes for `smem` bytes of dynamic shared memory: the
/// limit raised to it (over 48 KB needs that), and the shared memory carveout preferred at its
/// largest so that two CTAs fit an SM (the kernel reads nothing through L1 that matters).
fn pipelined_attributes(
    f: &cudarc::driver::CudaFunction,
    smem: usize,
) -> std::result::Result<(), cudarc::driver::DriverError> {
    f.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        i32_of(smem),
    )?;
    f.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
        100,
    )
}

impl CudaOps {
    /// The tensor-core prefill kernel this backend runs at `heads` (query rows aligned) and its
    /// footprint on the device; None where FMA units run it.
    pub fn prefill_footprint(&self, heads: Heads) -> Result<Option<PrefillFootprint>> {
        let aligned = RowSlice {
            rows: 0,
            stride: 0,
            offset: 0,
        };
        let group = heads.n_heads / heads.n_kv_heads.max(1);
        let (name, tiles, smem) = match self.prefill_kernel() {
            PrefillKernel::Fma => return Ok(None),
            PrefillKernel::MmaPipelined => match pipelined_tiles(heads, aligned) {
                Some(t) => (
                    "attention_mma_pipelined",
                    t,
                    pipelined_shared_bytes(heads.head_dim, group * t),
                ),
                None => return Ok(None),
            },
            PrefillKernel::Mma => match mma_tiles(heads) {
                Some(t) => ("attention_mma", t, 0),
                None => return Ok(None),
            },
        };
        let name = format!("{name}_hd{}_bf16", heads.head_dim);
        let f = self.f(&name)?;
        if smem > 0 {
            pipelined_attributes(&f, smem).or_engine(&name)?;
        }
        let threads = 32 * group * tiles;
        Ok(Some(PrefillFootprint {
            ctas_per_sm: f
                .occupancy_max_active_blocks_per_multiprocessor(threads as u32, smem, None)
                .or_engine(&name)?,
            threads,
            dynamic_shared_bytes: smem,
            registers: f.num_regs().or_engine(&name)?,
            local_bytes: f.local_size_bytes().or_engine(&name)?,
            kernel: name,
        }))
    }

    /// Prefill attention on tensor cores: one CTA per KV head and `16 * tiles` query rows of
    /// each head of its group, so every K/V tile is loaded once for the whole group; with
    /// `pipelined`, attention_mma_pipelined.cu (K/V tiles double-buffered in dynamic shared
    /// memory, over 48 KB, so the function's limit is raised first), else attention_mma.cu.
    /// The caller checked the shapes and [`mma_tiles`] (and [`pipelined_tiles`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_tensor_cores(
        &self,
        pipelined: bool,
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
        let kernel = if pipelined {
            "attention_mma_pipelined"
        } else {
            "attention_mma"
        };
        let name = format!("{kernel}_hd{}_bf16", heads.head_dim);
        let f = self.f(&name)?;
        let warps = heads.n_heads / heads.n_kv_heads * tiles;
        let smem = match pipelined {
            true => {
                let smem = pipelined_shared_bytes(heads.head_dim, warps);
                pipelined_attributes(&f, smem).or_engine(&name)?;
                smem
            }
            false => 0,
        };
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
            block_dim: ((32 * warps) as u32, 1, 1),
            shared_mem_bytes: smem as u32,
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
        // SAFETY: shapes (and for the pipelined kernel alignment) checked by the caller; the
        // table names slots of this pool; the dynamic shared memory is the pipelined kernel's
        // layout for these warps.
        unsafe { b.launch(cfg) }.or_engine(&name)?;
        Ok(())
    }
}
