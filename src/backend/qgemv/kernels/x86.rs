//! The x86 versions of the kernels in the parent module: AVX-512 VNNI and AVX2.

use std::arch::x86_64::*;

use super::{
    q4k_offsets, Q8Row, Tiles, Q4K_BLOCKS, Q4K_LINES, Q4K_SUPER, Q4_1_LINES, Q4_1_SCALES,
    Q5Z_SCALES, Q5_LINES, Q6_LINES, Q8X16_LINES, Q8X16_SCALES, Q8_0_LINES, Q8_0_SCALES, TILE,
};
use crate::backend::qgemv::QK;

/// Four activation bytes starting at `i`, as one i32 to broadcast.
#[inline(always)]
unsafe fn x4(x: &Q8Row, i: usize) -> i32 {
    // SAFETY (caller): i + 4 <= x.q.len().
    unsafe { (x.q.as_ptr().add(i) as *const i32).read_unaligned() }
}

/// Write a tile's 16 results; the last tile of a run may be partial.
#[inline(always)]
unsafe fn store16(acc: __m512, out: &mut [f32], tile: usize) {
    let rows = (out.len() - tile * TILE).min(TILE);
    let mask: __mmask16 = if rows == TILE {
        0xFFFF
    } else {
        (1u16 << rows) - 1
    };
    // SAFETY (caller): rows tile*16 .. tile*16+rows are inside `out`; masked lanes are not
    // written.
    unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(tile * TILE), mask, acc) }
}

/// Line k's low and high nibbles of a Q5 tile-block with their fifth bits from the bit
/// line `h` (see the module doc): `(lo | bit k << 4, hi | bit 4+k << 4)` per byte.
#[inline(always)]
pub(crate) unsafe fn five_bits_512(
    lo: __m512i,
    hi: __m512i,
    h: __m512i,
    k: usize,
) -> (__m512i, __m512i) {
    let bit = _mm512_set1_epi8(0x10);
    // 16-bit shifts: bit 4 of each byte comes from a bit of the same byte (k < 4)
    let up = _mm512_sll_epi16(h, _mm_cvtsi32_si128(4 - k as i32));
    let down = _mm512_srl_epi16(h, _mm_cvtsi32_si128(k as i32));
    (
        _mm512_or_si512(lo, _mm512_and_si512(up, bit)),
        _mm512_or_si512(hi, _mm512_and_si512(down, bit)),
    )
}

/// Each lane's i32 dot of its 32 quants in one tile-block of nibble lines (with `FIVE`, their
/// fifth bits from line 4) with activation block `b`.
///
/// SAFETY (caller): AVX-512F/BW/VNNI; the tile-block's lines at `lines`; block b inside x.
#[inline(always)]
unsafe fn nibble_dot_512<const FIVE: bool>(lines: *const __m512i, x: &Q8Row, b: usize) -> __m512i {
    let nibble = _mm512_set1_epi8(0x0F);
    // SAFETY: as the caller promised.
    unsafe {
        let (mut lo_acc, mut hi_acc) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let h = if FIVE {
            _mm512_load_si512(lines.add(4))
        } else {
            _mm512_setzero_si512()
        };
        for k in 0..4 {
            let w = _mm512_load_si512(lines.add(k));
            let mut lo = _mm512_and_si512(w, nibble);
            let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), nibble);
            if FIVE {
                (lo, hi) = five_bits_512(lo, hi, h, k);
            }
            let xlo = _mm512_set1_epi32(x4(x, b * QK + 4 * k));
            let xhi = _mm512_set1_epi32(x4(x, b * QK + 16 + 4 * k));
            lo_acc = _mm512_dpbusd_epi32(lo_acc, lo, xlo);
            hi_acc = _mm512_dpbusd_epi32(hi_acc, hi, xhi);
        }
        _mm512_add_epi32(lo_acc, hi_acc)
    }
}

/// 16 bytes at `p` as 16 f32 lanes.
#[inline(always)]
pub(crate) unsafe fn bytes_ps_512(p: *const u8) -> __m512 {
    // SAFETY (caller): 16 readable bytes at p.
    unsafe { _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))) }
}

