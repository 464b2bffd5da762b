//! Element-wise kernels written once as plain loops and compiled three times: generic, with
//! AVX2+FMA, and with AVX-512 (chosen at run time), so LLVM vectorises the loops without
//! building the whole program for one CPU.

/// exp(x) for x <= 0 (softmax after max subtraction, SiLU of negative inputs). Relative error
/// below 5e-6 over [-87, 0] (the rounding of x*log2(e) dominates for large |x|), below 1e-6 on
/// [-10, 0]; inputs below -87 clamp to e^-87. Branch-free so loops vectorise.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    let x = x.max(-87.0);
    // 2^(x log2 e) = 2^n * 2^f, n integer, f in [-0.5, 0.5]
    let t = x * std::f32::consts::LOG2_E;
    let n = t.round_ties_even();
    let f = t - n;
    // minimax-like polynomial for 2^f on [-0.5, 0.5] (Taylor of e^(f ln2) to degree 6)
    let l = std::f32::consts::LN_2;
    let y = f * l;
    let p = 1.0
        + y * (1.0
            + y * (0.5
                + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0))))));
    // 2^n as float bits: n + 127 is an integer in [1, 127]; adding 2^23 puts it in the low
    // mantissa bits, where a mask and a shift move it into the exponent. (A float-to-int cast
    // would be saturating in Rust and would not vectorise.)
    let biased = (n + 127.0 + 8_388_608.0).to_bits() & 0xFF;
    p * f32::from_bits(biased << 23)
}

macro_rules! dispatch {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                let avx2_fma = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
                if avx2_fma && std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the features `avx512` was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if avx2_fma {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

/// Independent accumulators per reduction: float addition is not associative, so LLVM keeps
/// one serial chain per accumulator; this many lanes let it fill a vector register.
const LANES: usize = 16;

pub(crate) use dispatch;

dispatch! {
    /// One step of online softmax (Milakov & Gimelshein, arXiv 1805.02867) for a row of scores
    /// against one block of keys: `row[..valid]` becomes exp(score - new_max), `row[valid..]`
    /// becomes 0. Returns (new_max, new_sum, correction), where the caller multiplies what it
    /// accumulated so far by `correction` = exp(old_max - new_max).
    pub fn softmax_block_row(row: &mut [f32], valid: usize, old_max: f32, old_sum: f32) -> (f32, f32, f32) {
        let (live, dead) = row.split_at_mut(valid);
        for x in dead.iter_mut() {
            *x = 0.0;
        }
        if live.is_empty() {
            return (old_max, old_sum, 1.0);
        }
        let mut maxes = [f32::NEG_INFINITY; LANES];
        let mut chunks = live.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                maxes[i] = maxes[i].max(c[i]);
            }
        }
        let block_max = chunks.remainder().iter().fold(maxes.iter().copied().fold(f32::NEG_INFINITY, f32::max), |m, &x| m.max(x));
        let new_max = old_max.max(block_max);
        let mut sums = [0.0f32; LANES];
        let mut chunks = live.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                c[i] = exp_nonpositive(c[i] - new_max);
                sums[i] += c[i];
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp_nonpositive(*x - new_max);
            sum += *x;
        }
        let correction = if old_max == f32::NEG_INFINITY { 0.0 } else { exp_nonpositive(old_max - new_max) };
        (new_max, old_sum * correction + sum, correction)
    }
}

dispatch! {
    /// out[i] = x[i] * w[i] / rms(x), rms over the row.
    pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let mut acc = [0.0f32; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                acc[i] += c[i] * c[i];
            }
        }
        let ss = acc.iter().sum::<f32>() + chunks.remainder().iter().map(|v| v * v).sum::<f32>();
        let scale = 1.0 / (ss / x.len() as f32 + eps).sqrt();
        for ((o, &v), &g) in out.iter_mut().zip(x.iter()).zip(w.iter()) {
            *o = v * scale * g;
        }
    }
}

dispatch! {
    /// out[i] = silu(gate[i]) * up[i].
    pub fn silu_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate.iter()).zip(up.iter()) {
            // silu(g) = g / (1 + e^-g); evaluate e^-|g| to stay in exp_nonpositive's range
            let e = exp_nonpositive(-g.abs());
            let sig = if g >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
            *o = g * sig * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_over_softmax_range() {
        let worst_on = |lo: i32| {
            (0..=lo * 1000)
                .map(|i| -(i as f32) / 1000.0)
                .map(|x| ((exp_nonpositive(x) - x.exp()) / x.exp()).abs())
                .fold(0.0f32, f32::max)
        };
        assert!(
            worst_on(10) < 1e-6,
            "worst relative error on [-10, 0]: {}",
            worst_on(10)
        );
        assert!(
            worst_on(87) < 5e-6,
            "worst relative error on [-87, 0]: {}",
            worst_on(87)
        );
        assert!(exp_nonpositive(-200.0) < 1e-37);
    }

    #[test]
    fn online_softmax_over_two_blocks_equals_softmax_of_the_row() {
        let row: Vec<f32> = (0..40)
            .map(|i| ((i * 37 % 11) as f32) * 0.7 - 3.0)
            .collect();
        let (mut a, mut b) = (row[..25].to_vec(), row[25..].to_vec());
        let (m1, s1, _) = softmax_block_row(&mut a, 25, f32::NEG_INFINITY, 0.0);
        let (m2, s2, corr) = softmax_block_row(&mut b, 15, m1, s1);
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f32 = row.iter().map(|x| (x - max).exp()).sum();
        assert_eq!(m2, max);
        assert!((s2 - total).abs() < 1e-4 * total, "{s2} vs {total}");
        for (i, &x) in row.iter().enumerate() {
            let got = if i < 25 { a[i] * corr } else { b[i - 25] };
            assert!((got / s2 - (x - max).exp() / total).abs() < 1e-5);
        }
        let mut tail = vec![1.0, 2.0, 3.0];
        softmax_block_row(&mut tail, 1, f32::NEG_INFINITY, 0.0);
        assert_eq!(&tail[1..], &[0.0, 0.0], "masked keys get no weight");
    }

    #[test]
    fn silu_matches_definition() {
        let g: Vec<f32> = (-50..50).map(|i| i as f32 * 0.37).collect();
        let u: Vec<f32> = g.iter().map(|x| 1.0 + x * 0.1).collect();
        let mut out = vec![0.0; g.len()];
        silu_mul_row(&g, &u, &mut out);
        for i in 0..g.len() {
            let want = g[i] / (1.0 + (-g[i]).exp()) * u[i];
            assert!(
                (out[i] - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{i}: {} vs {want}",
                out[i]
            );
        }
    }
}
