//! Turning logits into the next token: repetition penalty, temperature, top-k, top-p, min-p.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How the next token is picked from the logits; the default is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 0.0 disables min-p.
    pub min_p: f32,
    /// 1.0 disables the penalty.
    pub repetition_penalty: f32,
    /// Seed of the sampler's random stream; the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

/// Picks tokens from logits by a [`SamplingConfig`], with its own seeded random stream.
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `config.seed`.
    pub fn new(config: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Sampler { config, rng }
    }

    /// Picks the next token given the logits and the tokens seen so far; `logits` is left with
    /// the repetition penalty applied (what the pick was made from, before the temperature).
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32]) -> u32 {
        let c = &self.config;
        if c.repetition_penalty != 1.0 {
            // As in transformers: divide positive logits, multiply negative ones.
            for &t in context {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / c.repetition_penalty
                    } else {
                        *l * c.repetition_penalty
                    };
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / c.temperature))
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        if c.top_k > 0 {
            candidates.truncate(c.top_k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|&(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        let mut keep = probs.len();
        if c.top_p < 1.0 {
            let mut cumulative = 0.0;
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= c.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if c.min_p > 0.0 {
            let floor = c.min_p * probs[0];
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        let kept = &probs[..keep];
        let mut r = self.rng.random::<f32>() * kept.iter().sum::<f32>();
        for (i, p) in kept.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return candidates[i].0;
            }
        }
        candidates[keep - 1].0
    }
}

/// Index of the largest logit; the first one wins a tie, as `torch.argmax` does.
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

    #[test]
    fn greedy_takes_first_maximum() {
        let mut s = Sampler::new(SamplingConfig::default());
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeded_sampling_repeats() {
        let config = SamplingConfig {
            temperature: 0.8,
            top_k: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(config);
        assert_eq!(s.sample(&mut [0.0, 1.0, 5.0], &[]), 2);
        let config = SamplingConfig {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let draw = |c: SamplingConfig| {
            let mut s = Sampler::new(c);
            (0..20)
                .map(|_| s.sample(&mut [1.0, 1.1, 0.9, 1.05], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(config.clone()), draw(config));
    }

    #[test]
    fn repetition_penalty_can_change_the_greedy_choice() {
        let config = SamplingConfig {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(config);
        assert_eq!(s.sample(&mut [2.0, 1.5], &[0]), 1);
    }

    #[test]
    fn min_p_removes_unlikely_tokens() {
        let config = SamplingConfig {
            temperature: 1.0,
            min_p: 0.5,
            seed: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(config);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [10.0, 0.0, 0.0], &[]), 0);
        }
    }
}
