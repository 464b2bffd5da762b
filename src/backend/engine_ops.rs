//! [`Ops`] with the CPU engine's numerics: f32 activations; linear layers over the file's GGUF
//! blocks ([`Linear`], [`FusedLinear`]: in the default int8 mode the integer GEMM for many rows
//! and the GEMV for one, activations rounded to 8 bits per 32 values); RMSNorm, RoPE, the SiLU
//! gate and the residual in f32 with the kernels of [`super::rowwise`]. These are the
//! operations src/model/llama.rs runs, one for one, so that the ops forward computes what the
//! CPU product computes (`tests/engine_ops.rs` holds them to it).
//!
//! The KV too: pages in host memory ([`super::host_pool`]) of the engine's element type (Q8
//! with its per-channel key scale fixed by a layer's first append, f16 or bf16), attended by its
//! kernel (8-bit or f32) as the engine attends: a prefill's own rows as they are (f16) where the
//! pool holds them in 8 bits, the queries scaled by the key scale otherwise.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::attention_kind::{attention_in_place_with, AttentionKind};
use super::cpu_ops::{to_bf16, uniform, CpuOps};
use super::decode_attention::decode_attention_runs;
use super::host_pool::{self, SlotCopy};
use super::kv_format::{first_key_scale, unscale_keys, KvDtype, KvView};
use super::linear::{FusedLinear, Linear, LinearMode};
use super::ops::{
    AttentionContext, Heads, KvPool, MlpScratch, MlpWeights, Ops, RowSlice, ScoreMode, UnitBlocks,
};
use super::ops::{WeightUse, WeightValues};
use super::rowwise::{rms_norm, rotate_head, row_chunks, silu_mul_joined, RopeLayout, MLP_ROWS};
use super::with_f32;
use crate::{Error, Result};

/// The CPU engine's backend of the ops seam: the engine's `[model] linear`, `kv_dtype` and
/// `attention`.
#[derive(Debug, Clone, Copy)]
pub struct EngineOps {
    /// The linear layers' form.
    pub mode: LinearMode,
    /// The KV pools' element type (Q8 needs heads of a multiple of 32 values: the caller
    /// checks, as the engine does).
    pub kv: KvDtype,
    /// The kernel of a prefill's attention.
    pub attention: AttentionKind,
}

impl EngineOps {
    /// The product's defaults: int8 linear layers, Q8 keys and values, 8-bit attention (a
    /// constant, so `&EngineOps::PRODUCT` lives for the program, as a model borrowing its
    /// backend needs).
    pub const PRODUCT: Self = Self::new(LinearMode::Int8, KvDtype::Q8, AttentionKind::Int8);

    pub const fn new(mode: LinearMode, kv: KvDtype, attention: AttentionKind) -> Self {
        Self {
            mode,
            kv,
            attention,
        }
    }
}

/// A weight as the engine keeps it.
pub enum EngineWeight {
    /// A norm's weight or a bias, f32.
    Vector(Vec<f32>),
    /// One linear layer's matrix.
    Linear(Linear),
    /// Several layers over one input (q|k|v, gate|up), their outputs side by side in each row.
    Fused(FusedLinear),
    /// The token embedding's blocks: rows are dequantized when looked up.
    Table(Arc<QTensor>),
    /// The output head; when the embedding is tied to it, its rows come from the head's own
    /// blocks, or from `table` when the head's form cannot give them (one copy, not two, where
    /// it can).
    Head {
        linear: Linear,
        table: Option<Arc<QTensor>>,
    },
}

fn check(what: &str, len: usize, want: usize) -> Result<()> {
    if len < want {
        return Err(Error::Engine(format!(
            "engine ops: {what} has {len} elements, needs {want}"
        )));
    }
    Ok(())
}

/// `n` values uniform in [-scale, scale), rounded to bf16 as the devices' `fill_uniform` draws
/// them, so that a random model is the same model on every backend (up to the int8 blocks).
fn uniform_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..n)
        .into_par_iter()
        .map(|i| {
            let x = (2.0 * uniform(seed, i as u64) - 1.0) * scale;
            f32::from_bits((to_bf16(&[x])[0] as u32) << 16)
        })
        .collect()
}

