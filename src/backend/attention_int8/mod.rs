//! Causal prefill attention with 8-bit operands: Q·Kᵀ in int8 and P·V with P in u8, on the
//! integer dot product (`vpdpbusd`, about 3x the f32 FMA rate on this house's CPUs), f32 logits
//! and an f32 online softmax. The f32 kernel ([`super::attention`]) stays the exact reference.
//!
//! The quantisation follows SageAttention (Zhang et al., arXiv 2410.02367), shaped for a CPU:
//! - Keys are smoothed (the mean key of each KV head, over every cached row, is subtracted:
//!   a constant shift of each query's logits, which softmax ignores) and rounded to int8 with
//!   one scale per key. Queries get one scale per (row, head), with 1/sqrt(hd) folded in, and
//!   are stored as u8 (int8 + 128); the 128 x Σk the offset adds is taken off per key.
//! - Probabilities are rounded to u8 against their row's maximum within each key block (255 is
//!   that maximum), so a block far below the running maximum keeps its 8 bits; the block's
//!   factor exp(block max - running max) / 255 goes into the f32 accumulation, and the row sum
//!   adds the rounded weights, so each row stays a convex combination of the values.
//! - Values are smoothed by their mean (added back at the end: the weights sum to one) and
//!   rounded to int8 with one scale per channel per block of `BLOCK` keys, transposed so that
//!   four consecutive keys of a channel are one 32-bit broadcast.
//!
//! K and V are quantised once per call from any cache type (all KV heads, in parallel), then
//! tasks of (KV head, `TILE_ROWS` query rows) run as in the f32 kernel: the query heads of a
//! group are stacked, in vectors of 16 rows (the 16 lanes of one register), and each row
//! vector skips the key blocks past its last visible key (the causal skip, finer than the f32
//! kernel's per tile). Key blocks never straddle a multiple of `BLOCK`, so V's per-block scales
//! apply to whole blocks, whatever the key ranges.
//!
//! Four paths compute identical integers ([`dot`]): AVX-512 VNNI, AMX tiles (`tdpbsud`, where
//! the CPU exposes AMX-INT8 and Linux grants the tile state; heads of a multiple of 64), the
//! same tile kernel on emulated tiles (tests), and portable Rust; the float code around them is
//! shared, so all give the same bits. On tiles, P·V takes every group of four keys of a block
//! (a tile product costs the same with zeros in it) from values stored channel-major
//! (`vt`: a channel's keys in a row, the tile's A operand), where VNNI skips the groups whose
//! weights all round to 0.

use crate::backend::heads::Heads;
use std::ops::Range;

use rayon::prelude::*;

use super::attention::{check, Cells};
use super::kv_format::KvView;
use super::simd::exp_nonpositive;

mod dot;
mod quantize;
mod softmax;
#[cfg(test)]
mod tests;
mod tiles;

pub use tiles::{amx_status, amx_usable, AmxStatus};

use dot::LANES;
use quantize::{quantize, round_i8, Quantized};
use softmax::fmax;
use tiles::Tiles;

/// Keys per block: the unit of V's per-channel scales and of the online softmax; blocks start
/// at multiples of it (or at a key range's start).
const BLOCK: usize = 256;
/// Keys per online-softmax step (a divisor of `BLOCK`): each row's u8 probabilities are scaled
/// to their maximum within the step, so a step far from the row's peak (an attention sink)
/// keeps its 8 bits. 64 measured the same KL as 256 on the default model (bench/NOTES.md).
const STEP_KEYS: usize = BLOCK;
/// Query rows per task, per query head (as the f32 kernel).
const TILE_ROWS: usize = 64;
/// Fewer query rows than this take the f32 kernel: quantising the cache costs as much as the
/// attention of a few rows.
pub const MIN_ROWS: usize = 16;

