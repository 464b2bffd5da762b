//! Every op of the seam on a candidate backend against a reference backend, on random inputs
//! of odd sizes: `slimchat gpu-check --kernels` and tests/cuda_kernels.rs run it with the CUDA
//! backend against [`super::cpu_ops::CpuOps`]; the CPU tests run it CPU against CPU (which
//! checks the harness itself). Outputs are poisoned (NaN) before each run so an unwritten
//! element fails, and errors are ‖candidate − reference‖ / ‖reference‖ over all elements.

use serde::Serialize;

use super::cpu_ops::{rope_tables, to_bf16, to_f32};
use super::ops::{Heads, KvPool, Ops, RowSlice, ScoreMode, UnitBlocks, KV_BLOCK};
use crate::Result;

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

/// A pool holding rows with `positions` through a shuffled slot table; returns the table.
fn filled_pool<O: Ops>(
    ops: &O,
    rng: &mut Rng,
    positions: &[u32],
    kv_dim: usize,
) -> Result<(KvPool<O>, Vec<u32>)> {
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
    let pool = KvPool {
        k: ops.upload_bf16(&k)?,
        v: ops.upload_bf16(&v)?,
        pos: ops.upload_u32(&pos)?,
        slots: n_slots,
        kv_dim,
    };
    Ok((pool, table))
}

