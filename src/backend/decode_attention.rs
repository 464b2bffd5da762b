//! Attention for one query row (a decode step) against a long KV cache stored narrowed
//! ([`KvDtype`]: 16-bit floats or Q8 groups).
//!
//! The keys a query may see (its `key_ranges`, clipped to the keys at or before its position)
//! are cut into chunks spread over the rayon pool. A chunk walks its keys in blocks of
//! `BLOCK` rows in address order: per KV head it scores the `group` query heads that share the
//! head against each widened K row, takes an online-softmax step per head, then accumulates the
//! widened V rows. Each chunk returns per-head (max, sum, acc); the partials are merged at the
//! end. So every KV byte is read once per step, by one core, and scratch is one block, whatever
//! the context length.
//!
//! Paths ([`Isa`]): the AVX-512 kernel (decode_attention/avx512.rs: head_dim 64, up to 4 query
//! heads per KV head) widens rows straight into registers; the AVX2 and portable paths (and
//! AVX-512 for other shapes) run the generic loops below, which widen a block into an L1-sized
//! f32 buffer first.

use crate::backend::heads::Heads;
use std::ops::Range;

use rayon::prelude::*;

use super::isa::Isa;
use super::kv_format::{KvDtype, KvView};
use super::simd::exp_nonpositive;

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Keys per online-softmax step: a (32, 192) f32 block is 24 KiB, inside L1.
const BLOCK: usize = 32;
/// Keys per parallel chunk, at most (at least MIN_CHUNK, once there are 2 * MIN_CHUNK keys).
const MAX_CHUNK: usize = 1024;
const MIN_CHUNK: usize = 256;
/// Lanes of the fixed-size inner loops (one AVX-512 register of f32).
const LANES: usize = 16;
/// Output columns held in registers while the values of a block stream by.
const WIDE: usize = 4 * LANES;

/// One chunk's softmax state per query head: running max, sum, and unnormalised output.
struct Partial {
    max: Vec<f32>,
    sum: Vec<f32>,
    /// (n_heads, hd)
    acc: Vec<f32>,
}

impl Partial {
    fn new(n_heads: usize, hd: usize) -> Self {
        Self {
            max: vec![f32::NEG_INFINITY; n_heads],
            sum: vec![0.0; n_heads],
            acc: vec![0.0; n_heads * hd],
        }
    }
}

/// A run of consecutive key rows: K and V, each (rows, stored_len(n_kv_heads * hd)) words of one
/// [`KvDtype`].
/// The keys a query attends to are a list of runs read in order (the host cache cut by key
/// ranges, or the KV manager's fast-tier slots and generated rows).
#[derive(Debug, Clone, Copy)]
pub struct KeyRun<'a> {
    pub k: &'a [u16],
    pub v: &'a [u16],
}

/// out (n_heads * hd) = softmax(q k^T / sqrt(hd)) v over the keys of `key_ranges` at positions
/// <= `q_pos`, on the widest path this CPU has. Shapes are checked by the caller
/// ([`super::attention::attention`]); ranges must be sorted, disjoint and within the cache.
pub fn decode_attention(
    q: &[f32],
    q_pos: u32,
    kv: KvView,
    key_ranges: &[Range<usize>],
    shape: Heads,
    out: &mut [f32],
) {
    decode_attention_with(Isa::best(), q, q_pos, kv, key_ranges, shape, out)
}

/// [`decode_attention`] on a chosen path (tests compare every path).
pub fn decode_attention_with(
    isa: Isa,
    q: &[f32],
    q_pos: u32,
    kv: KvView,
    key_ranges: &[Range<usize>],
    shape: Heads,
    out: &mut [f32],
) {
    let stride = kv.dtype.stored_len(shape.n_kv_heads * shape.head_dim); // words per row
    let visible = kv.positions.partition_point(|&p| p <= q_pos);
    let runs: Vec<KeyRun> = key_ranges
        .iter()
        .map(|r| r.start..r.end.min(visible))
        .filter(|r| !r.is_empty())
        .map(|r| KeyRun {
            k: &kv.k[r.start * stride..r.end * stride],
            v: &kv.v[r.start * stride..r.end * stride],
        })
        .collect();
    decode_attention_runs_with(isa, q, &runs, kv.dtype, shape, out)
}

/// out = softmax(q k^T / sqrt(hd)) v over every key of `runs`, read in order, on the widest
/// path this CPU has.
pub fn decode_attention_runs(
    q: &[f32],
    runs: &[KeyRun],
    dtype: KvDtype,
    shape: Heads,
    out: &mut [f32],
) {
    decode_attention_runs_with(Isa::best(), q, runs, dtype, shape, out)
}

