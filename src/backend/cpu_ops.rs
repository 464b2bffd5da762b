//! [`Ops`] on the CPU, through the crate's existing kernels (RMSNorm, SiLU gate, tiled causal
//! attention, SlimInfer's block scores) over plain vectors. It is also the reference that every
//! CUDA kernel is compared with (`crate::cuda::check`): bf16 operands are widened exactly, the
//! arithmetic is f32, and results are rounded to bf16 where the kernels round them.

use std::borrow::Cow;
use std::ops::Range;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::host_pool::{self, SlotCopy};
use super::kv_format::KvDtype;
use super::ops::{bf16_weight, Heads, KvPool, Ops, RowSlice, ScoreMode, UnitBlocks};
use super::ops::{AttentionContext, WeightUse, WeightValues};
use super::rowwise::{rms_norm, silu_mul_joined, RopeLayout, RopeParams};
use crate::{Error, Result};

/// The CPU backend of the ops seam.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuOps;

pub fn to_f32(bits: &[u16]) -> Vec<f32> {
    let mut out = vec![0.0; bits.len()];
    KvDtype::Bf16.decode(bits, &mut out);
    out
}

pub fn to_bf16(x: &[f32]) -> Vec<u16> {
    let mut out = vec![0u16; x.len()];
    KvDtype::Bf16.encode(x, &mut out);
    out
}

fn check(what: &str, len: usize, want: usize) -> Result<()> {
    if len < want {
        return Err(Error::Engine(format!(
            "ops: {what} has {len} elements, needs {want}"
        )));
    }
    Ok(())
}

/// Elements `at.offset .. at.offset + width` of each of `at.rows` rows, widened: (rows, width).
fn slice_rows(x: &[u16], at: RowSlice, width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(at.rows * width);
    for r in 0..at.rows {
        out.extend(to_f32(&x[r * at.stride + at.offset..][..width]));
    }
    out
}

