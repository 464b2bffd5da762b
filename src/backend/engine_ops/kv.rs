//! The CPU engine's KV behind the seam: rows appended in its element type (Q8 keys divided by
//! the layer's channel scale, fixed at its first append) and attended as the engine's own cache
//! attended before this backend replaced it: a prefill's own rows unrounded (f16) where the pool
//! holds 8 bits, the queries scaled by the key scale otherwise, a subset as key ranges over the
//! layer's rows, a decode row over slot runs where they lie.

use super::{check, slice_rows};
use crate::backend::attention::scale_queries;
use crate::backend::attention_kind::{attention_in_place_with, AttentionKind};
use crate::backend::decode_attention::decode_attention_runs;
use crate::backend::host_pool;
use crate::backend::kv_format::{first_key_scale, unscale_keys, KvDtype, KvView};
use crate::backend::ops::{AttentionContext, Heads, KvPool, RowSlice};
use crate::Result;

use super::EngineOps;

/// [`crate::backend::ops::Ops::kv_append`]: rows `at` of qkv, keys at column `k_col`, values at
/// `v_col`.
pub(super) fn append(
    qkv: &[f32],
    at: RowSlice,
    (k_col, v_col): (usize, usize),
    positions: &[u32],
    pool: &mut KvPool<EngineOps>,
    table: &[u32],
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

/// [`crate::backend::ops::Ops::attention`] with the engine's prefill kernel `kind`.
pub(super) fn attend(
    kind: AttentionKind,
    (q, at, q_pos): (&[f32], RowSlice, &[u32]),
    (pool, table, n_keys): (&KvPool<EngineOps>, &[u32], usize),
    heads: Heads,
    out: &mut [f32],
    ctx: &AttentionContext<'_, EngineOps>,
) -> Result<()> {
    check("attention positions", q_pos.len(), at.rows)?;
    let q_pos = &q_pos[..at.rows];
    let shape = host_pool::attn_shape(heads);
    let mut qo = slice_rows(q, at, heads.q_dim())?;
    if at.rows == 1 {
        // decode: the rows where they lie, slot run after slot run, when all are visible
        let (runs, last) = host_pool::runs(pool, table, n_keys)?;
        if last.is_none_or(|p| p <= q_pos[0]) {
            scale_queries(&mut qo, &pool.k_scale, shape);
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
        Some(l) => (host_pool::PoolRows::of(l.pool, l.table, l.rows)?, l.ranges),
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
            attention_in_place_with(kind, &mut qo, q_pos, exact.view(), ranges, shape)?;
        }
        _ => {
            scale_queries(&mut qo, &pool.k_scale, shape);
            attention_in_place_with(kind, &mut qo, q_pos, view, ranges, shape)?;
        }
    }
    check("attention out", out.len(), qo.len())?;
    out[..qo.len()].copy_from_slice(&qo);
    Ok(())
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
