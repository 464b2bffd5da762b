//! How the KV cache is stored, shared by the kernels that read it (src/backend) and the caches
//! and KV manager that write and move it (src/kv): the element type [`KvDtype`] with its
//! conversions, the borrowed view the attention kernels read ([`KvView`]), and the per-channel
//! key scale of Q8 keys ([`unscale_keys`]).
//!
//! Elements are stored in `u16` words and widened to f32 for arithmetic: 16-bit
//! floats (f16 or bf16 bit patterns, one word a value: half the bytes of f32), or Q8: groups of
//! 32 values as one f16 scale and 32 int8 (17 words, 1.0625 bytes a value, GGML's Q8_0 layout).
//! A decode step at long context is bound by reading these bytes.
//!
//! Q8 groups never straddle a head: rows and heads must be multiples of 32 values
//! ([`KvDtype::check_head_dim`]). A group's scale is `max|x| / 127` rounded to f16, and each value
//! `round(x / scale)` clamped to ±127; widening is `q * scale` in f32.
//!
//! Conversions come in three paths (AVX-512, AVX2+F16C, scalar) selected by [`Isa`]; all give
//! bit-identical results (round to nearest even; bf16 NaNs stay NaN).

use std::sync::atomic::{AtomicU8, Ordering};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::isa::Isa;

/// How a KV element is stored. `Default` (f16) is a bare cache's type; the app's default
/// (`[model] kv_dtype`) is Q8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// IEEE half: 10-bit mantissa, range ±65504
    #[default]
    F16,
    /// bfloat16: 7-bit mantissa, f32's range
    Bf16,
    /// int8 with an f16 scale per 32 values
    Q8,
}

/// A backend's [`KvDtype`] for the pools it makes from now on, changed through a shared
/// reference (a loaded model's backend lives behind one); a clone holds the same type.
#[derive(Debug)]
pub struct KvDtypeCell(AtomicU8);

impl KvDtypeCell {
    pub const fn new(dtype: KvDtype) -> Self {
        Self(AtomicU8::new(match dtype {
            KvDtype::F16 => 0,
            KvDtype::Bf16 => 1,
            KvDtype::Q8 => 2,
        }))
    }

    pub fn get(&self) -> KvDtype {
        match self.0.load(Ordering::Relaxed) {
            0 => KvDtype::F16,
            1 => KvDtype::Bf16,
            _ => KvDtype::Q8,
        }
    }

    pub fn set(&self, dtype: KvDtype) {
        self.0
            .store(Self::new(dtype).0.into_inner(), Ordering::Relaxed);
    }
}

impl Clone for KvDtypeCell {
    fn clone(&self) -> Self {
        Self::new(self.get())
    }
}

/// Values per Q8 group.
pub const Q8_GROUP: usize = 32;
/// `u16` words per Q8 group: the f16 scale, then 32 int8 two to a word (little-endian).
pub const Q8_WORDS: usize = 17;

impl KvDtype {
    pub fn parse(s: &str) -> Option<KvDtype> {
        match s {
            "f16" => Some(KvDtype::F16),
            "bf16" => Some(KvDtype::Bf16),
            "q8" => Some(KvDtype::Q8),
            _ => None,
        }
    }

    /// `u16` words that `n` values take (for Q8, `n` is a multiple of [`Q8_GROUP`]).
    pub fn stored_len(self, n: usize) -> usize {
        match self {
            KvDtype::Q8 => n / Q8_GROUP * Q8_WORDS,
            _ => n,
        }
    }

    /// Values that `words` stored words hold (the inverse of [`Self::stored_len`]).
    pub fn values_in(self, words: usize) -> usize {
        match self {
            KvDtype::Q8 => words / Q8_WORDS * Q8_GROUP,
            _ => words,
        }
    }

    /// Whether heads of `head_dim` values can be stored in this type (Q8 groups must not
    /// straddle heads).
    pub fn check_head_dim(self, head_dim: usize) -> Result<(), String> {
        if self == KvDtype::Q8 && !head_dim.is_multiple_of(Q8_GROUP) {
            return Err(format!(
                "[model] kv_dtype = \"q8\" needs a head size that is a multiple of {Q8_GROUP}; \
                 this model's is {head_dim}"
            ));
        }
        Ok(())
    }

