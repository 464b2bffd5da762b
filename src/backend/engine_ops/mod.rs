//! [`Ops`] with the CPU engine's numerics: f32 activations; linear layers over the file's GGUF
//! blocks (`Linear`, `FusedLinear`: in the default int8 mode the integer GEMM for many rows
//! and the GEMV for one, activations rounded to 8 bits per 32 values); RMSNorm, RoPE, the SiLU
//! gate and the residual in f32 with the kernels of [`super::rowwise`]: the CPU product's
//! numerics (the engine's own forward, src/model/llama.rs until 2026-12-05, ran these operations
//! one for one; tests/cpu_forward.rs holds the product to the logits it gave). Its weights:
//! `weights.rs`.
//!
//! The KV too: pages in host memory ([`super::host_pool`]) of the engine's element type (Q8
//! with its per-channel key scale fixed by a layer's first append, f16 or bf16), attended by its
//! kernel (8-bit or f32) as the engine attends: a prefill's own rows as they are (f16) where the
//! pool holds them in 8 bits, the queries scaled by the key scale otherwise (`kv.rs`).

use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};
use std::thread::LocalKey;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::attention_kind::AttentionKind;
use super::cpu_ops::CpuOps;
use super::host_pool::{self, SlotCopy};
use super::kv_format::{KvDtype, KvDtypeCell};
use super::linear::LinearMode;
use super::ops::{
    AttentionContext, Heads, KvPool, MlpScratch, MlpWeights, Ops, RowSlice, ScoreMode, UnitBlocks,
};
use super::ops::{WeightUse, WeightValues};
use super::rowwise::{rms_norm, rotate_head, row_chunks, silu_mul_joined, RopeLayout, MLP_ROWS};
use super::with_f32;
use crate::{Error, Result};

mod kv;
mod weights;
use weights::linear_rows;
pub use weights::EngineWeight;

/// The CPU engine's backend of the ops seam: the engine's `[model] linear`, `kv_dtype` and
/// `attention`. The last two may change while a model is loaded (as the engine's do: an
/// evaluation's reference runs in another KV type or kernel); a pool keeps the type it was made
/// with.
#[derive(Debug)]
pub struct EngineOps {
    /// The linear layers' form.
    pub mode: LinearMode,
    /// The KV pools' element type (Q8 needs heads of a multiple of 32 values: the caller
    /// checks, as the engine does).
    kv: KvDtypeCell,
    /// The kernel of a prefill's attention, as [`attention_code`].
    attention: AtomicU8,
}

impl EngineOps {
    /// The product's defaults: int8 linear layers, Q8 keys and values, 8-bit attention.
    pub const fn product() -> Self {
        Self::new(LinearMode::Int8, KvDtype::Q8, AttentionKind::Int8)
    }

    pub const fn new(mode: LinearMode, kv: KvDtype, attention: AttentionKind) -> Self {
        Self {
            mode,
            kv: KvDtypeCell::new(kv),
            attention: AtomicU8::new(attention_code(attention)),
        }
    }

    /// The KV type new pools take.
    pub fn kv(&self) -> KvDtype {
        self.kv.get()
    }

    /// The kernel of a prefill's attention.
    pub fn attention(&self) -> AttentionKind {
        match self.attention.load(Ordering::Relaxed) {
            0 => AttentionKind::F32,
            _ => AttentionKind::Int8,
        }
    }

    /// Pools made from now on hold `kv`; prefills attend with `attention`.
    pub fn set_numerics(&self, kv: KvDtype, attention: AttentionKind) {
        self.kv.set(kv);
        self.attention
            .store(attention_code(attention), Ordering::Relaxed);
    }
}

const fn attention_code(kind: AttentionKind) -> u8 {
    match kind {
        AttentionKind::F32 => 0,
        AttentionKind::Int8 => 1,
    }
}

fn check(what: &str, len: usize, want: usize) -> Result<()> {
    if len < want {
        return Err(Error::Engine(format!(
            "engine ops: {what} has {len} elements, needs {want}"
        )));
    }
    Ok(())
}

/// Whether `x` holds `width` elements from `at.offset` in each of `at.rows` rows.
fn check_rows(what: &str, x: &[f32], at: RowSlice, width: usize) -> Result<()> {
    if at.rows > 0 {
        check(what, x.len(), at.offset + (at.rows - 1) * at.stride + width)?;
    }
    Ok(())
}

/// Elements `at.offset .. at.offset + width` of each of `at.rows` rows: (rows, width).
fn slice_rows(x: &[f32], at: RowSlice, width: usize) -> Result<Vec<f32>> {
    check_rows("rows", x, at, width)?;
    let mut out = Vec::with_capacity(at.rows * width);
    for r in 0..at.rows {
        out.extend_from_slice(&x[at.offset + r * at.stride..][..width]);
    }
    Ok(out)
}

