//! Log-probabilities of the generated tokens, as mlx-lm's responses carry them: the log-softmax
//! of the logits the sampler picked from (after the repetition penalty, before the temperature),
//!
//! ```text
//! log p(t) = z_t − log Σ_j exp(z_j)      (the sum in f64, shifted by the largest z)
//! ```
//!
//! with the `k` likeliest tokens beside the one chosen.

use serde::Serialize;

/// One generated token's log-probability and the `k` likeliest alternatives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprobs {
    /// The token chosen.
    pub id: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The `k` likeliest tokens, likeliest first (the lower id first on a tie).
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// `chosen`'s log-probability under `logits`, and the `k` likeliest tokens'.
    pub fn of(logits: &[f32], chosen: u32, k: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&z| f64::from(z - max).exp()).sum();
        let log_z = f64::from(max) + sum.ln();
        let logprob = |z: f32| (f64::from(z) - log_z) as f32;
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let k = k.min(order.len());
        if k > 0 {
            let by_logit = |a: &u32, b: &u32| {
                logits[*b as usize]
                    .total_cmp(&logits[*a as usize])
                    .then(a.cmp(b))
            };
            order.select_nth_unstable_by(k - 1, by_logit);
            order.truncate(k);
            order.sort_by(by_logit);
        }
        TokenLogprobs {
            id: chosen,
            logprob: logprob(logits[chosen as usize]),
            top: order
                .into_iter()
                .take(k)
                .map(|id| (id, logprob(logits[id as usize])))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_normalise_and_rank() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, 0.5];
        let t = TokenLogprobs::of(&logits, 4, 3);
        let total: f64 = logits
            .iter()
            .map(|&z| f64::from(TokenLogprobs::of(&logits, 0, 0).logprob - logits[0] + z).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        let ids: Vec<u32> = t.top.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [1, 2, 0]);
        assert!(
            (t.logprob
                - (0.5 - (1f32.exp() + 2.0 * 3f32.exp() + (-2f32).exp() + 0.5f32.exp()).ln()))
            .abs()
                < 1e-6
        );
    }
}
