//! Choosing the next token from logits: repeat penalty, then greedy (temperature 0) or
//! temperature → top-k → top-p sampling with a seeded generator, so a run can be repeated.

use crate::rng::SplitMix64;

/// Sampling settings. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingConfig {
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = all).
    pub top_p: f32,
    /// Divide positive logits (multiply negative ones) of recently seen tokens by this (1.0 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 299_792_458,
        }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(format!(
                "repeat_penalty must be > 0, got {}",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

/// A sampler with its own random state.
pub struct Sampler {
    cfg: SamplingConfig,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(cfg: SamplingConfig) -> Self {
        let rng = SplitMix64::new(cfg.seed);
        Self { cfg, rng }
    }

    /// Pick the next token. `recent`: tokens seen so far (prompt and answer), newest last.
    pub fn sample(&mut self, logits: &mut [f32], recent: &[u32]) -> u32 {
        self.apply_repeat_penalty(logits, recent);
        if self.cfg.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut cands: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if self.cfg.top_k > 0 {
            cands.truncate(self.cfg.top_k);
        }
        let max = cands[0].1;
        let mut probs: Vec<f32> = cands
            .iter()
            .map(|c| ((c.1 - max) / self.cfg.temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            mass += p;
            if mass >= self.cfg.top_p {
                keep = i + 1;
                break;
            }
        }
        let kept: f32 = probs[..keep].iter().sum();
        let mut u = self.rng.next_f32() * kept;
        for (c, p) in cands[..keep].iter().zip(&probs[..keep]) {
            if u < *p {
                return c.0;
            }
            u -= p;
        }
        cands[keep - 1].0
    }

    fn apply_repeat_penalty(&self, logits: &mut [f32], recent: &[u32]) {
        let penalty = self.cfg.repeat_penalty;
        if penalty == 1.0 || self.cfg.repeat_last_n == 0 {
            return;
        }
        let start = recent.len().saturating_sub(self.cfg.repeat_last_n);
        let mut seen = recent[start..].to_vec();
        seen.sort_unstable();
        seen.dedup();
        for t in seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32) -> SamplingConfig {
        SamplingConfig {
            temperature,
            repeat_penalty: 1.0,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = Sampler::new(cfg(0.0));
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.9, -1.0], &[]), 1);
    }

    #[test]
    fn repeat_penalty_can_change_the_greedy_choice() {
        let mut s = Sampler::new(SamplingConfig {
            repeat_penalty: 2.0,
            ..cfg(0.0)
        });
        assert_eq!(s.sample(&mut [0.0, 3.0, 2.0], &[1]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_even_when_hot() {
        let mut s = Sampler::new(SamplingConfig {
            top_k: 1,
            ..cfg(5.0)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.9, 0.8], &[]), 1);
        }
    }

    #[test]
    fn same_seed_same_choices_and_sampling_spreads() {
        let draw = |seed| {
            let mut s = Sampler::new(SamplingConfig {
                seed,
                top_k: 0,
                top_p: 1.0,
                ..cfg(1.0)
            });
            (0..200)
                .map(|_| s.sample(&mut [0.0, 0.0, 0.0, 0.0], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let d = draw(7);
        for t in 0..4 {
            assert!(
                d.iter().filter(|&&x| x == t).count() > 20,
                "token {t} rarely drawn"
            );
        }
    }

    #[test]
    fn top_p_drops_the_unlikely_tail() {
        let mut s = Sampler::new(SamplingConfig {
            top_k: 0,
            top_p: 0.5,
            ..cfg(1.0)
        });
        for _ in 0..100 {
            assert_eq!(s.sample(&mut [10.0, 0.0, 0.0], &[]), 0);
        }
    }
}
