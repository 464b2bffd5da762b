//! The x86 versions of the kernels in the parent module: AVX-512 VNNI and AVX2.

// The microkernels index their register tiles as acc[r][t]: clearer than zipped iterators.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::backend::qgemv::kernels::q4k_offsets;
use crate::backend::qgemv::kernels::x86::{
    bytes_ps_256, five_bits_512, q4k_scale_min_512, q4k_super_512, six_bits_512,
};
use std::ops::Range;

use super::{Gemm, VNNI_ROWS, VNNI_TILES};
use crate::backend::qgemv::{Kind, QK, TILE};

/// Four activation bytes of row `i` from column `c`, as one i32 to broadcast.
#[inline(always)]
unsafe fn x4(g: &Gemm, i: usize, c: usize) -> i32 {
    // SAFETY (caller): i < x.rows, c + 4 <= x.cols.
    unsafe { (g.x.q.as_ptr().add(i * g.x.cols + c) as *const i32).read_unaligned() }
}

/// Calls `$f::<R, T>` for the runtime (rows, tiles) of a microkernel, R in 1..=6, T in 1..=2.
macro_rules! by_shape {
    ($f:ident, $rn:expr, $tn:expr, $($arg:expr),*) => {
        match ($rn, $tn) {
            (6, 2) => $f::<6, 2>($($arg),*),
            (5, 2) => $f::<5, 2>($($arg),*),
            (4, 2) => $f::<4, 2>($($arg),*),
            (3, 2) => $f::<3, 2>($($arg),*),
            (2, 2) => $f::<2, 2>($($arg),*),
            (1, 2) => $f::<1, 2>($($arg),*),
            (6, _) => $f::<6, 1>($($arg),*),
            (5, _) => $f::<5, 1>($($arg),*),
            (4, _) => $f::<4, 1>($($arg),*),
            (3, _) => $f::<3, 1>($($arg),*),
            (2, _) => $f::<2, 1>($($arg),*),
            _ => $f::<1, 1>($($arg),*),
        }
    };
}

/// SAFETY: as `super::rect`, and the CPU has AVX-512F/BW/VNNI, F16C and FMA.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
pub unsafe fn rect_vnni(g: &Gemm, rows: Range<usize>, tiles: Range<usize>) {
    // the thread's buffer, grown once and reused by its later tasks
    let mut unpacked = UNPACKED.take();
    let bytes = !matches!(g.kind, Kind::Q8_0 | Kind::Q8x16);
    let step = microkernel_rows(g.kind);
    for t0 in tiles.clone().step_by(VNNI_TILES) {
        let tn = (tiles.end - t0).min(VNNI_TILES);
        if bytes {
            // SAFETY: tiles t0..t0+tn lie in the caller's rectangle.
            unsafe { unpacked.fill(g, t0, tn) };
        }
        for i0 in rows.clone().step_by(step) {
            let rn = (rows.end - i0).min(step);
            let u = &unpacked;
            // SAFETY: rows i0..i0+rn and tiles t0..t0+tn lie in the caller's rectangle, and
            // `unpacked` holds tiles t0..t0+tn.
            unsafe {
                match g.kind {
                    Kind::Q8_0 => by_shape!(q8_0_vnni, rn, tn, g, i0, t0),
                    Kind::Q8x16 => by_shape!(q8x16_vnni, rn, tn, g, i0, t0),
                    Kind::Q6 => by_shape!(halves_vnni, rn, tn, g, u, i0, t0),
                    Kind::Q5z => by_shape!(block_q5z_vnni, rn, tn, g, u, i0, t0),
                    Kind::Q4_1 | Kind::Q4K | Kind::Q5 => {
                        by_shape!(block_vnni, rn, tn, g, u, i0, t0)
                    }
                }
            }
        }
    }
    UNPACKED.set(unpacked);
}

thread_local! {
    static UNPACKED: std::cell::Cell<Unpacked> = std::cell::Cell::new(Unpacked::default());
}

