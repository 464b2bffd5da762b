//! SlimInfer's block scores on the GPU, for [`CudaOps`]' `unit_keys` and `unit_scores`
//! (kernels/slim_scores.cu): each unit's mean key, the window queries' logits against them (one
//! cuBLAS f32 GEMM a layer, batched over the KV heads), softmax, and one score a block.

use std::ffi::c_void;

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, PushKernelArg};

use super::kv_types::{arg_key_scale, kv_type_code};
use super::ops::{flat, i32_of, per_row, CudaOps};
use super::OrEngine;
use crate::backend::ops::{Heads, KvPool, Ops, RowSlice, ScoreMode, UnitBlocks};
use crate::{Error, Result};

impl CudaOps {
    /// [`Ops::unit_keys`] on the GPU: each unit's mean key (kernels/slim_scores.cu).
    pub(super) fn unit_keys_on_device(
        &self,
        pool: &KvPool<Self>,
        table: &CudaSlice<u32>,
        prompt_rows: usize,
        unit_size: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n_units = prompt_rows.div_ceil(unit_size);
        let kv_dim = pool.kv_dim;
        if n_units == 0 || out.len() < n_units * kv_dim {
            return Err(Error::Engine(format!(
                "cuda unit_keys: {} values for {n_units} units of {kv_dim}",
                out.len()
            )));
        }
        let s = &self.gpu.stream;
        let f = self.f("unit_keys_bf16")?;
        let (pr, us, d) = (i32_of(prompt_rows), i32_of(unit_size), i32_of(kv_dim));
        let kind = kv_type_code(pool.dtype);
        let mut b = s.launch_builder(&f);
        b.arg(&pool.k).arg(table);
        arg_key_scale(&mut b, &pool.k_scale_on_device);
        b.arg(&kind).arg(out).arg(&pr).arg(&us).arg(&d);
        // SAFETY: the table covers the prompt rows, of the pool's type; out holds n_units rows;
        // the scale, where there is one, kv_dim values.
        unsafe { b.launch(flat(n_units * kv_dim)) }.or_engine("unit_keys_bf16")?;
        Ok(())
    }

    /// [`Ops::unit_scores`] on the GPU.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn unit_scores_on_device(
        &self,
        q: &CudaSlice<u16>,
        at: RowSlice,
        unit_keys: &CudaSlice<f32>,
        units: &UnitBlocks,
        heads: Heads,
        mode: ScoreMode,
        acc: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n_units = units.n_units();
        if n_units == 0 || unit_keys.len() < n_units * heads.kv_dim() {
            return Err(Error::Engine(format!(
                "cuda unit_scores: {} unit key values for {n_units} units",
                unit_keys.len()
            )));
        }
        let s = &self.gpu.stream;
        let rows = at.rows * heads.n_heads;
        // logits (w * n_heads, n_units), grouped by KV head (row ((h / group) * w + qi) *
        // group + h % group): each KV head's window rows against its unit keys, one cuBLAS f32
        // GEMM (n_units x w * group x head_dim) batched over the KV heads. A warp per dot
        // product took ~2.5 ms a layer at 32k units; a GEMM per window row (4 columns) ~1.5 ms.
        let (w, n_heads, n_kv, hd) = (at.rows, heads.n_heads, heads.n_kv_heads, heads.head_dim);
        let (q_dim, kv_dim, group) = (heads.q_dim(), heads.kv_dim(), n_heads / n_kv);
        // SAFETY (both): every element is written below (qf by query_rows_f32, logits by the
        // GEMM: each (window row, head) row of n_units once)
        let mut qf = unsafe { s.alloc::<f32>(w * q_dim) }.or_engine("alloc")?;
        let mut logits = unsafe { s.alloc::<f32>(rows * n_units) }.or_engine("alloc")?;
        let scale = match mode {
            ScoreMode::Attention | ScoreMode::AttentionMax => 1.0 / (hd as f32).sqrt(),
            ScoreMode::Paper => 1.0,
        };
        let f = self.f("query_rows_f32")?;
        let (wi, st, qc, qd) = (
            i32_of(w),
            i32_of(at.stride),
            i32_of(at.offset),
            i32_of(q_dim),
        );
        let (gi, hdi) = (i32_of(group), i32_of(hd));
        let mut b = s.launch_builder(&f);
        b.arg(q).arg(&mut qf).arg(&wi).arg(&st).arg(&qc).arg(&qd);
        b.arg(&gi).arg(&hdi).arg(&scale);
        // SAFETY: the window rows are in q (the caller's RowSlice); qf holds w * q_dim.
        unsafe { b.launch(flat(w * q_dim)) }.or_engine("query_rows_f32")?;
        {
            let (kp, _gk) = unit_keys.device_ptr(s);
            let (qp, _gq) = qf.device_ptr(s);
            let (lp, _gl) = logits.device_ptr_mut(s);
            let (alpha, beta) = (1.0f32, 0.0f32);
            let cols = w * group;
            // SAFETY: unit_keys holds n_units rows of kv_dim (checked), qf n_kv matrices of
            // cols x hd, logits n_kv matrices of cols x n_units; every stride stays inside
            unsafe {
                cudarc::cublas::result::gemm_strided_batched_ex(
                    *self.gpu.blas.handle(),
                    cublasOperation_t::CUBLAS_OP_T,
                    cublasOperation_t::CUBLAS_OP_N,
                    i32_of(n_units),
                    i32_of(cols),
                    i32_of(hd),
                    &alpha as *const f32 as *const c_void,
                    kp as *const c_void,
                    cudaDataType_t::CUDA_R_32F,
                    i32_of(kv_dim),
                    hd as i64,
                    qp as *const c_void,
                    cudaDataType_t::CUDA_R_32F,
                    i32_of(hd),
                    (cols * hd) as i64,
                    &beta as *const f32 as *const c_void,
                    lp as *mut c_void,
                    cudaDataType_t::CUDA_R_32F,
                    i32_of(n_units),
                    (cols * n_units) as i64,
                    i32_of(n_kv),
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .or_engine("cublasGemmStridedBatchedEx")?;
        }
        let (h, nu) = (i32_of(n_heads), i32_of(n_units));

        if mode != ScoreMode::Paper {
            let f = self.f("softmax_rows_f32")?;
            let (r, n) = (i32_of(rows), i32_of(n_units));
            let mut b = s.launch_builder(&f);
            b.arg(&mut logits).arg(&r).arg(&n);
            // SAFETY: one CTA per row of n_units.
            unsafe { b.launch(per_row(rows)) }.or_engine("softmax_rows_f32")?;
        }
        let first = self.upload_u32(&units.first)?;
        let ids = self.upload_u32(&units.ids)?;
        let f = self.f("block_scores_f32")?;
        let m = match mode {
            ScoreMode::Attention => 0i32,
            ScoreMode::Paper => 1i32,
            ScoreMode::AttentionMax => 2i32,
        };
        let mut b = s.launch_builder(&f);
        b.arg(&logits).arg(&first).arg(&ids).arg(acc);
        b.arg(&wi).arg(&h).arg(&gi).arg(&nu).arg(&m);
        // SAFETY: one CTA per block present; block ids index acc (n_prompt_blocks).
        unsafe { b.launch(per_row(units.ids.len())) }.or_engine("block_scores_f32")?;
        Ok(())
    }
}
