//! Causal attention over explicit positions, tiled by query rows, for grouped-query heads.
//!
//! Queries and keys carry their own position ids, so the same kernel serves a dense prefill,
//! a decode step, and SlimInfer's rectangular case (kept query rows against kept keys with
//! arbitrary, increasing positions). A query at position p sees every key at position <= p.
//!
//! Work is split into tasks of (KV head, tile of up to `TILE_ROWS` query rows); the query heads
//! that share a KV head are stacked so each task reads its keys once. A task walks the keys in
//! blocks, only up to the last key any of its rows can see (the causal skip): one GEMM makes the
//! score block, an online softmax (running max and sum per row) turns it into weights, and a
//! second GEMM accumulates weights x V. Scratch per thread is one score block: no n x n buffer.
//!
//! The cache holds K and V in a 16-bit dtype; a task widens each key block of its KV head to
//! f32 before the GEMMs (a small cost next to them). A single query row (a decode step) goes to
//! [`super::decode_attention`] instead, which splits the keys rather than the query rows.

use std::ops::Range;

use gemm::Parallelism;
use rayon::prelude::*;

pub use super::attention_kind::{attention_in_place_with, AttentionKind};
use super::decode_attention::decode_attention;
use super::heads::Heads;
use super::kv_format::{KvDtype, KvView};
use super::simd;

/// Query rows per task.
const TILE_ROWS: usize = 64;
/// Keys per online-softmax step: a (3*64, 256) f32 score block is 192 KiB, inside L2.
const KEY_BLOCK: usize = 256;

/// The query and output buffers of a tiled attention (this kernel's and the 8-bit one's),
/// shared by tasks that read and write disjoint (row, head) cells; the two may be one buffer
/// ([`attention_in_place`]).
#[derive(Clone, Copy)]
pub(super) struct Cells {
    pub(super) q: *const f32,
    pub(super) out: *mut f32,
}
// SAFETY: every task reads and writes a disjoint set of (row, head) cells; see `tiled`.
unsafe impl Send for Cells {}
unsafe impl Sync for Cells {}

impl Cells {
    /// Methods, not field accesses, so closures capture the Send wrapper, not the raw pointers.
    /// The `hd` query floats at `offset`.
    ///
    /// # Safety
    /// `offset + hd` is inside the query buffer, and no task writes those cells while the
    /// returned slice lives.
    pub(super) unsafe fn q_at<'a>(self, offset: usize, hd: usize) -> &'a [f32] {
        unsafe { std::slice::from_raw_parts(self.q.add(offset), hd) }
    }

    fn out_at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the output buffer this pointer came from.
        unsafe { self.out.add(offset) }
    }
}

/// out = softmax(q k^T / sqrt(hd) + causal mask) v, per head.
///
/// - q: (nq, n_heads * hd), q_pos: (nq)
/// - kv: k, v (nk, n_kv_heads * hd) and their positions (nk), strictly increasing
/// - key_ranges: the rows of k/v that may be attended to (SlimInfer's active blocks plus the
///   generated tokens), sorted and disjoint; `&[0..nk]` for all of them
/// - out: (nq, n_heads * hd)
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    q_pos: &[u32],
    kv: KvView,
    key_ranges: &[Range<usize>],
    shape: Heads,
    out: &mut [f32],
) -> candle_core::Result<()> {
    check(q.len(), out.len(), q_pos, kv, key_ranges, shape)?;
    if q_pos.len() == 1 {
        decode_attention(q, q_pos[0], kv, key_ranges, shape, out);
        return Ok(());
    }
    let cells = Cells {
        q: q.as_ptr(),
        out: out.as_mut_ptr(),
    };
    // SAFETY: q and out are distinct slices of nq * n_heads * hd floats (checked above)
    unsafe { tiled(cells, q_pos, kv, key_ranges, shape) };
    Ok(())
}