/// Activation rows per microkernel. The kernels with a min or two scales per block take 4: with
/// 6 (R × T = 12 i32 and 12 f32 accumulators) their epilogue spilled zmm registers to the stack
/// and ran 20% slower (Q4_1: 250 against 305 GOP/s on one core). A task's rows
/// (`ROWS_PER_TASK`, 96) are a multiple of both.
fn microkernel_rows(kind: Kind) -> usize {
    match kind {
        Kind::Q8_0 | Kind::Q8x16 | Kind::Q5z => VNNI_ROWS,
        Kind::Q4_1 | Kind::Q4K | Kind::Q5 | Kind::Q6 => 4,
    }
}

/// The weights of one group of tiles as unsigned bytes, made once per task and read by each
/// of its row groups, so that the microkernels do no bit work: `lines[(t * nb + b) * 8 + j]`
/// holds the 16 rows' values 4j..4j+4 of block b (Q8_0's line order), and
/// `scales[(t * nb + b) * 32..]` their f32 scale and min per block (Q4_1, Q4K, Q5: weight =
/// d q + m; Q5z: the scale alone, its -16 d offset starts the dot) or the scales of the two
/// halves of 16 values (Q6: weight = d_h (q - 32)).
#[derive(Default)]
struct Unpacked {
    lines: Vec<__m512i>,
    scales: Vec<f32>,
}

impl Unpacked {
    /// Unpack tiles t0..t0+tn of a nibble or Q6 matrix.
    ///
    /// SAFETY: AVX-512F/BW and F16C; the tiles are inside `g` (check).
    #[inline(always)]
    unsafe fn fill(&mut self, g: &Gemm, t0: usize, tn: usize) {
        let (nb, n_lines) = (g.nb(), g.kind.lines());
        self.lines.resize(tn * nb * 8, _mm512_setzero_si512());
        self.scales.resize(tn * nb * 2 * TILE, 0.0);
        let nibble = _mm512_set1_epi8(0x0F);
        for t in 0..tn {
            for b in 0..nb {
                let (tb, ub) = ((t0 + t) * nb + b, t * nb + b);
                // SAFETY: tile-block tb's lines and scales are inside `g` (check; Q4K's
                // super-block too, nb being a multiple of 8); ub < tn * nb.
                unsafe {
                    let src = g.quants.as_ptr().add(tb * n_lines) as *const __m512i;
                    let dst = self.lines.as_mut_ptr().add(ub * 8);
                    match g.kind {
                        Kind::Q6 => {
                            for h in 0..2 {
                                let high = six_bits_512(_mm512_load_si512(src.add(4 + h)));
                                for k in 0..4 {
                                    let line = _mm512_load_si512(src.add(k));
                                    let nib = if h == 0 {
                                        line
                                    } else {
                                        _mm512_srli_epi16::<4>(line)
                                    };
                                    let q = _mm512_or_si512(_mm512_and_si512(nib, nibble), high[k]);
                                    _mm512_store_si512(dst.add(4 * h + k), q);
                                }
                            }
                        }
                        _ => {
                            let five = matches!(g.kind, Kind::Q5 | Kind::Q5z);
                            let h = if five {
                                _mm512_load_si512(src.add(4))
                            } else {
                                _mm512_setzero_si512()
                            };
                            for k in 0..4 {
                                let w = _mm512_load_si512(src.add(k));
                                let mut lo = _mm512_and_si512(w, nibble);
                                let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), nibble);
                                if five {
                                    (lo, hi) = five_bits_512(lo, hi, h, k);
                                }
                                _mm512_store_si512(dst.add(k), lo);
                                _mm512_store_si512(dst.add(4 + k), hi);
                            }
                        }
                    }
                    let f16s = |i: usize| {
                        let at = g.scales.as_ptr().add(tb * g.kind.scales() + i * TILE);
                        _mm512_cvtph_ps(_mm256_loadu_si256(at as *const __m256i))
                    };
                    let (first, second) = match g.kind {
                        Kind::Q4K => {
                            let (d, dmin) = q4k_super_512(g.scales.as_ptr(), tb);
                            q4k_scale_min_512(g.scales.as_ptr(), tb, d, dmin)
                        }
                        Kind::Q5z => (f16s(0), _mm512_setzero_ps()),
                        // Q4_1, Q5: d and m; Q6: d of each half
                        _ => (f16s(0), f16s(1)),
                    };
                    let at = self.scales.as_mut_ptr().add(ub * 2 * TILE);
                    _mm512_storeu_ps(at, first);
                    _mm512_storeu_ps(at.add(TILE), second);
                }
            }
        }
    }
}

