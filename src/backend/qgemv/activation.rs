//! The activation row of a decode GEMV, quantized once per product to 8 bits per value with one
//! f32 scale per 32-value block (ggml's Q8_0 rounding: d = max|x| / 127, q = round(x / d)), so
//! the weight blocks can be multiplied with integer dot products (VNNI `vpdpbusd`).

use super::QK;

/// x ≈ d[b] * q[32 b + j], with per-block sums of q for the weight offsets.
pub struct Q8Row {
    /// (cols) quantized values in [-127, 127]
    pub q: Vec<i8>,
    /// (cols / 32) block scales
    pub d: Vec<f32>,
    /// (cols / 32) Σ q over the block
    pub sum: Vec<i32>,
    /// (cols / 32) d * Σ q: the block's sum of x as the integer path sees it (Q4_1's offset term)
    pub dsum: Vec<f32>,
    /// (cols / 32, 2) d * Σ q over each half of 16 values (the offset terms of `Q8x16` weights)
    pub dsum16: Vec<f32>,
}

impl Q8Row {
    /// Quantize `x`; its length must be a multiple of 32.
    pub fn quantize(x: &[f32]) -> Self {
        assert!(
            x.len().is_multiple_of(QK),
            "q8 row: {} values is not a multiple of {QK}",
            x.len()
        );
        let nb = x.len() / QK;
        let mut row = Self {
            q: vec![0; x.len()],
            d: Vec::with_capacity(nb),
            sum: Vec::with_capacity(nb),
            dsum: Vec::with_capacity(nb),
            dsum16: Vec::with_capacity(2 * nb),
        };
        for (xb, qb) in x.chunks_exact(QK).zip(row.q.chunks_exact_mut(QK)) {
            let (d, [lo, hi]) = quantize_block(xb, qb);
            row.d.push(d);
            row.sum.push(lo + hi);
            row.dsum.push(d * (lo + hi) as f32);
            row.dsum16.extend([d * lo as f32, d * hi as f32]);
        }
        row
    }

    pub fn blocks(&self) -> usize {
        self.d.len()
    }

    /// The values the integer path multiplies with, as f32 (for tests).
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .chunks_exact(QK)
            .zip(&self.d)
            .flat_map(|(qb, &d)| qb.iter().map(move |&q| d * q as f32))
            .collect()
    }
}

crate::backend::simd::dispatch! {
    /// One block: q = round(x / d) with d = max|x| / 127; returns d and Σ q over each half.
    pub fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, [i32; 2]) {
        block(x, q)
    }
}

/// Every 32-value block of x: q, and per block d, Σ q, d Σ q and d Σ q over each half. One
/// feature check and call for all of them; on AVX-512 a block is two registers and its max and
/// sums are reduced in them (the compiled loop reduced them lane by lane: 4% of a prefill),
/// with the same float operations as [`block`], so the same bits.
pub fn quantize_blocks(
    x: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    sum: &mut [i32],
    dsum: &mut [f32],
    dsum16: &mut [f32],
) {
    let nb = x.len() / QK;
    assert!(
        q.len() >= nb * QK
            && d.len() >= nb
            && sum.len() >= nb
            && dsum.len() >= nb
            && dsum16.len() >= 2 * nb,
        "quantize_blocks: outputs shorter than {nb} blocks"
    );
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; every output holds nb blocks (checked above)
        return unsafe { x86::quantize_blocks_avx512(x, q, d, sum, dsum, dsum16, nb) };
    }
    quantize_blocks_compiled(x, q, d, sum, dsum, dsum16)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::QK;

    /// [`super::quantize_blocks`] on AVX-512F.
    ///
    /// # Safety
    /// The CPU has AVX-512F; x holds nb blocks and each output nb (dsum16 2 nb).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn quantize_blocks_avx512(
        x: &[f32],
        q: &mut [i8],
        d: &mut [f32],
        sum: &mut [i32],
        dsum: &mut [f32],
        dsum16: &mut [f32],
        nb: usize,
    ) {
        let magic = _mm512_set1_ps(12_582_912.0);
        let bias = _mm512_set1_epi32(0x4B40_0000);
        for b in 0..nb {
            // SAFETY: block b's 32 values and 32 bytes are in bounds (the caller's promise)
            unsafe {
                let xp = x.as_ptr().add(b * QK);
                let x0 = _mm512_loadu_ps(xp);
                let x1 = _mm512_loadu_ps(xp.add(16));
                // |x| by the sign bit; the new value first, so a NaN is passed over as f32::max
                // passes it over
                let m = _mm512_max_ps(
                    _mm512_abs_ps(x1),
                    _mm512_max_ps(_mm512_abs_ps(x0), _mm512_setzero_ps()),
                );
                let amax = _mm512_reduce_max_ps(m);
                let scale = amax / 127.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                let inv = _mm512_set1_ps(inv);
                // round to nearest even by the 1.5 * 2^23 trick, as `block`
                let r0 = _mm512_add_ps(_mm512_mul_ps(x0, inv), magic);
                let r1 = _mm512_add_ps(_mm512_mul_ps(x1, inv), magic);
                let i0 = _mm512_sub_epi32(_mm512_castps_si512(r0), bias);
                let i1 = _mm512_sub_epi32(_mm512_castps_si512(r1), bias);
                let qp = q.as_mut_ptr().add(b * QK);
                _mm_storeu_si128(qp as *mut __m128i, _mm512_cvtepi32_epi8(i0));
                _mm_storeu_si128(qp.add(16) as *mut __m128i, _mm512_cvtepi32_epi8(i1));
                // the sums of the bytes as stored (the i32 lanes are in -128..=127 unless x
                // held a NaN or an infinity: then as `block`, the truncated bytes)
                let b0 = _mm512_cvtepi8_epi32(_mm512_cvtepi32_epi8(i0));
                let b1 = _mm512_cvtepi8_epi32(_mm512_cvtepi32_epi8(i1));
                let lo = _mm512_reduce_add_epi32(b0);
                let hi = _mm512_reduce_add_epi32(b1);
                *d.get_unchecked_mut(b) = scale;
                *sum.get_unchecked_mut(b) = lo + hi;
                *dsum.get_unchecked_mut(b) = scale * (lo + hi) as f32;
                *dsum16.get_unchecked_mut(2 * b) = scale * lo as f32;
                *dsum16.get_unchecked_mut(2 * b + 1) = scale * hi as f32;
            }
        }
    }
}