impl Ops for CpuOps {
    type F32 = Vec<f32>;
    type Bf16 = Vec<u16>;
    type Act = Vec<u16>;
    type Weight = Vec<u16>;
    type U32 = Vec<u32>;
    type HostBlocks = Vec<SlotCopy>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
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
    fn zeros_act(&self, n: usize) -> Result<Vec<u16>> {
        Ok(vec![0; n])
    }
    fn upload_act(&self, v: &[f32]) -> Result<Vec<u16>> {
        Ok(to_bf16(v))
    }
    fn download_act_range(&self, b: &Vec<u16>, range: Range<usize>) -> Result<Vec<f32>> {
        check("download range", b.len(), range.end)?;
        Ok(to_f32(&b[range]))
    }
    fn weight(
        &self,
        values: WeightValues,
        _use: WeightUse,
        rows: usize,
        cols: usize,
    ) -> Result<Vec<u16>> {
        bf16_weight(self, values, rows * cols)
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn fill_uniform(&self, out: &mut Vec<u16>, seed: u64, scale: f32) -> Result<()> {
        out.par_iter_mut().enumerate().for_each(|(i, o)| {
            *o = to_bf16(&[(2.0 * uniform(seed, i as u64) - 1.0) * scale])[0];
        });
        Ok(())
    }

    fn matmul(
        &self,
        x: &Vec<u16>,
        w: &Vec<u16>,
        out: &mut Vec<u16>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        check("matmul x", x.len(), rows * k)?;
        check("matmul w", w.len(), n * k)?;
        check("matmul out", out.len(), rows * n)?;
        let xt = Tensor::from_vec(to_f32(&x[..rows * k]), (rows, k), &Device::Cpu)?;
        let wt = Tensor::from_vec(to_f32(&w[..n * k]), (n, k), &Device::Cpu)?;
        let y = xt.matmul(&wt.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        out[..rows * n].copy_from_slice(&to_bf16(&y));
        Ok(())
    }

    fn matmul_f32(
        &self,
        x: &Vec<u16>,
        w: &Vec<u16>,
        out: &mut Vec<f32>,
        rows: usize,
        k: usize,
        n: usize,
        _exact_input: bool,
    ) -> Result<()> {
        check("matmul_f32 x", x.len(), rows * k)?;
        check("matmul_f32 w", w.len(), n * k)?;
        check("matmul_f32 out", out.len(), rows * n)?;
        let xt = Tensor::from_vec(to_f32(&x[..rows * k]), (rows, k), &Device::Cpu)?;
        let wt = Tensor::from_vec(to_f32(&w[..n * k]), (n, k), &Device::Cpu)?;
        let y = xt.matmul(&wt.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        out[..rows * n].copy_from_slice(&y);
        Ok(())
    }

    fn dequant_bf16(
        &self,
        raw: &[u8],
        dtype: GgmlDType,
        n: usize,
        out: &mut Vec<u16>,
        offset: usize,
    ) -> Result<()> {
        check("dequant out", out.len(), offset + n)?;
        let storage = QStorage::from_data(Cow::Borrowed(raw), &Device::Cpu, dtype)?;
        let values = QTensor::new(storage, (n,))?
            .dequantize(&Device::Cpu)?
            .to_vec1::<f32>()?;
        out[offset..offset + n].copy_from_slice(&to_bf16(&values));
        Ok(())
    }

    fn head_rmsnorm(
        &self,
        x: &mut Vec<u16>,
        at: RowSlice,
        w: &Vec<u16>,
        n_heads: usize,
        head_dim: usize,
        eps: f32,
    ) -> Result<()> {
        let width = n_heads * head_dim;
        check("head_rmsnorm w", w.len(), head_dim)?;
        if at.rows > 0 {
            check(
                "head_rmsnorm x",
                x.len(),
                (at.rows - 1) * at.stride + at.offset + width,
            )?;
        }
        let w = to_f32(&w[..head_dim]);
        let mut y = vec![0.0; head_dim];
        for r in 0..at.rows {
            let row = &mut x[r * at.stride + at.offset..][..width];
            for head in row.chunks_exact_mut(head_dim) {
                rms_norm(&to_f32(head), &w, eps, &mut y);
                head.copy_from_slice(&to_bf16(&y));
            }
        }
        Ok(())
    }

    fn add_bias(&self, x: &mut Vec<u16>, bias: &Vec<u16>, rows: usize, width: usize) -> Result<()> {
        check("add_bias x", x.len(), rows * width)?;
        check("add_bias bias", bias.len(), width)?;
        let b = to_f32(&bias[..width]);
        for row in x[..rows * width].chunks_exact_mut(width) {
            let mut v = to_f32(row);
            v.iter_mut().zip(&b).for_each(|(v, b)| *v += b);
            row.copy_from_slice(&to_bf16(&v));
        }
        Ok(())
    }

    fn rmsnorm(
        &self,
        x: &Vec<f32>,
        w: &Vec<u16>,
        out: &mut Vec<u16>,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        let width = w.len();
        check("rmsnorm x", x.len(), rows * width)?;
        check("rmsnorm out", out.len(), rows * width)?;
        let mut y = vec![0.0; rows * width];
        rms_norm(&x[..rows * width], &to_f32(w), eps, &mut y);
        out[..rows * width].copy_from_slice(&to_bf16(&y));
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<u16>,
        at: RowSlice,
        positions: &Vec<u32>,
        cos: &Vec<f32>,
        sin: &Vec<f32>,
        n_heads: usize,
        head_dim: usize,
        layout: RopeLayout,
    ) -> Result<()> {
        let half = head_dim / 2;
        check("rope positions", positions.len(), at.rows)?;
        for (r, &p) in positions.iter().take(at.rows).enumerate() {
            let (c, s) = (
                &cos[p as usize * half..][..half],
                &sin[p as usize * half..][..half],
            );
            let row = &mut x[r * at.stride + at.offset..][..n_heads * head_dim];
            let mut v = to_f32(row);
            for head in v.chunks_mut(head_dim) {
                for i in 0..half {
                    let (ia, ib) = match layout {
                        RopeLayout::Normal => (2 * i, 2 * i + 1),
                        RopeLayout::Neox => (i, i + half),
                    };
                    let (a, b) = (head[ia], head[ib]);
                    head[ia] = a * c[i] - b * s[i];
                    head[ib] = a * s[i] + b * c[i];
                }
            }
            row.copy_from_slice(&to_bf16(&v));
        }
        Ok(())
    }

    fn silu_mul(
        &self,
        gate_up: &Vec<u16>,
        out: &mut Vec<u16>,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        check("silu_mul gate_up", gate_up.len(), rows * 2 * width)?;
        check("silu_mul out", out.len(), rows * width)?;
        let joined = to_f32(&gate_up[..rows * 2 * width]); // (rows, 2 width): gate, up
        let mut y = vec![0.0; rows * width];
        silu_mul_joined(&joined, width, &mut y);
        out[..rows * width].copy_from_slice(&to_bf16(&y));
        Ok(())
    }

    fn residual_add(&self, h: &mut Vec<f32>, a: &Vec<u16>) -> Result<()> {
        check("residual_add a", a.len(), h.len())?;
        let a = to_f32(&a[..h.len()]);
        h.iter_mut().zip(a).for_each(|(h, a)| *h += a);
        Ok(())
    }

    fn embed(
        &self,
        table: &Vec<u16>,
        tokens: &Vec<u32>,
        out: &mut Vec<f32>,
        width: usize,
    ) -> Result<()> {
        check("embed out", out.len(), tokens.len() * width)?;
        for (i, &t) in tokens.iter().enumerate() {
            let row = table
                .get(t as usize * width..(t as usize + 1) * width)
                .ok_or_else(|| Error::Engine(format!("ops: token {t} outside the table")))?;
            out[i * width..][..width].copy_from_slice(&to_f32(row));
        }
        Ok(())
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
        check("gather out", out.len(), idx.len() * width)?;
        check("gather out_pos", out_pos.len(), idx.len())?;
        for (i, &r) in idx.iter().enumerate() {
            let r = r as usize;
            out[i * width..][..width].copy_from_slice(&src[r * width..][..width]);
            out_pos[i] = src_pos[r];
        }
        Ok(())
    }

    fn kv_append(
        &self,
        qkv: &Vec<u16>,
        at: RowSlice,
        k_col: usize,
        v_col: usize,
        positions: &Vec<u32>,
        pool: &mut KvPool<Self>,
        table: &Vec<u32>,
        row0: usize,
    ) -> Result<()> {
        let d = pool.kv_dim;
        check("kv_append positions", positions.len(), at.rows)?;
        if pool.dtype != KvDtype::Bf16 {
            let (k, v) = (
                slice_rows(qkv, at.columns(k_col), d),
                slice_rows(qkv, at.columns(v_col), d),
            );
            let positions = &positions[..at.rows];
            return host_pool::append_values(&k, &v, positions, pool, table, row0);
        }
        let (mut k, mut v) = (
            Vec::with_capacity(at.rows * d),
            Vec::with_capacity(at.rows * d),
        );
        for r in 0..at.rows {
            let src = &qkv[at.offset + r * at.stride..];
            k.extend_from_slice(&src[k_col..][..d]);
            v.extend_from_slice(&src[v_col..][..d]);
        }
        host_pool::append(&k, &v, &positions[..at.rows], pool, table, row0)
    }

    fn attention(
        &self,
        q: &Vec<u16>,
        at: RowSlice,
        q_pos: &Vec<u32>,
        pool: &KvPool<Self>,
        table: &Vec<u32>,
        n_keys: usize,
        heads: Heads,
        out: &mut Vec<u16>,
        _ctx: &AttentionContext<'_, Self>,
    ) -> Result<()> {
        check("attention positions", q_pos.len(), at.rows)?;
        let qf = slice_rows(q, at, heads.q_dim());
        let y = host_pool::attention(&qf, &q_pos[..at.rows], pool, table, n_keys, heads)?;
        check("attention out", out.len(), y.len())?;
        out[..y.len()].copy_from_slice(&to_bf16(&y));
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
        q: &Vec<u16>,
        at: RowSlice,
        unit_keys: &Vec<f32>,
        units: &UnitBlocks,
        heads: Heads,
        mode: ScoreMode,
        acc: &mut Vec<f32>,
    ) -> Result<()> {
        let window = slice_rows(q, at, heads.q_dim());
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

/// The counter hash of kernels/elementwise.cu `fill_uniform_bf16`: a value in [0, 1).
pub fn uniform(seed: u64, i: u64) -> f32 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i + 1));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// RoPE tables (max_positions, head_dim / 2) of a model's RoPE: the angles of
/// `crate::backend::rowwise::Rope` (linear scaling, Llama 3's per-frequency divisors
/// `freq_factors`) for every position. Every head dimension rotates: `rope_dim` below `head_dim`
/// is refused by the caller.
pub fn rope_tables(
    rope: &RopeParams,
    freq_factors: Option<&[f32]>,
    max_positions: usize,
) -> (Vec<f32>, Vec<f32>) {
    rope.tables(&rope.inv_freq(freq_factors), max_positions)
}

/// RoPE parameters of a shape without scaling: base `theta`, every dimension rotating.
pub fn plain_rope(theta: f32, head_dim: usize, layout: RopeLayout) -> RopeParams {
    RopeParams {
        head_dim,
        rope_dim: head_dim,
        theta,
        linear_scaling: 1.0,
        layout,
    }
}