/// dot[r][t] += the byte lines `ks` of tile-block b of weight tile t (unsigned, `lines[t]`) ·
/// activation row i0 + r's bytes 4k..4k+4 of block b, for each line k: four K steps a
/// `vpdpbusd`, every microkernel's inner loop.
///
/// SAFETY: the CPU has AVX-512F/BW/VNNI; lines[t] + k is readable for k in `ks`; rows
/// i0..i0+R and block b are inside `g.x`.
#[inline(always)]
unsafe fn dot_lines<const R: usize, const T: usize>(
    g: &Gemm,
    lines: &[*const __m512i; T],
    i0: usize,
    b: usize,
    ks: Range<usize>,
    dot: &mut [[__m512i; T]; R],
) {
    for k in ks {
        // SAFETY: as the caller promised.
        unsafe {
            let w: [__m512i; T] = std::array::from_fn(|t| _mm512_load_si512(lines[t].add(k)));
            for r in 0..R {
                let xk = _mm512_set1_epi32(x4(g, i0 + r, b * QK + 4 * k));
                for t in 0..T {
                    dot[r][t] = _mm512_dpbusd_epi32(dot[r][t], w[t], xk);
                }
            }
        }
    }
}

/// Store 16 f32 of row `i` at output tile `tile`, masked past column n.
#[inline(always)]
unsafe fn store16(g: &Gemm, i: usize, tile: usize, v: __m512) {
    let valid = (g.n - tile * TILE).min(TILE);
    let mask: __mmask16 = if valid == TILE {
        0xFFFF
    } else {
        (1u16 << valid) - 1
    };
    // SAFETY (caller): (i, tile) is in the rectangle; masked lanes are not written.
    unsafe { _mm512_mask_storeu_ps(g.out.add(i * g.n + tile * TILE), mask, v) }
}

/// Rows i0..i0+R × tiles t0..t0+T of an unpacked nibble matrix (Q4_1, Q4K, Q5, Q5z): weight
/// bytes (unsigned) × activation bytes (signed); out = Σ_b d_w d_x dot + m_w (d_x Σ q_x).
///
/// SAFETY: as `rect_vnni`, for this microtile; `u` holds tiles t0..t0+T.
#[inline(always)]
unsafe fn block_vnni<const R: usize, const T: usize>(g: &Gemm, u: &Unpacked, i0: usize, t0: usize) {
    // SAFETY: as the caller promised.
    unsafe { block_vnni_with::<R, T, false>(g, u, i0, t0) }
}

/// `block_vnni` for Q5z, whose min is -16 d: each block's dot starts at -16 Σ q_x (exact, in
/// i32), so the epilogue has no min term.
///
/// SAFETY: as `block_vnni`.
#[inline(always)]
unsafe fn block_q5z_vnni<const R: usize, const T: usize>(
    g: &Gemm,
    u: &Unpacked,
    i0: usize,
    t0: usize,
) {
    // SAFETY: as the caller promised.
    unsafe { block_vnni_with::<R, T, true>(g, u, i0, t0) }
}

