//! The attention cases of the kernel checks ([`super::compare`]): paged attention on both
//! backends over the same random pool, prefill and decode, every kernel the CUDA backend has,
//! and over pools of the other KV element types (f16, Q8) that each backend appends itself.

use super::{kept_positions, record, rel_err, HostPool, OpCheck, Rng, POISON};
use crate::backend::cpu_ops::to_f32;
use crate::backend::kv_format::KvDtype;
use crate::backend::ops::{AttentionContext, DeviceOps, Heads, KvPool, RowSlice};
use crate::Result;

struct AttentionCase<'a> {
    pool: &'a HostPool,
    q: &'a [u16],
    at: RowSlice,
    q_pos: &'a [u32],
    n_keys: usize,
    heads: Heads,
}

fn attention<O: DeviceOps>(o: &O, c: &AttentionCase) -> Result<Vec<f32>> {
    let pool = c.pool.upload(o)?;
    let mut y = o.upload_bf16(&vec![POISON; c.at.rows * c.heads.q_dim()])?;
    let (q, q_pos) = (o.upload_bf16(c.q)?, o.upload_u32(c.q_pos)?);
    let table = o.upload_u32(&c.pool.table)?;
    o.attention(
        &q,
        c.at,
        &q_pos,
        &pool,
        &table,
        c.n_keys,
        c.heads,
        &mut y,
        &AttentionContext::NONE,
    )?;
    Ok(to_f32(&o.download_bf16(&y)?))
}

/// A case's outputs: (candidate's, reference's).
type OutputPair = (Vec<f32>, Vec<f32>);

/// One attention case on both backends: random queries and a random pool holding `key_pos`,
/// the queries at `q_pos`; (shape, (candidate's output, reference's output)).
fn attention_pair<R: DeviceOps, C: DeviceOps>(
    r: &R,
    c: &C,
    rng: &mut Rng,
    heads: Heads,
    key_pos: &[u32],
    q_pos: &[u32],
) -> Result<(String, OutputPair)> {
    let pool = HostPool::random(rng, key_pos, heads.kv_dim());
    let nq = q_pos.len();
    let stride = heads.q_dim() + 2 * heads.kv_dim();
    let q = rng.bf16s(nq * stride, 2.0);
    let case = AttentionCase {
        pool: &pool,
        q: &q,
        at: RowSlice {
            rows: nq,
            stride,
            offset: 0,
        },
        q_pos,
        n_keys: key_pos.len(),
        heads,
    };
    let shape = format!(
        "{nq} queries x {} keys, {}:{}x{}",
        case.n_keys, heads.n_heads, heads.n_kv_heads, heads.head_dim
    );
    Ok((shape, (attention(c, &case)?, attention(r, &case)?)))
}

/// An attention case's check (tolerance 2e-2: P is rounded to bf16 on the device).
fn record_one(label: &str, shape: String, (a, b): OutputPair) -> OpCheck {
    let rel_err = rel_err(&a, &b);
    OpCheck {
        op: label.into(),
        shape,
        rel_err,
        tolerance: 2e-2,
        pass: rel_err <= 2e-2,
    }
}

