//! Every op of the seam on a candidate backend against a reference backend, on random inputs
//! of odd sizes: `slimchat gpu-check --kernels` and tests/cuda_kernels.rs run it with the CUDA
//! backend against [`super::cpu_ops::CpuOps`]; the CPU tests run it CPU against CPU (which
//! checks the harness itself). Outputs are poisoned (NaN) before each run so an unwritten
//! element fails, and errors are ‖candidate − reference‖ / ‖reference‖ over all elements.

use serde::Serialize;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::cpu_ops::{plain_rope, rope_tables, to_bf16, to_f32};
use super::kv_format::KvDtype;
use super::ops::{DeviceOps, Heads, KvPool, RopeLayout, RowSlice, ScoreMode, UnitBlocks, KV_BLOCK};
use crate::Result;

mod attention_cases;
pub use attention_cases::compare_prefill_attention;

/// One op's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct OpCheck {
    pub op: String,
    pub shape: String,
    pub rel_err: f64,
    pub tolerance: f64,
    pub pass: bool,
}

/// A small deterministic generator (xorshift64*), so a failing case can be rerun.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn f32s(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.unit() * scale).collect()
    }
    pub fn bf16s(&mut self, n: usize, scale: f32) -> Vec<u16> {
        to_bf16(&self.f32s(n, scale))
    }
}

const POISON: u16 = 0x7fc0; // bf16 NaN

/// ‖a − b‖ / ‖b‖ (∞ when a has a NaN or the lengths differ).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().any(|x| x.is_nan()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn record(out: &mut Vec<OpCheck>, op: &str, shape: String, a: &[f32], b: &[f32], tol: f64) {
    let e = rel_err(a, b);
    out.push(OpCheck {
        op: op.into(),
        shape,
        rel_err: e,
        tolerance: tol,
        pass: e <= tol,
    });
}

