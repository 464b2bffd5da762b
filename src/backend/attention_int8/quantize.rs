//! K and V of a call quantised once for all its tasks (the module docs of [`super`] say how:
//! smoothed keys with a scale a key, values smoothed and scaled per channel and block), laid
//! out for the path that reads them: four keys of a channel together (VNNI, portable) or a
//! channel's keys in a row (tiles).

use rayon::prelude::*;

use super::BLOCK;
use crate::backend::kv_format::KvView;

/// K and V of every cached row, quantised for all tasks of a call.
pub(super) struct Quantized {
    pub(super) nk: usize,
    /// groups of four keys in `v4` (nk / 4 rounded up)
    pub(super) groups: usize,
    /// (n_kv_heads, nk, hd): smoothed keys, and 16 rows of zeros (the tiles read keys in 16s)
    pub(super) kq: Vec<i8>,
    /// (n_kv_heads, nk): each key's scale
    pub(super) kscale: Vec<f32>,
    /// (n_kv_heads, nk): where each key's dot starts, -128 x the sum of the key's bytes (what
    /// the u8 query offset adds, taken off)
    pub(super) kstart: Vec<i32>,
    /// (n_kv_heads, groups, hd, 4): smoothed values, four keys of a channel together (VNNI and
    /// portable paths; empty on tiles)
    pub(super) v4: Vec<i8>,
    /// (n_kv_heads, hd, vt_stride): smoothed values, a channel's keys in a row, zeros past nk
    /// (tile paths; empty otherwise)
    pub(super) vt: Vec<i8>,
    pub(super) vt_stride: usize,
    /// (n_kv_heads, nk / BLOCK rounded up, hd): each channel's scale in each block
    pub(super) vscale: Vec<f32>,
    /// (n_kv_heads, hd): the mean value, added back to the output
    pub(super) vmean: Vec<f32>,
    /// (n_kv_heads, hd): each key channel's divisor, the queries' factor
    pub(super) kchan: Vec<f32>,
}

/// One block of `quantize`'s output before it is assembled.
struct BlockOut {
    kq: Vec<i8>,
    kscale: Vec<f32>,
    kstart: Vec<i32>,
    /// (n_kv_heads, hd, kb)
    vt: Vec<i8>,
    vscale: Vec<f32>,
}

/// round(x) to nearest even, clamped to ±127 (the low mantissa bits of x + 1.5 * 2^23: no libm
/// call where the baseline has no rounding instruction).
#[inline(always)]
pub(super) fn round_i8(x: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-127.0, 127.0);
    ((x + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32) as i8
}