/// SAFETY: as `block_vnni`.
#[inline(always)]
unsafe fn block_vnni_with<const R: usize, const T: usize, const OFF16: bool>(
    g: &Gemm,
    u: &Unpacked,
    i0: usize,
    t0: usize,
) {
    let nb = g.nb();
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for b in 0..nb {
        // SAFETY: u holds T * nb tile-blocks (`fill`); activation bytes b * 32 + 32 <= cols.
        unsafe {
            let lines: [*const __m512i; T] =
                std::array::from_fn(|t| u.lines.as_ptr().add((t * nb + b) * 8));
            let mut dot: [[__m512i; T]; R] = std::array::from_fn(|r| {
                let bias = if OFF16 {
                    -(*g.x.sum.get_unchecked((i0 + r) * nb + b) << 4)
                } else {
                    0
                };
                [_mm512_set1_epi32(bias); T]
            });
            dot_lines(g, &lines, i0, b, 0..8, &mut dot);
            let s: [*const f32; T] =
                std::array::from_fn(|t| u.scales.as_ptr().add((t * nb + b) * 2 * TILE));
            let d: [__m512; T] = std::array::from_fn(|t| _mm512_loadu_ps(s[t]));
            let m: [__m512; T] = std::array::from_fn(|t| _mm512_loadu_ps(s[t].add(TILE)));
            for r in 0..R {
                let ib = (i0 + r) * nb + b;
                let dx = _mm512_set1_ps(*g.x.d.get_unchecked(ib));
                let dsum = _mm512_set1_ps(*g.x.dsum.get_unchecked(ib));
                for t in 0..T {
                    let scale = _mm512_mul_ps(d[t], dx);
                    acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][t]), scale, acc[r][t]);
                    if !OFF16 {
                        acc[r][t] = _mm512_fmadd_ps(m[t], dsum, acc[r][t]);
                    }
                }
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            // SAFETY: the microtile is in the caller's rectangle.
            unsafe { store16(g, i0 + r, t0 + t, acc[r][t]) };
        }
    }
}

/// Rows i0..i0+R × tiles t0..t0+T of an unpacked Q6 matrix: per half of 16 values, the 6-bit
/// quants × activation bytes, then d_h (d_x dot - 32 d_x Σ q_x).
///
/// SAFETY: as `block_vnni`.
#[inline(always)]
unsafe fn halves_vnni<const R: usize, const T: usize>(
    g: &Gemm,
    u: &Unpacked,
    i0: usize,
    t0: usize,
) {
    let nb = g.nb();
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for b in 0..nb {
        // SAFETY: as in `block_vnni`.
        unsafe {
            let lines: [*const __m512i; T] =
                std::array::from_fn(|t| u.lines.as_ptr().add((t * nb + b) * 8));
            let s: [*const f32; T] =
                std::array::from_fn(|t| u.scales.as_ptr().add((t * nb + b) * 2 * TILE));
            for h in 0..2 {
                let mut dot = [[_mm512_setzero_si512(); T]; R];
                dot_lines(g, &lines, i0, b, 4 * h..4 * h + 4, &mut dot);
                let d: [__m512; T] = std::array::from_fn(|t| _mm512_loadu_ps(s[t].add(h * TILE)));
                for r in 0..R {
                    let ib = (i0 + r) * nb + b;
                    let dx = _mm512_set1_ps(*g.x.d.get_unchecked(ib));
                    let c = _mm512_set1_ps(32.0 * *g.x.dsum16.get_unchecked(2 * ib + h));
                    for t in 0..T {
                        let v = _mm512_fmsub_ps(_mm512_cvtepi32_ps(dot[r][t]), dx, c);
                        acc[r][t] = _mm512_fmadd_ps(d[t], v, acc[r][t]);
                    }
                }
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            // SAFETY: the microtile is in the caller's rectangle.
            unsafe { store16(g, i0 + r, t0 + t, acc[r][t]) };
        }
    }
}

/// Rows i0..i0+R × tiles t0..t0+T of a Q8_0 matrix: weights stored as w + 128 (unsigned)
/// × activation bytes (signed); each block's dot starts at -128 Σ q_x to remove the offset.
///
/// SAFETY: as `rect_vnni`, for this microtile.
#[inline(always)]
unsafe fn q8_0_vnni<const R: usize, const T: usize>(g: &Gemm, i0: usize, t0: usize) {
    let nb = g.nb();
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for b in 0..nb {
        // SAFETY: tile-blocks (t0 + t) * nb + b are inside `quants`/`scales` (check);
        // activation bytes b * 32 + 32 <= cols.
        unsafe {
            let lines: [*const __m512i; T] = std::array::from_fn(|t| {
                g.quants.as_ptr().add(((t0 + t) * nb + b) * 8) as *const __m512i
            });
            let mut dot: [[__m512i; T]; R] = std::array::from_fn(|r| {
                let bias = -(*g.x.sum.get_unchecked((i0 + r) * nb + b) << 7);
                [_mm512_set1_epi32(bias); T]
            });
            dot_lines(g, &lines, i0, b, 0..8, &mut dot);
            let d: [__m512; T] = std::array::from_fn(|t| {
                let s = g.scales.as_ptr().add(((t0 + t) * nb + b) * TILE);
                _mm512_cvtph_ps(_mm256_loadu_si256(s as *const __m256i))
            });
            for r in 0..R {
                let dx = _mm512_set1_ps(*g.x.d.get_unchecked((i0 + r) * nb + b));
                for t in 0..T {
                    let scale = _mm512_mul_ps(d[t], dx);
                    acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][t]), scale, acc[r][t]);
                }
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            // SAFETY: the microtile is in the caller's rectangle.
            unsafe { store16(g, i0 + r, t0 + t, acc[r][t]) };
        }
    }
}