/// Which integer dot product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Path {
    /// AMX-INT8 tiles (`tdpbsud`), with the AVX-512 float code of `Vnni512`
    Amx,
    /// AVX-512F/BW/DQ + VNNI (`vpdpbusd` on 512-bit registers)
    Vnni512,
    /// The AMX path's tile kernel with its tile instructions carried out in Rust, and the
    /// portable float code: its layouts checked on any CPU (slow; tests only)
    TilesEmulated,
    /// Portable Rust: the same integers, for tests and CPUs without VNNI
    Scalar,
}

/// Whether the CPU runs the AVX-512 float code and `vpdpbusd`.
fn has_vnni512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        let avx512 = has!("avx512f") && has!("avx512bw") && has!("avx512dq");
        avx512 && has!("avx512vnni") && has!("avx2") && has!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the tile kernel takes heads of `hd` values (64 channels a tile row).
fn tiles_take(hd: usize) -> bool {
    hd.is_multiple_of(tiles::ROW_BYTES) && hd <= 4 * tiles::ROW_BYTES
}

impl Int8Path {
    /// The fast path of this CPU for heads of `hd` values; None when it has none (callers use
    /// the f32 kernel then).
    pub fn fast(hd: usize) -> Option<Int8Path> {
        Self::available(hd)
            .into_iter()
            .find(|p| matches!(p, Int8Path::Amx | Int8Path::Vnni512))
    }

    /// Every path this CPU runs for heads of `hd` values, the fastest first.
    pub fn available(hd: usize) -> Vec<Int8Path> {
        let vnni = has_vnni512();
        let tiles = supports(hd) && tiles_take(hd);
        let mut paths = Vec::new();
        if vnni && tiles && amx_usable() {
            paths.push(Int8Path::Amx);
        }
        if vnni {
            paths.push(Int8Path::Vnni512);
        }
        if tiles {
            paths.push(Int8Path::TilesEmulated);
        }
        paths.push(Int8Path::Scalar);
        paths
    }
}

/// Whether the kernel takes heads of `hd` values (16 channels a VNNI step).
pub fn supports(hd: usize) -> bool {
    hd > 0 && hd.is_multiple_of(16) && hd <= 256
}

/// [`super::attention::attention`] with 8-bit operands on `path`: out = softmax(q kᵀ / sqrt(hd)
/// + causal mask) v, to within the rounding described in the module docs.
pub fn attention_int8(
    path: Int8Path,
    q: &[f32],
    q_pos: &[u32],
    kv: KvView,
    key_ranges: &[Range<usize>],
    shape: Heads,
    out: &mut [f32],
) -> candle_core::Result<()> {
    check(q.len(), out.len(), q_pos, kv, key_ranges, shape)?;
    usable(path, shape.head_dim)?;
    let cells = Cells {
        q: q.as_ptr(),
        out: out.as_mut_ptr(),
    };
    // SAFETY: q and out are distinct buffers of nq * n_heads * hd floats (checked)
    unsafe { tiled(path, cells, q_pos, kv, key_ranges, shape) };
    Ok(())
}

/// [`attention_int8`] written over the queries (as [`super::attention::attention_in_place`]).
pub fn attention_int8_in_place(
    path: Int8Path,
    qo: &mut [f32],
    q_pos: &[u32],
    kv: KvView,
    key_ranges: &[Range<usize>],
    shape: Heads,
) -> candle_core::Result<()> {
    check(qo.len(), qo.len(), q_pos, kv, key_ranges, shape)?;
    usable(path, shape.head_dim)?;
    let p = qo.as_mut_ptr();
    // SAFETY: a task reads all its query cells before it writes any of them, and no other
    // task touches them (see `tiled`)
    unsafe { tiled(path, Cells { q: p, out: p }, q_pos, kv, key_ranges, shape) };
    Ok(())
}

/// Whether `path` runs on this CPU for heads of `hd` values (an error if not: a path the CPU
/// lacks would fault).
fn usable(path: Int8Path, hd: usize) -> candle_core::Result<()> {
    if !supports(hd) {
        candle_core::bail!("attention_int8: heads of {hd} values")
    }
    if !Int8Path::available(hd).contains(&path) {
        candle_core::bail!("attention_int8: {path:?} does not run here for heads of {hd}")
    }
    Ok(())
}