fn u32s_as_f32(v: &[u32]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// Key positions of a pruned layer: whole 64-position blocks with gaps, then a partial block.
fn kept_positions(rng: &mut Rng, blocks: usize, tail: usize) -> Vec<u32> {
    let mut pos = Vec::new();
    let mut b = 0u32;
    for _ in 0..blocks {
        pos.extend(b * 64..b * 64 + 64);
        b += 1 + rng.below(3) as u32;
    }
    pos.extend(b * 64..b * 64 + tail as u32);
    pos
}

/// A KV pool's contents on the host: rows with given positions through a shuffled slot table.
struct HostPool {
    k: Vec<u16>,
    v: Vec<u16>,
    pos: Vec<u32>,
    slots: usize,
    kv_dim: usize,
    /// slot of each logical block
    table: Vec<u32>,
}

impl HostPool {
    /// Random rows at `positions`, two spare slots, a shuffled table.
    fn random(rng: &mut Rng, positions: &[u32], kv_dim: usize) -> Self {
        let n_slots = positions.len().div_ceil(KV_BLOCK) + 2;
        let mut table: Vec<u32> = (0..n_slots as u32).collect();
        for i in (1..table.len()).rev() {
            table.swap(i, rng.below(i + 1));
        }
        let table = table[..positions.len().div_ceil(KV_BLOCK)].to_vec();
        let (mut k, mut v) = (
            vec![0u16; n_slots * KV_BLOCK * kv_dim],
            vec![0u16; n_slots * KV_BLOCK * kv_dim],
        );
        let mut pos = vec![u32::MAX; n_slots * KV_BLOCK];
        for (s, &p) in positions.iter().enumerate() {
            let row = table[s / KV_BLOCK] as usize * KV_BLOCK + s % KV_BLOCK;
            k[row * kv_dim..][..kv_dim].copy_from_slice(&rng.bf16s(kv_dim, 1.0));
            v[row * kv_dim..][..kv_dim].copy_from_slice(&rng.bf16s(kv_dim, 1.0));
            pos[row] = p;
        }
        Self {
            k,
            v,
            pos,
            slots: n_slots,
            kv_dim,
            table,
        }
    }

    fn upload<O: DeviceOps>(&self, o: &O) -> Result<KvPool<O>> {
        Ok(KvPool {
            k: o.upload_bf16(&self.k)?,
            v: o.upload_bf16(&self.v)?,
            pos: o.upload_u32(&self.pos)?,
            slots: self.slots,
            kv_dim: self.kv_dim,
            dtype: KvDtype::Bf16,
            k_scale: Vec::new(),
            k_scale_on_device: None,
        })
    }
}

/// A pool's K, V and positions back on the host, as f32 for `record`.
fn pool_f32<O: DeviceOps>(o: &O, pool: &KvPool<O>) -> Result<[Vec<f32>; 3]> {
    Ok([
        to_f32(&o.download_bf16(&pool.k)?),
        to_f32(&o.download_bf16(&pool.v)?),
        u32s_as_f32(&o.download_u32(&pool.pos)?),
    ])
}

fn matmul<O: DeviceOps>(
    o: &O,
    x: &[u16],
    w: &[u16],
    (rows, k, n): (usize, usize, usize),
) -> Result<Vec<f32>> {
    let mut y = o.upload_bf16(&vec![POISON; rows * n])?;
    o.matmul(&o.upload_bf16(x)?, &o.upload_bf16(w)?, &mut y, rows, k, n)?;
    Ok(to_f32(&o.download_bf16(&y)?))
}

fn matmul_f32<O: DeviceOps>(
    o: &O,
    x: &[u16],
    w: &[u16],
    (rows, k, n): (usize, usize, usize),
) -> Result<Vec<f32>> {
    let mut y = o.upload_f32(&vec![f32::NAN; rows * n])?;
    o.matmul_f32(
        &o.upload_bf16(x)?,
        &o.upload_bf16(w)?,
        &mut y,
        rows,
        k,
        n,
        false,
    )?;
    o.download_f32(&y)
}

fn head_rmsnorm<O: DeviceOps>(
    o: &O,
    x: &[u16],
    at: RowSlice,
    w: &[u16],
    heads: usize,
) -> Result<Vec<f32>> {
    let mut y = o.upload_bf16(x)?;
    o.head_rmsnorm(&mut y, at, &o.upload_bf16(w)?, heads, w.len(), 1e-6)?;
    Ok(to_f32(&o.download_bf16(&y)?))
}

fn add_bias<O: DeviceOps>(o: &O, x: &[u16], bias: &[u16], rows: usize) -> Result<Vec<f32>> {
    let mut y = o.upload_bf16(x)?;
    o.add_bias(&mut y, &o.upload_bf16(bias)?, rows, bias.len())?;
    Ok(to_f32(&o.download_bf16(&y)?))
}

/// `n` values of GGUF blocks expanded at `offset` of a poisoned buffer one block longer on
/// each side (the values around them must stay poisoned).
fn dequant<O: DeviceOps>(
    o: &O,
    raw: &[u8],
    dtype: GgmlDType,
    n: usize,
    pad: usize,
) -> Result<Vec<f32>> {
    let mut y = o.upload_bf16(&vec![POISON; n + 2 * pad])?;
    o.dequant_bf16(raw, dtype, n, &mut y, pad)?;
    let all = to_f32(&o.download_bf16(&y)?);
    if all[..pad]
        .iter()
        .chain(&all[pad + n..])
        .any(|v| !v.is_nan())
    {
        return Ok(vec![f32::NAN; n]); // wrote outside its range
    }
    Ok(all[pad..pad + n].to_vec())
}

/// GGUF bytes of `n` random values (spread like trained weights, a few outliers) quantized to
/// `dtype` by candle.
fn quantized_bytes(rng: &mut Rng, dtype: GgmlDType, n: usize) -> Result<Vec<u8>> {
    let values: Vec<f32> = (0..n)
        .map(|i| rng.unit() * if i % 97 == 0 { 0.4 } else { 0.05 })
        .collect();
    let t = Tensor::from_vec(values, (n,), &Device::Cpu)?;
    Ok(QTensor::quantize(&t, dtype)?.data()?.into_owned())
}

fn rmsnorm<O: DeviceOps>(o: &O, x: &[f32], w: &[u16], rows: usize) -> Result<Vec<f32>> {
    let mut y = o.upload_bf16(&vec![POISON; x.len()])?;
    o.rmsnorm(&o.upload_f32(x)?, &o.upload_bf16(w)?, &mut y, rows, 1e-5)?;
    Ok(to_f32(&o.download_bf16(&y)?))
}

struct RopeCase<'a> {
    x: &'a [u16],
    at: RowSlice,
    positions: &'a [u32],
    cos: &'a [f32],
    sin: &'a [f32],
    heads: usize,
    hd: usize,
    layout: RopeLayout,
}

