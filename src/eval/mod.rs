//! Fidelity of pruning against the dense model.
//!
//! - [`agreement`] (`slimchat eval`): teacher-forced agreement with dense on one kind of text
//!   (the Python language reference) and one planted needle, over keep ratios;
//! - [`facts`] (`slimchat facts`): whether the pruned model finds what dense finds, on four kinds
//!   of text, ten fact phrasings, one to three facts per prompt and questions about the text
//!   itself, split into a part to tune on and a part only to report ([`corpus`], [`cases`]);
//!   each miss is traced to the stage or decode choice that dropped the fact ([`diagnose`]);
//! - [`logits`]: two forwards' teacher-forced logits compared (top-1 agreement, largest
//!   difference), for the ops-seam forward against the engine and a GPU against the CPU.

pub mod agreement;
pub mod cases;
pub mod corpus;
pub mod diagnose;
pub mod facts;
pub mod logits;

pub use agreement::{run, EvalConfig, EvalResult};

use crate::engine::Engine;
use crate::slim::SlimConfig;
use crate::Result;

/// Dense (`ratio` None) or pruned at `ratio`, on a fresh cache.
pub(crate) fn set_slim(engine: &mut Engine, base: &SlimConfig, ratio: Option<f32>) -> Result<()> {
    let cfg = match ratio {
        Some(r) => SlimConfig {
            enabled: true,
            keep_ratio: r,
            ..base.clone()
        },
        None => SlimConfig {
            enabled: false,
            ..base.clone()
        },
    };
    engine.reset();
    engine.set_slim(cfg)
}

/// The byte index just after the sentence end at or after `at` (or the end of the text).
pub(crate) fn sentence_boundary(text: &str, at: usize) -> usize {
    if at == 0 {
        return 0;
    }
    let mut i = at.min(text.len());
    while !text.is_char_boundary(i) {
        i += 1;
    }
    text[i..].find(". ").map_or(text.len(), |j| i + j + 1)
}

/// KL(p‖q) of the softmax distributions of two logit vectors, in nats.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let log_softmax = |l: &[f32]| {
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln() + max;
        l.iter().map(move |&x| x as f64 - lse).collect::<Vec<f64>>()
    };
    let (lp, lq) = (log_softmax(p_logits), log_softmax(q_logits));
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_and_positive_for_different_distributions() {
        let a = [1.0, 2.0, 3.0];
        assert!(kl_divergence(&a, &a) < 1e-12);
        assert!(kl_divergence(&a, &[3.0, 2.0, 1.0]) > 0.1);
    }

    #[test]
    fn needles_go_after_a_sentence_end() {
        let t = "One two. Three four. Five.";
        assert_eq!(sentence_boundary(t, 0), 0);
        assert_eq!(&t[..sentence_boundary(t, 3)], "One two.");
        assert_eq!(sentence_boundary(t, 22), t.len());
    }
}