    /// Narrow `src` into `dst` (`stored_len(src.len())` words).
    pub fn encode(self, src: &[f32], dst: &mut [u16]) {
        self.encode_with(Isa::best(), src, dst)
    }

    /// Widen `src` into `dst` (`values_in(src.len())` values).
    pub fn decode(self, src: &[u16], dst: &mut [f32]) {
        self.decode_with(Isa::best(), src, dst)
    }

    /// `encode` on a chosen path (tests compare the paths).
    pub fn encode_with(self, isa: Isa, src: &[f32], dst: &mut [u16]) {
        assert_eq!(
            self.stored_len(src.len()),
            dst.len(),
            "kv encode: length mismatch"
        );
        match (self, isa) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` comes from Isa::available(), so the CPU has AVX-512F / F16C.
            (KvDtype::F16, Isa::Avx512) => unsafe { x86::f16_encode_avx512(src, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, the CPU has F16C.
            (KvDtype::F16, Isa::Avx2) => unsafe { x86::f16_encode_f16c(src, dst) },
            (KvDtype::F16, _) => f16_encode_scalar(src, dst),
            (KvDtype::Bf16, _) => bf16_encode(src, dst),
            (KvDtype::Q8, _) => {
                assert!(
                    src.len().is_multiple_of(Q8_GROUP),
                    "kv encode: q8 needs whole groups"
                );
                q8_encode(isa, src, dst)
            }
        }
    }

    /// `decode` on a chosen path.
    pub fn decode_with(self, isa: Isa, src: &[u16], dst: &mut [f32]) {
        assert_eq!(
            self.values_in(src.len()),
            dst.len(),
            "kv decode: length mismatch"
        );
        match (self, isa) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` comes from Isa::available(), so the CPU has AVX-512F / F16C.
            (KvDtype::F16, Isa::Avx512) => unsafe { x86::f16_decode_avx512(src, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, the CPU has F16C.
            (KvDtype::F16, Isa::Avx2) => unsafe { x86::f16_decode_f16c(src, dst) },
            (KvDtype::F16, _) => f16_decode_scalar(src, dst),
            (KvDtype::Bf16, _) => bf16_decode(src, dst),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, the CPU has AVX-512F and F16C.
            (KvDtype::Q8, Isa::Avx512) => unsafe { x86::q8_decode_avx512(src, dst) },
            (KvDtype::Q8, _) => q8_decode(src, dst),
        }
    }

    /// One element of a 16-bit type, for reference code and tests (Q8 values exist only in
    /// groups: use [`Self::decode`]).
    pub fn to_f32(self, bits: u16) -> f32 {
        match self {
            KvDtype::F16 => half::f16::from_bits(bits).to_f32(),
            KvDtype::Bf16 => f32::from_bits((bits as u32) << 16),
            KvDtype::Q8 => panic!("KvDtype::to_f32: Q8 values are stored in groups"),
        }
    }
}

/// A borrowed cache for the attention kernels.
#[derive(Debug, Clone, Copy)]
pub struct KvView<'a> {
    /// (len, stored_len(kv_dim)) words
    pub k: &'a [u16],
    /// (len, stored_len(kv_dim)) words
    pub v: &'a [u16],
    /// (len), strictly increasing
    pub positions: &'a [u32],
    pub dtype: KvDtype,
}

/// Rows the first append of a Q8 layer needs for its keys to set the channel scale; a shorter
/// first turn keeps keys unscaled for the conversation (a scale taken from a handful of rows may
/// be far below the range of the document that follows).
pub const SCALE_MIN_ROWS: usize = 64;
/// No channel's divisor is below the loudest channel's divided by this, so a channel that was
/// quiet in the rows that set the scale cannot dominate a later row's int8 range by much more.
pub const SCALE_MAX_RATIO: f32 = 16.0;

/// The divisor of each key channel of a Q8 layer, fixed by its first append of keys `k` (rows
/// of `kv_dim`): [`key_channel_scale`] when there are enough rows to set it, else 1 for every
/// channel.
pub fn first_key_scale(k: &[f32], kv_dim: usize) -> Vec<f32> {
    if k.len() / kv_dim.max(1) >= SCALE_MIN_ROWS {
        key_channel_scale(k, kv_dim)
    } else {
        vec![1.0; kv_dim]
    }
}