/// Widen, smooth and round K and V (see the module docs), one block of keys per task.
pub(super) fn quantize(kv: KvView, n_kv: usize, hd: usize, qmax: &[f32], tiles: bool) -> Quantized {
    let nk = kv.positions.len();
    let kv_dim = n_kv * hd;
    let words = kv.dtype.stored_len(kv_dim);
    let nb = nk.div_ceil(BLOCK);
    let widen = |src: &[u16], b: usize| {
        let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(nk));
        let mut out = vec![0.0f32; (j1 - j0) * kv_dim];
        kv.dtype.decode(&src[j0 * words..j1 * words], &mut out);
        out
    };
    // per column: sum, min and max
    type Stats = (Vec<f64>, Vec<f32>, Vec<f32>);
    let empty = || -> Stats {
        (
            vec![0.0; kv_dim],
            vec![f32::INFINITY; kv_dim],
            vec![f32::NEG_INFINITY; kv_dim],
        )
    };
    let columns = |x: &[f32]| {
        let mut st = empty();
        for row in x.chunks_exact(kv_dim) {
            for (c, &x) in row.iter().enumerate() {
                st.0[c] += x as f64;
                st.1[c] = st.1[c].min(x);
                st.2[c] = st.2[c].max(x);
            }
        }
        st
    };
    let merge = |mut a: Stats, b: Stats| {
        a.0.iter_mut().zip(b.0).for_each(|(a, b)| *a += b);
        a.1.iter_mut().zip(b.1).for_each(|(a, b)| *a = a.min(b));
        a.2.iter_mut().zip(b.2).for_each(|(a, b)| *a = a.max(b));
        a
    };
    let (kst, vst) = (0..nb)
        .into_par_iter()
        .map(|b| (columns(&widen(kv.k, b)), columns(&widen(kv.v, b))))
        .reduce(
            || (empty(), empty()),
            |a, b| (merge(a.0, b.0), merge(a.1, b.1)),
        );
    let mean =
        |s: &[f64]| -> Vec<f32> { s.iter().map(|&x| (x / nk.max(1) as f64) as f32).collect() };
    let (kmean, vmean) = (mean(&kst.0), mean(&vst.0));
    // SmoothQuant's balance (Xiao et al., arXiv 2211.10438, migration strength 1/2): channel c of
    // the smoothed keys is divided by sqrt(max|k_c| / max|q_c|) and the queries multiplied by it,
    // so both operands of a channel span the same range and quiet channels keep their levels
    let kchan: Vec<f32> = (0..kv_dim)
        .map(|c| {
            let ka = (kst.2[c] - kmean[c]).max(kmean[c] - kst.1[c]);
            let r = (ka / qmax[c]).sqrt();
            if r.is_finite() && r > 0.0 {
                r
            } else {
                1.0
            }
        })
        .collect();
    let blocks: Vec<BlockOut> = (0..nb)
        .into_par_iter()
        .map(|b| {
            let (k, v) = (widen(kv.k, b), widen(kv.v, b));
            let kb = k.len() / kv_dim;
            let mut o = BlockOut {
                kq: vec![0; n_kv * kb * hd],
                kscale: vec![0.0; n_kv * kb],
                kstart: vec![0; n_kv * kb],
                vt: vec![0; n_kv * hd * kb],
                vscale: vec![0.0; n_kv * hd],
            };
            let mut x = vec![0.0f32; hd];
            for g in 0..n_kv {
                let mu = &kmean[g * hd..][..hd];
                let ch = &kchan[g * hd..][..hd];
                for j in 0..kb {
                    let row = &k[j * kv_dim + g * hd..][..hd];
                    for (d, x) in x.iter_mut().enumerate() {
                        *x = (row[d] - mu[d]) / ch[d];
                    }
                    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let scale = amax / 127.0;
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    let q = &mut o.kq[(g * kb + j) * hd..][..hd];
                    q.iter_mut()
                        .zip(&x)
                        .for_each(|(q, &x)| *q = round_i8(x * inv));
                    o.kscale[g * kb + j] = scale;
                    o.kstart[g * kb + j] = -128 * q.iter().map(|&q| q as i32).sum::<i32>();
                }
                for d in 0..hd {
                    let (c, mu) = (g * hd + d, vmean[g * hd + d]);
                    let amax = (0..kb).fold(0.0f32, |m, j| m.max((v[j * kv_dim + c] - mu).abs()));
                    let scale = amax / 127.0;
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    let dst = &mut o.vt[(g * hd + d) * kb..][..kb];
                    for (j, q) in dst.iter_mut().enumerate() {
                        *q = round_i8((v[j * kv_dim + c] - mu) * inv);
                    }
                    o.vscale[g * hd + d] = scale;
                }
            }
            o
        })
        .collect();
    let groups = nk.div_ceil(4);
    // a tile reads 64 keys of a channel from any group's start: the row's keys rounded up, and
    // one tile row more
    let vt_stride = if tiles { nk.div_ceil(64) * 64 + 64 } else { 0 };
    let mut z = Quantized {
        nk,
        groups,
        kq: vec![0; (n_kv * nk + 16) * hd],
        kscale: vec![0.0; n_kv * nk],
        kstart: vec![0; n_kv * nk],
        v4: vec![0; if tiles { 0 } else { n_kv * groups * hd * 4 }],
        vt: vec![0; n_kv * hd * vt_stride],
        vt_stride,
        vscale: vec![0.0; n_kv * nb * hd],
        vmean,
        kchan,
    };
    for (b, o) in blocks.iter().enumerate() {
        let j0 = b * BLOCK;
        let kb = o.kscale.len() / n_kv;
        for g in 0..n_kv {
            z.kq[(g * nk + j0) * hd..][..kb * hd].copy_from_slice(&o.kq[g * kb * hd..][..kb * hd]);
            z.kscale[g * nk + j0..][..kb].copy_from_slice(&o.kscale[g * kb..][..kb]);
            z.kstart[g * nk + j0..][..kb].copy_from_slice(&o.kstart[g * kb..][..kb]);
            for d in 0..hd {
                let src = &o.vt[(g * hd + d) * kb..][..kb];
                if tiles {
                    z.vt[(g * hd + d) * vt_stride + j0..][..kb].copy_from_slice(src);
                    continue;
                }
                for (j, &q) in src.iter().enumerate() {
                    let j = j0 + j;
                    z.v4[((g * groups + j / 4) * hd + d) * 4 + j % 4] = q;
                }
            }
            z.vscale[(g * nb + b) * hd..][..hd].copy_from_slice(&o.vscale[g * hd..][..hd]);
        }
    }
    z
}