/// Elements `at.offset .. at.offset + width` of each of `at.rows` rows: (rows, width).
fn slice_rows(x: &[f32], at: RowSlice, width: usize) -> Result<Vec<f32>> {
    if at.rows > 0 {
        check(
            "rows",
            x.len(),
            at.offset + (at.rows - 1) * at.stride + width,
        )?;
    }
    let mut out = Vec::with_capacity(at.rows * width);
    for r in 0..at.rows {
        out.extend_from_slice(&x[at.offset + r * at.stride..][..width]);
    }
    Ok(out)
}

/// x (rows, cols) through a linear layer: (rows, out).
fn linear_rows(w: &EngineWeight, x: &[f32], cols: usize) -> Result<Vec<f32>> {
    Ok(match w {
        EngineWeight::Linear(l) | EngineWeight::Head { linear: l, .. } => l.forward_vec(x, cols)?,
        EngineWeight::Fused(f) => f.forward_slice(x, cols)?,
        _ => {
            return Err(Error::Engine(
                "engine ops: matmul by a vector or table".into(),
            ))
        }
    })
}

/// Copy a (rows, n) result into out.
fn write(out: &mut [f32], y: &Tensor) -> Result<()> {
    with_f32(&y.contiguous()?, |y| {
        check("out", out.len(), y.len())?;
        out[..y.len()].copy_from_slice(y);
        Ok(())
    })?
}

impl EngineOps {
    /// A weight's f32 values (a vector's).
    fn values(values: WeightValues, n: usize) -> Result<Vec<f32>> {
        let v = match values {
            WeightValues::Gguf(parts) => {
                let mut v = Vec::with_capacity(n);
                for (t, len) in parts {
                    match t {
                        Some(t) => v.extend(
                            t.dequantize(&Device::Cpu)?
                                .flatten_all()?
                                .to_vec1::<f32>()?,
                        ),
                        None => v.resize(v.len() + len, 0.0),
                    }
                }
                v
            }
            WeightValues::Uniform { seed, scale } => uniform_values(n, seed, scale),
            WeightValues::Ones => vec![1.0; n],
        };
        if v.len() != n {
            return Err(Error::ModelLoad(format!(
                "a weight of {} values where the model's dimensions need {n}",
                v.len()
            )));
        }
        Ok(v)
    }

