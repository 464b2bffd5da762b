//! Two forwards' teacher-forced logits of the same tokens, compared: how often their top-1
//! tokens agree, how far apart the logits are, and each one's mean NLL of the next token. The
//! ops-seam forward against the engine (tests/ops_real_model.rs) and a GPU against the CPU
//! (`slimchat gpu-check --agreement`) are measured with it.

use serde::Serialize;

/// How two sets of logits over the same positions compare.
#[derive(Debug, Clone, Serialize)]
pub struct LogitAgreement {
    pub positions: usize,
    /// Share of positions whose top-1 tokens are the same.
    pub top1_agreement: f64,
    /// Largest |a - b| over every logit, and the largest |b| (its scale).
    pub max_abs_diff: f32,
    pub max_abs_logit: f32,
    /// Mean -log p(next token) under each (positions with a next token).
    pub nll_a: f64,
    pub nll_b: f64,
}

/// Compare `a` and `b`, each (positions, vocab) row-major, the logits at `tokens`' positions
/// (row i predicts tokens[i + 1]).
pub fn compare(a: &[f32], b: &[f32], vocab: usize, tokens: &[u32]) -> LogitAgreement {
    assert_eq!(a.len(), b.len(), "logits of different lengths");
    let positions = a.len() / vocab;
    let (mut same, mut max_diff, mut max_abs) = (0usize, 0f32, 0f32);
    let (mut nll_a, mut nll_b, mut scored) = (0f64, 0f64, 0usize);
    for (i, (ra, rb)) in a.chunks_exact(vocab).zip(b.chunks_exact(vocab)).enumerate() {
        same += usize::from(argmax(ra) == argmax(rb));
        for (x, y) in ra.iter().zip(rb) {
            max_diff = max_diff.max((x - y).abs());
            max_abs = max_abs.max(y.abs());
        }
        if let Some(&next) = tokens.get(i + 1) {
            nll_a += nll(ra, next);
            nll_b += nll(rb, next);
            scored += 1;
        }
    }
    let per = |s: f64| if scored == 0 { 0.0 } else { s / scored as f64 };
    LogitAgreement {
        positions,
        top1_agreement: same as f64 / positions.max(1) as f64,
        max_abs_diff: max_diff,
        max_abs_logit: max_abs,
        nll_a: per(nll_a),
        nll_b: per(nll_b),
    }
}

fn argmax(v: &[f32]) -> usize {
    crate::sampling::argmax(v) as usize
}

/// -log softmax(logits)[target], in f64.
fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().map(|&x| x as f64).fold(f64::MIN, f64::max);
    let lse = logits
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    lse - logits[target as usize] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_top1_matches_and_the_largest_difference() {
        // vocab 3, two positions: the first agrees (token 2), the second does not
        let a = [0.0, 1.0, 3.0, 2.0, 0.0, 0.0];
        let b = [0.0, 1.5, 3.0, 0.0, 1.0, 0.0];
        let r = compare(&a, &b, 3, &[7, 2]);
        assert_eq!(r.positions, 2);
        assert_eq!(r.top1_agreement, 0.5);
        assert_eq!((r.max_abs_diff, r.max_abs_logit), (2.0, 3.0));
        // only row 0 has a next token (2): a's NLL is log(1 + e^-2 + e^-3)
        let want = (1.0 + (-2.0f64).exp() + (-3.0f64).exp()).ln();
        assert!((r.nll_a - want).abs() < 1e-9);
    }
}
