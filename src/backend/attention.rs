//! Causal attention over explicit positions, tiled by query rows, for grouped-query heads.
//!
//! Queries and keys carry their own position ids, so the same kernel serves a dense prefill,
//! a decode step, and SlimInfer's rectangular case (kept query rows against kept keys with
//! arbitrary, increasing positions). A query at position p sees every key at position <= p.
//!
//! Work is split into tasks of (KV head, tile of up to `TILE_ROWS` query rows); the query heads
//! that share a KV head are stacked so each task reads its keys once. A task computes the score
//! tile (heads*rows, keys) with one GEMM, only up to the last key any of its rows can see (the
//! causal skip), masks and softmaxes each row, and multiplies by V with a second GEMM. Scratch
//! per task is (heads*rows, keys) floats: no n x n buffer is ever built.

use gemm::Parallelism;
use rayon::prelude::*;

use super::simd;

/// Query rows per task.
const TILE_ROWS: usize = 64;

#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Raw output pointer shared by tasks that write disjoint (row, head) cells.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of (row, head) cells of `out`; see `attention`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method, not a field access, so closures capture the Send wrapper, not the raw pointer.
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the `out` slice this pointer came from.
        unsafe { self.0.add(offset) }
    }
}

/// out = softmax(q k^T / sqrt(hd) + causal mask) v, per head.
///
/// - q: (nq, n_heads * hd), q_pos: (nq)
/// - k, v: (nk, n_kv_heads * hd), k_pos: (nk), strictly increasing
/// - out: (nq, n_heads * hd)
pub fn attention(
    q: &[f32],
    q_pos: &[u32],
    k: &[f32],
    v: &[f32],
    k_pos: &[u32],
    shape: AttnShape,
    out: &mut [f32],
) -> candle_core::Result<()> {
    let AttnShape { n_heads, n_kv_heads, head_dim: hd } = shape;
    let (nq, nk) = (q_pos.len(), k_pos.len());
    let (q_stride, kv_stride) = (n_heads * hd, n_kv_heads * hd);
    if q.len() != nq * q_stride || out.len() != nq * q_stride {
        candle_core::bail!("attention: q/out have {}/{} floats, want ({nq}, {q_stride})", q.len(), out.len())
    }
    if k.len() != nk * kv_stride || v.len() != nk * kv_stride {
        candle_core::bail!("attention: k/v have {}/{} floats, want ({nk}, {kv_stride})", k.len(), v.len())
    }
    if k_pos.windows(2).any(|w| w[0] >= w[1]) {
        candle_core::bail!("attention: key positions are not strictly increasing")
    }
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let n_tiles = nq.div_ceil(TILE_ROWS);
    let out_ptr = OutPtr(out.as_mut_ptr());

    (0..n_kv_heads * n_tiles).into_par_iter().for_each(|task| {
        let (g, tile) = (task % n_kv_heads, task / n_kv_heads);
        let r0 = tile * TILE_ROWS;
        let rows = TILE_ROWS.min(nq - r0);
        let m = group * rows;
        let tile_pos = &q_pos[r0..r0 + rows];
        let max_pos = tile_pos.iter().copied().max().unwrap_or(0);
        let keys = k_pos.partition_point(|&p| p <= max_pos);

        // qt: (group * rows, hd), scaled; row (h, r) = q[r0 + r, (g*group + h)]
        let mut qt = vec![0.0f32; m * hd];
        for h in 0..group {
            let head = g * group + h;
            for r in 0..rows {
                let src = &q[(r0 + r) * q_stride + head * hd..][..hd];
                let dst = &mut qt[(h * rows + r) * hd..][..hd];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = s * scale;
                }
            }
        }
        let mut ot = vec![0.0f32; m * hd];
        if keys > 0 {
            // s: (m, keys) = qt (m, hd) . K_g^T (hd, keys)
            let mut s = vec![0.0f32; m * keys];
            // SAFETY: all pointers and strides describe in-bounds (rows, cols) views:
            // qt is (m, hd) row-major; K_g^T element (d, j) = k[j*kv_stride + g*hd + d] for j < keys <= nk;
            // s is (m, keys) row-major.
            unsafe {
                gemm::gemm(
                    m, keys, hd,
                    s.as_mut_ptr(), 1, keys as isize, false,
                    qt.as_ptr(), 1, hd as isize,
                    k.as_ptr().add(g * hd), kv_stride as isize, 1,
                    0.0, 1.0, false, false, false, Parallelism::None,
                );
            }
            for h in 0..group {
                for (r, &p) in tile_pos.iter().enumerate() {
                    let visible = k_pos[..keys].partition_point(|&kp| kp <= p);
                    simd::softmax_prefix(&mut s[(h * rows + r) * keys..][..keys], visible);
                }
            }
            // ot: (m, hd) = s (m, keys) . V_g (keys, hd)
            // SAFETY: s is (m, keys) row-major; V_g element (j, d) = v[j*kv_stride + g*hd + d];
            // ot is (m, hd) row-major.
            unsafe {
                gemm::gemm(
                    m, hd, keys,
                    ot.as_mut_ptr(), 1, hd as isize, false,
                    s.as_ptr(), 1, keys as isize,
                    v.as_ptr().add(g * hd), 1, kv_stride as isize,
                    0.0, 1.0, false, false, false, Parallelism::None,
                );
            }
        }
        for h in 0..group {
            let head = g * group + h;
            for r in 0..rows {
                let src = &ot[(h * rows + r) * hd..][..hd];
                // SAFETY: cell (r0 + r, head) belongs to this task only: tasks differ in tile
                // (rows) or in KV head g (heads g*group..(g+1)*group); the offset is in bounds
                // because r0 + r < nq and head < n_heads.
                unsafe {
                    let dst = out_ptr.at((r0 + r) * q_stride + head * hd);
                    std::ptr::copy_nonoverlapping(src.as_ptr(), dst, hd);
                }
            }
        }
    });
    Ok(())
}

/// Plain reference: one query row and head at a time, exact softmax. For tests.
pub fn attention_reference(
    q: &[f32],
    q_pos: &[u32],
    k: &[f32],
    v: &[f32],
    k_pos: &[u32],
    shape: AttnShape,
) -> Vec<f32> {
    let AttnShape { n_heads, n_kv_heads, head_dim: hd } = shape;
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
                    out[r * q_stride + h * hd + d] += (w * v[j * kv_stride + g * hd + d] as f64) as f32;
                }
            }
        }
    }
    out
}
