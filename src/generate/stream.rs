//! One sequence being generated: its sampler, its context, the tokens it produced and why it
//! stopped. Plain, batched and speculative generation all pick tokens through it.

use super::GenerationLimits;
use super::logprobs::TokenLogprobs;
use super::sampler::{Sampler, SamplingConfig};

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// It produced a stop token (not kept).
    Stop,
    /// It produced `max_tokens` tokens.
    Length,
    /// It was interrupted (Ctrl-C in chat).
    Interrupted,
}

/// A sequence's sampler, context and output.
pub struct Stream {
    sampler: Sampler,
    /// The prompt, then every token kept.
    pub context: Vec<u32>,
    /// The tokens kept, without the prompt.
    pub ids: Vec<u32>,
    /// Each kept token's log-probabilities, when the limits ask for them.
    pub logprobs: Vec<TokenLogprobs>,
    /// Why it stopped, once it has.
    pub finish: Option<Finish>,
}

impl Stream {
    /// A sequence continuing `context`.
    pub fn new(context: Vec<u32>, sampling: SamplingConfig) -> Self {
        Stream {
            sampler: Sampler::new(sampling),
            context,
            ids: Vec::new(),
            logprobs: Vec::new(),
            finish: None,
        }
    }

    /// Picks the next token from `logits` (left as the sampler picked from them) and keeps it,
    /// unless it stops the sequence; returns the token kept. The sequence ends after it at
    /// `max_tokens`, or when the limits' interrupt flag is set.
    pub fn push(
        &mut self,
        logits: &mut [f32],
        limits: &GenerationLimits,
        stop_ids: &[u32],
    ) -> Option<u32> {
        if self.finish.is_some() {
            return None;
        }
        if self.ids.len() >= limits.max_tokens {
            self.finish = Some(Finish::Length);
            return None;
        }
        let next = self.sampler.sample(logits, &self.context);
        if limits.stop_at_eos && stop_ids.contains(&next) {
            self.finish = Some(Finish::Stop);
            return None;
        }
        if let Some(k) = limits.top_logprobs {
            self.logprobs.push(TokenLogprobs::of(logits, next, k));
        }
        self.ids.push(next);
        self.context.push(next);
        if self.ids.len() == limits.max_tokens {
            self.finish = Some(Finish::Length);
        }
        if limits.interrupted() {
            self.finish = Some(Finish::Interrupted);
        }
        Some(next)
    }
}
