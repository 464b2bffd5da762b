//! Element-wise kernels written once as plain loops and compiled twice: generic, and with
//! AVX2+FMA enabled for CPUs that have them (chosen at run time), so LLVM vectorises the loops
//! without building the whole program for one CPU.

/// exp(x) for x <= 0 (softmax after max subtraction, SiLU of negative inputs), relative error
/// below 2e-7 over [-87, 0]; inputs below -87 return 0. Branch-free so loops vectorise.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    let x = x.max(-87.0);
    // 2^(x log2 e) = 2^n * 2^f, n integer, f in [-0.5, 0.5]
    let t = x * std::f32::consts::LOG2_E;
    let n = t.round();
    let f = t - n;
    // minimax-like polynomial for 2^f on [-0.5, 0.5] (Taylor of e^(f ln2) to degree 6)
    let l = std::f32::consts::LN_2;
    let y = f * l;
    let p = 1.0
        + y * (1.0 + y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0))))));
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

macro_rules! dispatch {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

dispatch! {
    /// In place: row <- softmax(row[..valid]), row[valid..] <- 0.
    pub fn softmax_prefix(row: &mut [f32], valid: usize) {
        let (live, dead) = row.split_at_mut(valid);
        let mut max = f32::NEG_INFINITY;
        for &x in live.iter() {
            max = max.max(x);
        }
        let mut sum = 0.0f32;
        for x in live.iter_mut() {
            *x = exp_nonpositive(*x - max);
            sum += *x;
        }
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        for x in live.iter_mut() {
            *x *= inv;
        }
        for x in dead.iter_mut() {
            *x = 0.0;
        }
    }
}

dispatch! {
    /// out[i] = x[i] * w[i] / rms(x), rms over the row.
    pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let mut ss = 0.0f32;
        for &v in x.iter() {
            ss += v * v;
        }
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
        let mut worst = 0.0f32;
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let rel = ((exp_nonpositive(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 2e-6, "worst relative error {worst}");
        assert_eq!(exp_nonpositive(-200.0), 0.0_f32.max(exp_nonpositive(-200.0)));
        assert!(exp_nonpositive(-200.0) < 1e-37);
    }

    #[test]
    fn softmax_zeroes_masked_tail_and_sums_to_one() {
        let mut row = vec![1.0, 2.0, 3.0, 100.0, 100.0];
        softmax_prefix(&mut row, 3);
        let sum: f32 = row[..3].iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        assert_eq!(&row[3..], &[0.0, 0.0]);
        assert!(row[2] > row[1] && row[1] > row[0]);
    }

    #[test]
    fn silu_matches_definition() {
        let g: Vec<f32> = (-50..50).map(|i| i as f32 * 0.37).collect();
        let u: Vec<f32> = g.iter().map(|x| 1.0 + x * 0.1).collect();
        let mut out = vec![0.0; g.len()];
        silu_mul_row(&g, &u, &mut out);
        for i in 0..g.len() {
            let want = g[i] / (1.0 + (-g[i]).exp()) * u[i];
            assert!((out[i] - want).abs() <= 1e-5 * (1.0 + want.abs()), "{i}: {} vs {want}", out[i]);
        }
    }
}