fn rope<O: DeviceOps>(o: &O, c: &RopeCase) -> Result<Vec<f32>> {
    let mut x = o.upload_bf16(c.x)?;
    let (cos, sin) = (o.upload_f32(c.cos)?, o.upload_f32(c.sin)?);
    let positions = o.upload_u32(c.positions)?;
    o.rope(
        &mut x, c.at, &positions, &cos, &sin, c.heads, c.hd, c.layout,
    )?;
    Ok(to_f32(&o.download_bf16(&x)?))
}

fn silu_mul<O: DeviceOps>(o: &O, gu: &[u16], rows: usize, width: usize) -> Result<Vec<f32>> {
    let mut y = o.upload_bf16(&vec![POISON; rows * width])?;
    o.silu_mul(&o.upload_bf16(gu)?, &mut y, rows, width)?;
    Ok(to_f32(&o.download_bf16(&y)?))
}

fn residual_add<O: DeviceOps>(o: &O, h: &[f32], add: &[u16]) -> Result<Vec<f32>> {
    let mut h = o.upload_f32(h)?;
    o.residual_add(&mut h, &o.upload_bf16(add)?)?;
    o.download_f32(&h)
}

fn embed<O: DeviceOps>(o: &O, table: &[u16], tokens: &[u32], width: usize) -> Result<Vec<f32>> {
    let mut y = o.upload_f32(&vec![f32::NAN; tokens.len() * width])?;
    o.embed(
        &o.upload_bf16(table)?,
        &o.upload_u32(tokens)?,
        &mut y,
        width,
    )?;
    o.download_f32(&y)
}

/// Gathered rows and their positions.
fn gather_rows<O: DeviceOps>(
    o: &O,
    src: &[f32],
    src_pos: &[u32],
    idx: &[u32],
    width: usize,
) -> Result<[Vec<f32>; 2]> {
    let m = idx.len();
    let mut y = o.upload_f32(&vec![f32::NAN; m * width])?;
    let mut p = o.upload_u32(&vec![u32::MAX; m])?;
    let (src, src_pos, idx) = (
        o.upload_f32(src)?,
        o.upload_u32(src_pos)?,
        o.upload_u32(idx)?,
    );
    o.gather_rows(&src, &src_pos, &idx, &mut y, &mut p, width)?;
    Ok([o.download_f32(&y)?, u32s_as_f32(&o.download_u32(&p)?)])
}

struct AppendCase<'a> {
    pool: &'a HostPool,
    qkv: &'a [u16],
    at: RowSlice,
    k_col: usize,
    v_col: usize,
    positions: &'a [u32],
    row0: usize,
    /// then these slots are copied onto the spare ones
    src_slots: &'a [u32],
    spare: &'a [u32],
}

/// The pool after the append (K, V, positions), then its K and positions after the block copy.
fn kv_append_then_copy<O: DeviceOps>(o: &O, c: &AppendCase) -> Result<[Vec<f32>; 5]> {
    let mut pool = c.pool.upload(o)?;
    let (qkv, positions) = (o.upload_bf16(c.qkv)?, o.upload_u32(c.positions)?);
    let table = o.upload_u32(&c.pool.table)?;
    o.kv_append(
        &qkv, c.at, c.k_col, c.v_col, &positions, &mut pool, &table, c.row0,
    )?;
    let [k, v, pos] = pool_f32(o, &pool)?;
    o.kv_copy_blocks(&mut pool, c.src_slots, c.spare)?;
    let [k2, _, pos2] = pool_f32(o, &pool)?;
    Ok([k, v, pos, k2, pos2])
}

/// A tier's copies: two slots offloaded to the host, the pool regrouped (two other slots moved
/// into a pool of four) and dropped, the two host blocks fetched into its empty slots (in the
/// other order); the regrouped pool's K, V and positions.
fn tier_copies<O: DeviceOps>(o: &O, host: &HostPool) -> Result<[Vec<f32>; 3]> {
    let pool = host.upload(o)?;
    let t = &host.table;
    let blocks = o.kv_offload(&pool, &[t[2], t[0]])?;
    let mut grouped = o.kv_pool_regrouped(&pool, &[(t[1], 0), (t[2], 2)], 4)?;
    drop(pool);
    o.kv_fetch(&blocks, &[(1, 1), (0, 3)], &mut grouped)?;
    pool_f32(o, &grouped)
}

struct ScoreCase<'a> {
    pool: &'a HostPool,
    q: &'a [u16],
    at: RowSlice,
    rows: usize,
    units: &'a UnitBlocks,
    heads: Heads,
    mode: ScoreMode,
    n_blocks: usize,
}