/// Each key channel's divisor for Q8: the largest |k| over `k`'s rows (`kv_dim` values each) of
/// the channel pair (2i, 2i + 1) that RoPE rotates together, so that a later position's rotation
/// does not push a channel far past it; at least the loudest pair's / `SCALE_MAX_RATIO`, and 1
/// when every key is zero.
fn key_channel_scale(k: &[f32], kv_dim: usize) -> Vec<f32> {
    let mut amax = vec![0f32; kv_dim];
    for row in k.chunks_exact(kv_dim) {
        amax.iter_mut()
            .zip(row)
            .for_each(|(m, x)| *m = m.max(x.abs()));
    }
    key_scale_from_amax(amax)
}

/// The channel divisors of [`key_channel_scale`] from each channel's largest |k| (`amax`), for
/// a backend that reduces the rows where they are (a device).
pub fn key_scale_from_amax(mut amax: Vec<f32>) -> Vec<f32> {
    let kv_dim = amax.len();
    let loudest = amax.iter().fold(0f32, |a, &b| a.max(b));
    if !(loudest > 0.0 && loudest.is_finite()) {
        return vec![1.0; kv_dim];
    }
    for pair in amax.chunks_mut(2) {
        let m = pair.iter().fold(0f32, |a, &b| a.max(b));
        pair.fill(m.max(loudest / SCALE_MAX_RATIO));
    }
    amax
}

/// Multiply widened key rows back by their channel scale (no-op for an empty scale).
pub fn unscale_keys(rows: &mut [f32], scale: &[f32]) {
    if scale.is_empty() {
        return;
    }
    for row in rows.chunks_exact_mut(scale.len()) {
        row.iter_mut().zip(scale).for_each(|(x, s)| *x *= s);
    }
}