/// d and dmin (16 lanes, f32) of the super-block of Q4K tile-block `tb` (counted from the tile
/// where `scales` starts).
///
/// SAFETY (caller): AVX-512F and F16C; the super-block lies inside `scales`.
#[inline(always)]
pub(crate) unsafe fn q4k_super_512(scales: *const u16, tb: usize) -> (__m512, __m512) {
    let sup = q4k_offsets(tb).0;
    // SAFETY: as the caller promised.
    unsafe {
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(sup) as *const __m256i));
        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(sup + TILE) as *const __m256i));
        (d, dmin)
    }
}

/// Scale d sc and min -dmin m of the 16 lanes of Q4K tile-block `tb`, from its super-block's
/// `d` and `dmin` (`q4k_super_512`): exact f32 products of the f16 and the 6-bit codes.
///
/// SAFETY (caller): AVX-512F; the tile-block lies inside `scales`.
#[inline(always)]
pub(crate) unsafe fn q4k_scale_min_512(
    scales: *const u16,
    tb: usize,
    d: __m512,
    dmin: __m512,
) -> (__m512, __m512) {
    // SAFETY: as the caller promised.
    unsafe {
        let own = scales.add(q4k_offsets(tb).1) as *const u8;
        let m = _mm512_fnmadd_ps(dmin, bytes_ps_512(own.add(TILE)), _mm512_setzero_ps());
        (_mm512_mul_ps(d, bytes_ps_512(own)), m)
    }
}

/// Q4_1 tiles, or with `FIVE` Q5 tiles.
///
/// SAFETY: the CPU has AVX-512F/BW/VNNI and F16C; `t` holds every tile-block of `out`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
pub unsafe fn q4_1_vnni<const FIVE: bool, const OFF16: bool>(
    t: &Tiles,
    x: &Q8Row,
    out: &mut [f32],
) {
    let n_lines = if FIVE { Q5_LINES } else { Q4_1_LINES };
    let scales = if OFF16 { Q5Z_SCALES } else { Q4_1_SCALES };
    for tile in 0..out.len().div_ceil(TILE) {
        let (mut acc_d, mut acc_m) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for b in 0..t.nb {
            let tb = tile * t.nb + b;
            // SAFETY: tb < tiles * nb, so its lines and scales are in bounds (`check`);
            // b * 32 + 32 <= x.q.len().
            unsafe {
                let lines = t.quants.as_ptr().add(tb * n_lines) as *const __m512i;
                let dot = _mm512_cvtepi32_ps(nibble_dot_512::<FIVE>(lines, x, b));
                let s = t.scales.as_ptr().add(tb * scales);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(s as *const __m256i));
                let m = if OFF16 {
                    _mm512_mul_ps(d, _mm512_set1_ps(-16.0))
                } else {
                    _mm512_cvtph_ps(_mm256_loadu_si256(s.add(TILE) as *const __m256i))
                };
                let dx = _mm512_mul_ps(d, _mm512_set1_ps(*x.d.get_unchecked(b)));
                acc_d = _mm512_fmadd_ps(dx, dot, acc_d);
                acc_m = _mm512_fmadd_ps(m, _mm512_set1_ps(*x.dsum.get_unchecked(b)), acc_m);
            }
        }
        // SAFETY: `tile` is one of out's tiles.
        unsafe { store16(_mm512_add_ps(acc_d, acc_m), out, tile) };
    }
}

/// Q4K tiles: per super-block of 8 blocks, Σ_b sc_b d_x,b dot_b and Σ_b m_b d_x,b Σ q_x,b in f32,
/// then × d and × -dmin.
///
/// SAFETY: as `q4_1_vnni`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
pub unsafe fn q4k_vnni(t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    for tile in 0..out.len().div_ceil(TILE) {
        let mut acc = _mm512_setzero_ps();
        for b0 in (0..t.nb).step_by(Q4K_BLOCKS) {
            let tb0 = tile * t.nb + b0;
            let (mut sum_d, mut sum_m) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            // SAFETY: tile-blocks tb0..tb0 + 8 and their super-block's scales are in bounds
            // (`check`; nb is a multiple of 8); b * 32 + 32 <= x.q.len().
            unsafe {
                let sup = t.scales.as_ptr().add(tb0 / Q4K_BLOCKS * Q4K_SUPER);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(sup as *const __m256i));
                let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(sup.add(TILE) as *const __m256i));
                for j in 0..Q4K_BLOCKS {
                    let (tb, b) = (tb0 + j, b0 + j);
                    let lines = t.quants.as_ptr().add(tb * Q4K_LINES) as *const __m512i;
                    let dot = _mm512_cvtepi32_ps(nibble_dot_512::<false>(lines, x, b));
                    let own = sup.add(2 * TILE + j * TILE) as *const u8;
                    let sc = bytes_ps_512(own);
                    let m = bytes_ps_512(own.add(TILE));
                    let dx = _mm512_set1_ps(*x.d.get_unchecked(b));
                    sum_d = _mm512_fmadd_ps(_mm512_mul_ps(sc, dx), dot, sum_d);
                    sum_m = _mm512_fmadd_ps(m, _mm512_set1_ps(*x.dsum.get_unchecked(b)), sum_m);
                }
                acc = _mm512_fmadd_ps(d, sum_d, acc);
                acc = _mm512_fnmadd_ps(dmin, sum_m, acc);
            }
        }
        // SAFETY: `tile` is one of out's tiles.
        unsafe { store16(acc, out, tile) };
    }
}