fn block_scores<O: DeviceOps>(o: &O, c: &ScoreCase) -> Result<Vec<f32>> {
    let pool = c.pool.upload(o)?;
    let mut out = o.zeros_f32(c.n_blocks)?;
    let (q, table) = (o.upload_bf16(c.q)?, o.upload_u32(&c.pool.table)?);
    o.block_scores(
        &q, c.at, &pool, &table, c.rows, c.units, 8, c.heads, c.mode, &mut out,
    )?;
    o.download_f32(&out)
}

fn fill_uniform<O: DeviceOps>(o: &O, n: usize) -> Result<Vec<f32>> {
    let mut y = o.zeros_bf16(n)?;
    o.fill_uniform(&mut y, 42, 0.02)?;
    Ok(to_f32(&o.download_bf16(&y)?))
}

/// Run every op on both backends, each on the same inputs; one entry per case.
pub fn compare<R: DeviceOps, C: DeviceOps>(
    reference: &R,
    candidate: &C,
    seed: u64,
) -> Result<Vec<OpCheck>> {
    let mut out = Vec::new();
    let mut rng = Rng::new(seed);
    let (r, c) = (reference, candidate);

    // matmul: bf16 in and out
    let dims @ (rows, k, n) = (77, 515, 259);
    let (x, w) = (rng.bf16s(rows * k, 1.0), rng.bf16s(n * k, 0.05));
    let (a, b) = (matmul(c, &x, &w, dims)?, matmul(r, &x, &w, dims)?);
    let shape = format!("({rows},{k})x({n},{k})^T");
    record(&mut out, "matmul (cuBLAS bf16)", shape, &a, &b, 1e-2);

    // one row (decode; kernels/gemv.cu on a GPU), bf16 and f32 out, rows past a CTA's 4
    let dims @ (rows, k, n) = (1, 1032, 259);
    let (x, w) = (rng.bf16s(rows * k, 1.0), rng.bf16s(n * k, 0.05));
    let (a, b) = (matmul(c, &x, &w, dims)?, matmul(r, &x, &w, dims)?);
    let shape = format!("({rows},{k})x({n},{k})^T");
    record(&mut out, "matmul one row (gemv bf16)", shape, &a, &b, 1e-2);
    let (a, b) = (matmul_f32(c, &x, &w, dims)?, matmul_f32(r, &x, &w, dims)?);
    let shape = format!("({rows},{k})x({n},{k})^T");
    record(
        &mut out,
        "matmul_f32 one row (gemv f32)",
        shape,
        &a,
        &b,
        1e-3,
    );

    // matmul with f32 output (the head's logits)
    let dims @ (rows, k, n) = (5, 576, 1031);
    let (x, w) = (rng.bf16s(rows * k, 1.0), rng.bf16s(n * k, 0.05));
    let (a, b) = (matmul_f32(c, &x, &w, dims)?, matmul_f32(r, &x, &w, dims)?);
    let shape = format!("({rows},{k})x({n},{k})^T");
    record(
        &mut out,
        "matmul_f32 (cuBLAS bf16 -> f32)",
        shape,
        &a,
        &b,
        1e-3,
    );

    // bias_add_bf16
    let (rows, width) = (19, 1155);
    let (x, bias) = (rng.bf16s(rows * width, 1.0), rng.bf16s(width, 0.5));
    let (a, b) = (add_bias(c, &x, &bias, rows)?, add_bias(r, &x, &bias, rows)?);
    record(
        &mut out,
        "bias_add_bf16",
        format!("({rows},{width})"),
        &a,
        &b,
        8e-3,
    );

    // head_rmsnorm_bf16 over the k part of a q|k|v-like buffer (Qwen3)
    let (rows, heads, hd, stride) = (23, 4, 128, 12 * 128 + 3);
    let (x, w) = (rng.bf16s(rows * stride, 2.0), rng.bf16s(hd, 1.0));
    let at = RowSlice {
        rows,
        stride,
        offset: 8 * 128 + 1,
    };
    let (a, b) = (
        head_rmsnorm(c, &x, at, &w, heads)?,
        head_rmsnorm(r, &x, at, &w, heads)?,
    );
    let shape = format!("({rows},{stride}) {heads}x{hd} at {}", at.offset);
    record(&mut out, "head_rmsnorm_bf16", shape, &a, &b, 8e-3);

    // dequant_*_bf16: every GGUF type the models load, expanded in the middle of a buffer
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::F32,
    ] {
        let per_block = dtype.block_size();
        let n = per_block * 37;
        let raw = quantized_bytes(&mut rng, dtype, n)?;
        let (a, b) = (
            dequant(c, &raw, dtype, n, per_block)?,
            dequant(r, &raw, dtype, n, per_block)?,
        );
        // a GPU may fuse d * q - m into one FMA: the last bit of a value can differ
        let label = format!("dequant {dtype:?} -> bf16");
        record(
            &mut out,
            &label,
            format!("({n}) at {per_block}"),
            &a,
            &b,
            1e-3,
        );
    }

    // rmsnorm_f32
    let (rows, width) = (37, 4099);
    let (x, w) = (rng.f32s(rows * width, 3.0), rng.bf16s(width, 1.0));
    let (a, b) = (rmsnorm(c, &x, &w, rows)?, rmsnorm(r, &x, &w, rows)?);
    record(
        &mut out,
        "rmsnorm_f32",
        format!("({rows},{width})"),
        &a,
        &b,
        8e-3,
    );

    // rope_bf16 over the k part of a q|k|v-like buffer, in both layouts
    for layout in [RopeLayout::Normal, RopeLayout::Neox] {
        let (rows, heads, hd, stride) = (29, 3, 128, 7 * 128 + 5);
        let positions: Vec<u32> = (0..rows).map(|_| rng.below(5000) as u32).collect();
        let (cos, sin) = rope_tables(&plain_rope(500_000.0, hd, layout), None, 5000);
        let x = rng.bf16s(rows * stride, 1.0);
        let case = RopeCase {
            x: &x,
            at: RowSlice {
                rows,
                stride,
                offset: 2 * 128 + 3,
            },
            positions: &positions,
            cos: &cos,
            sin: &sin,
            heads,
            hd,
            layout,
        };
        let shape = format!("({rows},{stride}) {heads}x{hd} at {}", case.at.offset);
        let label = format!("rope_bf16 ({layout:?})");
        let (a, b) = (rope(c, &case)?, rope(r, &case)?);
        record(&mut out, &label, shape, &a, &b, 8e-3);
    }

    // silu_mul_bf16
    let (rows, width) = (33, 517);
    let gu = rng.bf16s(rows * 2 * width, 4.0);
    let (a, b) = (
        silu_mul(c, &gu, rows, width)?,
        silu_mul(r, &gu, rows, width)?,
    );
    record(
        &mut out,
        "silu_mul_bf16",
        format!("({rows},2x{width})"),
        &a,
        &b,
        8e-3,
    );

    // residual_add_f32
    let n = 10_007;
    let (h, add) = (rng.f32s(n, 2.0), rng.bf16s(n, 1.0));
    let (a, b) = (residual_add(c, &h, &add)?, residual_add(r, &h, &add)?);
    record(&mut out, "residual_add_f32", format!("({n})"), &a, &b, 1e-6);

    // embed_rows_bf16
    let (vocab, width, n) = (301, 257, 41);
    let table = rng.bf16s(vocab * width, 1.0);
    let tokens: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let (a, b) = (
        embed(c, &table, &tokens, width)?,
        embed(r, &table, &tokens, width)?,
    );
    let shape = format!("{n} of ({vocab},{width})");
    record(&mut out, "embed_rows_bf16", shape, &a, &b, 0.0);

    // gather_rows_f32 + gather_positions_u32
    let (n_src, width) = (97, 131);
    let src = rng.f32s(n_src * width, 1.0);
    let src_pos: Vec<u32> = (0..n_src as u32).map(|i| i * 3 + 1).collect();
    let idx: Vec<u32> = (0..n_src as u32).filter(|_| rng.below(3) > 0).collect();
    let [rows_c, pos_c] = gather_rows(c, &src, &src_pos, &idx, width)?;
    let [rows_r, pos_r] = gather_rows(r, &src, &src_pos, &idx, width)?;
    let shape = format!("{} of ({n_src},{width})", idx.len());
    record(
        &mut out,
        "gather_rows_f32",
        shape.clone(),
        &rows_c,
        &rows_r,
        0.0,
    );
    record(&mut out, "gather_positions_u32", shape, &pos_c, &pos_r, 0.0);

    // kv_append_bf16: rows 37.. of a layer through a shuffled table, from rows 3.. of the
    // q|k|v buffer (a step's revived rows go in apart from its new ones); then
    // kv_copy_blocks_bf16: move two slots onto the spare ones
    let heads = Heads {
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 128,
    };
    let (kv_dim, rows, row0) = (heads.kv_dim(), 150, 37);
    let stride = heads.q_dim() + 2 * kv_dim;
    let all_rows: Vec<u32> = (0..(row0 + rows) as u32).collect();
    let pool = HostPool::random(&mut rng, &all_rows, kv_dim);
    let qkv = rng.bf16s((3 + rows) * stride, 1.0);
    let positions: Vec<u32> = (1000..1000 + rows as u32).collect();
    let spare: Vec<u32> = (0..pool.slots as u32)
        .filter(|s| !pool.table.contains(s))
        .collect();
    let src_slots = [pool.table[1], pool.table[0]];
    let case = AppendCase {
        pool: &pool,
        qkv: &qkv,
        at: RowSlice {
            rows,
            stride,
            offset: 3 * stride,
        },
        k_col: heads.q_dim(),
        v_col: heads.q_dim() + kv_dim,
        positions: &positions,
        row0,
        src_slots: &src_slots,
        spare: &spare,
    };
    let got = kv_append_then_copy(c, &case)?;
    let want = kv_append_then_copy(r, &case)?;
    let appended = format!("{rows} rows at {row0}, kv_dim {kv_dim}");
    let copied = format!("{} slots", spare.len());
    for (i, (label, shape)) in [
        ("kv_append_bf16 (k)", &appended),
        ("kv_append_bf16 (v)", &appended),
        ("kv_append_bf16 (positions)", &appended),
        ("kv_copy_blocks_bf16", &copied),
        ("kv_copy_blocks (positions)", &copied),
    ]
    .into_iter()
    .enumerate()
    {
        record(&mut out, label, shape.clone(), &got[i], &want[i], 0.0);
    }

    // the KV tiers' copies: slots to the host and back, a pool regrouped on the device
    let got = tier_copies(c, &pool)?;
    let want = tier_copies(r, &pool)?;
    let shape = format!("2 of {} slots, kv_dim {kv_dim}", pool.slots);
    for (i, label) in [
        "kv_offload + kv_pool_regrouped + kv_fetch (k)",
        "kv_offload + kv_pool_regrouped + kv_fetch (v)",
        "kv_offload + kv_pool_regrouped + kv_fetch (positions)",
    ]
    .into_iter()
    .enumerate()
    {
        record(&mut out, label, shape.clone(), &got[i], &want[i], 0.0);
    }

    out.extend(attention_cases::cases(r, c, &mut rng)?);

    // slim scores: unit keys, logits, softmax, block reduction (both score kinds)
    for (label, mode) in [
        ("slim block scores (attention)", ScoreMode::Attention),
        (
            "slim block scores (attention, max)",
            ScoreMode::AttentionMax,
        ),
        ("slim block scores (paper)", ScoreMode::Paper),
    ] {
        let heads = Heads {
            n_heads: 8,
            n_kv_heads: 2,
            head_dim: 128,
        };
        let key_pos = kept_positions(&mut rng, 7, 29);
        let pool = HostPool::random(&mut rng, &key_pos, heads.kv_dim());
        let units = UnitBlocks::from_positions(&key_pos, KV_BLOCK, 8);
        let (w, stride) = (5, heads.q_dim() + 2 * heads.kv_dim());
        let q = rng.bf16s((w + 3) * stride, 1.0);
        let case = ScoreCase {
            pool: &pool,
            q: &q,
            at: RowSlice {
                rows: w,
                stride,
                offset: 3 * stride,
            },
            rows: key_pos.len(),
            units: &units,
            heads,
            mode,
            n_blocks: (*key_pos.last().unwrap() as usize / KV_BLOCK) + 1,
        };
        let shape = format!("w {w}, {} rows in {} blocks", case.rows, units.ids.len());
        let (a, b) = (block_scores(c, &case)?, block_scores(r, &case)?);
        record(&mut out, label, shape, &a, &b, 2e-3);
    }

    // fill_uniform_bf16: the same hash on both sides
    let n = 4097;
    let (a, b) = (fill_uniform(c, n)?, fill_uniform(r, n)?);
    record(&mut out, "fill_uniform_bf16", format!("({n})"), &a, &b, 0.0);

    c.sync()?;
    Ok(out)
}