/// The prefill attention cases that a tensor-core kernel takes (head sizes 64 and 128, GQA
/// groups up to 8), named `<prefix>_hd<head size> ...`: GQA groups of 4, 2, 7 (rows over
/// several CTAs), 1 and 8; the queries the last rows of the keys with a partial last tile, or a
/// whole number of tiles, or rows in the middle of the sequence (the keys after them masked
/// for every query, whole tiles past every query skipped).
fn prefill_attention_cases<R: DeviceOps, C: DeviceOps>(
    r: &R,
    c: &C,
    rng: &mut Rng,
    prefix: &str,
) -> Result<Vec<OpCheck>> {
    let mut out = Vec::new();
    let heads = |n_heads, n_kv_heads, head_dim| Heads {
        n_heads,
        n_kv_heads,
        head_dim,
    };
    // (label, heads, whole blocks, partial tail, query rows, keys after the last query)
    for (label, heads, blocks, tail, nq, after) in [
        ("hd128 prefill", heads(8, 2, 128), 3, 11, 83, 0),
        ("hd64 prefill", heads(6, 3, 64), 2, 50, 45, 0),
        ("hd128 group 7", heads(14, 2, 128), 6, 5, 301, 0),
        ("hd128 whole tiles", heads(8, 2, 128), 4, 0, 150, 0),
        ("hd128 mid-sequence", heads(8, 2, 128), 7, 40, 97, 230),
        ("hd64 group 1", heads(4, 4, 64), 3, 33, 140, 0),
        ("hd64 group 8", heads(16, 2, 64), 2, 7, 40, 60),
    ] {
        let key_pos = kept_positions(rng, blocks, tail);
        let end = key_pos.len() - after;
        let q_pos: Vec<u32> = key_pos[end - nq..end].to_vec();
        let label = format!("{prefix}_{label}");
        let (shape, pair) = attention_pair(r, c, rng, heads, &key_pos, &q_pos)?;
        out.push(record_one(&label, shape, pair));
    }
    Ok(out)
}

/// The prefill attention cases of [`compare`] alone, named `<prefix>_hd...`: the device check
/// runs them once more for each tensor-core kernel that is not the candidate's.
pub fn compare_prefill_attention<R: DeviceOps, C: DeviceOps>(
    reference: &R,
    candidate: &C,
    seed: u64,
    prefix: &str,
) -> Result<Vec<OpCheck>> {
    let mut rng = Rng::new(seed ^ 0x0a77_e471);
    let out = prefill_attention_cases(reference, candidate, &mut rng, prefix)?;
    candidate.sync()?;
    Ok(out)
}

/// Every attention case of [`super::compare`]: prefill (kept rows vs kept keys) on tensor cores
/// at head sizes 64 and 128 (attention_mma_*: the candidate's tensor-core kernel, see
/// [`compare_prefill_attention`]) and on FMA units otherwise (attention_bf16, head size 96);
/// decode (one query), also over many splits: the warp kernel's two register variants (groups
/// up to 4 and up to 8) at both head sizes, the tree kernel at 96, and keys past the query
/// masked.
pub(super) fn cases<R: DeviceOps, C: DeviceOps>(
    r: &R,
    c: &C,
    rng: &mut Rng,
) -> Result<Vec<OpCheck>> {
    let mut out = Vec::new();
    out.extend(prefill_attention_cases(r, c, rng, "attention_mma")?);
    for (label, heads, blocks, tail, nq) in [
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
            "attention_bf16 prefill hd96",
            Heads {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 96,
            },
            3,
            20,
            70,
        ),
    ] {
        let key_pos = kept_positions(rng, blocks, tail);
        let q_pos: Vec<u32> = key_pos[key_pos.len() - nq..].to_vec();
        let (shape, pair) = attention_pair(r, c, rng, heads, &key_pos, &q_pos)?;
        out.push(record_one(label, shape, pair));
    }
    for (label, heads, blocks, masked) in [
        ("decode attention (warps) 8B shape", (32, 8, 128), 150, 0),
        ("decode attention (warps) hd64 group 3", (9, 3, 64), 40, 0),
        ("decode attention (warps) group 7", (28, 4, 128), 60, 0),
        (
            "decode attention (warps) keys past the query",
            (8, 2, 128),
            30,
            41,
        ),
        ("decode attention (tree) hd96", (4, 2, 96), 12, 5),
    ] {
        let heads = Heads {
            n_heads: heads.0,
            n_kv_heads: heads.1,
            head_dim: heads.2,
        };
        let key_pos = kept_positions(rng, blocks, 37);
        let q_pos = vec![key_pos[key_pos.len() - 1 - masked]];
        let (shape, pair) = attention_pair(r, c, rng, heads, &key_pos, &q_pos)?;
        out.push(record_one(label, shape, pair));
    }
    out.extend(typed_kv_cases(r, c, rng)?);
    Ok(out)
}

