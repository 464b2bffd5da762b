//! The float steps of the 8-bit attention around the integer dots, for one vector of 16 query
//! rows and one key block: logits with the causal mask and the block max, u8 probabilities
//! (four keys a u32), and the rescaled accumulation of P·V. A portable version and an AVX-512
//! one that performs the same IEEE operations in the same order (no contraction: Rust does
//! not fuse `a * b + c`; the fused steps are `mul_add` on both), so both give the same bits.
//! (The AVX-512 logits are computed inside the Q·Kᵀ microkernel, `dot::x86::qk_logits`.)

use super::dot::LANES;

/// 255 * 2^f on [0, 1): a degree-4 polynomial, lowest power first, fitted for the least
/// largest relative error (3.0e-6) with p(0) = 255 exactly. (The Taylor polynomial about 0 on
/// [-0.5, 0.5] it replaced has 5.6e-5; a degree-3 fit, 7.7e-5, moved perplexity at 2048
/// tokens by -0.21%: bench/NOTES.md.)
const EXP2: [f32; 5] = [255.0, 176.726_44, 61.526_45, 13.321_831, 3.423_804_5];

/// a > b ? a : b (what `vmaxps a, b` computes; no NaN reaches it).
#[inline(always)]
pub fn fmax(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// round(255 * 2^x) for x <= 0 (up to a rounding residue above 0), in 0..=255: the u8
/// probability of a logit x (log2 units) below its block's maximum; 0 for -inf (a masked
/// key). The steps are those of the AVX-512 path, which has no clamp: the fraction
/// f = x - floor(x) rounded down (`vreduceps` rounds its subtraction in the mode of its floor),
/// the polynomial, the product with 2^floor(x) (`vscalefps`, exact while it is a normal
/// float; below 2^-24 everything rounds to 0), and a rounding saturated at 255 (the packs).
#[inline(always)]
pub fn exp2_u8(x: f32) -> u32 {
    if x.is_nan() || x < -24.0 {
        return 0;
    }
    let n = x.floor();
    let exact = x as f64 - n as f64;
    let mut f = exact as f32;
    if f as f64 > exact {
        f = f.next_down();
    }
    let p = f
        .mul_add(EXP2[4], EXP2[3])
        .mul_add(f, EXP2[2])
        .mul_add(f, EXP2[1])
        .mul_add(f, EXP2[0]);
    let y = p * f32::from_bits(((n as i32 + 127) as u32) << 23);
    (y.round_ties_even() as u32).min(255)
}

/// Logits of `kscale.len()` keys from j0 on, before the query scale: dot * kscale, -inf for
/// the first `dead` keys (outside the key range) and where key j0 + jj is at or past a row's
/// `vis` (checked only from jj = `open` on). Returns the max.
#[allow(clippy::too_many_arguments)]
pub fn logits(
    dots: &[i32],
    kscale: &[f32],
    vis: &[i32; LANES],
    j0: usize,
    dead: usize,
    open: usize,
    out: &mut [f32],
) -> [f32; LANES] {
    let mut bmax = [f32::NEG_INFINITY; LANES];
    for (jj, &ks) in kscale.iter().enumerate() {
        let d = &dots[jj * LANES..][..LANES];
        let o = &mut out[jj * LANES..][..LANES];
        for l in 0..LANES {
            let x = d[l] as f32 * ks;
            let x = if jj < dead || (jj >= open && (j0 + jj) as i32 >= vis[l]) {
                f32::NEG_INFINITY
            } else {
                x
            };
            o[l] = x;
            bmax[l] = fmax(bmax[l], x);
        }
    }
    bmax
}

/// u8 probabilities exp2(logit * qs - base) of `ke` logits, four keys a u32 into `p4` (missing
/// keys of the last four are 0); with `COMPACT` only the groups of four keys with a weight
/// above 0, whose index goes to `at`, else every group. Returns each row's sum of the weights
/// and how many groups were kept. `qs` > 0.
pub fn probs<const COMPACT: bool>(
    logits: &[f32],
    qs: &[f32; LANES],
    base: &[f32; LANES],
    ke: usize,
    p4: &mut [u32],
    at: &mut [u32],
) -> ([u32; LANES], usize) {
    let mut psum = [0u32; LANES];
    let mut kept = 0;
    for st in 0..ke.div_ceil(4) {
        let mut w = [0u32; LANES];
        for b in 0..4.min(ke - 4 * st) {
            let x = &logits[(4 * st + b) * LANES..][..LANES];
            for l in 0..LANES {
                let p = exp2_u8(x[l].mul_add(qs[l], -base[l]));
                psum[l] += p;
                w[l] |= p << (8 * b);
            }
        }
        p4[kept * LANES..][..LANES].copy_from_slice(&w);
        at[kept] = st as u32;
        kept += usize::from(!COMPACT || w.iter().any(|&w| w != 0));
    }
    (psum, kept)
}

/// o = o * corr + pv * (factor * vscale[d]) for each channel d of `o` (hd, 16).
pub fn accumulate(
    o: &mut [f32],
    pv: &[i32],
    vscale: &[f32],
    corr: &[f32; LANES],
    factor: &[f32; LANES],
) {
    for ((o, pv), &f) in o
        .chunks_exact_mut(LANES)
        .zip(pv.chunks_exact(LANES))
        .zip(vscale)
    {
        for l in 0..LANES {
            o[l] = o[l] * corr[l] + pv[l] as f32 * (factor[l] * f);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::{EXP2, LANES};
    use std::arch::x86_64::*;

    /// [`super::exp2_u8`] on 16 lanes, as i32 (the packs saturate them at 255): the fraction
    /// by `vreduceps` (x - floor(x), its subtraction rounded down; -inf gives 0) and the power
    /// of two by `vscalefps`, which takes floor(x) itself (and gives 0 for -inf).
    #[inline(always)]
    unsafe fn exp2_u8(x: __m512) -> __m512i {
        // imm 0x09: no fraction bits kept, exceptions suppressed, round down
        let f = _mm512_reduce_ps::<0x09>(x);
        let p = _mm512_fmadd_ps(f, _mm512_set1_ps(EXP2[4]), _mm512_set1_ps(EXP2[3]));
        let p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2[2]));
        let p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2[1]));
        let p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2[0]));
        _mm512_cvtps_epi32(_mm512_scalef_ps(p, x))
    }

    /// The u8 probability of the 16 logits at `x`: exp2(x * qs - base).
    ///
    /// # Safety
    /// x..x+16 is readable; the CPU has AVX-512F/DQ and FMA.
    #[inline(always)]
    unsafe fn prob(x: *const f32, qs: __m512, nbase: __m512) -> __m512i {
        // SAFETY: as the caller promised
        unsafe { exp2_u8(_mm512_fmadd_ps(_mm512_loadu_ps(x), qs, nbase)) }
    }

    /// Four keys' probabilities (i32 lanes, up to 256) as one u32 a lane, key b in byte b,
    /// saturated at 255: two packs give, in each 128-bit lane, the four keys' bytes one key
    /// after the other, and a byte shuffle turns that 4 x 4 block around.
    #[inline(always)]
    unsafe fn pack4(p0: __m512i, p1: __m512i, p2: __m512i, p3: __m512i) -> __m512i {
        let words01 = _mm512_packus_epi32(p0, p1);
        let words23 = _mm512_packus_epi32(p2, p3);
        let bytes = _mm512_packus_epi16(words01, words23);
        let turn = _mm512_broadcast_i32x4(_mm_setr_epi8(
            0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
        ));
        _mm512_shuffle_epi8(bytes, turn)
    }

    /// [`super::probs`] on AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/DQ/VNNI and FMA; `logits` holds ke x 16, `p4` ke/4 (rounded up) x 16.
    #[inline(always)]
    pub unsafe fn probs<const COMPACT: bool>(
        logits: &[f32],
        qs: &[f32; LANES],
        base: &[f32; LANES],
        ke: usize,
        p4: &mut [u32],
        at: &mut [u32],
    ) -> ([u32; LANES], usize) {
        let steps = ke.div_ceil(4);
        assert!(logits.len() >= ke * LANES && p4.len() >= steps * LANES && at.len() >= steps);
        let mut kept = 0;
        // SAFETY: rows below ke of logits and below steps of p4 (asserted)
        unsafe {
            let qs = _mm512_loadu_ps(qs.as_ptr());
            let nbase = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_loadu_ps(base.as_ptr()));
            let mut psum = _mm512_setzero_si512();
            let ones = _mm512_set1_epi8(1);
            let mut step = |st: usize, w: __m512i| {
                // each lane's four weights summed by one dot with bytes of 1
                psum = _mm512_dpbusd_epi32(psum, w, ones);
                _mm512_storeu_si512(p4.as_mut_ptr().add(kept * LANES) as *mut _, w);
                *at.get_unchecked_mut(kept) = st as u32;
                kept += usize::from(!COMPACT || _mm512_test_epi32_mask(w, w) != 0);
            };
            // (written out, not through `array::map`: its closure runs inside a function
            // compiled without this one's target features, where the intrinsics do not
            // inline; that ran 5x slower)
            let full = ke / 4;
            for st in 0..full {
                let x = logits.as_ptr().add(4 * st * LANES);
                let p0 = prob(x, qs, nbase);
                let p1 = prob(x.add(LANES), qs, nbase);
                let p2 = prob(x.add(2 * LANES), qs, nbase);
                let p3 = prob(x.add(3 * LANES), qs, nbase);
                step(st, pack4(p0, p1, p2, p3));
            }
            if full < steps {
                let (x, rest) = (logits.as_ptr().add(4 * full * LANES), ke - 4 * full);
                let zero = _mm512_setzero_si512();
                let p0 = prob(x, qs, nbase);
                let p1 = if rest > 1 {
                    prob(x.add(LANES), qs, nbase)
                } else {
                    zero
                };
                let p2 = if rest > 2 {
                    prob(x.add(2 * LANES), qs, nbase)
                } else {
                    zero
                };
                step(full, pack4(p0, p1, p2, zero));
            }
            let mut r = [0u32; LANES];
            _mm512_storeu_si512(r.as_mut_ptr() as *mut _, psum);
            (r, kept)
        }
    }

    /// [`super::accumulate`] on AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `o` and `pv` hold vscale.len() x 16.
    #[inline(always)]
    pub unsafe fn accumulate(
        o: &mut [f32],
        pv: &[i32],
        vscale: &[f32],
        corr: &[f32; LANES],
        factor: &[f32; LANES],
    ) {
        let hd = vscale.len();
        assert!(o.len() >= hd * LANES && pv.len() >= hd * LANES);
        // SAFETY: rows below hd of o and pv (asserted)
        unsafe {
            let corr = _mm512_loadu_ps(corr.as_ptr());
            let factor = _mm512_loadu_ps(factor.as_ptr());
            for (d, &f) in vscale.iter().enumerate() {
                let op = o.as_mut_ptr().add(d * LANES);
                let p =
                    _mm512_cvtepi32_ps(_mm512_loadu_si512(pv.as_ptr().add(d * LANES) as *const _));
                let kept = _mm512_mul_ps(_mm512_loadu_ps(op), corr);
                let add = _mm512_mul_ps(p, _mm512_mul_ps(factor, _mm512_set1_ps(f)));
                _mm512_storeu_ps(op, _mm512_add_ps(kept, add));
            }
        }
    }
}