/// [`decode_attention_runs`] on a chosen path.
///
/// The result depends only on the logical sequence of keys, not on how it is cut into runs:
/// chunks are cut by logical key count, and a chunk steps its online softmax in blocks of
/// `BLOCK` logical keys whose rows may come from several runs. So the KV manager's fast tier
/// (slots in position order) and the host cache cut by key ranges give bit-identical outputs.
pub fn decode_attention_runs_with(
    isa: Isa,
    q: &[f32],
    runs: &[KeyRun],
    dtype: KvDtype,
    shape: Heads,
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let words = dtype.stored_len(shape.n_kv_heads * hd); // stored words per row
    let active: usize = runs.iter().map(|r| r.k.len() / words).sum();
    if active == 0 {
        out.fill(0.0);
        return;
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let qs: Vec<f32> = q.iter().map(|x| x * scale).collect();
    // A whole number of chunks per thread (7 equal chunks on 2 threads would leave one thread
    // idle for the last), each at most MAX_CHUNK keys so that a core slowed by another process
    // can be helped.
    let threads = rayon::current_num_threads().max(1);
    let chunks = if active < 2 * MIN_CHUNK {
        1
    } else {
        (active.div_ceil(MAX_CHUNK).div_ceil(threads) * threads).min(active / MIN_CHUNK)
    };
    let per_chunk = active.div_ceil(chunks);
    let partials: Vec<Partial> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let (from, to) = (c * per_chunk, ((c + 1) * per_chunk).min(active));
            chunk_on(isa, &qs, runs, from..to, dtype, shape)
        })
        .collect();
    merge(&partials, hd, out);
}

/// Walks the `keys`-th keys of `runs` (counted in order) in blocks of up to `BLOCK` keys.
/// Each block's rows come as pieces, in order (one piece unless the block straddles runs).
struct Blocks<'r, 'a> {
    runs: &'r [KeyRun<'a>],
    stride: usize,
    /// current run and row within it
    run: usize,
    row: usize,
    left: usize,
}

impl<'r, 'a> Blocks<'r, 'a> {
    #[inline(always)]
    fn new(runs: &'r [KeyRun<'a>], stride: usize, keys: Range<usize>) -> Self {
        let mut b = Self {
            runs,
            stride,
            run: 0,
            row: keys.start,
            left: keys.len(),
        };
        while b.run < runs.len() && b.row >= b.rows(b.run) {
            b.row -= b.rows(b.run);
            b.run += 1;
        }
        b
    }

    #[inline(always)]
    fn rows(&self, run: usize) -> usize {
        self.runs[run].k.len() / self.stride
    }

    /// The next block's rows into `pieces`; its key count, or None at the end.
    #[inline(always)]
    fn next_into(&mut self, pieces: &mut Vec<KeyRun<'a>>) -> Option<usize> {
        if self.left == 0 {
            return None;
        }
        let kb = BLOCK.min(self.left);
        pieces.clear();
        let mut need = kb;
        while need > 0 {
            let (r, total) = (self.runs[self.run], self.rows(self.run));
            let take = (total - self.row).min(need);
            if take > 0 {
                let span = self.row * self.stride..(self.row + take) * self.stride;
                pieces.push(KeyRun {
                    k: &r.k[span.clone()],
                    v: &r.v[span],
                });
            }
            need -= take;
            self.row += take;
            if self.row == total {
                self.run += 1;
                self.row = 0;
            }
        }
        self.left -= kb;
        Some(kb)
    }
}