/// Run every op on both backends; one entry per case.
pub fn compare<R: Ops, C: Ops>(reference: &R, candidate: &C, seed: u64) -> Result<Vec<OpCheck>> {
    let mut out = Vec::new();
    let mut rng = Rng::new(seed);
    let (r, c) = (reference, candidate);

    // matmul: bf16 in and out
    let (rows, k, n) = (77, 515, 259);
    let (x, w) = (rng.bf16s(rows * k, 1.0), rng.bf16s(n * k, 0.05));
    let (mut yr, mut yc) = (
        r.upload_bf16(&vec![POISON; rows * n])?,
        c.upload_bf16(&vec![POISON; rows * n])?,
    );
    r.matmul(
        &r.upload_bf16(&x)?,
        &r.upload_bf16(&w)?,
        &mut yr,
        rows,
        k,
        n,
    )?;
    c.matmul(
        &c.upload_bf16(&x)?,
        &c.upload_bf16(&w)?,
        &mut yc,
        rows,
        k,
        n,
    )?;
    let (a, b) = (
        to_f32(&c.download_bf16(&yc)?),
        to_f32(&r.download_bf16(&yr)?),
    );
    record(
        &mut out,
        "matmul (cuBLAS bf16)",
        format!("({rows},{k})x({n},{k})^T"),
        &a,
        &b,
        1e-2,
    );

    // rmsnorm_f32
    let (rows, width) = (37, 4099);
    let (x, w) = (rng.f32s(rows * width, 3.0), rng.bf16s(width, 1.0));
    let (mut yr, mut yc) = (
        r.upload_bf16(&vec![POISON; rows * width])?,
        c.upload_bf16(&vec![POISON; rows * width])?,
    );
    r.rmsnorm(&r.upload_f32(&x)?, &r.upload_bf16(&w)?, &mut yr, rows, 1e-5)?;
    c.rmsnorm(&c.upload_f32(&x)?, &c.upload_bf16(&w)?, &mut yc, rows, 1e-5)?;
    let (a, b) = (
        to_f32(&c.download_bf16(&yc)?),
        to_f32(&r.download_bf16(&yr)?),
    );
    record(
        &mut out,
        "rmsnorm_f32",
        format!("({rows},{width})"),
        &a,
        &b,
        8e-3,
    );

    // rope_bf16 over the k part of a q|k|v-like buffer
    let (rows, heads, hd, stride) = (29, 3, 128, 7 * 128 + 5);
    let positions: Vec<u32> = (0..rows).map(|_| rng.below(5000) as u32).collect();
    let (cos, sin) = rope_tables(500_000.0, hd, 5000);
    let x = rng.bf16s(rows * stride, 1.0);
    let at = RowSlice {
        rows,
        stride,
        offset: 2 * 128 + 3,
    };
    let (mut xr, mut xc) = (r.upload_bf16(&x)?, c.upload_bf16(&x)?);
    r.rope(
        &mut xr,
        at,
        &r.upload_u32(&positions)?,
        &r.upload_f32(&cos)?,
        &r.upload_f32(&sin)?,
        heads,
        hd,
    )?;
    c.rope(
        &mut xc,
        at,
        &c.upload_u32(&positions)?,
        &c.upload_f32(&cos)?,
        &c.upload_f32(&sin)?,
        heads,
        hd,
    )?;
    let (a, b) = (
        to_f32(&c.download_bf16(&xc)?),
        to_f32(&r.download_bf16(&xr)?),
    );
    record(
        &mut out,
        "rope_bf16",
        format!("({rows},{stride}) {heads}x{hd} at {}", at.offset),
        &a,
        &b,
        8e-3,
    );

    // silu_mul_bf16
    let (rows, width) = (33, 517);
    let gu = rng.bf16s(rows * 2 * width, 4.0);
    let (mut yr, mut yc) = (
        r.upload_bf16(&vec![POISON; rows * width])?,
        c.upload_bf16(&vec![POISON; rows * width])?,
    );
    r.silu_mul(&r.upload_bf16(&gu)?, &mut yr, rows, width)?;
    c.silu_mul(&c.upload_bf16(&gu)?, &mut yc, rows, width)?;
    let (a, b) = (
        to_f32(&c.download_bf16(&yc)?),
        to_f32(&r.download_bf16(&yr)?),
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
    let (mut hr, mut hc) = (r.upload_f32(&h)?, c.upload_f32(&h)?);
    r.residual_add(&mut hr, &r.upload_bf16(&add)?)?;
    c.residual_add(&mut hc, &c.upload_bf16(&add)?)?;
    record(
        &mut out,
        "residual_add_f32",
        format!("({n})"),
        &c.download_f32(&hc)?,
        &r.download_f32(&hr)?,
        1e-6,
    );

    // embed_rows_bf16
    let (vocab, width, n) = (301, 257, 41);
    let table = rng.bf16s(vocab * width, 1.0);
    let tokens: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
    let (mut yr, mut yc) = (
        r.upload_f32(&vec![f32::NAN; n * width])?,
        c.upload_f32(&vec![f32::NAN; n * width])?,
    );
    r.embed(
        &r.upload_bf16(&table)?,
        &r.upload_u32(&tokens)?,
        &mut yr,
        width,
    )?;
    c.embed(
        &c.upload_bf16(&table)?,
        &c.upload_u32(&tokens)?,
        &mut yc,
        width,
    )?;
    record(
        &mut out,
        "embed_rows_bf16",
        format!("{n} of ({vocab},{width})"),
        &c.download_f32(&yc)?,
        &r.download_f32(&yr)?,
        0.0,
    );

    // gather_rows_f32 + gather_positions_u32
    let (n_src, width) = (97, 131);
    let src = rng.f32s(n_src * width, 1.0);
    let src_pos: Vec<u32> = (0..n_src as u32).map(|i| i * 3 + 1).collect();
    let idx: Vec<u32> = (0..n_src as u32).filter(|_| rng.below(3) > 0).collect();
    let m = idx.len();
    let (mut yr, mut yc) = (
        r.upload_f32(&vec![f32::NAN; m * width])?,
        c.upload_f32(&vec![f32::NAN; m * width])?,
    );
    let (mut pr, mut pc) = (
        r.upload_u32(&vec![u32::MAX; m])?,
        c.upload_u32(&vec![u32::MAX; m])?,
    );
    r.gather_rows(
        &r.upload_f32(&src)?,
        &r.upload_u32(&src_pos)?,
        &r.upload_u32(&idx)?,
        &mut yr,
        &mut pr,
        width,
    )?;
    c.gather_rows(
        &c.upload_f32(&src)?,
        &c.upload_u32(&src_pos)?,
        &c.upload_u32(&idx)?,
        &mut yc,
        &mut pc,
        width,
    )?;
    let shape = format!("{m} of ({n_src},{width})");
    record(
        &mut out,
        "gather_rows_f32",
        shape.clone(),
        &c.download_f32(&yc)?,
        &r.download_f32(&yr)?,
        0.0,
    );
    record(
        &mut out,
        "gather_positions_u32",
        shape,
        &u32s_as_f32(&c.download_u32(&pc)?),
        &u32s_as_f32(&r.download_u32(&pr)?),
        0.0,
    );

    // kv_append_bf16: rows 37.. of a layer through a shuffled table
    let heads = Heads {
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 128,
    };
    let (kv_dim, rows, row0) = (heads.kv_dim(), 150, 37);
    let stride = heads.q_dim() + 2 * kv_dim;
    let prior: Vec<u32> = (0..row0 as u32).collect();
    let (pool_r, table) = filled_pool(
        r,
        &mut rng,
        &(0..(row0 + rows) as u32).collect::<Vec<_>>(),
        kv_dim,
    )?;
    let _ = prior;
    let mut pool_c = KvPool::<C> {
        k: c.upload_bf16(&r.download_bf16(&pool_r.k)?)?,
        v: c.upload_bf16(&r.download_bf16(&pool_r.v)?)?,
        pos: c.upload_u32(&r.download_u32(&pool_r.pos)?)?,
        slots: pool_r.slots,
        kv_dim,
    };
    let mut pool_r = pool_r;
    let qkv = rng.bf16s(rows * stride, 1.0);
    let pos: Vec<u32> = (1000..1000 + rows as u32).collect();
    let at = RowSlice {
        rows,
        stride,
        offset: 0,
    };
    let (q, kc, vc) = (heads.q_dim(), heads.q_dim(), heads.q_dim() + kv_dim);
    let _ = q;
    r.kv_append(
        &r.upload_bf16(&qkv)?,
        at,
        kc,
        vc,
        &r.upload_u32(&pos)?,
        &mut pool_r,
        &r.upload_u32(&table)?,
        row0,
    )?;
    c.kv_append(
        &c.upload_bf16(&qkv)?,
        at,
        kc,
        vc,
        &c.upload_u32(&pos)?,
        &mut pool_c,
        &c.upload_u32(&table)?,
        row0,
    )?;
    let shape = format!("{rows} rows at {row0}, kv_dim {kv_dim}");
    record(
        &mut out,
        "kv_append_bf16 (k)",
        shape.clone(),
        &to_f32(&c.download_bf16(&pool_c.k)?),
        &to_f32(&r.download_bf16(&pool_r.k)?),
        0.0,
    );
    record(
        &mut out,
        "kv_append_bf16 (v)",
        shape.clone(),
        &to_f32(&c.download_bf16(&pool_c.v)?),
        &to_f32(&r.download_bf16(&pool_r.v)?),
        0.0,
    );
    record(
        &mut out,
        "kv_append_bf16 (positions)",
        shape,
        &u32s_as_f32(&c.download_u32(&pool_c.pos)?),
        &u32s_as_f32(&r.download_u32(&pool_r.pos)?),
        0.0,
    );

    // kv_copy_blocks_bf16: move two slots onto the spare ones
    let spare: Vec<u32> = (0..pool_r.slots as u32)
        .filter(|s| !table.contains(s))
        .collect();
    let src_slots = vec![table[1], table[0]];
    r.kv_copy_blocks(&mut pool_r, &src_slots, &spare)?;
    c.kv_copy_blocks(&mut pool_c, &src_slots, &spare)?;
    record(
        &mut out,
        "kv_copy_blocks_bf16",
        format!("{} slots", spare.len()),
        &to_f32(&c.download_bf16(&pool_c.k)?),
        &to_f32(&r.download_bf16(&pool_r.k)?),
        0.0,
    );
    record(
        &mut out,
        "kv_copy_blocks (positions)",
        format!("{} slots", spare.len()),
        &u32s_as_f32(&c.download_u32(&pool_c.pos)?),
        &u32s_as_f32(&r.download_u32(&pool_r.pos)?),
        0.0,
    );

    // attention_bf16: prefill (kept rows vs kept keys), decode (one query), head_dim 64
    for (label, heads, blocks, tail, nq) in [
        (
            "attention_bf16 prefill",
            Heads {
                n_heads: 8,
                n_kv_heads: 2,
                head_dim: 128,
            },
            3,
            11,
            83,
        ),
        (
            "attention_bf16 decode",
            Heads {
                n_heads: 8,
                n_kv_heads: 2,
                head_dim: 128,
            },
            15,
            37,
            1,
        ),
        (
            "attention_bf16 hd64",
            Heads {
                n_heads: 6,
                n_kv_heads: 3,
                head_dim: 64,
            },
            2,
            50,
            45,
        ),
    ] {
        let key_pos = kept_positions(&mut rng, blocks, tail);
        let (pool_r, table) = filled_pool(r, &mut rng, &key_pos, heads.kv_dim())?;
        let pool_c = KvPool::<C> {
            k: c.upload_bf16(&r.download_bf16(&pool_r.k)?)?,
            v: c.upload_bf16(&r.download_bf16(&pool_r.v)?)?,
            pos: c.upload_u32(&r.download_u32(&pool_r.pos)?)?,
            slots: pool_r.slots,
            kv_dim: heads.kv_dim(),
        };
        // queries: the last nq key positions (a prefill's rows) or the newest position
        let q_pos: Vec<u32> = key_pos[key_pos.len() - nq..].to_vec();
        let stride = heads.q_dim() + 2 * heads.kv_dim();
        let q = rng.bf16s(nq * stride, 2.0);
        let at = RowSlice {
            rows: nq,
            stride,
            offset: 0,
        };
        let n_keys = key_pos.len();
        let size = nq * heads.q_dim();
        let (mut yr, mut yc) = (
            r.upload_bf16(&vec![POISON; size])?,
            c.upload_bf16(&vec![POISON; size])?,
        );
        r.attention(
            &r.upload_bf16(&q)?,
            at,
            &r.upload_u32(&q_pos)?,
            &pool_r,
            &r.upload_u32(&table)?,
            n_keys,
            heads,
            &mut yr,
        )?;
        c.attention(
            &c.upload_bf16(&q)?,
            at,
            &c.upload_u32(&q_pos)?,
            &pool_c,
            &c.upload_u32(&table)?,
            n_keys,
            heads,
            &mut yc,
        )?;
        let shape = format!(
            "{nq} queries x {n_keys} keys, {}:{}x{}",
            heads.n_heads, heads.n_kv_heads, heads.head_dim
        );
        record(
            &mut out,
            label,
            shape,
            &to_f32(&c.download_bf16(&yc)?),
            &to_f32(&r.download_bf16(&yr)?),
            2e-2,
        );
    }

    // slim scores: unit keys, logits, softmax, block reduction (both score kinds)
    for (label, mode) in [
        ("slim block scores (attention)", ScoreMode::Attention),
        ("slim block scores (paper)", ScoreMode::Paper),
    ] {
        let heads = Heads {
            n_heads: 8,
            n_kv_heads: 2,
            head_dim: 128,
        };
        let key_pos = kept_positions(&mut rng, 7, 29);
        let (pool_r, table) = filled_pool(r, &mut rng, &key_pos, heads.kv_dim())?;
        let pool_c = KvPool::<C> {
            k: c.upload_bf16(&r.download_bf16(&pool_r.k)?)?,
            v: c.upload_bf16(&r.download_bf16(&pool_r.v)?)?,
            pos: c.upload_u32(&r.download_u32(&pool_r.pos)?)?,
            slots: pool_r.slots,
            kv_dim: heads.kv_dim(),
        };
        let units = UnitBlocks::from_positions(&key_pos, KV_BLOCK, 8);
        let n_blocks = (*key_pos.last().unwrap() as usize / KV_BLOCK) + 1;
        let (w, stride) = (5, heads.q_dim() + 2 * heads.kv_dim());
        let q = rng.bf16s((w + 3) * stride, 1.0);
        let at = RowSlice {
            rows: w,
            stride,
            offset: 3 * stride,
        };
        let (mut ar, mut ac) = (r.zeros_f32(n_blocks)?, c.zeros_f32(n_blocks)?);
        let rows = key_pos.len();
        r.block_scores(
            &r.upload_bf16(&q)?,
            at,
            &pool_r,
            &r.upload_u32(&table)?,
            rows,
            &units,
            8,
            heads,
            mode,
            &mut ar,
        )?;
        c.block_scores(
            &c.upload_bf16(&q)?,
            at,
            &pool_c,
            &c.upload_u32(&table)?,
            rows,
            &units,
            8,
            heads,
            mode,
            &mut ac,
        )?;
        record(
            &mut out,
            label,
            format!("w {w}, {rows} rows in {} blocks", units.ids.len()),
            &c.download_f32(&ac)?,
            &r.download_f32(&ar)?,
            2e-3,
        );
    }

    // fill_uniform_bf16: the same hash on both sides
    let n = 4097;
    let (mut yr, mut yc) = (r.zeros_bf16(n)?, c.zeros_bf16(n)?);
    r.fill_uniform(&mut yr, 42, 0.02)?;
    c.fill_uniform(&mut yc, 42, 0.02)?;
    record(
        &mut out,
        "fill_uniform_bf16",
        format!("({n})"),
        &to_f32(&c.download_bf16(&yc)?),
        &to_f32(&r.download_bf16(&yr)?),
        0.0,
    );

    c.sync()?;
    Ok(out)
}