/// One task's inputs.
struct Job<'a> {
    cells: Cells,
    q_pos: &'a [u32],
    k_pos: &'a [u32],
    key_ranges: &'a [Range<usize>],
    shape: Heads,
    z: &'a Quantized,
    g: usize,
    r0: usize,
    rows: usize,
}

/// max |q| of each channel of each KV head's group of query heads: (n_kv_heads, hd).
///
/// # Safety
/// As [`tiled`]: `cells.q` holds (nq, n_heads * hd) floats, nothing writes them meanwhile.
unsafe fn query_max(cells: Cells, nq: usize, shape: Heads) -> Vec<f32> {
    let (hd, group) = (shape.head_dim, shape.n_heads / shape.n_kv_heads);
    let q_dim = shape.n_heads * hd;
    let kv_dim = shape.n_kv_heads * hd;
    (0..nq.div_ceil(TILE_ROWS))
        .into_par_iter()
        .map(|t| {
            let mut m = vec![0.0f32; kv_dim];
            for r in t * TILE_ROWS..((t + 1) * TILE_ROWS).min(nq) {
                // SAFETY: row r < nq of the query buffer, read only
                let row = unsafe { cells.q_at(r * q_dim, q_dim) };
                for (h, head) in row.chunks_exact(hd).enumerate() {
                    let mg = &mut m[h / group * hd..][..hd];
                    mg.iter_mut()
                        .zip(head)
                        .for_each(|(m, x)| *m = m.max(x.abs()));
                }
            }
            m
        })
        .reduce(
            || vec![0.0; kv_dim],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a = a.max(b));
                a
            },
        )
}

/// Quantise K and V, then one task per (KV head, tile of query rows) over both cores.
///
/// # Safety
/// `cells.q` and `cells.out` point to (nq, n_heads * hd) floats each, checked by [`check`];
/// they may be the same buffer: a task reads its query cells before it writes any output cell,
/// and tasks' cells are disjoint (they differ in tile or in KV head).
unsafe fn tiled(
    path: Int8Path,
    cells: Cells,
    q_pos: &[u32],
    kv: KvView,
    key_ranges: &[Range<usize>],
    shape: Heads,
) {
    let on_tiles = matches!(path, Int8Path::Amx | Int8Path::TilesEmulated);
    let z = quantize(
        kv,
        shape.n_kv_heads,
        shape.head_dim,
        &query_max(cells, q_pos.len(), shape),
        on_tiles,
    );
    let nq = q_pos.len();
    let n_tiles = nq.div_ceil(TILE_ROWS);
    (0..shape.n_kv_heads * n_tiles)
        .into_par_iter()
        .for_each(|t| {
            let (g, tile) = (t % shape.n_kv_heads, t / shape.n_kv_heads);
            let r0 = tile * TILE_ROWS;
            let job = Job {
                cells,
                q_pos,
                k_pos: kv.positions,
                key_ranges,
                shape,
                z: &z,
                g,
                r0,
                rows: TILE_ROWS.min(nq - r0),
            };
            SCRATCH.with_borrow_mut(|s| match path {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the entry points checked that the CPU runs `path` (`usable`); the
                // job's cells are this task's own (the caller's promise)
                Int8Path::Vnni512 => unsafe {
                    match shape.head_dim {
                        64 => task_avx512::<VNNI, 64>(&job, s),
                        128 => task_avx512::<VNNI, 128>(&job, s),
                        _ => task_avx512::<VNNI, 0>(&job, s),
                    }
                },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above; the process holds the tile state (`amx_usable`)
                Int8Path::Amx => unsafe {
                    tiles::Amx.configure();
                    match shape.head_dim {
                        64 => task_avx512::<AMX, 64>(&job, s),
                        128 => task_avx512::<AMX, 128>(&job, s),
                        _ => task_avx512::<AMX, 0>(&job, s),
                    }
                    tiles::Amx.release();
                },
                // SAFETY: as above; emulated tiles need no permission
                Int8Path::TilesEmulated => unsafe {
                    s.emulated.configure();
                    task::<EMULATED, 0>(&job, s);
                    s.emulated.release();
                },
                // SAFETY: as above
                _ => unsafe { task::<SCALAR, 0>(&job, s) },
            });
        });
}