/// Each query head times its KV head's key scale, in place (Q8 keys are stored divided by a
/// per-channel scale, so `q·k = (q∘s)·(k/s)`); nothing for an empty scale. q: rows of
/// `shape.n_heads` heads of `shape.head_dim`; k_scale: `n_kv_heads * head_dim`.
pub fn scale_queries(q: &mut [f32], k_scale: &[f32], shape: Heads) {
    if k_scale.is_empty() {
        return;
    }
    let hd = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    for row in q.chunks_exact_mut(shape.n_heads * hd) {
        for (h, head) in row.chunks_exact_mut(hd).enumerate() {
            let s = &k_scale[h / group * hd..][..hd];
            head.iter_mut().zip(s).for_each(|(x, s)| *x *= s);
        }
    }
}

/// [`attention`] with the output written over the queries: `qo` holds q (nq, n_heads * hd) on
/// entry and the attention output on return, bit for bit what [`attention`] writes to `out`.
/// A long prefill then holds one (nq, n_heads * hd) buffer for both, not two.
pub fn attention_in_place(
    qo: &mut [f32],
    q_pos: &[u32],
    kv: KvView,
    key_ranges: &[Range<usize>],
    shape: Heads,
) -> candle_core::Result<()> {
    check(qo.len(), qo.len(), q_pos, kv, key_ranges, shape)?;
    if q_pos.len() == 1 {
        let q = qo.to_vec(); // one row
        decode_attention(&q, q_pos[0], kv, key_ranges, shape, qo);
        return Ok(());
    }
    let p = qo.as_mut_ptr();
    // SAFETY: a task reads the query cells it will write, all of them before it writes any
    // (see `tiled`), and no other task touches them
    unsafe { tiled(Cells { q: p, out: p }, q_pos, kv, key_ranges, shape) };
    Ok(())
}

/// The checks every entry point makes (here and in [`super::attention_int8`]): shapes,
/// positions and key ranges.
pub(super) fn check(
    q_len: usize,
    out_len: usize,
    q_pos: &[u32],
    kv: KvView,
    key_ranges: &[Range<usize>],
    shape: Heads,
) -> candle_core::Result<()> {
    let Heads {
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = shape;
    if n_kv_heads == 0 || hd == 0 || n_heads % n_kv_heads != 0 {
        candle_core::bail!(
            "attention: {n_heads} query heads cannot share {n_kv_heads} KV heads of size {hd}"
        )
    }
    let (nq, nk) = (q_pos.len(), kv.positions.len());
    let (q_stride, kv_stride) = (n_heads * hd, n_kv_heads * hd);
    if q_len != nq * q_stride || out_len != nq * q_stride {
        candle_core::bail!(
            "attention: q/out have {q_len}/{out_len} floats, want ({nq}, {q_stride})"
        )
    }
    let kv_words = kv.dtype.stored_len(kv_stride); // stored words per key row
    if kv.k.len() != nk * kv_words || kv.v.len() != nk * kv_words {
        candle_core::bail!(
            "attention: k/v have {}/{} words, want ({nk}, {kv_words})",
            kv.k.len(),
            kv.v.len()
        )
    }
    if kv.positions.windows(2).any(|w| w[0] >= w[1]) {
        candle_core::bail!("attention: key positions are not strictly increasing")
    }
    let ordered = key_ranges.windows(2).all(|w| w[0].end <= w[1].start);
    if !ordered || key_ranges.iter().any(|r| r.start > r.end || r.end > nk) {
        candle_core::bail!(
            "attention: key ranges {key_ranges:?} are not sorted, disjoint ranges within 0..{nk}"
        )
    }
    Ok(())
}

/// The query rows in tiles of `TILE_ROWS`, one task per (KV head, tile), over both cores.
///
/// # Safety
/// `cells.q` and `cells.out` point to (nq, n_heads * hd) floats each, checked by [`check`]; they
/// may be the same buffer: a task copies its (row, head) query cells into its scratch before
/// it writes the same cells of the output, and tasks' cells are disjoint.
unsafe fn tiled(
    cells: Cells,
    q_pos: &[u32],
    kv: KvView,
    key_ranges: &[Range<usize>],
    shape: Heads,
) {
    let k_pos = kv.positions;
    let nq = q_pos.len();
    let (n_heads, n_kv_heads, hd) = (shape.n_heads, shape.n_kv_heads, shape.head_dim);
    let q_stride = n_heads * hd;
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let n_tiles = nq.div_ceil(TILE_ROWS);

    (0..n_kv_heads * n_tiles).into_par_iter().for_each(|task| {
        let (g, tile) = (task % n_kv_heads, task / n_kv_heads);
        let r0 = tile * TILE_ROWS;
        let rows = TILE_ROWS.min(nq - r0);
        let tile_pos = &q_pos[r0..r0 + rows];
        let max_pos = tile_pos.iter().copied().max().unwrap_or(0);
        let keys = k_pos.partition_point(|&p| p <= max_pos);
        // visible[r]: how many keys query row r may see (keys are sorted by position)
        let visible: Vec<usize> = tile_pos
            .iter()
            .map(|&p| k_pos[..keys].partition_point(|&kp| kp <= p))
            .collect();
        SCRATCH.with_borrow_mut(|scratch| {
            let ot = tile_task(
                cells, kv, g, r0, rows, keys, key_ranges, &visible, shape, scale, scratch,
            );
            for h in 0..group {
                let head = g * group + h;
                for r in 0..rows {
                    let src = &ot[(h * rows + r) * hd..][..hd];
                    // SAFETY: cell (r0 + r, head) belongs to this task only: tasks differ in tile
                    // (rows) or in KV head g (heads g*group..(g+1)*group); the offset is in bounds
                    // because r0 + r < nq and head < n_heads. tile_task has read this task's
                    // query cells already.
                    unsafe {
                        let dst = cells.out_at((r0 + r) * q_stride + head * hd);
                        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, hd);
                    }
                }
            }
        });
    });
}