/// out = Σ_c acc_c e^(max_c - M) / Σ_c sum_c e^(max_c - M), per head, M the largest max.
fn merge(partials: &[Partial], hd: usize, out: &mut [f32]) {
    out.fill(0.0);
    let heads = out.len() / hd;
    for h in 0..heads {
        let m = partials
            .iter()
            .map(|p| p.max[h])
            .fold(f32::NEG_INFINITY, f32::max);
        let o = &mut out[h * hd..][..hd];
        let mut total = 0.0;
        for p in partials.iter().filter(|p| p.sum[h] > 0.0) {
            let w = exp_nonpositive(p.max[h] - m);
            total += p.sum[h] * w;
            for (o, a) in o.iter_mut().zip(&p.acc[h * hd..][..hd]) {
                *o += a * w;
            }
        }
        let inv = if total > 0.0 { 1.0 / total } else { 0.0 };
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

fn chunk_on(
    isa: Isa,
    qs: &[f32],
    runs: &[KeyRun],
    keys: Range<usize>,
    dtype: KvDtype,
    shape: Heads,
) -> Partial {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` comes from Isa::available(), so the CPU has these features.
        Isa::Avx512 => avx512::chunk(qs, runs, keys.clone(), dtype, shape)
            // SAFETY: as above.
            .unwrap_or_else(|| unsafe { chunk_avx512(isa, qs, runs, keys, dtype, shape) }),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { chunk_avx2(isa, qs, runs, keys, dtype, shape) },
        _ => chunk::<false>(isa, qs, runs, keys, dtype, shape),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn chunk_avx512(
    isa: Isa,
    qs: &[f32],
    runs: &[KeyRun],
    keys: Range<usize>,
    dtype: KvDtype,
    s: Heads,
) -> Partial {
    chunk::<true>(isa, qs, runs, keys, dtype, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn chunk_avx2(
    isa: Isa,
    qs: &[f32],
    runs: &[KeyRun],
    keys: Range<usize>,
    dtype: KvDtype,
    s: Heads,
) -> Partial {
    chunk::<true>(isa, qs, runs, keys, dtype, s)
}

/// One chunk: keys `keys` (counted in order over `runs`), block by block. `qs` is the query
/// pre-scaled by 1/sqrt(hd). FMA: fuse multiply-adds (the SIMD paths; a fused multiply-add is a
/// libm call without FMA).
#[inline(always)]
fn chunk<const FMA: bool>(
    isa: Isa,
    qs: &[f32],
    runs: &[KeyRun],
    keys: Range<usize>,
    dtype: KvDtype,
    shape: Heads,
) -> Partial {
    let Heads {
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = shape;
    let group = n_heads / n_kv_heads;
    let stride = n_kv_heads * hd;
    let words = dtype.stored_len(stride); // stored words per row
    let mut st = Partial::new(n_heads, hd);
    let mut buf = vec![0.0f32; BLOCK * stride];
    let mut p = vec![0.0f32; n_heads * BLOCK];
    let mut blocks = Blocks::new(runs, words, keys);
    let mut pieces = Vec::with_capacity(4);
    while let Some(kb) = blocks.next_into(&mut pieces) {
        let rows = &mut buf[..kb * stride];
        let mut at = 0;
        for piece in &pieces {
            let n = dtype.values_in(piece.k.len());
            dtype.decode_with(isa, piece.k, &mut rows[at..at + n]);
            at += n;
        }
        // scores p[h][j] = qs_h . k_j[g(h)]: the group's query heads read each key row in turn
        for g in 0..n_kv_heads {
            for j in 0..kb {
                let k = &rows[j * stride + g * hd..][..hd];
                for h in g * group..(g + 1) * group {
                    p[h * BLOCK + j] = dot::<FMA>(&qs[h * hd..][..hd], k);
                }
            }
        }
        // online softmax step per head
        for h in 0..n_heads {
            let ph = &mut p[h * BLOCK..][..kb];
            let new_max = st.max[h].max(lane_max(ph));
            if new_max > st.max[h] && st.sum[h] > 0.0 {
                let c = exp_nonpositive(st.max[h] - new_max);
                st.sum[h] *= c;
                st.acc[h * hd..][..hd].iter_mut().for_each(|a| *a *= c);
            }
            st.max[h] = new_max;
            for x in ph.iter_mut() {
                *x = exp_nonpositive(*x - new_max);
            }
            st.sum[h] += lane_sum(ph);
        }
        let mut at = 0;
        for piece in &pieces {
            let n = dtype.values_in(piece.v.len());
            dtype.decode_with(isa, piece.v, &mut rows[at..at + n]);
            at += n;
        }
        // acc_h += Σ_j p[h][j] v_j[g(h)], LANES output columns at a time in registers
        for h in 0..n_heads {
            let g = h / group;
            let acc = &mut st.acc[h * hd..][..hd];
            let ph = &p[h * BLOCK..][..kb];
            let mut d0 = 0;
            // four registers of outputs per pass: independent FMA chains
            while d0 + WIDE <= hd {
                let mut a: [f32; WIDE] = acc[d0..d0 + WIDE].try_into().unwrap();
                for (j, &w) in ph.iter().enumerate() {
                    let v = &rows[j * stride + g * hd + d0..][..WIDE];
                    for l in 0..WIDE {
                        a[l] = fma::<FMA>(w, v[l], a[l]);
                    }
                }
                acc[d0..d0 + WIDE].copy_from_slice(&a);
                d0 += WIDE;
            }
            while d0 + LANES <= hd {
                let mut a: [f32; LANES] = acc[d0..d0 + LANES].try_into().unwrap();
                for (j, &w) in ph.iter().enumerate() {
                    let v = &rows[j * stride + g * hd + d0..][..LANES];
                    for l in 0..LANES {
                        a[l] = fma::<FMA>(w, v[l], a[l]);
                    }
                }
                acc[d0..d0 + LANES].copy_from_slice(&a);
                d0 += LANES;
            }
            for d in d0..hd {
                acc[d] += ph
                    .iter()
                    .enumerate()
                    .map(|(j, &w)| w * rows[j * stride + g * hd + d])
                    .sum::<f32>();
            }
        }
    }
    st
}

#[inline(always)]
fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Dot product with LANES independent accumulators (vectorisable).
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] = fma::<FMA>(x[l], y[l], acc[l]);
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    tree_sum(acc) + tail
}

/// Sum of LANES values pairwise, halving each step (vectorises; a serial sum is 15 dependent
/// adds).
#[inline(always)]
fn tree_sum(a: [f32; LANES]) -> f32 {
    let mut b = [0.0f32; 8];
    for i in 0..8 {
        b[i] = a[i] + a[i + 8];
    }
    let mut c = [0.0f32; 4];
    for i in 0..4 {
        c[i] = b[i] + b[i + 4];
    }
    (c[0] + c[2]) + (c[1] + c[3])
}

/// Sum of a short row through LANES partial sums.
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    tree_sum(acc) + chunks.remainder().iter().sum::<f32>()
}

/// Max of a short row through LANES partial maxima.
#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    let m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    chunks.remainder().iter().copied().fold(m, f32::max)
}
