//! The AVX-512 chunk kernel of [`super`] for head_dim 64 and up to 4 query heads per KV head
//! (SmolLM2, LLaMA-style models): K and V rows are widened from f16/bf16/Q8 straight into
//! registers (no f32 buffer), the group's queries and output accumulators sit in registers
//! while a block's rows stream by, and each KV head's rows are read once for its query heads.

use crate::backend::heads::Heads;
use std::arch::x86_64::*;
use std::ops::Range;

use super::{lane_max, lane_sum, Blocks, KeyRun, Partial, BLOCK};
use crate::backend::kv_format::x86::q8_group;
use crate::backend::kv_format::{KvDtype, Q8_WORDS};
use crate::backend::simd::exp_nonpositive;

const HD: usize = 64;

/// Storage formats, as const parameters of the kernel.
const F16: u8 = 0;
const BF16: u8 = 1;
const Q8: u8 = 2;

/// The chunk's partial softmax state, or None for a shape this kernel does not cover.
pub(super) fn chunk(
    qs: &[f32],
    runs: &[KeyRun],
    keys: Range<usize>,
    dtype: KvDtype,
    shape: Heads,
) -> Option<Partial> {
    let group = shape.n_heads / shape.n_kv_heads;
    if shape.head_dim != HD {
        return None;
    }
    // SAFETY: the caller took this path from Isa::available(): the CPU has AVX-512F and F16C.
    unsafe {
        Some(match (group, dtype) {
            (1, KvDtype::F16) => run::<1, F16>(qs, runs, keys, dtype, shape),
            (2, KvDtype::F16) => run::<2, F16>(qs, runs, keys, dtype, shape),
            (3, KvDtype::F16) => run::<3, F16>(qs, runs, keys, dtype, shape),
            (4, KvDtype::F16) => run::<4, F16>(qs, runs, keys, dtype, shape),
            (1, KvDtype::Bf16) => run::<1, BF16>(qs, runs, keys, dtype, shape),
            (2, KvDtype::Bf16) => run::<2, BF16>(qs, runs, keys, dtype, shape),
            (3, KvDtype::Bf16) => run::<3, BF16>(qs, runs, keys, dtype, shape),
            (4, KvDtype::Bf16) => run::<4, BF16>(qs, runs, keys, dtype, shape),
            (1, KvDtype::Q8) => run::<1, Q8>(qs, runs, keys, dtype, shape),
            (2, KvDtype::Q8) => run::<2, Q8>(qs, runs, keys, dtype, shape),
            (3, KvDtype::Q8) => run::<3, Q8>(qs, runs, keys, dtype, shape),
            (4, KvDtype::Q8) => run::<4, Q8>(qs, runs, keys, dtype, shape),
            _ => return None,
        })
    }
}

/// 16 elements of a 16-bit type at `p`, widened to f32.
#[inline(always)]
unsafe fn load16<const FMT: u8>(p: *const u16) -> __m512 {
    let h = _mm256_loadu_si256(p as *const __m256i);
    if FMT == BF16 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    } else {
        _mm512_cvtph_ps(h)
    }
}

/// A 64-wide head row at `p` (64 words, or two Q8 groups), widened.
#[inline(always)]
unsafe fn row<const FMT: u8>(p: *const u16) -> [__m512; 4] {
    if FMT == Q8 {
        let [a, b] = q8_group(p);
        let [c, d] = q8_group(p.add(Q8_WORDS));
        return [a, b, c, d];
    }
    [
        load16::<FMT>(p),
        load16::<FMT>(p.add(16)),
        load16::<FMT>(p.add(32)),
        load16::<FMT>(p.add(48)),
    ]
}

/// The 16 lane-wise partial sums of a 64-wide dot product.
#[inline(always)]
unsafe fn dot64(q: &[__m512; 4], k: &[__m512; 4]) -> __m512 {
    let s = _mm512_fmadd_ps(q[0], k[0], _mm512_mul_ps(q[1], k[1]));
    let t = _mm512_fmadd_ps(q[2], k[2], _mm512_mul_ps(q[3], k[3]));
    _mm512_add_ps(s, t)
}

/// The horizontal sums of four vectors, as [sum a, sum b, sum c, sum d].
#[inline(always)]
unsafe fn hsum4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
    // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d
    let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    // per 128-bit lane: [a, b, c, d] partial sums
    let abcd = _mm512_add_ps(
        _mm512_shuffle_ps::<0b01_00_01_00>(ab, cd),
        _mm512_shuffle_ps::<0b11_10_11_10>(ab, cd),
    );
    // the four 128-bit lanes added
    let half = _mm256_add_ps(
        _mm512_castps512_ps256(abcd),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(abcd))),
    );
    _mm_add_ps(
        _mm256_castps256_ps128(half),
        _mm256_extractf128_ps::<1>(half),
    )
}