/// Rows i0..i0+R × tiles t0..t0+T of a Q8x16 matrix: unsigned quants × activation bytes, per
/// half of 16 values its own scale, and each half's min × the activation half-block sum.
///
/// SAFETY: as `q8_0_vnni`.
#[inline(always)]
unsafe fn q8x16_vnni<const R: usize, const T: usize>(g: &Gemm, i0: usize, t0: usize) {
    let nb = g.nb();
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    for b in 0..nb {
        // SAFETY: as in `q8_0_vnni`.
        unsafe {
            let lines: [*const __m512i; T] = std::array::from_fn(|t| {
                g.quants.as_ptr().add(((t0 + t) * nb + b) * 8) as *const __m512i
            });
            let s: [*const u16; T] =
                std::array::from_fn(|t| g.scales.as_ptr().add(((t0 + t) * nb + b) * 4 * TILE));
            let scale = |t: usize, i: usize| {
                _mm512_cvtph_ps(_mm256_loadu_si256(s[t].add(i * TILE) as *const __m256i))
            };
            for h in 0..2 {
                let mut dot = [[_mm512_setzero_si512(); T]; R];
                dot_lines(g, &lines, i0, b, 4 * h..4 * h + 4, &mut dot);
                let d: [__m512; T] = std::array::from_fn(|t| scale(t, h));
                for r in 0..R {
                    let dx = _mm512_set1_ps(*g.x.d.get_unchecked((i0 + r) * nb + b));
                    for t in 0..T {
                        let sc = _mm512_mul_ps(d[t], dx);
                        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][t]), sc, acc[r][t]);
                    }
                }
            }
            let m: [[__m512; 2]; T] = std::array::from_fn(|t| [scale(t, 2), scale(t, 3)]);
            for r in 0..R {
                let ds = g.x.dsum16.as_ptr().add(2 * ((i0 + r) * nb + b));
                let (lo, hi) = (_mm512_set1_ps(*ds), _mm512_set1_ps(*ds.add(1)));
                for t in 0..T {
                    acc[r][t] = _mm512_fmadd_ps(m[t][0], lo, acc[r][t]);
                    acc[r][t] = _mm512_fmadd_ps(m[t][1], hi, acc[r][t]);
                }
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            // SAFETY: the microtile is in the caller's rectangle.
            unsafe { store16(g, i0 + r, t0 + t, acc[r][t]) };
        }
    }
}

/// Rows per AVX2 microkernel (one 8-column half tile each: 2 × 4 of the 16 ymm registers).
const AVX2_ROWS: usize = 4;