/// SAFETY: as `q4_1_vnni`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
pub unsafe fn q8_0_vnni(t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    for tile in 0..out.len().div_ceil(TILE) {
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for b in 0..t.nb {
            let tb = tile * t.nb + b;
            // SAFETY: as in `q4_1_vnni`.
            unsafe {
                let lines = t.quants.as_ptr().add(tb * Q8_0_LINES) as *const __m512i;
                let (mut i0, mut i1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for k in (0..Q8_0_LINES).step_by(2) {
                    let w0 = _mm512_load_si512(lines.add(k));
                    let w1 = _mm512_load_si512(lines.add(k + 1));
                    i0 = _mm512_dpbusd_epi32(i0, w0, _mm512_set1_epi32(x4(x, b * QK + 4 * k)));
                    i1 = _mm512_dpbusd_epi32(i1, w1, _mm512_set1_epi32(x4(x, b * QK + 4 * k + 4)));
                }
                // the weights were stored as w + 128: remove 128 Σ x
                let bias = _mm512_set1_epi32(*x.sum.get_unchecked(b) << 7);
                let dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(i0, i1), bias));
                let s = t.scales.as_ptr().add(tb * Q8_0_SCALES);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(s as *const __m256i));
                let dx = _mm512_mul_ps(d, _mm512_set1_ps(*x.d.get_unchecked(b)));
                // two accumulators: alternate blocks, so the FMA latency chains overlap
                if b % 2 == 0 {
                    acc0 = _mm512_fmadd_ps(dx, dot, acc0);
                } else {
                    acc1 = _mm512_fmadd_ps(dx, dot, acc1);
                }
            }
        }
        // SAFETY: `tile` is one of out's tiles.
        unsafe { store16(_mm512_add_ps(acc0, acc1), out, tile) };
    }
}

