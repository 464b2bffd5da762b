//! The CPU engine's KV behind the seam: rows appended in its element type (Q8 keys divided by
//! the layer's channel scale, fixed at its first append) and attended as the engine's own cache
//! attended before this backend replaced it: a prefill's own rows unrounded (f16) where the pool
//! holds 8 bits, the queries scaled by the key scale otherwise, a subset as key ranges over the
//! layer's rows, a decode row over slot runs where they lie.

use std::cell::RefCell;

use super::{check, check_rows, slice_rows, with_reused};
use crate::backend::attention::scale_queries;
use crate::backend::attention_kind::{attention_in_place_with, AttentionKind};
use crate::backend::decode_attention::decode_attention_runs;
use crate::backend::host_pool;
use crate::backend::kv_format::{first_key_scale, unscale_keys, KvDtype, KvView};
use crate::backend::ops::{AttentionContext, Heads, KvPool, RowSlice, KV_BLOCK};
use crate::Result;

use super::EngineOps;

/// [`crate::backend::ops::Ops::kv_append`]: rows `at` of qkv, keys at column `k_col`, values at
/// `v_col`, each encoded from where it lies straight into its slot.
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
    check("kv_append table", table.len() * KV_BLOCK, row0 + at.rows)?;
    if at.rows == 0 {
        return Ok(());
    }
    check_rows("kv_append rows", qkv, at, k_col.max(v_col) + d)?;
    let q8 = pool.dtype == KvDtype::Q8;
    if q8 && pool.k_scale.is_empty() {
        let keys = slice_rows(qkv, at.columns(k_col), d)?;
        pool.k_scale = first_key_scale(&keys, d);
    }
    let mut scaled = vec![0f32; d];
    for (r, &p) in positions[..at.rows].iter().enumerate() {
        let s = row0 + r;
        let dst = table[s / KV_BLOCK] as usize * KV_BLOCK + s % KV_BLOCK;
        let src = at.offset + r * at.stride;
        let mut k = &qkv[src + k_col..][..d];
        if q8 {
            for ((o, x), c) in scaled.iter_mut().zip(k).zip(&pool.k_scale) {
                *o = x / c;
            }
            k = &scaled;
        }
        pool.dtype.encode(k, &mut pool.k[dst * words..][..words]);
        (pool.dtype).encode(
            &qkv[src + v_col..][..d],
            &mut pool.v[dst * words..][..words],
        );
        pool.pos[dst] = p;
    }
    Ok(())
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
    if at.rows == 1 {
        // decode: the rows where they lie, slot run after slot run, when all are visible
        let (runs, last) = host_pool::runs(pool, table, n_keys)?;
        if last.is_none_or(|p| p <= q_pos[0]) {
            let mut q = slice_rows(q, at, heads.q_dim())?;
            scale_queries(&mut q, &pool.k_scale, heads);
            check("attention out", out.len(), q.len())?;
            decode_attention_runs(&q, &runs, pool.dtype, heads, &mut out[..q.len()]);
            return Ok(());
        }
    }
    // the queries go where the output will be, and are attended in place there
    let qd = heads.q_dim();
    check("attention out", out.len(), at.rows * qd)?;
    check_rows("attention queries", q, at, qd)?;
    let qo = &mut out[..at.rows * qd];
    for (r, row) in qo.chunks_exact_mut(qd).enumerate() {
        row.copy_from_slice(&q[at.offset + r * at.stride..][..qd]);
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
        (Some(cols), Some(old)) if at.rows > 1 && pool.dtype == KvDtype::Q8 => {
            with_reused(&EXACT, |exact| {
                exact_rows(view, old, (q, at, cols), &pool.k_scale, pool.kv_dim, exact);
                attention_in_place_with(kind, qo, q_pos, exact.view(), ranges, heads)
            })?;
        }
        _ => {
            scale_queries(qo, &pool.k_scale, heads);
            attention_in_place_with(kind, qo, q_pos, view, ranges, heads)?;
        }
    }
    Ok(())
}

thread_local! {
    /// A Q8 prefill's layer in f16 for its own attention, reused from layer to layer (a long
    /// prompt's rows are megabytes: fresh pages per layer cost their faults).
    static EXACT: RefCell<host_pool::Rows> = RefCell::new(host_pool::Rows::default());
}

