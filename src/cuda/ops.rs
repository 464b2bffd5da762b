//! [`Ops`] over device buffers: our kernels for the row-wise ops, attention, gathers, scores and
//! KV blocks, cuBLAS (bf16 in and out, f32 accumulation) for the GEMMs. Everything is queued on
//! the compute stream; only downloads wait.

use std::ffi::c_void;
use std::ops::Range;
use std::sync::Arc;

use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};

use super::host_blocks::{CudaHostBlocks, PinnedArena, StagingQueue};
pub use super::kernel_choice::{
    DecodeKernel, DecodeTuning, OneRowLinear, PrefillFootprint, PrefillKernel,
};
use super::kv_types::{arg_key_scale, FreshRows, WideScratch};
use super::{Gpu, OrEngine};
use candle_core::quantized::GgmlDType;

use crate::backend::cpu_ops::{to_bf16, to_f32};
use crate::backend::kv_format::{KvDtype, KvDtypeCell, Q8_GROUP};
use crate::backend::ops::{bf16_weight, Heads, KvPool, Ops, RopeLayout, RowSlice, ScoreMode};
use crate::backend::ops::{AttentionContext, UnitBlocks, WeightUse, WeightValues, KV_BLOCK};
use crate::{Error, Result};

/// The CUDA backend of the ops seam.
#[derive(Clone)]
pub struct CudaOps {
    pub gpu: Arc<Gpu>,
    /// Offloads' staging buffers until their copies to the host are done.
    pub(super) staging: StagingQueue,
    /// Pinned buffers of dropped host tiers, for the next offloads.
    pub(super) pinned: PinnedArena,
    /// The kernel of prefill attention (more than one query row) where its shapes allow.
    prefill: PrefillKernel,
    /// How the warp kernel of decode attention splits its work.
    pub(super) decode: DecodeTuning,
    /// Who runs one-row linear layers (decode's GEMVs).
    one_row: OneRowLinear,
    /// The element type of the KV pools made from now on.
    kv: KvDtypeCell,
    /// Where a pool of another type than bf16 is widened for the kernels that read bf16.
    pub(super) wide: WideScratch,
}

const THREADS: u32 = 256;