#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn run<const G: usize, const FMT: u8>(
    qs: &[f32],
    runs: &[KeyRun],
    keys: Range<usize>,
    dtype: KvDtype,
    shape: Heads,
) -> Partial {
    let n_heads = shape.n_heads;
    // stored words per row and per head row
    let stride = dtype.stored_len(shape.n_kv_heads * HD);
    let head_words = dtype.stored_len(HD);
    let mut st = Partial::new(n_heads, HD);
    let mut p = [0.0f32; 4 * BLOCK];
    // row starts of the block's keys and values (a block may straddle runs)
    let mut kp = [std::ptr::null::<u16>(); BLOCK];
    let mut vp = [std::ptr::null::<u16>(); BLOCK];
    // blocks outer, KV heads inner: the rows of a block (every head) are read in address order,
    // one sequential stream for K and one for V per run; the group's queries and accumulators
    // are reloaded from L1 per block.
    let mut blocks = Blocks::new(runs, stride, keys);
    let mut pieces = Vec::with_capacity(4);
    while let Some(kb) = blocks.next_into(&mut pieces) {
        let mut j = 0;
        for piece in &pieces {
            for r in 0..piece.k.len() / stride {
                kp[j] = piece.k.as_ptr().add(r * stride);
                vp[j] = piece.v.as_ptr().add(r * stride);
                j += 1;
            }
        }
        for g in 0..shape.n_kv_heads {
            let mut q = [[_mm512_setzero_ps(); 4]; G];
            let mut acc = [[_mm512_setzero_ps(); 4]; G];
            for h in 0..G {
                let qp = qs.as_ptr().add((g * G + h) * HD);
                let ap = st.acc.as_ptr().add((g * G + h) * HD);
                for c in 0..4 {
                    q[h][c] = _mm512_loadu_ps(qp.add(16 * c));
                    acc[h][c] = _mm512_loadu_ps(ap.add(16 * c));
                }
            }
            // scores of the group's heads against each key row, read once; four rows at a time,
            // so that one transpose-and-add reduces four dot products (a horizontal sum per
            // product was most of the kernel's shuffles)
            let mut j = 0;
            while j + 4 <= kb {
                let k0 = row::<FMT>(kp[j].add(g * head_words));
                let k1 = row::<FMT>(kp[j + 1].add(g * head_words));
                let k2 = row::<FMT>(kp[j + 2].add(g * head_words));
                let k3 = row::<FMT>(kp[j + 3].add(g * head_words));
                for h in 0..G {
                    let sums = hsum4(
                        dot64(&q[h], &k0),
                        dot64(&q[h], &k1),
                        dot64(&q[h], &k2),
                        dot64(&q[h], &k3),
                    );
                    _mm_storeu_ps(p.as_mut_ptr().add(h * BLOCK + j), sums);
                }
                j += 4;
            }
            for j in j..kb {
                let k = row::<FMT>(kp[j].add(g * head_words));
                for h in 0..G {
                    p[h * BLOCK + j] = _mm512_reduce_add_ps(dot64(&q[h], &k));
                }
            }
            // online softmax step per head
            for h in 0..G {
                let head = g * G + h;
                let ph = &mut p[h * BLOCK..][..kb];
                let new_max = st.max[head].max(lane_max(ph));
                if new_max > st.max[head] && st.sum[head] > 0.0 {
                    let c = exp_nonpositive(st.max[head] - new_max);
                    st.sum[head] *= c;
                    let cv = _mm512_set1_ps(c);
                    for a in acc[h].iter_mut() {
                        *a = _mm512_mul_ps(*a, cv);
                    }
                }
                st.max[head] = new_max;
                for x in ph.iter_mut() {
                    *x = exp_nonpositive(*x - new_max);
                }
                st.sum[head] += lane_sum(ph);
            }
            // acc_h += p[h][j] v_j, each value row read once for the group
            for j in 0..kb {
                let v = row::<FMT>(vp[j].add(g * head_words));
                for (h, acc_h) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(p[h * BLOCK + j]);
                    for (a, &vc) in acc_h.iter_mut().zip(&v) {
                        *a = _mm512_fmadd_ps(w, vc, *a);
                    }
                }
            }
            for (h, acc_h) in acc.iter().enumerate() {
                let ap = st.acc.as_mut_ptr().add((g * G + h) * HD);
                for (c, &a) in acc_h.iter().enumerate() {
                    _mm512_storeu_ps(ap.add(16 * c), a);
                }
            }
        }
    }
    st
}