/// Per-thread buffers, reused across tasks and calls so large tiles don't fault in fresh pages.
#[derive(Default)]
struct Scratch {
    /// (group * rows, hd) scaled queries
    qt: Vec<f32>,
    /// (group * rows, KEY_BLOCK) scores, then probabilities
    s: Vec<f32>,
    /// (group * rows, hd) output accumulator
    ot: Vec<f32>,
    /// (group * rows) running max and sum of the online softmax
    max: Vec<f32>,
    sum: Vec<f32>,
    /// (KEY_BLOCK, hd) one key block of this KV head, widened to f32; then its values
    kvt: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// One task: the query heads of KV head `g` for query rows r0..r0+rows, against the rows of
/// `key_ranges` below `keys`, one block of `KEY_BLOCK` keys at a time with an online softmax.
/// Returns (group*rows, hd).
#[allow(clippy::too_many_arguments)]
fn tile_task<'s>(
    cells: Cells,
    kv: KvView,
    g: usize,
    r0: usize,
    rows: usize,
    keys: usize,
    key_ranges: &[Range<usize>],
    visible: &[usize],
    shape: Heads,
    scale: f32,
    scratch: &'s mut Scratch,
) -> &'s [f32] {
    let Heads {
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = shape;
    let group = n_heads / n_kv_heads;
    let (q_stride, kv_stride) = (n_heads * hd, n_kv_heads * hd);
    let m = group * rows;
    let Scratch {
        qt,
        s,
        ot,
        max,
        sum,
        kvt,
    } = scratch;
    kvt.resize(KEY_BLOCK * hd, 0.0);
    qt.resize(m * hd, 0.0);
    s.resize(m * KEY_BLOCK, 0.0);
    ot.clear();
    ot.resize(m * hd, 0.0);
    max.clear();
    max.resize(m, f32::NEG_INFINITY);
    sum.clear();
    sum.resize(m, 0.0);
    // qt row (h, r) = q[r0 + r, head g*group + h] / sqrt(hd)
    for h in 0..group {
        let head = g * group + h;
        for r in 0..rows {
            // SAFETY: in bounds (r0 + r < nq, head < n_heads); only this task writes these cells,
            // after this loop
            let src = unsafe { cells.q_at((r0 + r) * q_stride + head * hd, hd) };
            for (d, x) in qt[(h * rows + r) * hd..][..hd].iter_mut().zip(src) {
                *d = x * scale;
            }
        }
    }
    let blocks = key_ranges.iter().flat_map(|r| {
        let end = r.end.min(keys);
        (r.start..end)
            .step_by(KEY_BLOCK)
            .map(move |j0| (j0, KEY_BLOCK.min(end - j0)))
    });
    for (j0, kb) in blocks {
        widen_head_rows(kv.dtype, kv.k, j0, kb, kv_stride, g * hd, hd, kvt);
        // s: (m, kb) = qt (m, hd) . K_g[j0..j0+kb]^T (hd, kb)
        // SAFETY: qt is (m, hd) row-major; K^T element (d, j) = kvt[j*hd + d] with j < kb, and
        // kvt holds KEY_BLOCK*hd >= kb*hd floats; s holds m*KEY_BLOCK >= m*kb floats, row
        // stride kb.
        unsafe {
            gemm::gemm(
                m,
                kb,
                hd,
                s.as_mut_ptr(),
                1,
                kb as isize,
                false,
                qt.as_ptr(),
                1,
                hd as isize,
                kvt.as_ptr(),
                hd as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
        for h in 0..group {
            for (r, &vis) in visible.iter().enumerate().take(rows) {
                let i = h * rows + r;
                let valid = vis.saturating_sub(j0).min(kb);
                let row = &mut s[i * kb..][..kb];
                let (new_max, new_sum, correction) =
                    simd::softmax_block_row(row, valid, max[i], sum[i]);
                if correction != 1.0 {
                    ot[i * hd..][..hd].iter_mut().for_each(|o| *o *= correction);
                }
                max[i] = new_max;
                sum[i] = new_sum;
            }
        }
        widen_head_rows(kv.dtype, kv.v, j0, kb, kv_stride, g * hd, hd, kvt);
        // ot (m, hd) += s (m, kb) . V_g[j0..j0+kb] (kb, hd)
        // SAFETY: s is (m, kb) row-major; V element (j, d) = kvt[j*hd + d], j < kb; ot is
        // (m, hd) row-major.
        unsafe {
            gemm::gemm(
                m,
                hd,
                kb,
                ot.as_mut_ptr(),
                1,
                hd as isize,
                true,
                s.as_ptr(),
                1,
                kb as isize,
                kvt.as_ptr(),
                1,
                hd as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    }
    for (row, &total) in ot.chunks_mut(hd).zip(sum.iter()) {
        let inv = if total > 0.0 { 1.0 / total } else { 0.0 };
        row.iter_mut().for_each(|o| *o *= inv);
    }
    ot
}

/// Rows j0..j0+kb of one head (columns col..col+hd of rows of `stride`) widened to f32 into
/// `out` (kb, hd).
#[allow(clippy::too_many_arguments)]
fn widen_head_rows(
    dtype: KvDtype,
    src: &[u16],
    j0: usize,
    kb: usize,
    stride: usize,
    col: usize,
    hd: usize,
    out: &mut [f32],
) {
    // stored words: 16-bit types one per value, Q8 groups never straddle a head
    let (stride, col, len) = (
        dtype.stored_len(stride),
        dtype.stored_len(col),
        dtype.stored_len(hd),
    );
    for (j, o) in out[..kb * hd].chunks_exact_mut(hd).enumerate() {
        dtype.decode(&src[(j0 + j) * stride + col..][..len], o);
    }
}

/// Plain reference: one query row and head at a time, exact softmax. For tests.
pub fn attention_reference(
    q: &[f32],
    q_pos: &[u32],
    k: &[f32],
    v: &[f32],
    k_pos: &[u32],
    shape: Heads,
) -> Vec<f32> {
    let Heads {
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = shape;
    let group = n_heads / n_kv_heads;
    let (q_stride, kv_stride) = (n_heads * hd, n_kv_heads * hd);
    let mut out = vec![0.0f32; q_pos.len() * q_stride];
    for (r, &p) in q_pos.iter().enumerate() {
        for h in 0..n_heads {
            let g = h / group;
            let qv = &q[r * q_stride + h * hd..][..hd];
            let scores: Vec<(usize, f64)> = (0..k_pos.len())
                .filter(|&j| k_pos[j] <= p)
                .map(|j| {
                    let kv = &k[j * kv_stride + g * hd..][..hd];
                    let dot: f64 = qv.iter().zip(kv).map(|(a, b)| *a as f64 * *b as f64).sum();
                    (j, dot / (hd as f64).sqrt())
                })
                .collect();
            let max = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = scores.iter().map(|s| (s.1 - max).exp()).sum();
            for &(j, sc) in &scores {
                let w = (sc - max).exp() / sum;
                for d in 0..hd {
                    out[r * q_stride + h * hd + d] +=
                        (w * v[j * kv_stride + g * hd + d] as f64) as f32;
                }
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // one key range covering every key is the common case
mod tests {
    use super::*;

    /// K and V narrowed to f16 bits, and widened back for the reference (so the reference
    /// sees the same rounded values and only the arithmetic is compared).
    struct Kv16 {
        k: Vec<u16>,
        v: Vec<u16>,
        kf: Vec<f32>,
        vf: Vec<f32>,
    }

    fn kv16(k: &[f32], v: &[f32]) -> Kv16 {
        let dtype = KvDtype::F16;
        let (mut k16, mut v16) = (vec![0u16; k.len()], vec![0u16; v.len()]);
        dtype.encode(k, &mut k16);
        dtype.encode(v, &mut v16);
        let (mut kf, mut vf) = (vec![0f32; k.len()], vec![0f32; v.len()]);
        dtype.decode(&k16, &mut kf);
        dtype.decode(&v16, &mut vf);
        Kv16 {
            k: k16,
            v: v16,
            kf,
            vf,
        }
    }

    fn view<'a>(c: &'a Kv16, positions: &'a [u32]) -> KvView<'a> {
        KvView {
            k: &c.k,
            v: &c.v,
            positions,
            dtype: KvDtype::F16,
        }
    }

    /// Deterministic pseudo-random values in [-1, 1).
    fn patterned(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn check(q_pos: &[u32], k_pos: &[u32], shape: Heads, seed: u64) {
        let Heads {
            n_heads,
            n_kv_heads,
            head_dim,
        } = shape;
        let q = patterned(q_pos.len() * n_heads * head_dim, seed);
        let k = patterned(k_pos.len() * n_kv_heads * head_dim, seed + 1);
        let v = patterned(k_pos.len() * n_kv_heads * head_dim, seed + 2);
        let c = kv16(&k, &v);
        let mut out = vec![f32::NAN; q.len()];
        attention(
            &q,
            q_pos,
            view(&c, k_pos),
            &[0..k_pos.len()],
            shape,
            &mut out,
        )
        .unwrap();
        // written over the queries: the same bits
        let mut qo = q.clone();
        attention_in_place(&mut qo, q_pos, view(&c, k_pos), &[0..k_pos.len()], shape).unwrap();
        assert!(
            qo.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()),
            "in place differs (nq {})",
            q_pos.len()
        );
        let want = attention_reference(&q, q_pos, &c.kf, &c.vf, k_pos, shape);
        let worst = out
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            worst < 2e-5,
            "max abs error {worst} (nq {}, nk {})",
            q_pos.len(),
            k_pos.len()
        );
    }

    const GQA: Heads = Heads {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };

    #[test]
    fn prefill_of_odd_length_matches_reference() {
        let pos: Vec<u32> = (0..203).collect();
        check(&pos, &pos, GQA, 1);
    }

    #[test]
    fn continuation_after_cached_prefix_matches_reference() {
        let k_pos: Vec<u32> = (0..150).collect();
        check(&k_pos[97..], &k_pos, GQA, 2);
    }

    #[test]
    fn single_query_decode_matches_reference() {
        let k_pos: Vec<u32> = (0..77).collect();
        check(
            &[76],
            &k_pos,
            Heads {
                n_heads: 4,
                n_kv_heads: 1,
                head_dim: 24,
            },
            3,
        );
    }

    #[test]
    fn pruned_rows_with_gapped_positions_match_reference() {
        // kept keys and queries with holes in their positions, as after SlimInfer's row drop
        let k_pos: Vec<u32> = (0..300)
            .filter(|p| p % 7 != 3 && !(64..128).contains(p))
            .collect();
        let q_pos: Vec<u32> = k_pos.iter().copied().filter(|p| p % 3 == 0).collect();
        check(&q_pos, &k_pos, GQA, 4);
    }

    #[test]
    fn key_ranges_equal_attention_over_the_gathered_keys() {
        let shape = GQA;
        let kv_dim = shape.n_kv_heads * shape.head_dim;
        let k_pos: Vec<u32> = (0..400).collect();
        let q_pos: Vec<u32> = vec![150, 399];
        let ranges = [0..64, 192..256, 300..400];
        let q = patterned(q_pos.len() * shape.n_heads * shape.head_dim, 8);
        let k = patterned(k_pos.len() * kv_dim, 9);
        let v = patterned(k_pos.len() * kv_dim, 10);
        let c = kv16(&k, &v);
        let (k, v) = (&c.kf, &c.vf);
        let mut out = vec![f32::NAN; q.len()];
        attention(&q, &q_pos, view(&c, &k_pos), &ranges, shape, &mut out).unwrap();
        let rows: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
        let gather = |x: &[f32]| {
            rows.iter()
                .flat_map(|&j| x[j * kv_dim..][..kv_dim].to_vec())
                .collect::<Vec<_>>()
        };
        let sub_pos: Vec<u32> = rows.iter().map(|&j| k_pos[j]).collect();
        let want = attention_reference(&q, &q_pos, &gather(k), &gather(v), &sub_pos, shape);
        let worst = out
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(worst < 2e-5, "max abs error {worst}");
    }

    #[test]
    fn query_before_every_key_outputs_zero() {
        let shape = Heads {
            n_heads: 2,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let q = patterned(16, 5);
        let k = patterned(3 * 16, 6);
        let v = patterned(3 * 16, 7);
        let c = kv16(&k, &v);
        let mut out = vec![f32::NAN; 16];
        attention(&q, &[1], view(&c, &[5, 6, 7]), &[0..3], shape, &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 0.0));
        let mut out = vec![f32::NAN; 32];
        let q2 = [q.clone(), q].concat();
        attention(&q2, &[1, 2], view(&c, &[5, 6, 7]), &[0..3], shape, &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn unsorted_key_positions_are_rejected() {
        let shape = Heads {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 4,
        };
        let mut out = vec![0.0; 4];
        let c = kv16(&[0.0; 8], &[0.0; 8]);
        assert!(attention(&[0.0; 4], &[9], view(&c, &[3, 2]), &[0..2], shape, &mut out).is_err());
        assert!(attention(
            &[0.0; 4],
            &[9],
            view(&c, &[2, 3]),
            &[1..2, 0..1],
            shape,
            &mut out
        )
        .is_err());
    }
}