/// A pool of `dtype` that backend `o` fills with the keys and values of `rows` (q|k|v rows of
/// `stride`, one a key, at `key_pos`) through `table`, then attends over with the last `nq` rows'
/// queries: (the pool's key and value words, as numbers; the attention's output).
fn typed_attention<O: DeviceOps>(
    o: &O,
    dtype: KvDtype,
    (rows, stride): (&[u16], usize),
    key_pos: &[u32],
    table: &[u32],
    heads: Heads,
    nq: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (n, kv) = (key_pos.len(), heads.kv_dim());
    let mut pool = KvPool::typed(o, table.len() + 1, kv, dtype)?;
    let (qkv, pos, t) = (
        o.upload_bf16(rows)?,
        o.upload_u32(key_pos)?,
        o.upload_u32(table)?,
    );
    let at = RowSlice {
        rows: n,
        stride,
        offset: 0,
    };
    let (k_col, v_col) = (heads.q_dim(), heads.q_dim() + kv);
    o.kv_append(&qkv, at, k_col, v_col, &pos, &mut pool, &t, 0)?;
    let mut words = o.download_bf16(&pool.k)?;
    words.extend(o.download_bf16(&pool.v)?);
    let q_pos = o.upload_u32(&key_pos[n - nq..])?;
    let mut y = o.upload_bf16(&vec![POISON; nq * heads.q_dim()])?;
    let (q_at, none) = (at.rows_from(n - nq, nq), AttentionContext::NONE);
    o.attention(&qkv, q_at, &q_pos, &pool, &t, n, heads, &mut y, &none)?;
    let words = words.iter().map(|&w| w as f32).collect();
    Ok((words, to_f32(&o.download_bf16(&y)?)))
}

/// The KV element types other than bf16 (f16; Q8 with the keys' channel scale): each backend
/// appends the same rows into its own pool of the type (the words must match), then attends
/// over it: decode on the typed warp kernels, prefill and the tree kernel's head size through
/// the pool widened to bf16.
fn typed_kv_cases<R: DeviceOps, C: DeviceOps>(r: &R, c: &C, rng: &mut Rng) -> Result<Vec<OpCheck>> {
    let mut out = Vec::new();
    for dtype in [KvDtype::F16, KvDtype::Q8] {
        for (label, (n_heads, n_kv_heads, head_dim), blocks, nq) in [
            ("decode 8B shape", (32, 8, 128), 40, 1),
            ("decode hd64 group 3", (9, 3, 64), 20, 1),
            ("decode hd96 (tree)", (4, 2, 96), 6, 1),
            ("prefill hd128", (8, 2, 128), 3, 83),
            ("prefill hd96", (4, 2, 96), 3, 70),
        ] {
            let heads = Heads {
                n_heads,
                n_kv_heads,
                head_dim,
            };
            let key_pos = kept_positions(rng, blocks, 37);
            let stride = heads.q_dim() + 2 * heads.kv_dim();
            let rows = rng.bf16s(key_pos.len() * stride, 2.0);
            // the blocks in reverse slot order
            let table: Vec<u32> = (0..key_pos.len().div_ceil(64) as u32).rev().collect();
            let rows = (&rows[..], stride);
            let (cw, cy) = typed_attention(c, dtype, rows, &key_pos, &table, heads, nq)?;
            let (rw, ry) = typed_attention(r, dtype, rows, &key_pos, &table, heads, nq)?;
            let shape = format!(
                "{nq} queries x {} keys, {n_heads}:{n_kv_heads}x{head_dim}",
                key_pos.len()
            );
            let name = format!("{dtype:?}").to_lowercase();
            record(
                &mut out,
                &format!("kv_append {name} ({label})"),
                shape.clone(),
                &cw,
                &rw,
                0.0,
            );
            out.push(record_one(
                &format!("attention over {name} KV, {label}"),
                shape,
                (cy, ry),
            ));
        }
    }
    Ok(out)
}