/// SAFETY: as `super::rect`, and the CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rect_avx2(g: &Gemm, rows: Range<usize>, tiles: Range<usize>) {
    for tile in tiles {
        for half in 0..2 {
            if tile * TILE + 8 * half >= g.n {
                continue;
            }
            for i0 in rows.clone().step_by(AVX2_ROWS) {
                // SAFETY: rows i0.. and this half tile lie in the caller's rectangle.
                unsafe {
                    match (rows.end - i0).min(AVX2_ROWS) {
                        4 => half_avx2::<4>(g, i0, tile, half),
                        3 => half_avx2::<3>(g, i0, tile, half),
                        2 => half_avx2::<2>(g, i0, tile, half),
                        _ => half_avx2::<1>(g, i0, tile, half),
                    }
                }
            }
        }
    }
}

/// Rows i0..i0+R × the 8 columns of half `half` of tile `tile`, any tile format.
///
/// SAFETY: as `rect_avx2`, for this microtile.
#[inline(always)]
unsafe fn half_avx2<const R: usize>(g: &Gemm, i0: usize, tile: usize, half: usize) {
    let nb = g.nb();
    let (lines, scales) = (g.kind.lines(), g.kind.scales());
    let nibble = _mm256_set1_epi8(0x0F);
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let tb = tile * nb + b;
        // SAFETY: as in `q8_0_vnni`; half * 32 + 32 <= 64 bytes of a line.
        unsafe {
            let line = |k: usize| {
                let p = g.quants.as_ptr().add(tb * lines + k) as *const u8;
                _mm256_load_si256(p.add(32 * half) as *const __m256i)
            };
            let s = g.scales.as_ptr().add(tb * scales + 8 * half);
            let scale =
                |i: usize| _mm256_cvtph_ps(_mm_loadu_si128(s.add(i * TILE) as *const __m128i));
            // dot[h][r]: Q8x16 keeps the halves of 16 values apart (own scales); the other
            // formats sum into dot[0]
            let mut dot = [[_mm256_setzero_si256(); R]; 2];
            match g.kind {
                Kind::Q4_1 | Kind::Q4K | Kind::Q5 | Kind::Q5z => {
                    let five = matches!(g.kind, Kind::Q5 | Kind::Q5z);
                    let h = if five {
                        line(4)
                    } else {
                        _mm256_setzero_si256()
                    };
                    for k in 0..4 {
                        let w = line(k);
                        let mut lo = _mm256_and_si256(w, nibble);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), nibble);
                        if five {
                            (lo, hi) =
                                crate::backend::qgemv::kernels::x86::five_bits_256(lo, hi, h, k);
                        }
                        for (r, dot) in dot[0].iter_mut().enumerate() {
                            let xlo = _mm256_set1_epi32(x4(g, i0 + r, b * QK + 4 * k));
                            let xhi = _mm256_set1_epi32(x4(g, i0 + r, b * QK + 16 + 4 * k));
                            // |31 * 127 * 2| twice fits i16
                            let p = _mm256_add_epi16(
                                _mm256_maddubs_epi16(lo, xlo),
                                _mm256_maddubs_epi16(hi, xhi),
                            );
                            *dot = _mm256_add_epi32(*dot, _mm256_madd_epi16(p, ones));
                        }
                    }
                }
                Kind::Q8_0 => {
                    for k in 0..8 {
                        let w = _mm256_xor_si256(line(k), flip); // back to signed
                        let wabs = _mm256_abs_epi8(w);
                        for (r, dot) in dot[0].iter_mut().enumerate() {
                            let xk = _mm256_set1_epi32(x4(g, i0 + r, b * QK + 4 * k));
                            // |w| * sign(x, w): at most 128 * 127 * 2 per i16
                            let p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xk, w));
                            *dot = _mm256_add_epi32(*dot, _mm256_madd_epi16(p, ones));
                        }
                    }
                }
                Kind::Q6 => {
                    use crate::backend::qgemv::kernels::x86::six_bits_256;
                    let high = [six_bits_256(line(4)), six_bits_256(line(5))];
                    for k in 0..4 {
                        let w = line(k);
                        let nib = [
                            _mm256_and_si256(w, nibble),
                            _mm256_and_si256(_mm256_srli_epi16::<4>(w), nibble),
                        ];
                        for h in 0..2 {
                            let q = _mm256_or_si256(nib[h], high[h][k]);
                            for (r, dot) in dot[h].iter_mut().enumerate() {
                                let xk = _mm256_set1_epi32(x4(g, i0 + r, b * QK + 16 * h + 4 * k));
                                // quants below 64: 63 * 127 * 2 fits i16
                                let p = _mm256_maddubs_epi16(q, xk);
                                *dot = _mm256_add_epi32(*dot, _mm256_madd_epi16(p, ones));
                            }
                        }
                    }
                }
                Kind::Q8x16 => {
                    for k in 0..8 {
                        let w = line(k);
                        for (r, dot) in dot[k / 4].iter_mut().enumerate() {
                            let xk = _mm256_set1_epi32(x4(g, i0 + r, b * QK + 4 * k));
                            // quants below 64: 63 * 127 * 2 fits i16
                            let p = _mm256_maddubs_epi16(w, xk);
                            *dot = _mm256_add_epi32(*dot, _mm256_madd_epi16(p, ones));
                        }
                    }
                }
            }
            // Q4K: d sc and -dmin m of this block, as `scale(0)` and `scale(1)` of Q4_1
            let (k4_d, k4_m) = if g.kind == Kind::Q4K {
                let (sup, own) = q4k_offsets(tb);
                let sup = g.scales.as_ptr().add(sup + 8 * half);
                let own = (g.scales.as_ptr().add(own) as *const u8).add(8 * half);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(sup as *const __m128i));
                let dmin = _mm256_cvtph_ps(_mm_loadu_si128(sup.add(TILE) as *const __m128i));
                let m = _mm256_fnmadd_ps(dmin, bytes_ps_256(own.add(TILE)), _mm256_setzero_ps());
                (_mm256_mul_ps(d, bytes_ps_256(own)), m)
            } else {
                (_mm256_setzero_ps(), _mm256_setzero_ps())
            };
            let scale = |i: usize| {
                if g.kind == Kind::Q4K {
                    [k4_d, k4_m][i]
                } else {
                    scale(i)
                }
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let ib = (i0 + r) * nb + b;
                let dx = _mm256_set1_ps(*g.x.d.get_unchecked(ib));
                let halves = if matches!(g.kind, Kind::Q8x16 | Kind::Q6) {
                    2
                } else {
                    1
                };
                for h in 0..halves {
                    let sc = _mm256_mul_ps(scale(h), dx);
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[h][r]), sc, *acc);
                }
                match g.kind {
                    Kind::Q4_1 | Kind::Q4K | Kind::Q5 => {
                        let dsum = _mm256_set1_ps(*g.x.dsum.get_unchecked(ib));
                        *acc = _mm256_fmadd_ps(scale(1), dsum, *acc);
                    }
                    Kind::Q5z => {
                        let dsum = *g.x.dsum.get_unchecked(ib);
                        *acc = _mm256_fmadd_ps(scale(0), _mm256_set1_ps(-16.0 * dsum), *acc);
                    }
                    Kind::Q8_0 => {}
                    Kind::Q6 => {
                        for h in 0..2 {
                            let ds = *g.x.dsum16.get_unchecked(2 * ib + h);
                            *acc = _mm256_fmadd_ps(scale(h), _mm256_set1_ps(-32.0 * ds), *acc);
                        }
                    }
                    Kind::Q8x16 => {
                        for h in 0..2 {
                            let ds = _mm256_set1_ps(*g.x.dsum16.get_unchecked(2 * ib + h));
                            *acc = _mm256_fmadd_ps(scale(2 + h), ds, *acc);
                        }
                    }
                }
            }
        }
    }
    let first = tile * TILE + 8 * half;
    let valid = (g.n - first).min(8);
    for (r, acc) in acc.iter().enumerate() {
        let mut tmp = [0.0f32; 8];
        // SAFETY: tmp holds 8 floats; the `valid` columns from `first` of row i0 + r are in
        // the caller's rectangle.
        unsafe {
            _mm256_storeu_ps(tmp.as_mut_ptr(), *acc);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), g.out.add((i0 + r) * g.n + first), valid);
        }
    }
}