/// A grid-stride launch over `n` elements.
pub(super) fn flat(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            (n.div_ceil(THREADS as usize)).clamp(1, 1 << 20) as u32,
            1,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One CTA of `THREADS` per row.
pub(super) fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn need(what: &str, len: usize, want: usize) -> Result<()> {
    if len < want {
        return Err(Error::Engine(format!(
            "cuda ops: {what} has {len} elements, needs {want}"
        )));
    }
    Ok(())
}

pub(super) fn i32_of(n: usize) -> i32 {
    i32::try_from(n).expect("kernel size fits in i32")
}

impl CudaOps {
    pub fn new(gpu: Arc<Gpu>) -> Self {
        Self {
            gpu,
            staging: StagingQueue::default(),
            pinned: PinnedArena::default(),
            prefill: PrefillKernel::MmaPipelined,
            decode: DecodeTuning::default(),
            one_row: OneRowLinear::default(),
            kv: KvDtypeCell::new(KvDtype::Bf16),
            wide: WideScratch::default(),
        }
    }

    /// The same backend making KV pools of `kv` (bf16 unless told).
    pub fn with_kv_dtype(self, kv: KvDtype) -> Self {
        self.kv.set(kv);
        self
    }

    /// Pools made from now on hold `kv` (a loaded model's backend, as the engine's
    /// `[model] kv_dtype` changes).
    pub fn set_kv_dtype(&self, kv: KvDtype) {
        self.kv.set(kv);
    }

    /// The same backend with one-row linear layers run as `one_row` says: gpu-check times
    /// every setting and runs the fastest that agrees with cuBLAS.
    pub fn with_one_row(mut self, one_row: OneRowLinear) -> Self {
        self.one_row = one_row;
        self
    }

    /// The same backend with decode attention's warp kernel launched as `tuning` says.
    pub fn with_decode_tuning(mut self, tuning: DecodeTuning) -> Self {
        self.decode = tuning;
        self
    }

    /// The same backend with prefill attention on `kernel` (where its shapes allow): gpu-check
    /// times every kernel, checks each tensor-core one and runs on the fastest that passed.
    pub fn with_prefill_kernel(mut self, kernel: PrefillKernel) -> Self {
        self.prefill = kernel;
        self
    }

    /// The kernel prefill attention runs on where its shapes allow.
    pub fn prefill_kernel(&self) -> PrefillKernel {
        self.prefill
    }

    pub(super) fn f(&self, name: &str) -> Result<cudarc::driver::CudaFunction> {
        self.gpu.kernels.get(name)
    }

    /// out (rows, n) = x (rows, k) . w^T, w: (n, k), row-major, through cuBLAS: bf16 operands,
    /// f32 accumulation, out of type `out_type` (bf16 or f32, matching T). Row-major out (rows,
    /// n) is column-major out^T (n, rows) = w (n, k) . x^T (k, rows): A = w read transposed (its
    /// column-major view is (k, n)), B = x as is.
    fn gemm<T: DeviceRepr>(
        &self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        out: &mut CudaSlice<T>,
        out_type: cudaDataType_t,
        (rows, k, n): (usize, usize, usize),
        what: &'static str,
    ) -> Result<()> {
        for (part, have, want) in [
            ("x", x.len(), rows * k),
            ("w", w.len(), n * k),
            ("out", out.len(), rows * n),
        ] {
            if have < want {
                return Err(Error::Engine(format!(
                    "cuda ops: {what} {part} has {have} elements, needs {want}"
                )));
            }
        }
        if let (
            1,
            true,
            OneRowLinear::Gemv {
                rows: per_cta,
                warps,
            },
        ) = (rows, k.is_multiple_of(8), self.one_row)
        {
            return self.gemv(x, w, out, out_type, (k, n), (per_cta, warps));
        }
        let s = &self.gpu.stream;
        let (xp, _gx) = x.device_ptr(s);
        let (wp, _gw) = w.device_ptr(s);
        let (op, _go) = out.device_ptr_mut(s);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the three buffers hold at least rows*k, n*k and rows*n elements (checked),
        // and their guards live across the call.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.gpu.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                i32_of(n),
                i32_of(rows),
                i32_of(k),
                &alpha as *const f32 as *const c_void,
                wp as *const c_void,
                cudaDataType_t::CUDA_R_16BF,
                i32_of(k),
                xp as *const c_void,
                cudaDataType_t::CUDA_R_16BF,
                i32_of(k),
                &beta as *const f32 as *const c_void,
                op as *mut c_void,
                out_type,
                i32_of(n),
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .or_engine("cublasGemmEx")
    }
}

impl CudaOps {
    /// [`Self::gemm`] at one row by kernels/gemv.cu: a CTA `rows` rows, its `warps` warps
    /// splitting k. The caller checked the lengths and that k is a multiple of 8.
    fn gemv<T: DeviceRepr>(
        &self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        out: &mut CudaSlice<T>,
        out_type: cudaDataType_t,
        (k, n): (usize, usize),
        (rows, warps): (u8, u8),
    ) -> Result<()> {
        let f32_out = out_type == cudaDataType_t::CUDA_R_32F;
        let one_row = OneRowLinear::Gemv { rows, warps };
        let name = one_row.entry(f32_out).expect("a kernel");
        let f = self.f(&name)?;
        let (n32, k32) = (i32_of(n), i32_of(k));
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(x).arg(w).arg(out).arg(&n32).arg(&k32);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(rows as usize) as u32, 1, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: x holds k values, w n rows of k, out n (checked by gemm); k is a multiple of
        // 8 and cudarc's allocations are 256-byte aligned, so the 16-byte loads are aligned.
        unsafe { b.launch(cfg) }.or_engine(&name)?;
        Ok(())
    }
}

/// The kernel that expands a GGUF type, with its values and bytes per block (kernels/dequant.cu).
fn dequant_kernel(dtype: GgmlDType) -> Result<(&'static str, usize, usize)> {
    Ok(match dtype {
        GgmlDType::Q4_0 => ("dequant_q4_0_bf16", 32, 18),
        GgmlDType::Q4_1 => ("dequant_q4_1_bf16", 32, 20),
        GgmlDType::Q5_0 => ("dequant_q5_0_bf16", 32, 22),
        GgmlDType::Q5_1 => ("dequant_q5_1_bf16", 32, 24),
        GgmlDType::Q8_0 => ("dequant_q8_0_bf16", 32, 34),
        GgmlDType::Q2K => ("dequant_q2_k_bf16", 256, 84),
        GgmlDType::Q3K => ("dequant_q3_k_bf16", 256, 110),
        GgmlDType::Q4K => ("dequant_q4_k_bf16", 256, 144),
        GgmlDType::Q5K => ("dequant_q5_k_bf16", 256, 176),
        GgmlDType::Q6K => ("dequant_q6_k_bf16", 256, 210),
        GgmlDType::F32 => ("dequant_f32_bf16", 1, 4),
        GgmlDType::F16 => ("dequant_f16_bf16", 1, 2),
        GgmlDType::BF16 => ("dequant_bf16_bf16", 1, 2),
        other => {
            return Err(Error::Engine(format!(
                "cuda ops: no kernel expands GGUF type {other:?}"
            )))
        }
    })
}

impl Ops for CudaOps {
    type F32 = CudaSlice<f32>;
    type Bf16 = CudaSlice<u16>;
    type Act = CudaSlice<u16>;
    type Weight = CudaSlice<u16>;
    type U32 = CudaSlice<u32>;
    type HostBlocks = CudaHostBlocks;

    fn name(&self) -> String {
        format!("cuda: {}", self.gpu.describe())
    }

    fn kv_dtype(&self) -> KvDtype {
        self.kv.get()
    }

    fn zeros_f32(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.gpu.stream.alloc_zeros(n.max(1)).or_engine("alloc")
    }
    fn zeros_bf16(&self, n: usize) -> Result<CudaSlice<u16>> {
        self.gpu.stream.alloc_zeros(n.max(1)).or_engine("alloc")
    }
    fn upload_f32(&self, v: &[f32]) -> Result<CudaSlice<f32>> {
        self.gpu.stream.clone_htod(v).or_engine("upload")
    }
    fn upload_bf16(&self, v: &[u16]) -> Result<CudaSlice<u16>> {
        self.gpu.stream.clone_htod(v).or_engine("upload")
    }
    fn upload_u32(&self, v: &[u32]) -> Result<CudaSlice<u32>> {
        if v.is_empty() {
            return self.gpu.stream.alloc_zeros(1).or_engine("alloc");
        }
        self.gpu.stream.clone_htod(v).or_engine("upload")
    }
    fn download_f32(&self, b: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.gpu.stream.clone_dtoh(b).or_engine("download")
    }
    fn download_bf16(&self, b: &CudaSlice<u16>) -> Result<Vec<u16>> {
        self.gpu.stream.clone_dtoh(b).or_engine("download")
    }
    fn download_u32(&self, b: &CudaSlice<u32>) -> Result<Vec<u32>> {
        self.gpu.stream.clone_dtoh(b).or_engine("download")
    }
    fn zeros_act(&self, n: usize) -> Result<CudaSlice<u16>> {
        self.zeros_bf16(n)
    }
    fn upload_act(&self, v: &[f32]) -> Result<CudaSlice<u16>> {
        self.upload_bf16(&to_bf16(v))
    }
    fn download_act_range(&self, b: &CudaSlice<u16>, range: Range<usize>) -> Result<Vec<f32>> {
        if range.start > range.end || range.end > b.len() {
            return Err(Error::Engine(format!(
                "ops: download range {range:?} of a buffer of {}",
                b.len()
            )));
        }
        let bits = (self.gpu.stream)
            .clone_dtoh(&b.slice(range))
            .or_engine("download")?;
        Ok(to_f32(&bits))
    }
    fn weight(
        &self,
        values: WeightValues,
        _use: WeightUse,
        rows: usize,
        cols: usize,
    ) -> Result<CudaSlice<u16>> {
        bf16_weight(self, values, rows * cols)
    }
    fn sync(&self) -> Result<()> {
        self.gpu.stream.synchronize().or_engine("synchronize")
    }

    fn fill_uniform(&self, out: &mut CudaSlice<u16>, seed: u64, scale: f32) -> Result<()> {
        let f = self.f("fill_uniform_bf16")?;
        let n = out.len() as i64;
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(out).arg(&n).arg(&seed).arg(&scale);
        // SAFETY: out holds n elements; the kernel writes indices < n.
        unsafe { b.launch(flat(n as usize)) }.or_engine("fill_uniform_bf16")?;
        Ok(())
    }

    fn matmul(
        &self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.gemm(
            x,
            w,
            out,
            cudaDataType_t::CUDA_R_16BF,
            (rows, k, n),
            "matmul",
        )
    }

    fn matmul_f32(
        &self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        out: &mut CudaSlice<f32>,
        rows: usize,
        k: usize,
        n: usize,
        _exact_input: bool,
    ) -> Result<()> {
        self.gemm(
            x,
            w,
            out,
            cudaDataType_t::CUDA_R_32F,
            (rows, k, n),
            "matmul_f32",
        )
    }

    fn dequant_bf16(
        &self,
        raw: &[u8],
        dtype: GgmlDType,
        n: usize,
        out: &mut CudaSlice<u16>,
        offset: usize,
    ) -> Result<()> {
        need("dequant out", out.len(), offset + n)?;
        let (name, per_block, block_bytes) = dequant_kernel(dtype)?;
        if !n.is_multiple_of(per_block) || raw.len() != n / per_block * block_bytes {
            return Err(Error::Engine(format!(
                "cuda ops: {n} values of {dtype:?} in {} bytes",
                raw.len()
            )));
        }
        let bytes = self.gpu.stream.clone_htod(raw).or_engine("upload")?;
        let f = self.f(name)?;
        let (blocks, off) = ((n / per_block) as i64, offset as i64);
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(&bytes).arg(&blocks).arg(out).arg(&off);
        // SAFETY: `bytes` holds `blocks` whole blocks and out holds offset + n values (checked).
        unsafe { b.launch(flat(blocks as usize)) }.or_engine(name)?;
        Ok(())
    }

    fn head_rmsnorm(
        &self,
        x: &mut CudaSlice<u16>,
        at: RowSlice,
        w: &CudaSlice<u16>,
        n_heads: usize,
        head_dim: usize,
        eps: f32,
    ) -> Result<()> {
        need(
            "head_rmsnorm x",
            x.len(),
            at.rows.saturating_sub(1) * at.stride + at.offset + n_heads * head_dim,
        )?;
        need("head_rmsnorm w", w.len(), head_dim)?;
        let f = self.f("head_rmsnorm_bf16")?;
        let (r, st, c, h, hd) = (
            i32_of(at.rows),
            i32_of(at.stride),
            i32_of(at.offset),
            i32_of(n_heads),
            i32_of(head_dim),
        );
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(x)
            .arg(w)
            .arg(&r)
            .arg(&st)
            .arg(&c)
            .arg(&h)
            .arg(&hd)
            .arg(&eps);
        // SAFETY: rows * n_heads heads inside x (checked), w holds head_dim values.
        unsafe { b.launch(flat(at.rows * n_heads)) }.or_engine("head_rmsnorm_bf16")?;
        Ok(())
    }

    fn add_bias(
        &self,
        x: &mut CudaSlice<u16>,
        bias: &CudaSlice<u16>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        need("add_bias x", x.len(), rows * width)?;
        need("add_bias bias", bias.len(), width)?;
        let f = self.f("bias_add_bf16")?;
        let (r, w) = (i32_of(rows), i32_of(width));
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(x).arg(bias).arg(&r).arg(&w);
        // SAFETY: sizes checked above.
        unsafe { b.launch(flat(rows * width)) }.or_engine("bias_add_bf16")?;
        Ok(())
    }

    fn rmsnorm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        let width = w.len();
        need("rmsnorm x", x.len(), rows * width)?;
        need("rmsnorm out", out.len(), rows * width)?;
        let f = self.f("rmsnorm_f32")?;
        let (r, wd) = (i32_of(rows), i32_of(width));
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(x).arg(w).arg(out).arg(&r).arg(&wd).arg(&eps);
        // SAFETY: one CTA per row of `width` elements, all checked above.
        unsafe { b.launch(per_row(rows)) }.or_engine("rmsnorm_f32")?;
        Ok(())
    }

    fn rope(
        &self,
        x: &mut CudaSlice<u16>,
        at: RowSlice,
        positions: &CudaSlice<u32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        n_heads: usize,
        head_dim: usize,
        layout: RopeLayout,
    ) -> Result<()> {
        need(
            "rope x",
            x.len(),
            at.rows.saturating_sub(1) * at.stride + at.offset + n_heads * head_dim,
        )?;
        need("rope positions", positions.len(), at.rows)?;
        let f = self.f("rope_bf16")?;
        let (r, st, c, h, hd) = (
            i32_of(at.rows),
            i32_of(at.stride),
            i32_of(at.offset),
            i32_of(n_heads),
            i32_of(head_dim),
        );
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(x).arg(positions).arg(cos).arg(sin);
        let neox = i32::from(layout == RopeLayout::Neox);
        b.arg(&r).arg(&st).arg(&c).arg(&h).arg(&hd).arg(&neox);
        // SAFETY: rows * n_heads * head_dim/2 pairs inside x (checked); positions index the
        // tables, which the caller sized for the model's context.
        unsafe { b.launch(flat(at.rows * n_heads * head_dim / 2)) }.or_engine("rope_bf16")?;
        Ok(())
    }

    fn silu_mul(
        &self,
        gate_up: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        need("silu_mul gate_up", gate_up.len(), rows * 2 * width)?;
        need("silu_mul out", out.len(), rows * width)?;
        let f = self.f("silu_mul_bf16")?;
        let (r, w) = (i32_of(rows), i32_of(width));
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(gate_up).arg(out).arg(&r).arg(&w);
        // SAFETY: sizes checked above.
        unsafe { b.launch(flat(rows * width)) }.or_engine("silu_mul_bf16")?;
        Ok(())
    }

    fn residual_add(&self, h: &mut CudaSlice<f32>, a: &CudaSlice<u16>) -> Result<()> {
        need("residual_add a", a.len(), h.len())?;
        let f = self.f("residual_add_f32")?;
        let n = h.len() as i64;
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(h).arg(a).arg(&n);
        // SAFETY: both hold n elements.
        unsafe { b.launch(flat(n as usize)) }.or_engine("residual_add_f32")?;
        Ok(())
    }

    fn embed(
        &self,
        table: &CudaSlice<u16>,
        tokens: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
        width: usize,
    ) -> Result<()> {
        let n = tokens.len();
        need("embed out", out.len(), n * width)?;
        let f = self.f("embed_rows_bf16")?;
        let (nn, w) = (i32_of(n), i32_of(width));
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(table).arg(tokens).arg(out).arg(&nn).arg(&w);
        // SAFETY: token ids are below the table's rows (the forward checks them).
        unsafe { b.launch(flat(n * width)) }.or_engine("embed_rows_bf16")?;
        Ok(())
    }

    fn gather_rows(
        &self,
        src: &CudaSlice<f32>,
        src_pos: &CudaSlice<u32>,
        idx: &CudaSlice<u32>,
        out: &mut CudaSlice<f32>,
        out_pos: &mut CudaSlice<u32>,
        width: usize,
    ) -> Result<()> {
        let n = idx.len();
        need("gather out", out.len(), n * width)?;
        need("gather out_pos", out_pos.len(), n)?;
        let (nn, w) = (i32_of(n), i32_of(width));
        let f = self.f("gather_rows_f32")?;
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(src).arg(idx).arg(&mut *out).arg(&nn).arg(&w);
        // SAFETY: idx holds row indices of src (the forward builds them from its rows).
        unsafe { b.launch(flat(n * width)) }.or_engine("gather_rows_f32")?;
        let f = self.f("gather_positions_u32")?;
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(src_pos).arg(idx).arg(out_pos).arg(&nn);
        // SAFETY: as above.
        unsafe { b.launch(flat(n)) }.or_engine("gather_positions_u32")?;
        Ok(())
    }

    fn kv_append(
        &self,
        qkv: &CudaSlice<u16>,
        at: RowSlice,
        k_col: usize,
        v_col: usize,
        positions: &CudaSlice<u32>,
        pool: &mut KvPool<Self>,
        table: &CudaSlice<u32>,
        row0: usize,
    ) -> Result<()> {
        need("kv_append table", table.len() * KV_BLOCK, row0 + at.rows)?;
        need("kv_append qkv", qkv.len(), at.rows * at.stride)?;
        if pool.dtype == KvDtype::Q8 && pool.k_scale.is_empty() {
            self.set_key_scale(qkv, at, k_col, pool)?;
        }
        let (name, threads) = match pool.dtype {
            KvDtype::Bf16 => ("kv_append_bf16", at.rows * pool.kv_dim),
            KvDtype::F16 => ("kv_append_f16", at.rows * pool.kv_dim),
            KvDtype::Q8 => ("kv_append_q8", at.rows * pool.kv_dim / Q8_GROUP),
        };
        let f = self.f(name)?;
        let (r0, r, st, kc, vc, d) = (
            i32_of(row0),
            i32_of(at.rows),
            i32_of(at.stride),
            i32_of(at.offset + k_col),
            i32_of(at.offset + v_col),
            i32_of(pool.kv_dim),
        );
        let mut b = self.gpu.stream.launch_builder(&f);
        b.arg(qkv)
            .arg(positions)
            .arg(&mut pool.k)
            .arg(&mut pool.v)
            .arg(&mut pool.pos);
        b.arg(table);
        arg_key_scale(&mut b, &pool.k_scale_on_device);
        b.arg(&r0).arg(&r).arg(&st).arg(&kc).arg(&vc).arg(&d);
        // SAFETY: the table covers the rows written (checked) and names slots of this pool,
        // whose rows are its type's words (Q8: kv_dim is whole groups, checked when the model
        // loaded); a scale holds kv_dim values.
        unsafe { b.launch(flat(threads)) }.or_engine(name)?;
        Ok(())
    }

    fn attention(
        &self,
        q: &CudaSlice<u16>,
        at: RowSlice,
        q_pos: &CudaSlice<u32>,
        pool: &KvPool<Self>,
        table: &CudaSlice<u32>,
        n_keys: usize,
        heads: Heads,
        out: &mut CudaSlice<u16>,
        ctx: &AttentionContext<'_, Self>,
    ) -> Result<()> {
        if !heads.head_dim.is_multiple_of(32) || heads.head_dim > 128 || n_keys == 0 {
            return Err(Error::Engine(format!(
                "cuda attention: head_dim {} (a multiple of 32 up to 128) with {n_keys} keys",
                heads.head_dim
            )));
        }
        need("attention table", table.len() * KV_BLOCK, n_keys)?;
        need("attention out", out.len(), at.rows * heads.q_dim())?;
        let read_in_place = at.rows == 1 && matches!(heads.head_dim, 64 | 128);
        if pool.dtype != KvDtype::Bf16 && !read_in_place {
            // the tiles go to these kernels as bf16: the pool widened first (a prefill's own
            // rows as they were computed, as the CPU engine attends them)
            let fresh = ctx.fresh.filter(|_| at.rows > 1).map(|cols| FreshRows {
                qkv: q,
                at,
                cols,
                q_pos,
            });
            let wide = self.widened(pool, table, n_keys, fresh)?;
            let w = wide.as_ref().expect("widened");
            let none = AttentionContext::NONE;
            return self.attention(q, at, q_pos, &w.pool, &w.table, n_keys, heads, out, &none);
        }
        if at.rows == 1 {
            return self.decode_attention(q, at, q_pos, pool, table, n_keys, heads, out);
        }
        use super::prefill_attention::{mma_tiles, pipelined_tiles};
        if self.prefill == PrefillKernel::MmaPipelined {
            if let Some(tiles) = pipelined_tiles(heads, at) {
                return self.attention_tensor_cores(
                    true, q, at, q_pos, pool, table, n_keys, heads, tiles, out,
                );
            }
        }
        if let Some(tiles) = mma_tiles(heads).filter(|_| self.prefill != PrefillKernel::Fma) {
            return self.attention_tensor_cores(
                false, q, at, q_pos, pool, table, n_keys, heads, tiles, out,
            );
        }
        const ROWS_PER_CTA: usize = 16; // ATT_WARPS * ATT_ROWS in attention.cu
        let f = self.f("attention_bf16")?;
        let (nq, st, qc, nk, h, kvh, hd) = (
            i32_of(at.rows),
            i32_of(at.stride),
            i32_of(at.offset),
            i32_of(n_keys),
            i32_of(heads.n_heads),
            i32_of(heads.n_kv_heads),
            i32_of(heads.head_dim),
        );
        let scale = 1.0 / (heads.head_dim as f32).sqrt();
        let cfg = LaunchConfig {
            grid_dim: (
                at.rows.div_ceil(ROWS_PER_CTA) as u32,
                heads.n_heads as u32,
                1,
            ),
            block_dim: (128, 1, 1),
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
            .arg(&hd)
            .arg(&scale);
        // SAFETY: shapes checked above; the table names slots of this pool.
        unsafe { b.launch(cfg) }.or_engine("attention_bf16")?;
        Ok(())
    }

    fn unit_keys(
        &self,
        pool: &KvPool<Self>,
        table: &CudaSlice<u32>,
        prompt_rows: usize,
        unit_size: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.unit_keys_on_device(pool, table, prompt_rows, unit_size, out)
    }

    fn unit_scores(
        &self,
        q: &CudaSlice<u16>,
        at: RowSlice,
        unit_keys: &CudaSlice<f32>,
        units: &UnitBlocks,
        heads: Heads,
        mode: ScoreMode,
        acc: &mut CudaSlice<f32>,
    ) -> Result<()> {
        self.unit_scores_on_device(q, at, unit_keys, units, heads, mode, acc)
    }

    fn kv_offload(&self, pool: &KvPool<Self>, slots: &[u32]) -> Result<CudaHostBlocks> {
        self.offload_slots(pool, slots)
    }

    fn kv_fetch(
        &self,
        host: &CudaHostBlocks,
        writes: &[(usize, u32)],
        pool: &mut KvPool<Self>,
    ) -> Result<()> {
        self.fetch_slots(host, writes, pool)
    }

    fn host_block_words<'h>(
        &self,
        host: &'h mut CudaHostBlocks,
        i: usize,
    ) -> Option<(&'h mut [u16], &'h mut [u16])> {
        host.block_words(i)
    }

    fn kv_pool_regrouped(
        &self,
        src: &KvPool<Self>,
        moves: &[(u32, u32)],
        slots: usize,
    ) -> Result<KvPool<Self>> {
        self.regroup_pool(src, moves, slots)
    }

    fn kv_copy_blocks(
        &self,
        pool: &mut KvPool<Self>,
        src_slots: &[u32],
        dst_slots: &[u32],
    ) -> Result<()> {
        let n = src_slots.len().min(dst_slots.len());
        if n == 0 {
            return Ok(());
        }
        let (src, dst) = (self.upload_u32(src_slots)?, self.upload_u32(dst_slots)?);
        let f = self.f("kv_copy_blocks_bf16")?;
        let words = KV_BLOCK * pool.row_words();
        let (nn, elems) = (i32_of(n), i32_of(words));
        let s = &self.gpu.stream;
        for part in [&mut pool.k, &mut pool.v] {
            // the same buffer is source and destination: pass it once per role by pointer
            let (p, _g) = part.device_ptr_mut(s);
            let mut b = s.launch_builder(&f);
            b.arg(&p).arg(&p).arg(&src).arg(&dst).arg(&nn).arg(&elems);
            // SAFETY: slot ids are below pool.slots; source and destination slots differ.
            unsafe { b.launch(flat(n * words)) }.or_engine("kv_copy_blocks")?;
        }
        // positions: one u32 per row, copied with the same kernel as pairs of u16
        let (p, _g) = pool.pos.device_ptr_mut(s);
        let pos_elems = i32_of(KV_BLOCK * 2);
        let mut b = s.launch_builder(&f);
        b.arg(&p)
            .arg(&p)
            .arg(&src)
            .arg(&dst)
            .arg(&nn)
            .arg(&pos_elems);
        // SAFETY: as above; a slot's positions are KV_BLOCK u32 = 2 * KV_BLOCK u16.
        unsafe { b.launch(flat(n * KV_BLOCK * 2)) }.or_engine("kv_copy_blocks positions")?;
        Ok(())
    }
}