/// Q8 groups: scale = max|x| / 127 as f16, values round(x / scale) (to nearest even) clamped to
/// ±127. A prefill appends thousands of rows, so runs of groups go to the pool.
fn q8_encode(isa: Isa, src: &[f32], dst: &mut [u16]) {
    const RUN: usize = 512; // groups per task
    src.par_chunks(RUN * Q8_GROUP)
        .zip(dst.par_chunks_mut(RUN * Q8_WORDS))
        .for_each(|(src, dst)| match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` comes from Isa::available(), so the CPU has AVX-512F and F16C.
            Isa::Avx512 => unsafe { x86::q8_encode_avx512(src, dst) },
            _ => {
                for (g, out) in src
                    .chunks_exact(Q8_GROUP)
                    .zip(dst.chunks_exact_mut(Q8_WORDS))
                {
                    q8_encode_group(g.try_into().expect("whole groups"), out);
                }
            }
        });
}

#[inline]
fn q8_encode_group(g: &[f32; Q8_GROUP], out: &mut [u16]) {
    let amax = g.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let scale = half::f16::from_f32(amax / 127.0);
    let s = scale.to_f32();
    let inv = if s > 0.0 && s.is_finite() {
        1.0 / s
    } else {
        0.0
    };
    let mut q = [0i8; Q8_GROUP];
    for (q, &x) in q.iter_mut().zip(g) {
        *q = (x * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    out[0] = scale.to_bits();
    for (w, pair) in out[1..].iter_mut().zip(q.chunks_exact(2)) {
        *w = pair[0] as u8 as u16 | ((pair[1] as u8 as u16) << 8);
    }
}

/// Q8 groups widened: q * scale.
fn q8_decode(src: &[u16], dst: &mut [f32]) {
    for (g, out) in src
        .chunks_exact(Q8_WORDS)
        .zip(dst.chunks_exact_mut(Q8_GROUP))
    {
        let s = half::f16::from_bits(g[0]).to_f32();
        for (pair, &w) in out.chunks_exact_mut(2).zip(&g[1..]) {
            pair[0] = (w as u8 as i8) as f32 * s;
            pair[1] = ((w >> 8) as u8 as i8) as f32 * s;
        }
    }
}

fn f16_encode_scalar(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_f32(s).to_bits();
    }
}

fn f16_decode_scalar(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = half::f16::from_bits(s).to_f32();
    }
}

crate::backend::simd::dispatch! {
    /// f32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
    pub fn bf16_encode(src: &[f32], dst: &mut [u16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            let b = s.to_bits();
            let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
            *d = if s.is_nan() { ((b >> 16) as u16) | 0x40 } else { rounded };
        }
    }
}

crate::backend::simd::dispatch! {
    /// bf16 -> f32 (exact).
    pub fn bf16_decode(src: &[u16], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s as u32) << 16);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    const ROUND_NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT;

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn f16_encode_avx512(src: &[f32], dst: &mut [u16]) {
        let n = src.len() / 16 * 16;
        for i in (0..n).step_by(16) {
            let x = _mm512_loadu_ps(src.as_ptr().add(i));
            let h = _mm512_cvtps_ph::<ROUND_NEAREST>(x);
            _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, h);
        }
        f16_encode_f16c(&src[n..], &mut dst[n..]);
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn f16_decode_avx512(src: &[u16], dst: &mut [f32]) {
        let n = src.len() / 16 * 16;
        for i in (0..n).step_by(16) {
            let h = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
        }
        f16_decode_f16c(&src[n..], &mut dst[n..]);
    }

    /// One Q8 group at `p` (17 words) widened into 2 registers.
    #[inline(always)]
    pub unsafe fn q8_group(p: *const u16) -> [__m512; 2] {
        let s = _mm512_cvtph_ps(_mm256_set1_epi16(*p as i16)); // the f16 scale, broadcast
        let q = p.add(1) as *const __m128i;
        let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
        let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q.add(1))));
        [_mm512_mul_ps(lo, s), _mm512_mul_ps(hi, s)]
    }

    /// Q8 groups as the scalar `q8_encode_group` makes them, bit for bit: the scale from the
    /// group's max |x| (f16), values `x * (1 / scale)` rounded to nearest even and clamped to
    /// ±127 in the integer domain (the same result for finite x).
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn q8_encode_avx512(src: &[f32], dst: &mut [u16]) {
        let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
        let (lo, hi) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
        for (g, out) in src
            .chunks_exact(32)
            .zip(dst.chunks_exact_mut(super::Q8_WORDS))
        {
            let a = _mm512_loadu_ps(g.as_ptr());
            let b = _mm512_loadu_ps(g.as_ptr().add(16));
            let abs =
                |x: __m512| _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), abs_mask));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(abs(a), abs(b)));
            let scale = half::f16::from_f32(amax / 127.0);
            let s = scale.to_f32();
            let inv = _mm512_set1_ps(if s > 0.0 && s.is_finite() {
                1.0 / s
            } else {
                0.0
            });
            let q = |x: __m512| {
                let n = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm512_mul_ps(x, inv),
                );
                _mm512_cvtepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(n, lo), hi))
            };
            out[0] = scale.to_bits();
            let p = out.as_mut_ptr().add(1) as *mut __m128i;
            _mm_storeu_si128(p, q(a));
            _mm_storeu_si128(p.add(1), q(b));
        }
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn q8_decode_avx512(src: &[u16], dst: &mut [f32]) {
        for (i, g) in src.chunks_exact(super::Q8_WORDS).enumerate() {
            let [lo, hi] = q8_group(g.as_ptr());
            let o = dst.as_mut_ptr().add(i * super::Q8_GROUP);
            _mm512_storeu_ps(o, lo);
            _mm512_storeu_ps(o.add(16), hi);
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn f16_encode_f16c(src: &[f32], dst: &mut [u16]) {
        let n = src.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            let x = _mm256_loadu_ps(src.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<ROUND_NEAREST>(x);
            _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
        }
        super::f16_encode_scalar(&src[n..], &mut dst[n..]);
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn f16_decode_f16c(src: &[u16], dst: &mut [f32]) {
        let n = src.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        super::f16_decode_scalar(&src[n..], &mut dst[n..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Vec<f32> {
        let mut v: Vec<f32> = (0..1037)
            .map(|i| ((i * 7919 % 2003) as f32 - 1001.0) * 0.0137)
            .collect();
        v.extend([
            0.0,
            -0.0,
            1e-8,
            -3e-6,
            65504.0,
            70000.0,
            -1e30,
            f32::INFINITY,
        ]);
        v.extend([1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0]); // bf16 ties: to even
        v
    }

    #[test]
    fn every_path_encodes_and_decodes_identically_to_the_scalar_one() {
        let src = values();
        for dtype in [KvDtype::F16, KvDtype::Bf16] {
            let mut want = vec![0u16; src.len()];
            dtype.encode_with(Isa::Scalar, &src, &mut want);
            let mut back_want = vec![0f32; src.len()];
            dtype.decode_with(Isa::Scalar, &want, &mut back_want);
            for &isa in Isa::available() {
                let mut got = vec![0u16; src.len()];
                dtype.encode_with(isa, &src, &mut got);
                assert_eq!(got, want, "{dtype:?} encode on {isa:?}");
                let mut back = vec![0f32; src.len()];
                dtype.decode_with(isa, &got, &mut back);
                assert_eq!(
                    back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    back_want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "{dtype:?} decode on {isa:?}"
                );
            }
        }
    }

    #[test]
    fn round_trip_error_is_within_half_an_ulp() {
        let src = values();
        for (dtype, rel) in [(KvDtype::F16, 1.0 / 2048.0), (KvDtype::Bf16, 1.0 / 256.0)] {
            let mut bits = vec![0u16; src.len()];
            dtype.encode(&src, &mut bits);
            for (&x, &b) in src.iter().zip(&bits) {
                let y = dtype.to_f32(b);
                if x.abs() > 1e-4 && x.abs() <= 65504.0 {
                    assert!((y - x).abs() <= rel * x.abs(), "{dtype:?}: {x} -> {y}");
                }
            }
        }
        assert_eq!(KvDtype::Bf16.to_f32(0x3F81), 1.0 + 1.0 / 128.0);
        let mut tie = [0u16; 2];
        KvDtype::Bf16.encode(&[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0], &mut tie);
        assert_eq!(tie, [0x3F80, 0x3F82], "ties round to even");
    }

    #[test]
    fn q8_paths_agree_and_round_trip_within_half_a_step_of_each_group() {
        let mut src = values();
        src.truncate(src.len() / Q8_GROUP * Q8_GROUP - Q8_GROUP); // finite values only
        src.extend([0.0; Q8_GROUP]); // an all-zero group
        let q8 = KvDtype::Q8;
        let mut bits = vec![0u16; q8.stored_len(src.len())];
        q8.encode_with(Isa::Scalar, &src, &mut bits);
        assert_eq!(bits.len(), src.len() / 32 * 17);
        for &isa in Isa::available() {
            let mut got = vec![0u16; bits.len()];
            q8.encode_with(isa, &src, &mut got);
            assert_eq!(got, bits, "q8 encode on {isa:?}");
        }
        let mut want = vec![0f32; src.len()];
        q8.decode_with(Isa::Scalar, &bits, &mut want);
        for &isa in Isa::available() {
            let mut got = vec![0f32; src.len()];
            q8.decode_with(isa, &bits, &mut got);
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "q8 decode on {isa:?}"
            );
        }
        for (g, back) in src.chunks(Q8_GROUP).zip(want.chunks(Q8_GROUP)) {
            let amax = g.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            // half a step of 127 levels, plus the f16 rounding of the scale (2^-11 relative)
            let tol = amax / 127.0 * 0.5 + amax * (1.0 / 2048.0) + 1e-12;
            for (&x, &y) in g.iter().zip(back) {
                assert!((x - y).abs() <= tol, "{x} -> {y} (group max {amax})");
            }
        }
        assert!(want[want.len() - Q8_GROUP..].iter().all(|&y| y == 0.0));
    }

    #[test]
    fn q8_needs_heads_of_whole_groups() {
        assert!(KvDtype::Q8.check_head_dim(64).is_ok());
        let e = KvDtype::Q8.check_head_dim(40).unwrap_err();
        assert!(e.contains("kv_dtype") && e.contains("40"), "{e}");
        assert!(KvDtype::F16.check_head_dim(40).is_ok());
        assert_eq!(KvDtype::Q8.values_in(KvDtype::Q8.stored_len(192)), 192);
    }
}
