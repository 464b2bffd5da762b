//! The float steps of the 8-bit attention around the integer dots, for one vector of 16 query
//! rows and one key block: logits with the causal mask and the block max, u8 probabilities
//! (four keys a u32), and the rescaled accumulation of P·V. A portable version and an AVX-512
//! one that performs the same IEEE operations in the same order (no contraction: Rust does
//! not fuse `a * b + c`; the fused steps are `mul_add` on both), so both give the same bits.
//! (The AVX-512 logits are computed inside the Q·Kᵀ microkernel, `dot::x86::qk_logits`.)

use super::dot::LANES;

/// The degree-4 Taylor polynomial of 255 * 2^f, lowest power first. (A degree-3 fit with the
/// same largest error, 7.7e-5 against 5.6e-5, moved perplexity at 2048 tokens by -0.21%
/// against this one's +0.03% from the f32 kernel: the rounding of small weights is sensitive
/// to where the polynomial's error lies, bench/NOTES.md.)
const LN2: f32 = std::f32::consts::LN_2;
const EXP2: [f32; 5] = [
    255.0,
    LN2 * 255.0,
    LN2 * LN2 / 2.0 * 255.0,
    LN2 * LN2 * LN2 / 6.0 * 255.0,
    LN2 * LN2 * LN2 * LN2 / 24.0 * 255.0,
];

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
/// probability of a logit x (log2 units) below its block's maximum. Relative error of the
/// polynomial on [-0.5, 0.5] below 5.6e-5, a fiftieth of a step at 255.
#[inline(always)]
pub fn exp2_u8(x: f32) -> u32 {
    // below 2^-24 everything rounds to 0; the clamp keeps 2^n a normal float
    let x = fmax(x, -24.0);
    let n = x.round_ties_even();
    let f = x - n;
    let p = f
        .mul_add(EXP2[4], EXP2[3])
        .mul_add(f, EXP2[2])
        .mul_add(f, EXP2[1])
        .mul_add(f, EXP2[0]);
    // p * 2^n is exact (a normal float scaled by a power of two)
    let y = p * f32::from_bits(((n as i32 + 127) as u32) << 23);
    y.round_ties_even() as u32
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
/// keys of the last four are 0), only the groups of four keys with a weight above 0, whose
/// index goes to `at`. Returns each row's sum of the weights and how many groups were kept.
/// `qs` > 0.
pub fn probs(
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
        kept += usize::from(w.iter().any(|&w| w != 0));
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

    /// [`super::exp2_u8`] on 16 lanes (round to nearest even: `vrndscaleps` with mode 0 and
    /// `vcvtps2dq` under the default MXCSR).
    #[inline(always)]
    unsafe fn exp2_u8(x: __m512) -> __m512i {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-24.0));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
        let f = _mm512_sub_ps(x, n);
        let p = _mm512_fmadd_ps(f, _mm512_set1_ps(EXP2[4]), _mm512_set1_ps(EXP2[3]));
        let p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2[2]));
        let p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2[1]));
        let p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2[0]));
        _mm512_cvtps_epi32(_mm512_scalef_ps(p, n))
    }

    /// The u8 probability of the 16 logits at `x`: exp2(x * qs - base).
    ///
    /// # Safety
    /// x..x+16 is readable; the CPU has AVX-512F and FMA.
    #[inline(always)]
    unsafe fn prob(x: *const f32, qs: __m512, nbase: __m512) -> __m512i {
        // SAFETY: as the caller promised
        unsafe { exp2_u8(_mm512_fmadd_ps(_mm512_loadu_ps(x), qs, nbase)) }
    }

    /// [`super::probs`] on AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512F/VNNI and FMA; `logits` holds ke x 16, `p4` ke/4 (rounded up) x 16.
    #[inline(always)]
    pub unsafe fn probs(
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
            for st in 0..steps {
                let mut w = _mm512_setzero_si512();
                if 4 * st + 4 <= ke {
                    let at = logits.as_ptr().add(4 * st * LANES);
                    let p0 = prob(at, qs, nbase);
                    let p1 = prob(at.add(LANES), qs, nbase);
                    let p2 = prob(at.add(2 * LANES), qs, nbase);
                    let p3 = prob(at.add(3 * LANES), qs, nbase);
                    w = _mm512_or_si512(p0, _mm512_slli_epi32::<8>(p1));
                    w = _mm512_or_si512(w, _mm512_slli_epi32::<16>(p2));
                    w = _mm512_or_si512(w, _mm512_slli_epi32::<24>(p3));
                } else {
                    for b in 0..ke - 4 * st {
                        let pb = prob(logits.as_ptr().add((4 * st + b) * LANES), qs, nbase);
                        let shifted = _mm512_sllv_epi32(pb, _mm512_set1_epi32(8 * b as i32));
                        w = _mm512_or_si512(w, shifted);
                    }
                }
                // each lane's four weights summed by one dot with bytes of 1
                psum = _mm512_dpbusd_epi32(psum, w, ones);
                _mm512_storeu_si512(p4.as_mut_ptr().add(kept * LANES) as *mut _, w);
                *at.get_unchecked_mut(kept) = st as u32;
                kept += usize::from(_mm512_test_epi32_mask(w, w) != 0);
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