/// Copy a (rows, n) result into out.
fn write(out: &mut [f32], y: &Tensor) -> Result<()> {
    with_f32(&y.contiguous()?, |y| {
        check("out", out.len(), y.len())?;
        out[..y.len()].copy_from_slice(y);
        Ok(())
    })?
}

/// Run `f` on this thread's `cell`, or on a fresh value when the thread is using it already (a
/// pool thread that, waiting inside one forward's parallel op, runs another forward's work).
fn with_reused<T: Default, R>(
    cell: &'static LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    cell.with(|c| match c.try_borrow_mut() {
        Ok(mut reused) => f(&mut reused),
        Err(_) => f(&mut T::default()),
    })
}

thread_local! {
    /// The MLP's normed input and gated activation, one chunk's worth, reused from chunk to
    /// chunk and layer to layer (fresh zeroed megabytes per chunk cost 1% of a prefill).
    static MLP_SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

impl Ops for EngineOps {
    type F32 = Vec<f32>;
    type Bf16 = Vec<u16>;
    type Act = Vec<f32>;
    type Weight = EngineWeight;
    type U32 = Vec<u32>;
    type HostBlocks = Vec<SlotCopy>;

    fn name(&self) -> String {
        format!(
            "cpu engine ({:?} linear layers, {:?} KV, {:?} attention, {} threads)",
            self.mode,
            self.kv(),
            self.attention(),
            rayon::current_num_threads()
        )
    }

    fn kv_dtype(&self) -> KvDtype {
        self.kv()
    }

    fn attends_by_layer_rows(&self) -> bool {
        true
    }

    fn zeros_f32(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn zeros_bf16(&self, n: usize) -> Result<Vec<u16>> {
        Ok(vec![0; n])
    }
    fn upload_f32(&self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }
    fn upload_bf16(&self, v: &[u16]) -> Result<Vec<u16>> {
        Ok(v.to_vec())
    }
    fn upload_u32(&self, v: &[u32]) -> Result<Vec<u32>> {
        Ok(v.to_vec())
    }
    fn download_f32(&self, b: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(b.clone())
    }
    fn download_bf16(&self, b: &Vec<u16>) -> Result<Vec<u16>> {
        Ok(b.clone())
    }
    fn download_u32(&self, b: &Vec<u32>) -> Result<Vec<u32>> {
        Ok(b.clone())
    }
    fn zeros_act(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }
    fn upload_act(&self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }
    fn download_act_range(&self, b: &Vec<f32>, range: Range<usize>) -> Result<Vec<f32>> {
        check("download range", b.len(), range.end)?;
        Ok(b[range].to_vec())
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn weight(
        &self,
        values: WeightValues,
        use_: WeightUse,
        rows: usize,
        cols: usize,
    ) -> Result<EngineWeight> {
        weights::prepare(self.mode, values, use_, rows, cols)
    }

    fn fill_uniform(&self, out: &mut Vec<u16>, seed: u64, scale: f32) -> Result<()> {
        CpuOps.fill_uniform(out, seed, scale)
    }

    fn matmul(
        &self,
        x: &Vec<f32>,
        w: &EngineWeight,
        out: &mut Vec<f32>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        check("matmul x", x.len(), rows * k)?;
        // the layer's output becomes `out` (a buffer of rows * n, not copied into a larger one)
        let y = linear_rows(w, &x[..rows * k], k)?;
        if y.len() != rows * n {
            return Err(Error::Engine(format!(
                "engine ops: a matmul gave {} values for ({rows}, {n})",
                y.len()
            )));
        }
        *out = y;
        Ok(())
    }

    fn matmul_f32(
        &self,
        x: &Vec<f32>,
        w: &EngineWeight,
        out: &mut Vec<f32>,
        rows: usize,
        k: usize,
        n: usize,
        exact_input: bool,
    ) -> Result<()> {
        check("matmul_f32 x", x.len(), rows * k)?;
        check("matmul_f32 out", out.len(), rows * n)?;
        let x = &x[..rows * k];
        match w {
            EngineWeight::Linear(l) | EngineWeight::Head { linear: l, .. } => {
                write(out, &weights::head_forward(l, x, rows, k, exact_input)?)
            }
            _ => self.matmul(&x.to_vec(), w, out, rows, k, n),
        }
    }

    fn dequant_bf16(
        &self,
        raw: &[u8],
        dtype: GgmlDType,
        n: usize,
        out: &mut Vec<u16>,
        offset: usize,
    ) -> Result<()> {
        CpuOps.dequant_bf16(raw, dtype, n, out, offset)
    }

    fn head_rmsnorm(
        &self,
        x: &mut Vec<f32>,
        at: RowSlice,
        w: &EngineWeight,
        n_heads: usize,
        head_dim: usize,
        eps: f32,
    ) -> Result<()> {
        let EngineWeight::Vector(w) = w else {
            return Err(Error::Engine("engine ops: head_rmsnorm by a matrix".into()));
        };
        check("head_rmsnorm w", w.len(), head_dim)?;
        let width = n_heads * head_dim;
        check_rows("head_rmsnorm x", x, at, width)?;
        let mut normed = vec![0.0; width];
        for r in 0..at.rows {
            let row = &mut x[r * at.stride + at.offset..][..width];
            rms_norm(row, &w[..head_dim], eps, &mut normed);
            row.copy_from_slice(&normed);
        }
        Ok(())
    }

    fn add_bias(
        &self,
        x: &mut Vec<f32>,
        bias: &EngineWeight,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        let EngineWeight::Vector(b) = bias else {
            return Err(Error::Engine("engine ops: a bias that is a matrix".into()));
        };
        check("add_bias x", x.len(), rows * width)?;
        check("add_bias bias", b.len(), width)?;
        for row in x[..rows * width].chunks_exact_mut(width) {
            row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
        }
        Ok(())
    }

    fn rmsnorm(
        &self,
        x: &Vec<f32>,
        w: &EngineWeight,
        out: &mut Vec<f32>,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        let EngineWeight::Vector(w) = w else {
            return Err(Error::Engine("engine ops: rmsnorm by a matrix".into()));
        };
        let width = w.len();
        check("rmsnorm x", x.len(), rows * width)?;
        check("rmsnorm out", out.len(), rows * width)?;
        rms_norm(&x[..rows * width], w, eps, &mut out[..rows * width]);
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        at: RowSlice,
        positions: &Vec<u32>,
        cos: &Vec<f32>,
        sin: &Vec<f32>,
        n_heads: usize,
        head_dim: usize,
        layout: RopeLayout,
    ) -> Result<()> {
        let (half, width) = (head_dim / 2, n_heads * head_dim);
        check("rope positions", positions.len(), at.rows)?;
        if at.rows == 0 {
            return Ok(());
        }
        check_rows("rope x", x, at, width)?;
        if width > at.stride {
            return Err(Error::Engine(format!(
                "engine ops: rope of {width} values in rows of {}",
                at.stride
            )));
        }
        let last = positions[..at.rows].iter().max().copied().unwrap_or(0) as usize;
        check("rope table", cos.len().min(sin.len()), (last + 1) * half)?;
        (x[at.offset..].par_chunks_mut(at.stride))
            .zip(positions[..at.rows].par_iter())
            .for_each(|(row, &p)| {
                let (c, s) = (
                    &cos[p as usize * half..][..half],
                    &sin[p as usize * half..][..half],
                );
                for head in row[..width].chunks_exact_mut(head_dim) {
                    rotate_head(head, c, s, layout);
                }
            });
        Ok(())
    }

    fn silu_mul(
        &self,
        gate_up: &Vec<f32>,
        out: &mut Vec<f32>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        check("silu_mul gate_up", gate_up.len(), rows * 2 * width)?;
        check("silu_mul out", out.len(), rows * width)?;
        silu_mul_joined(
            &gate_up[..rows * 2 * width],
            width,
            &mut out[..rows * width],
        );
        Ok(())
    }

    fn residual_add(&self, h: &mut Vec<f32>, a: &Vec<f32>) -> Result<()> {
        check("residual_add a", a.len(), h.len())?;
        h.iter_mut().zip(a.iter()).for_each(|(h, a)| *h += a);
        Ok(())
    }

    /// The engine's MLP: a chunk of [`MLP_ROWS`] rows at a time through RMSNorm, gate|up, the
    /// SiLU gate, down and the residual (a (512, intermediate) block of a 1B model is 16 MB,
    /// where all of a long prefill's rows would be gigabytes).
    fn mlp(
        &self,
        h: &mut Vec<f32>,
        w: MlpWeights<'_, Self>,
        _scratch: &mut MlpScratch<Self>,
        rows: usize,
        hidden: usize,
        intermediate: usize,
        eps: f32,
    ) -> Result<()> {
        let EngineWeight::Vector(norm) = w.norm else {
            return Err(Error::Engine(
                "engine ops: an MLP norm that is a matrix".into(),
            ));
        };
        check("mlp h", h.len(), rows * hidden)?;
        check("mlp norm", norm.len(), hidden)?;
        with_reused(&MLP_SCRATCH, |(x, act)| {
            for r in row_chunks(rows, MLP_ROWS) {
                let chunk = &mut h[r.start * hidden..r.end * hidden];
                // every value of both is written before it is read
                x.resize(chunk.len(), 0.0);
                rms_norm(chunk, &norm[..hidden], eps, &mut x[..chunk.len()]);
                let gate_up = linear_rows(w.gate_up, &x[..chunk.len()], hidden)?;
                check("mlp gate_up", gate_up.len(), r.len() * 2 * intermediate)?;
                act.resize(r.len() * intermediate, 0.0);
                let act = &mut act[..r.len() * intermediate];
                silu_mul_joined(&gate_up, intermediate, act);
                let term = linear_rows(w.down, act, intermediate)?;
                check("mlp down", term.len(), chunk.len())?;
                chunk.iter_mut().zip(&term).for_each(|(a, b)| *a += b);
            }
            Ok(())
        })
    }

    fn embed(
        &self,
        table: &EngineWeight,
        tokens: &Vec<u32>,
        out: &mut Vec<f32>,
        width: usize,
    ) -> Result<()> {
        check("embed out", out.len(), tokens.len() * width)?;
        let ids = || Tensor::new(tokens.as_slice(), &Device::Cpu);
        let rows = match table {
            EngineWeight::Table(t) | EngineWeight::Head { table: Some(t), .. } => {
                t.embedding(&ids()?)?
            }
            EngineWeight::Head { linear, .. } => linear.weight_rows(tokens).ok_or_else(|| {
                Error::Engine("engine ops: a token outside the tied head's rows".into())
            })?,
            _ => return Err(Error::Engine("engine ops: embedding from a vector".into())),
        };
        write(out, &rows)
    }

    fn gather_rows(
        &self,
        src: &Vec<f32>,
        src_pos: &Vec<u32>,
        idx: &Vec<u32>,
        out: &mut Vec<f32>,
        out_pos: &mut Vec<u32>,
        width: usize,
    ) -> Result<()> {
        CpuOps.gather_rows(src, src_pos, idx, out, out_pos, width)
    }

    fn kv_append(
        &self,
        qkv: &Vec<f32>,
        at: RowSlice,
        k_col: usize,
        v_col: usize,
        positions: &Vec<u32>,
        pool: &mut KvPool<Self>,
        table: &Vec<u32>,
        row0: usize,
    ) -> Result<()> {
        kv::append(qkv, at, (k_col, v_col), positions, pool, table, row0)
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        at: RowSlice,
        q_pos: &Vec<u32>,
        pool: &KvPool<Self>,
        table: &Vec<u32>,
        n_keys: usize,
        heads: Heads,
        out: &mut Vec<f32>,
        ctx: &AttentionContext<'_, Self>,
    ) -> Result<()> {
        kv::attend(
            self.attention(),
            (q, at, q_pos),
            (pool, table, n_keys),
            heads,
            out,
            ctx,
        )
    }

    fn unit_keys(
        &self,
        pool: &KvPool<Self>,
        table: &Vec<u32>,
        prompt_rows: usize,
        unit_size: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        host_pool::unit_keys(pool, table, prompt_rows, unit_size, out)
    }

    fn unit_scores(
        &self,
        q: &Vec<f32>,
        at: RowSlice,
        unit_keys: &Vec<f32>,
        units: &UnitBlocks,
        heads: Heads,
        mode: ScoreMode,
        acc: &mut Vec<f32>,
    ) -> Result<()> {
        let window = slice_rows(q, at, heads.q_dim())?;
        host_pool::unit_scores(&window, unit_keys, units, heads, mode, acc)
    }

    fn kv_offload(&self, pool: &KvPool<Self>, slots: &[u32]) -> Result<Vec<SlotCopy>> {
        host_pool::offload(pool, slots)
    }

    fn kv_fetch(
        &self,
        host: &Vec<SlotCopy>,
        writes: &[(usize, u32)],
        pool: &mut KvPool<Self>,
    ) -> Result<()> {
        host_pool::fetch(host, writes, pool)
    }

    fn host_block_words<'h>(
        &self,
        host: &'h mut Vec<SlotCopy>,
        i: usize,
    ) -> Option<(&'h mut [u16], &'h mut [u16])> {
        host_pool::block_words(host, i)
    }

    fn kv_pool_regrouped(
        &self,
        src: &KvPool<Self>,
        moves: &[(u32, u32)],
        slots: usize,
    ) -> Result<KvPool<Self>> {
        host_pool::regrouped(self, src, moves, slots)
    }

    fn kv_copy_blocks(
        &self,
        pool: &mut KvPool<Self>,
        src_slots: &[u32],
        dst_slots: &[u32],
    ) -> Result<()> {
        host_pool::copy_blocks(pool, src_slots, dst_slots);
        Ok(())
    }
}