/// SAFETY: as `q4_1_vnni`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
pub unsafe fn q8x16_vnni(t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    for tile in 0..out.len().div_ceil(TILE) {
        let (mut acc_lo, mut acc_hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for b in 0..t.nb {
            let tb = tile * t.nb + b;
            // SAFETY: as in `q4_1_vnni`.
            unsafe {
                let lines = t.quants.as_ptr().add(tb * Q8X16_LINES) as *const __m512i;
                let (mut lo, mut hi) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for k in 0..4 {
                    let xlo = _mm512_set1_epi32(x4(x, b * QK + 4 * k));
                    let xhi = _mm512_set1_epi32(x4(x, b * QK + 16 + 4 * k));
                    lo = _mm512_dpbusd_epi32(lo, _mm512_load_si512(lines.add(k)), xlo);
                    hi = _mm512_dpbusd_epi32(hi, _mm512_load_si512(lines.add(4 + k)), xhi);
                }
                let s = t.scales.as_ptr().add(tb * Q8X16_SCALES);
                let scale = |i: usize| {
                    _mm512_cvtph_ps(_mm256_loadu_si256(s.add(i * TILE) as *const __m256i))
                };
                let dx = _mm512_set1_ps(*x.d.get_unchecked(b));
                let ds = x.dsum16.as_ptr().add(2 * b);
                acc_lo =
                    _mm512_fmadd_ps(_mm512_mul_ps(scale(0), dx), _mm512_cvtepi32_ps(lo), acc_lo);
                acc_hi =
                    _mm512_fmadd_ps(_mm512_mul_ps(scale(1), dx), _mm512_cvtepi32_ps(hi), acc_hi);
                acc_lo = _mm512_fmadd_ps(scale(2), _mm512_set1_ps(*ds), acc_lo);
                acc_hi = _mm512_fmadd_ps(scale(3), _mm512_set1_ps(*ds.add(1)), acc_hi);
            }
        }
        // SAFETY: `tile` is one of out's tiles.
        unsafe { store16(_mm512_add_ps(acc_lo, acc_hi), out, tile) };
    }
}

/// A Q6 high-bit line's four bit pairs, pair k (bits 2k, 2k+1 of each byte) moved to bits
/// 4, 5 and the rest cleared: entry k is what line k's nibbles OR in. (16-bit shifts keep
/// bits 4, 5 within their byte.)
#[inline(always)]
pub(crate) unsafe fn six_bits_512(h: __m512i) -> [__m512i; 4] {
    let m = _mm512_set1_epi8(0x30);
    [
        _mm512_and_si512(_mm512_slli_epi16::<4>(h), m),
        _mm512_and_si512(_mm512_slli_epi16::<2>(h), m),
        _mm512_and_si512(h, m),
        _mm512_and_si512(_mm512_srli_epi16::<2>(h), m),
    ]
}

/// `six_bits_512` on half a line.
#[inline(always)]
pub(crate) unsafe fn six_bits_256(h: __m256i) -> [__m256i; 4] {
    let m = _mm256_set1_epi8(0x30);
    [
        _mm256_and_si256(_mm256_slli_epi16::<4>(h), m),
        _mm256_and_si256(_mm256_slli_epi16::<2>(h), m),
        _mm256_and_si256(h, m),
        _mm256_and_si256(_mm256_srli_epi16::<2>(h), m),
    ]
}

/// SAFETY: as `q4_1_vnni`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
pub unsafe fn q6_vnni(t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    let nibble = _mm512_set1_epi8(0x0F);
    for tile in 0..out.len().div_ceil(TILE) {
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for b in 0..t.nb {
            let tb = tile * t.nb + b;
            // SAFETY: as in `q4_1_vnni`.
            unsafe {
                let lines = t.quants.as_ptr().add(tb * Q6_LINES) as *const __m512i;
                let h0 = six_bits_512(_mm512_load_si512(lines.add(4)));
                let h1 = six_bits_512(_mm512_load_si512(lines.add(5)));
                let (mut lo_acc, mut hi_acc) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for k in 0..4 {
                    let w = _mm512_load_si512(lines.add(k));
                    let lo = _mm512_or_si512(_mm512_and_si512(w, nibble), h0[k]);
                    let hi =
                        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(w), nibble), h1[k]);
                    let xlo = _mm512_set1_epi32(x4(x, b * QK + 4 * k));
                    let xhi = _mm512_set1_epi32(x4(x, b * QK + 16 + 4 * k));
                    lo_acc = _mm512_dpbusd_epi32(lo_acc, lo, xlo);
                    hi_acc = _mm512_dpbusd_epi32(hi_acc, hi, xhi);
                }
                let s = t.scales.as_ptr().add(tb * Q4_1_SCALES);
                let d0 = _mm512_cvtph_ps(_mm256_loadu_si256(s as *const __m256i));
                let d1 = _mm512_cvtph_ps(_mm256_loadu_si256(s.add(TILE) as *const __m256i));
                let dx = _mm512_set1_ps(*x.d.get_unchecked(b));
                let ds = x.dsum16.as_ptr().add(2 * b);
                // d_h (d_x dot_h - 32 d_x Σ_h q_x)
                let c0 = _mm512_set1_ps(32.0 * *ds);
                let c1 = _mm512_set1_ps(32.0 * *ds.add(1));
                let v0 = _mm512_fmsub_ps(_mm512_cvtepi32_ps(lo_acc), dx, c0);
                let v1 = _mm512_fmsub_ps(_mm512_cvtepi32_ps(hi_acc), dx, c1);
                acc0 = _mm512_fmadd_ps(d0, v0, acc0);
                acc1 = _mm512_fmadd_ps(d1, v1, acc1);
            }
        }
        // SAFETY: `tile` is one of out's tiles.
        unsafe { store16(_mm512_add_ps(acc0, acc1), out, tile) };
    }
}