/// A Q8 layer's rows in f16 into `out`: the first `old` widened from the pool's words (keys
/// unscaled), 256 rows at a time, the rest the prefill's own keys and values (rows `at` of
/// `qkv`, at columns `cols`) rounded to f16 only.
fn exact_rows(
    rows: KvView,
    old: usize,
    (qkv, at, (k_col, v_col)): (&[f32], RowSlice, (usize, usize)),
    k_scale: &[f32],
    kv_dim: usize,
    out: &mut host_pool::Rows,
) {
    const CHUNK: usize = 256;
    let words = rows.dtype.stored_len(kv_dim);
    let n = rows.positions.len();
    let mut wide = vec![0f32; CHUNK.min(old.max(1)) * kv_dim];
    for (dst, bits, scale, col) in [
        (&mut out.k, rows.k, k_scale, k_col),
        (&mut out.v, rows.v, &[][..], v_col),
    ] {
        dst.resize(n * kv_dim, 0);
        let (head, tail) = dst.split_at_mut(old * kv_dim);
        for (bits, narrow) in
            (bits[..old * words].chunks(CHUNK * words)).zip(head.chunks_mut(CHUNK * kv_dim))
        {
            let wide = &mut wide[..narrow.len()];
            rows.dtype.decode(bits, wide);
            unscale_keys(wide, scale);
            KvDtype::F16.encode(wide, narrow);
        }
        for (r, narrow) in tail.chunks_exact_mut(kv_dim).enumerate() {
            KvDtype::F16.encode(&qkv[at.offset + r * at.stride + col..][..kv_dim], narrow);
        }
    }
    out.pos.clear();
    out.pos.extend_from_slice(rows.positions);
    out.dtype = KvDtype::F16;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ops::{Ops, KV_BLOCK};
    use crate::backend::qgemv::tests::noise;

    const HEADS: Heads = Heads {
        n_heads: 6,
        n_kv_heads: 2,
        head_dim: 64,
    };

    /// Rows `turns` of one layer's qkv (each row q | k | v) through a pool of `dtype`, every
    /// turn appended then attended as a prefill (`fresh`: with its own keys and values as the
    /// forward passes them); the last turn's output.
    fn prefill_turns(
        dtype: KvDtype,
        qkv: &Vec<f32>,
        turns: &[std::ops::Range<usize>],
        fresh: bool,
    ) -> Vec<f32> {
        let ops = EngineOps::new(
            crate::backend::linear::LinearMode::Int8,
            dtype,
            AttentionKind::Int8,
        );
        let (qd, kvd) = (HEADS.q_dim(), HEADS.kv_dim());
        let width = qd + 2 * kvd;
        let n = qkv.len() / width;
        let mut pool = KvPool::new(&ops, n.div_ceil(KV_BLOCK), kvd).unwrap();
        let table: Vec<u32> = (0..pool.slots as u32).collect();
        let mut out = Vec::new();
        for rows in turns {
            let at = RowSlice {
                rows: rows.len(),
                stride: width,
                offset: rows.start * width,
            };
            let pos: Vec<u32> = (rows.start as u32..rows.end as u32).collect();
            ops.kv_append(qkv, at, qd, qd + kvd, &pos, &mut pool, &table, rows.start)
                .unwrap();
            out = vec![0f32; rows.len() * qd];
            let ctx = AttentionContext {
                fresh: fresh.then_some((qd, qd + kvd)),
                layer: None,
            };
            (Ops::attention(
                &ops, qkv, at, &pos, &pool, &table, rows.end, HEADS, &mut out, &ctx,
            ))
            .unwrap();
        }
        out
    }

    /// A Q8 layer's prefill reads its own rows at f16 precision: bit-identical to an f16 pool on
    /// a first turn (and not so without them, as in decode); on a second turn the earlier rows
    /// come widened from Q8 and the turn's own at f16.
    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one turn: one range of rows
    fn a_q8_prefill_attends_over_its_own_rows_at_f16_precision() {
        let (qd, kvd) = (HEADS.q_dim(), HEADS.kv_dim());
        let n = 200;
        let qkv = noise(n * (qd + 2 * kvd), 3);
        let f16 = prefill_turns(KvDtype::F16, &qkv, &[0..n], true);
        let q8 = prefill_turns(KvDtype::Q8, &qkv, &[0..n], true);
        assert_eq!(q8, f16, "first turn: Q8 prefill = f16 prefill");
        let rounded = prefill_turns(KvDtype::Q8, &qkv, &[0..n], false);
        assert_ne!(rounded, f16, "the int8 rows differ from f16");
        let second = prefill_turns(KvDtype::Q8, &qkv, &[0..120, 120..n], true);
        let whole_f16 = prefill_turns(KvDtype::F16, &qkv, &[0..120, 120..n], true);
        let first_rows_rounded = prefill_turns(KvDtype::Q8, &qkv, &[0..120, 120..n], false);
        assert_ne!(second, whole_f16, "the earlier rows are read from Q8");
        assert_ne!(
            second, first_rows_rounded,
            "the turn's own rows are read at f16"
        );
        let diff = second
            .iter()
            .zip(&whole_f16)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 0.05, "Q8 earlier rows moved the output by {diff}");
    }
}