    /// A matrix's blocks, one tensor per part: the file's, or random values rounded to Q8_0.
    fn blocks(values: WeightValues, rows: usize, cols: usize) -> Result<Vec<Arc<QTensor>>> {
        match values {
            WeightValues::Gguf(parts) => (parts.into_iter())
                .map(|(t, _)| {
                    let t = t.ok_or_else(|| {
                        Error::ModelLoad("a matrix with a part the file lacks".into())
                    })?;
                    match t.shape().dims() {
                        [_, c] if *c == cols => Ok(Arc::new(t)),
                        dims => Err(Error::ModelLoad(format!(
                            "a matrix part of shape {dims:?}, expected (_, {cols})"
                        ))),
                    }
                })
                .collect(),
            WeightValues::Uniform { seed, scale } => {
                let v = uniform_values(rows * cols, seed, scale);
                let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu)?;
                Ok(vec![Arc::new(QTensor::quantize(&t, GgmlDType::Q8_0)?)])
            }
            WeightValues::Ones => Err(Error::Engine("engine ops: a matrix of ones".into())),
        }
    }

    /// The head (or a tied embedding's) layer: x (rows, k) -> (rows, n) f32 into out.
    fn head_forward(
        &self,
        l: &Linear,
        x: &[f32],
        rows: usize,
        k: usize,
        exact: bool,
    ) -> Result<Tensor> {
        let t = Tensor::from_slice(x, (rows, k), &Device::Cpu)?;
        Ok(match exact {
            true => l.forward_f32(&t)?,
            false => l.forward(&t)?,
        })
    }
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
            self.kv,
            self.attention,
            rayon::current_num_threads()
        )
    }

    fn kv_dtype(&self) -> KvDtype {
        self.kv
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
        if use_ == WeightUse::Vector {
            return Ok(EngineWeight::Vector(Self::values(values, rows * cols)?));
        }
        let mut parts = Self::blocks(values, rows, cols)?;
        let one = |parts: &mut Vec<Arc<QTensor>>| match parts.len() {
            1 => Ok(parts.remove(0)),
            n => Err(Error::ModelLoad(format!("a {use_:?} weight in {n} parts"))),
        };
        Ok(match use_ {
            WeightUse::Vector => unreachable!("returned above"),
            WeightUse::Linear if parts.len() > 1 => {
                EngineWeight::Fused(FusedLinear::new(parts, self.mode)?)
            }
            WeightUse::Linear => EngineWeight::Linear(Linear::new(one(&mut parts)?, self.mode)?),
            WeightUse::Embedding => EngineWeight::Table(one(&mut parts)?),
            WeightUse::Head => EngineWeight::Head {
                linear: Linear::one_row(one(&mut parts)?, self.mode)?,
                table: None,
            },
            WeightUse::TiedEmbedding => {
                let blocks = one(&mut parts)?;
                let linear = Linear::one_row(blocks.clone(), self.mode)?;
                let table = linear.weight_rows(&[0]).is_none().then_some(blocks);
                EngineWeight::Head { linear, table }
            }
        })
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
                write(out, &self.head_forward(l, x, rows, k, exact_input)?)
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
        if at.rows > 0 {
            check(
                "head_rmsnorm x",
                x.len(),
                (at.rows - 1) * at.stride + at.offset + width,
            )?;
        }
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
        check(
            "rope x",
            x.len(),
            at.offset + (at.rows - 1) * at.stride + width,
        )?;
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
    /// SiLU gate, down and the residual (as src/model/llama.rs runs it: a (512, intermediate)
    /// block of a 1B model is 16 MB, where all of a long prefill's rows would be gigabytes).
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
        for r in row_chunks(rows, MLP_ROWS) {
            let chunk = &mut h[r.start * hidden..r.end * hidden];
            let mut x = vec![0.0f32; chunk.len()];
            rms_norm(chunk, &norm[..hidden], eps, &mut x);
            let gate_up = linear_rows(w.gate_up, &x, hidden)?;
            check("mlp gate_up", gate_up.len(), r.len() * 2 * intermediate)?;
            let mut act = vec![0.0f32; r.len() * intermediate];
            silu_mul_joined(&gate_up, intermediate, &mut act);
            let term = linear_rows(w.down, &act, intermediate)?;
            check("mlp down", term.len(), chunk.len())?;
            chunk.iter_mut().zip(&term).for_each(|(a, b)| *a += b);
        }
        Ok(())
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
        let (d, words) = (pool.kv_dim, pool.row_words());
        check("kv_append positions", positions.len(), at.rows)?;
        let mut k = slice_rows(
            qkv,
            RowSlice {
                offset: at.offset + k_col,
                ..at
            },
            d,
        )?;
        let v = slice_rows(
            qkv,
            RowSlice {
                offset: at.offset + v_col,
                ..at
            },
            d,
        )?;
        if pool.dtype == KvDtype::Q8 {
            if pool.k_scale.is_empty() && at.rows > 0 {
                pool.k_scale = first_key_scale(&k, d);
            }
            for row in k.chunks_exact_mut(d) {
                row.iter_mut().zip(&pool.k_scale).for_each(|(x, s)| *x /= s);
            }
        }
        let (mut k16, mut v16) = (vec![0u16; at.rows * words], vec![0u16; at.rows * words]);
        pool.dtype.encode(&k, &mut k16);
        pool.dtype.encode(&v, &mut v16);
        host_pool::append(&k16, &v16, &positions[..at.rows], pool, table, row0)
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
        ctx: &AttentionContext<'_, Vec<u32>>,
    ) -> Result<()> {
        check("attention positions", q_pos.len(), at.rows)?;
        let q_pos = &q_pos[..at.rows];
        let shape = host_pool::attn_shape(heads);
        let mut qo = slice_rows(q, at, heads.q_dim())?;
        if at.rows == 1 {
            // decode: the rows where they lie, slot run after slot run, when all are visible
            let (runs, last) = host_pool::runs(pool, table, n_keys)?;
            if last.is_none_or(|p| p <= q_pos[0]) {
                scale_queries(&mut qo, &pool.k_scale, heads);
                let q = qo.clone();
                decode_attention_runs(&q, &runs, pool.dtype, shape, &mut qo);
                check("attention out", out.len(), qo.len())?;
                out[..qo.len()].copy_from_slice(&qo);
                return Ok(());
            }
        }
        // several rows: the 8-bit kernel groups keys by their row in the layer, so a subset is
        // read as the layer's rows it is, where the layer has them all
        let every_key = 0..n_keys;
        let (rows, ranges) = match &ctx.layer {
            Some(l) => (host_pool::PoolRows::of(pool, l.table, l.rows)?, l.ranges),
            None => (
                host_pool::PoolRows::of(pool, table, n_keys)?,
                std::slice::from_ref(&every_key),
            ),
        };
        let view = rows.view();
        let n = view.positions.len();
        // a prefill's rows just appended, the layer's last: read as they are, at f16 precision
        let tail = n
            .checked_sub(at.rows)
            .filter(|&old| view.positions[old..] == *q_pos);
        match (ctx.fresh, tail) {
            (Some((k_col, v_col)), Some(old)) if at.rows > 1 && pool.dtype == KvDtype::Q8 => {
                let d = pool.kv_dim;
                let k = slice_rows(
                    q,
                    RowSlice {
                        offset: at.offset + k_col,
                        ..at
                    },
                    d,
                )?;
                let v = slice_rows(
                    q,
                    RowSlice {
                        offset: at.offset + v_col,
                        ..at
                    },
                    d,
                )?;
                let exact = exact_rows(view, old, (&k, &v), &pool.k_scale, d);
                attention_in_place_with(
                    self.attention,
                    &mut qo,
                    q_pos,
                    exact.view(),
                    ranges,
                    shape,
                )?;
            }
            _ => {
                scale_queries(&mut qo, &pool.k_scale, heads);
                attention_in_place_with(self.attention, &mut qo, q_pos, view, ranges, shape)?;
            }
        }
        check("attention out", out.len(), qo.len())?;
        out[..qo.len()].copy_from_slice(&qo);
        Ok(())
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

/// A Q8 layer's rows in f16: the first `old` widened from the pool's words (keys unscaled), the
/// rest the prefill's own keys and values (k, v: (rows, kv_dim) f32) rounded to f16 only.
fn exact_rows(
    rows: KvView,
    old: usize,
    (k, v): (&[f32], &[f32]),
    k_scale: &[f32],
    kv_dim: usize,
) -> host_pool::Rows {
    let words = rows.dtype.stored_len(kv_dim);
    let n = rows.positions.len();
    let widen = |bits: &[u16], scale: &[f32], fresh: &[f32]| {
        let mut wide = vec![0f32; n * kv_dim];
        rows.dtype
            .decode(&bits[..old * words], &mut wide[..old * kv_dim]);
        unscale_keys(&mut wide[..old * kv_dim], scale);
        wide[old * kv_dim..].copy_from_slice(&fresh[..(n - old) * kv_dim]);
        let mut narrow = vec![0u16; n * kv_dim];
        KvDtype::F16.encode(&wide, &mut narrow);
        narrow
    };
    host_pool::Rows {
        k: widen(rows.k, k_scale, k),
        v: widen(rows.v, &[], v),
        pos: rows.positions.to_vec(),
        dtype: KvDtype::F16,
    }
}

/// Each query head times its KV head's key scale (Q8 keys are stored divided by it); nothing
/// for an empty scale.
fn scale_queries(q: &mut [f32], k_scale: &[f32], heads: Heads) {
    if k_scale.is_empty() {
        return;
    }
    let (hd, group) = (heads.head_dim, heads.n_heads / heads.n_kv_heads);
    for row in q.chunks_exact_mut(heads.q_dim()) {
        for (h, head) in row.chunks_exact_mut(hd).enumerate() {
            let s = &k_scale[h / group * hd..][..hd];
            head.iter_mut().zip(s).for_each(|(x, s)| *x *= s);
        }
    }
}
