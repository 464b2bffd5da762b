//! Element type of the KV cache: keys and values are stored as 16-bit floats (f16 or bf16 bit
//! patterns in `u16`) and widened to f32 for arithmetic. Half the bytes of f32, which is what a
//! decode step at long context is bound by.
//!
//! Conversions come in three paths (AVX-512, AVX2+F16C, scalar) selected by [`Isa`]; all give
//! bit-identical results (round to nearest even; bf16 NaNs stay NaN).

use serde::{Deserialize, Serialize};

use crate::backend::isa::Isa;

/// How a KV element is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// IEEE half: 10-bit mantissa, range ±65504
    #[default]
    F16,
    /// bfloat16: 7-bit mantissa, f32's range
    Bf16,
}

impl KvDtype {
    pub fn parse(s: &str) -> Option<KvDtype> {
        match s {
            "f16" => Some(KvDtype::F16),
            "bf16" => Some(KvDtype::Bf16),
            _ => None,
        }
    }

    /// Narrow `src` into `dst` (same length).
    pub fn encode(self, src: &[f32], dst: &mut [u16]) {
        self.encode_with(Isa::best(), src, dst)
    }

    /// Widen `src` into `dst` (same length).
    pub fn decode(self, src: &[u16], dst: &mut [f32]) {
        self.decode_with(Isa::best(), src, dst)
    }

    /// `encode` on a chosen path (tests compare the paths).
    pub fn encode_with(self, isa: Isa, src: &[f32], dst: &mut [u16]) {
        assert_eq!(src.len(), dst.len(), "kv encode: length mismatch");
        match (self, isa) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` comes from Isa::available(), so the CPU has AVX-512F / F16C.
            (KvDtype::F16, Isa::Avx512) => unsafe { x86::f16_encode_avx512(src, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, the CPU has F16C.
            (KvDtype::F16, Isa::Avx2) => unsafe { x86::f16_encode_f16c(src, dst) },
            (KvDtype::F16, _) => f16_encode_scalar(src, dst),
            (KvDtype::Bf16, _) => bf16_encode(src, dst),
        }
    }

    /// `decode` on a chosen path.
    pub fn decode_with(self, isa: Isa, src: &[u16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "kv decode: length mismatch");
        match (self, isa) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` comes from Isa::available(), so the CPU has AVX-512F / F16C.
            (KvDtype::F16, Isa::Avx512) => unsafe { x86::f16_decode_avx512(src, dst) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, the CPU has F16C.
            (KvDtype::F16, Isa::Avx2) => unsafe { x86::f16_decode_f16c(src, dst) },
            (KvDtype::F16, _) => f16_decode_scalar(src, dst),
            (KvDtype::Bf16, _) => bf16_decode(src, dst),
        }
    }

    /// One element, for reference code and tests.
    pub fn to_f32(self, bits: u16) -> f32 {
        match self {
            KvDtype::F16 => half::f16::from_bits(bits).to_f32(),
            KvDtype::Bf16 => f32::from_bits((bits as u32) << 16),
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
mod x86 {
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
}