/// Per-thread buffers, reused across tasks and calls.
#[derive(Default)]
struct Scratch {
    /// (vectors, hd/4, 16, 4) the rows' queries as u8
    qpack: Vec<u8>,
    /// (vectors, 16) query scales; visible keys per row
    qscale: Vec<f32>,
    vis: Vec<i32>,
    /// (vectors, 16) running max and sum; (vectors, hd, 16) output accumulators
    max: Vec<f32>,
    sum: Vec<f32>,
    o: Vec<f32>,
    /// (BLOCK, 16) raw dots (the portable path only: the VNNI one keeps them in registers), then
    /// logits
    dots: Vec<i32>,
    logits: Vec<f32>,
    /// (BLOCK / 4, 16) probabilities, four keys a u32; (hd, 16) their sums with V
    p4: Vec<u32>,
    pv: Vec<i32>,
    /// (BLOCK / 4) which group of four keys each entry of `p4` is
    at: Vec<u32>,
    /// (hd) one row's query times the channel factors, or its output channels; its bytes
    row: Vec<f32>,
    row_bytes: Vec<u8>,
    /// the tiles of `Int8Path::TilesEmulated`
    emulated: Box<tiles::Emulated>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// `task`'s integer products: portable, VNNI, AMX tiles, emulated tiles.
const SCALAR: u8 = 0;
const VNNI: u8 = 1;
const AMX: u8 = 2;
const EMULATED: u8 = 3;

/// `task` with the VNNI or AMX microkernels, compiled for AVX-512 so the float loops vectorise;
/// `HD` is the head size when it is one the microkernels are specialised for, else 0.
///
/// # Safety
/// As `task`, and the CPU has AVX-512F/BW/DQ/VNNI, AVX2 and FMA; for `AMX` the tiles are
/// configured on this thread.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
unsafe fn task_avx512<const PATH: u8, const HD: usize>(job: &Job, s: &mut Scratch) {
    // SAFETY: as the caller promised
    unsafe { task::<PATH, HD>(job, s) }
}

/// One task: the query heads of KV head `job.g` for rows r0..r0+rows, stacked and cut into
/// vectors of 16 rows, against the quantised keys, block by block with an online softmax.
///
/// # Safety
/// The job's (row, head) cells are this task's only, inside the buffers; with `VNNI` or `AMX`
/// the CPU has AVX-512F/BW/VNNI, with `AMX` and `EMULATED` the tiles are configured.
#[inline(always)]
unsafe fn task<const PATH: u8, const HD: usize>(job: &Job, s: &mut Scratch) {
    let Heads {
        n_heads,
        n_kv_heads,
        head_dim: hd,
    } = job.shape;
    let (g, r0, rows, z) = (job.g, job.r0, job.rows, job.z);
    let group = n_heads / n_kv_heads;
    let q_stride = n_heads * hd;
    let m = group * rows;
    let nv = m.div_ceil(LANES);
    let hd4 = hd / 4;
    let nk = z.nk;
    let nb = nk.div_ceil(BLOCK);
    let tile_pos = &job.q_pos[r0..r0 + rows];
    let max_pos = tile_pos.iter().copied().max().unwrap_or(0);
    let keys = job.k_pos.partition_point(|&p| p <= max_pos);

    s.qpack.clear();
    s.qpack.resize(nv * hd4 * LANES * 4, 128);
    s.qscale.clear();
    s.qscale.resize(nv * LANES, 1.0);
    s.vis.clear();
    s.vis.resize(nv * LANES, 0);
    s.max.clear();
    s.max.resize(nv * LANES, f32::NEG_INFINITY);
    s.sum.clear();
    s.sum.resize(nv * LANES, 0.0);
    s.o.clear();
    s.o.resize(nv * hd * LANES, 0.0);
    s.dots.resize(BLOCK * LANES, 0);
    s.logits.resize(BLOCK * LANES, 0.0);
    s.p4.resize(BLOCK / 4 * LANES, 0);
    s.at.resize(BLOCK / 4, 0);
    s.pv.resize(hd * LANES, 0);
    s.row.resize(hd, 0.0);
    s.row_bytes.resize(hd, 0);

    // stacked row i = (head h of the group, tile row r): its visible keys and its query as u8
    let scale = 1.0 / (hd as f32).sqrt();
    let kchan = &z.kchan[g * hd..][..hd];
    for i in 0..m {
        let (h, r) = (i / rows, i % rows);
        let (v, lane) = (i / LANES, i % LANES);
        s.vis[i] = job.k_pos[..keys].partition_point(|&kp| kp <= tile_pos[r]) as i32;
        let at = (r0 + r) * q_stride + (g * group + h) * hd;
        // SAFETY: cell (r0 + r, head) is in bounds and this task's; nothing writes it before
        // the end of the task
        let raw = unsafe { std::slice::from_raw_parts(job.cells.q.add(at), hd) };
        // the query times its KV head's channel factors (see `quantize`)
        let q = &mut s.row[..hd];
        q.iter_mut()
            .zip(raw.iter().zip(kchan))
            .for_each(|(q, (x, c))| *q = x * c);
        let amax = q.iter().fold(0.0f32, |m, x| m.max(x.abs())) * scale;
        let qs = amax / 127.0;
        let inv = if qs > 0.0 { scale / qs } else { 0.0 };
        // logits in log2 units (the softmax takes powers of two); positive, so that a masked
        // logit times it stays -inf
        s.qscale[i] = (qs * std::f32::consts::LOG2_E).max(f32::MIN_POSITIVE);
        // rounded in channel order (a loop the compiler vectorises), then four bytes a lane
        let bytes = &mut s.row_bytes[..hd];
        bytes
            .iter_mut()
            .zip(q.iter())
            .for_each(|(b, &x)| *b = (round_i8(x * inv) as i32 + 128) as u8);
        for (d4, four) in bytes.chunks_exact(4).enumerate() {
            let at = ((v * hd4 + d4) * LANES + lane) * 4;
            s.qpack[at..at + 4].copy_from_slice(four);
        }
    }
    // each row vector's first and last visible key (+1), over its real rows
    let span = |v: usize| {
        let lanes = &s.vis[v * LANES..(v * LANES + LANES).min(m)];
        let lo = lanes.iter().copied().min().unwrap_or(0) as usize;
        let hi = lanes.iter().copied().max().unwrap_or(0) as usize;
        (lo, hi)
    };
    let spans: Vec<(usize, usize)> = (0..nv).map(span).collect();

    let kq = &z.kq[g * nk * hd..][..nk * hd];
    let kscale = &z.kscale[g * nk..][..nk];
    let kstart = &z.kstart[g * nk..][..nk];
    let v4 = if z.v4.is_empty() {
        &[][..]
    } else {
        &z.v4[g * z.groups * hd * 4..][..z.groups * hd * 4]
    };
    for range in job.key_ranges {
        let end = range.end.min(keys);
        let mut j0 = range.start;
        while j0 < end {
            let j1 = ((j0 / STEP_KEYS + 1) * STEP_KEYS).min(end);
            let vscale = &z.vscale[(g * nb + j0 / BLOCK) * hd..][..hd];
            // from the group of four that holds j0: its first `dead` keys are outside the range
            let ja = j0 & !3;
            let dead = j0 - ja;
            for (v, &(lo, hi)) in spans.iter().enumerate() {
                if j1.min(hi) <= j0 {
                    continue;
                }
                let ke = j1.min(hi) - ja;
                // logits before the query scale, with the causal mask, and the block max; keys
                // below `lo` are visible to every row of the vector
                let q = &s.qpack[v * hd4 * LANES * 4..][..hd4 * LANES * 4];
                let qs: &[f32; LANES] = s.qscale[v * LANES..][..LANES].try_into().unwrap();
                let vis: &[i32; LANES] = s.vis[v * LANES..][..LANES].try_into().unwrap();
                let open = lo.clamp(ja, ja + ke) - ja;
                let ks = &kscale[ja..ja + ke];
                let raw_max = match PATH {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: q is hd4 x 64 bytes, keys ja..ja+ke are rows of kq and kstart,
                    // logits holds BLOCK >= ke rows; the CPU has VNNI (the caller's promise)
                    VNNI => unsafe {
                        dot::x86::qk_logits::<HD>(
                            q.as_ptr(),
                            kq.as_ptr().add(ja * hd),
                            kstart.as_ptr().add(ja),
                            ks,
                            hd,
                            (vis, ja, dead, open),
                            s.logits.as_mut_ptr(),
                        )
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above, and kq is padded by 16 rows, dots holds BLOCK rows (ke
                    // rounded up to 16 is at most BLOCK); the tiles are configured
                    AMX => unsafe {
                        let k = z.kq.as_ptr().add((g * nk + ja) * hd);
                        let dots = s.dots.as_mut_ptr();
                        dot::tiled::qk(&mut tiles::Amx, q.as_ptr(), k, hd, ke, dots);
                        dot::x86::logits_of_dots(
                            dots,
                            kstart.as_ptr().add(ja),
                            ks,
                            (vis, ja, dead, open),
                            s.logits.as_mut_ptr(),
                        )
                    },
                    // SAFETY: as AMX's
                    EMULATED => unsafe {
                        let k = z.kq.as_ptr().add((g * nk + ja) * hd);
                        let dots = s.dots.as_mut_ptr();
                        dot::tiled::qk(&mut *s.emulated, q.as_ptr(), k, hd, ke, dots);
                        for (row, &start) in
                            s.dots.chunks_exact_mut(LANES).zip(&kstart[ja..ja + ke])
                        {
                            row.iter_mut().for_each(|d| *d = d.wrapping_add(start));
                        }
                        softmax::logits(&s.dots, ks, vis, ja, dead, open, &mut s.logits)
                    },
                    _ => {
                        dot::qk_scalar(q, &kq[ja * hd..], &kstart[ja..], hd, ke, &mut s.dots);
                        softmax::logits(&s.dots, ks, vis, ja, dead, open, &mut s.logits)
                    }
                };
                // in log2 units (qs > 0 keeps the order and -inf)
                let bmax: [f32; LANES] = std::array::from_fn(|l| raw_max[l] * qs[l]);
                // online softmax: the correction of what came before, and this block's factor
                let mut corr = [0.0f32; LANES];
                let mut factor = [0.0f32; LANES];
                let mut base = [0.0f32; LANES];
                let run = &mut s.max[v * LANES..][..LANES];
                for l in 0..LANES {
                    let new = fmax(run[l], bmax[l]);
                    let new_safe = if new == f32::NEG_INFINITY { 0.0 } else { new };
                    base[l] = if bmax[l] == f32::NEG_INFINITY {
                        0.0
                    } else {
                        bmax[l]
                    };
                    corr[l] = exp_nonpositive((run[l] - new_safe) * std::f32::consts::LN_2);
                    factor[l] =
                        exp_nonpositive((bmax[l] - new_safe) * std::f32::consts::LN_2) / 255.0;
                    run[l] = new;
                }
                // probabilities against the block max, as u8, four keys a u32; then P·V
                let o = &mut s.o[v * hd * LANES..][..hd * LANES];
                let vt = |z: &Quantized| z.vt[(g * hd * z.vt_stride + ja)..].as_ptr();
                let psum = match PATH {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the CPU has AVX-512F/BW/VNNI and FMA; logits holds ke rows, p4 and
                    // at BLOCK / 4
                    VNNI => unsafe {
                        let (psum, kept) = softmax::x86::probs::<true>(
                            &s.logits, qs, &base, ke, &mut s.p4, &mut s.at,
                        );
                        // p4 and at hold `kept` entries, groups ja / 4 + at < groups
                        dot::x86::pv_vnni::<HD>(
                            s.p4.as_ptr(),
                            s.at.as_ptr(),
                            v4.as_ptr().add(ja * hd),
                            hd,
                            kept,
                            s.pv.as_mut_ptr(),
                        );
                        softmax::x86::accumulate(o, &s.pv, vscale, &corr, &factor);
                        psum
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above; p4 holds the steps rounded up to 16 (at most BLOCK / 4),
                    // padded with zeros; vt's rows reach 64 bytes past any group's start; the
                    // tiles are configured
                    AMX => unsafe {
                        let (psum, steps) = softmax::x86::probs::<false>(
                            &s.logits, qs, &base, ke, &mut s.p4, &mut s.at,
                        );
                        s.p4[steps * LANES..steps.div_ceil(16) * 16 * LANES].fill(0);
                        let (p4, pv) = (s.p4.as_ptr(), s.pv.as_mut_ptr());
                        dot::tiled::pv(&mut tiles::Amx, p4, vt(z), z.vt_stride, hd, steps, pv);
                        softmax::x86::accumulate(o, &s.pv, vscale, &corr, &factor);
                        psum
                    },
                    // SAFETY: as AMX's
                    EMULATED => unsafe {
                        let (psum, steps) =
                            softmax::probs::<false>(&s.logits, qs, &base, ke, &mut s.p4, &mut s.at);
                        s.p4[steps * LANES..steps.div_ceil(16) * 16 * LANES].fill(0);
                        let (p4, pv) = (s.p4.as_ptr(), s.pv.as_mut_ptr());
                        dot::tiled::pv(&mut *s.emulated, p4, vt(z), z.vt_stride, hd, steps, pv);
                        softmax::accumulate(o, &s.pv, vscale, &corr, &factor);
                        psum
                    },
                    _ => {
                        let (psum, kept) =
                            softmax::probs::<true>(&s.logits, qs, &base, ke, &mut s.p4, &mut s.at);
                        dot::pv_scalar(&s.p4, &s.at, &v4[ja * hd..], hd, kept, &mut s.pv);
                        softmax::accumulate(o, &s.pv, vscale, &corr, &factor);
                        psum
                    }
                };
                let sum = &mut s.sum[v * LANES..][..LANES];
                for l in 0..LANES {
                    sum[l] = sum[l] * corr[l] + psum[l] as f32 * factor[l];
                }
            }
            j0 = j1;
        }
    }
    let vmean = &z.vmean[g * hd..][..hd];
    for i in 0..m {
        let (h, r) = (i / rows, i % rows);
        let (v, lane) = (i / LANES, i % LANES);
        let total = s.sum[i];
        let at = (r0 + r) * q_stride + (g * group + h) * hd;
        // SAFETY: cell (r0 + r, head) is in bounds and this task's; its query was read above
        let out = unsafe { std::slice::from_raw_parts_mut(job.cells.out.add(at), hd) };
        if total > 0.0 {
            // the row's channels gathered from their lane, then one vectorised pass
            let o = &s.o[v * hd * LANES..][..hd * LANES];
            let col = &mut s.row[..hd];
            col.iter_mut()
                .zip(o.chunks_exact(LANES))
                .for_each(|(c, lanes)| *c = lanes[lane]);
            out.iter_mut()
                .zip(col.iter().zip(vmean))
                .for_each(|(x, (c, mean))| *x = c / total + mean);
        } else {
            out.fill(0.0);
        }
    }
}