crate::backend::simd::dispatch! {
    /// [`quantize_blocks`] compiled for the CPU's vector width from [`block`].
    pub fn quantize_blocks_compiled(x: &[f32], q: &mut [i8], d: &mut [f32], sum: &mut [i32], dsum: &mut [f32], dsum16: &mut [f32]) {
        let blocks = q.chunks_exact_mut(QK).zip(x.chunks_exact(QK));
        let sums = d.iter_mut().zip(sum).zip(dsum).zip(dsum16.chunks_exact_mut(2));
        for ((qb, xb), (((d, s), ds), ds16)) in blocks.zip(sums) {
            let (scale, [lo, hi]) = block(xb, qb);
            (*d, *s) = (scale, lo + hi);
            *ds = scale * *s as f32;
            ds16.copy_from_slice(&[scale * lo as f32, scale * hi as f32]);
        }
    }
}

/// The body of `quantize_block`, inlined into each compiled variant.
#[inline(always)]
fn block(x: &[f32], q: &mut [i8]) -> (f32, [i32; 2]) {
    let mut lanes = [0.0f32; 16];
    for c in x.chunks_exact(16) {
        for i in 0..16 {
            lanes[i] = lanes[i].max(c[i].abs());
        }
    }
    let amax = x
        .chunks_exact(16)
        .remainder()
        .iter()
        .fold(lanes.iter().fold(0.0f32, |m, v| m.max(*v)), |m, v| {
            m.max(v.abs())
        });
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(x) {
        // Round to nearest (ties to even; ggml's roundf differs only on exact ties) by
        // adding 1.5 * 2^23: the integer lands in the low mantissa bits. |v * inv| <= 127,
        // so it fits; a float-to-int `as` cast would saturate and not vectorise.
        let bits = (v * inv + 12_582_912.0).to_bits() as i32 - 0x4B40_0000;
        *q = bits as i8;
        sum += *q as i32;
    }
    // the first half's sum on its own (the second is the rest): a short loop of its own keeps
    // the rounding loop above as it vectorises best
    let lo: i32 = q[..16].iter().map(|&v| v as i32).sum();
    (d, [lo, sum - lo])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_error_is_at_most_half_a_step() {
        let x: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
            .collect();
        let mut x = x;
        x[32..64].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
        let r = Q8Row::quantize(&x);
        let back = r.dequantize();
        for b in 0..3 {
            for j in 0..QK {
                let i = b * QK + j;
                assert!((back[i] - x[i]).abs() <= 0.5 * r.d[b] + 1e-7, "{i}");
            }
            let s: i32 = r.q[b * QK..][..QK].iter().map(|&q| q as i32).sum();
            assert_eq!(r.sum[b], s);
            let lo: i32 = r.q[b * QK..][..16].iter().map(|&q| q as i32).sum();
            assert_eq!(
                r.dsum16[2 * b..][..2],
                [r.d[b] * lo as f32, r.d[b] * (s - lo) as f32]
            );
        }
        assert_eq!(r.d[1], 0.0);
        assert!(r.q.iter().all(|&q| q != i8::MIN));
    }

    /// The vector path gives the compiled loop's bits, ties, zeros, denormals and huge values
    /// included.
    #[test]
    fn every_path_rounds_alike() {
        let mut x: Vec<f32> = (0..32 * 64i32)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2_654_435_761) >> 8;
                (h as f32 / (1 << 24) as f32 - 0.5) * 10f32.powi(i % 7 - 3)
            })
            .collect();
        x[32..64].iter_mut().for_each(|v| *v = 0.0);
        x[64..96]
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = (i as f32 - 16.0) * 0.5);
        x[96..128]
            .iter_mut()
            .for_each(|v| *v = f32::MIN_POSITIVE / 8.0);
        x[128] = 3.0e38;
        x[160] = -127.0;
        let nb = x.len() / QK;
        type Blocks = fn(&[f32], &mut [i8], &mut [f32], &mut [i32], &mut [f32], &mut [f32]);
        let run = |f: Blocks| {
            let (mut q, mut d, mut s) = (vec![0i8; x.len()], vec![0f32; nb], vec![0i32; nb]);
            let (mut ds, mut ds16) = (vec![0f32; nb], vec![0f32; 2 * nb]);
            f(&x, &mut q, &mut d, &mut s, &mut ds, &mut ds16);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            (q, bits(&d), s, bits(&ds), bits(&ds16))
        };
        assert_eq!(run(quantize_blocks), run(quantize_blocks_compiled));
    }
}