/// Write 8 results of a tile half; partial at the end of `out`.
#[inline(always)]
unsafe fn store8(acc: __m256, out: &mut [f32], first: usize) {
    if first >= out.len() {
        return;
    }
    let mut tmp = [0.0f32; 8];
    // SAFETY: tmp holds 8 floats.
    unsafe { _mm256_storeu_ps(tmp.as_mut_ptr(), acc) };
    let n = (out.len() - first).min(8);
    out[first..first + n].copy_from_slice(&tmp[..n]);
}

/// `five_bits_512` on half a line.
#[inline(always)]
pub(crate) unsafe fn five_bits_256(
    lo: __m256i,
    hi: __m256i,
    h: __m256i,
    k: usize,
) -> (__m256i, __m256i) {
    let bit = _mm256_set1_epi8(0x10);
    let up = _mm256_sll_epi16(h, _mm_cvtsi32_si128(4 - k as i32));
    let down = _mm256_srl_epi16(h, _mm_cvtsi32_si128(k as i32));
    (
        _mm256_or_si256(lo, _mm256_and_si256(up, bit)),
        _mm256_or_si256(hi, _mm256_and_si256(down, bit)),
    )
}

/// `nibble_dot_512` for the 8 lanes of half a tile: `half` points to the half's bytes of the
/// tile-block's first line (the lines are 64 bytes apart).
///
/// SAFETY (caller): AVX2; the lines are readable; block b inside x.
#[inline(always)]
unsafe fn nibble_dot_256<const FIVE: bool>(half: *const u8, x: &Q8Row, b: usize) -> __m256i {
    let nibble = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // SAFETY: as the caller promised; 32-byte aligned (a line's half).
    unsafe {
        let line = |k: usize| _mm256_load_si256(half.add(64 * k) as *const __m256i);
        let h = if FIVE {
            line(4)
        } else {
            _mm256_setzero_si256()
        };
        let mut isum = _mm256_setzero_si256();
        for k in 0..4 {
            let w = line(k);
            let mut lo = _mm256_and_si256(w, nibble);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), nibble);
            if FIVE {
                (lo, hi) = five_bits_256(lo, hi, h, k);
            }
            let xlo = _mm256_set1_epi32(x4(x, b * QK + 4 * k));
            let xhi = _mm256_set1_epi32(x4(x, b * QK + 16 + 4 * k));
            // |31 * 127 * 2| twice fits i16
            let p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, ones));
        }
        isum
    }
}

/// 8 bytes at `p` as 8 f32 lanes.
#[inline(always)]
pub(crate) unsafe fn bytes_ps_256(p: *const u8) -> __m256 {
    // SAFETY (caller): 8 readable bytes at p.
    unsafe { _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
}

/// Q4_1 tiles, or with `FIVE` Q5 tiles.
///
/// SAFETY: the CPU has AVX2, FMA and F16C; `t` holds every tile-block of `out`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_1_avx2<const FIVE: bool, const OFF16: bool>(
    t: &Tiles,
    x: &Q8Row,
    out: &mut [f32],
) {
    let n_lines = if FIVE { Q5_LINES } else { Q4_1_LINES };
    let scales = if OFF16 { Q5Z_SCALES } else { Q4_1_SCALES };
    for tile in 0..out.len().div_ceil(TILE) {
        for half in 0..2 {
            let (mut acc_d, mut acc_m) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for b in 0..t.nb {
                let tb = tile * t.nb + b;
                // SAFETY: as in `q4_1_vnni`; half * 32 + 32 <= 64 bytes of a line.
                unsafe {
                    let lines = t.quants.as_ptr().add(tb * n_lines) as *const u8;
                    let isum = nibble_dot_256::<FIVE>(lines.add(32 * half), x, b);
                    let s = t.scales.as_ptr().add(tb * scales + 8 * half);
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(s as *const __m128i));
                    let m = if OFF16 {
                        _mm256_mul_ps(d, _mm256_set1_ps(-16.0))
                    } else {
                        _mm256_cvtph_ps(_mm_loadu_si128(s.add(TILE) as *const __m128i))
                    };
                    let dx = _mm256_mul_ps(d, _mm256_set1_ps(*x.d.get_unchecked(b)));
                    acc_d = _mm256_fmadd_ps(dx, _mm256_cvtepi32_ps(isum), acc_d);
                    acc_m = _mm256_fmadd_ps(m, _mm256_set1_ps(*x.dsum.get_unchecked(b)), acc_m);
                }
            }
            // SAFETY: plain store of 8 lanes.
            unsafe { store8(_mm256_add_ps(acc_d, acc_m), out, tile * TILE + 8 * half) };
        }
    }
}

/// `q4k_vnni` in halves of 8 rows.
///
/// SAFETY: as `q4_1_avx2`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4k_avx2(t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    for tile in 0..out.len().div_ceil(TILE) {
        for half in 0..2 {
            let mut acc = _mm256_setzero_ps();
            for b0 in (0..t.nb).step_by(Q4K_BLOCKS) {
                let tb0 = tile * t.nb + b0;
                let (mut sum_d, mut sum_m) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                // SAFETY: as in `q4k_vnni`; half * 32 + 32 <= 64 bytes of a line.
                unsafe {
                    for j in 0..Q4K_BLOCKS {
                        let (tb, b) = (tb0 + j, b0 + j);
                        let lines = t.quants.as_ptr().add(tb * Q4K_LINES) as *const u8;
                        let isum = nibble_dot_256::<false>(lines.add(32 * half), x, b);
                        let own = t.scales.as_ptr().add(q4k_offsets(tb).1) as *const u8;
                        let sc = bytes_ps_256(own.add(8 * half));
                        let m = bytes_ps_256(own.add(TILE + 8 * half));
                        let dx = _mm256_set1_ps(*x.d.get_unchecked(b));
                        let dot = _mm256_cvtepi32_ps(isum);
                        sum_d = _mm256_fmadd_ps(_mm256_mul_ps(sc, dx), dot, sum_d);
                        let dsum = _mm256_set1_ps(*x.dsum.get_unchecked(b));
                        sum_m = _mm256_fmadd_ps(m, dsum, sum_m);
                    }
                    let sup = t
                        .scales
                        .as_ptr()
                        .add(tb0 / Q4K_BLOCKS * Q4K_SUPER + 8 * half);
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(sup as *const __m128i));
                    let dmin = _mm256_cvtph_ps(_mm_loadu_si128(sup.add(TILE) as *const __m128i));
                    acc = _mm256_fmadd_ps(d, sum_d, acc);
                    acc = _mm256_fnmadd_ps(dmin, sum_m, acc);
                }
            }
            // SAFETY: plain store of 8 lanes.
            unsafe { store8(acc, out, tile * TILE + 8 * half) };
        }
    }
}

/// SAFETY: as `q4_1_avx2`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q8_0_avx2(t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    for tile in 0..out.len().div_ceil(TILE) {
        for half in 0..2 {
            let mut acc = _mm256_setzero_ps();
            for b in 0..t.nb {
                let tb = tile * t.nb + b;
                // SAFETY: as in `q4_1_avx2`.
                unsafe {
                    let lines = t.quants.as_ptr().add(tb * Q8_0_LINES) as *const u8;
                    let mut isum = _mm256_setzero_si256();
                    for k in 0..Q8_0_LINES {
                        let u = _mm256_load_si256(lines.add(64 * k + 32 * half) as *const __m256i);
                        let w = _mm256_xor_si256(u, flip); // back to signed
                        let xk = _mm256_set1_epi32(x4(x, b * QK + 4 * k));
                        // |w| * sign(x, w): unsigned × signed, at most 128 * 127 * 2 per i16
                        let p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xk, w));
                        isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, ones));
                    }
                    let s = t.scales.as_ptr().add(tb * Q8_0_SCALES + 8 * half);
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(s as *const __m128i));
                    let dx = _mm256_mul_ps(d, _mm256_set1_ps(*x.d.get_unchecked(b)));
                    acc = _mm256_fmadd_ps(dx, _mm256_cvtepi32_ps(isum), acc);
                }
            }
            // SAFETY: plain store of 8 lanes.
            unsafe { store8(acc, out, tile * TILE + 8 * half) };
        }
    }
}

/// SAFETY: as `q4_1_avx2`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q8x16_avx2(t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    let ones = _mm256_set1_epi16(1);
    for tile in 0..out.len().div_ceil(TILE) {
        for half in 0..2 {
            let mut acc = _mm256_setzero_ps();
            for b in 0..t.nb {
                let tb = tile * t.nb + b;
                // SAFETY: as in `q4_1_avx2`.
                unsafe {
                    let lines = t.quants.as_ptr().add(tb * Q8X16_LINES) as *const u8;
                    let s = t.scales.as_ptr().add(tb * Q8X16_SCALES + 8 * half);
                    let dx = _mm256_set1_ps(*x.d.get_unchecked(b));
                    for h in 0..2 {
                        let mut isum = _mm256_setzero_si256();
                        for k in 4 * h..4 * h + 4 {
                            let w =
                                _mm256_load_si256(lines.add(64 * k + 32 * half) as *const __m256i);
                            let xk = _mm256_set1_epi32(x4(x, b * QK + 4 * k));
                            // quants below 64: 63 * 127 * 2 fits i16
                            let p = _mm256_maddubs_epi16(w, xk);
                            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, ones));
                        }
                        let scale = |i: usize| {
                            _mm256_cvtph_ps(_mm_loadu_si128(s.add(i * TILE) as *const __m128i))
                        };
                        let d = _mm256_mul_ps(scale(h), dx);
                        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum), acc);
                        let ds = _mm256_set1_ps(*x.dsum16.get_unchecked(2 * b + h));
                        acc = _mm256_fmadd_ps(scale(2 + h), ds, acc);
                    }
                }
            }
            // SAFETY: plain store of 8 lanes.
            unsafe { store8(acc, out, tile * TILE + 8 * half) };
        }
    }
}

/// SAFETY: as `q4_1_avx2`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q6_avx2(t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    let nibble = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for tile in 0..out.len().div_ceil(TILE) {
        for half in 0..2 {
            let mut acc = _mm256_setzero_ps();
            for b in 0..t.nb {
                let tb = tile * t.nb + b;
                // SAFETY: as in `q4_1_avx2`.
                unsafe {
                    let lines = t.quants.as_ptr().add(tb * Q6_LINES) as *const u8;
                    let line = |k: usize| {
                        _mm256_load_si256(lines.add(64 * k + 32 * half) as *const __m256i)
                    };
                    let (h0, h1) = (six_bits_256(line(4)), six_bits_256(line(5)));
                    let (mut lo_sum, mut hi_sum) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for k in 0..4 {
                        let w = line(k);
                        let lo = _mm256_or_si256(_mm256_and_si256(w, nibble), h0[k]);
                        let hi = _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(w), nibble),
                            h1[k],
                        );
                        let xlo = _mm256_set1_epi32(x4(x, b * QK + 4 * k));
                        let xhi = _mm256_set1_epi32(x4(x, b * QK + 16 + 4 * k));
                        // quants below 64: 63 * 127 * 2 fits i16
                        let plo = _mm256_maddubs_epi16(lo, xlo);
                        let phi = _mm256_maddubs_epi16(hi, xhi);
                        lo_sum = _mm256_add_epi32(lo_sum, _mm256_madd_epi16(plo, ones));
                        hi_sum = _mm256_add_epi32(hi_sum, _mm256_madd_epi16(phi, ones));
                    }
                    let s = t.scales.as_ptr().add(tb * Q4_1_SCALES + 8 * half);
                    let d0 = _mm256_cvtph_ps(_mm_loadu_si128(s as *const __m128i));
                    let d1 = _mm256_cvtph_ps(_mm_loadu_si128(s.add(TILE) as *const __m128i));
                    let dx = _mm256_set1_ps(*x.d.get_unchecked(b));
                    let ds = x.dsum16.as_ptr().add(2 * b);
                    let v0 =
                        _mm256_fmsub_ps(_mm256_cvtepi32_ps(lo_sum), dx, _mm256_set1_ps(32.0 * *ds));
                    let v1 = _mm256_fmsub_ps(
                        _mm256_cvtepi32_ps(hi_sum),
                        dx,
                        _mm256_set1_ps(32.0 * *ds.add(1)),
                    );
                    acc = _mm256_fmadd_ps(d0, v0, acc);
                    acc = _mm256_fmadd_ps(d1, v1, acc);
                }
            }
            // SAFETY: plain store of 8 lanes.
            unsafe { store8(acc, out, tile * TILE + 8 * half) };
        }
    }
}
