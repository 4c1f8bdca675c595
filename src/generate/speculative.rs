//! Speculative decoding (mlx-lm's `--draft-model`): a small draft model proposes `k` tokens,
//! the model checks them in one pass over all `k + 1` positions, keeps the agreeing prefix and
//! its own next token, and both caches forget what was not kept. Every kept token is the model's
//! own pick given the true prefix, so greedy output is plain greedy output, and sampled output
//! follows the model's distribution.

use anyhow::{Result, bail};

use super::stream::Stream;
use super::{
    Generation, GenerationLimits, GenerationStats, Sampler, SamplingConfig, TextOut, advance_one,
};
use crate::model::{Decoder, KvCache};
use crate::ops::frozen_linear::ModelBackend;
use crate::tokenizer::Tokenizer;
use std::time::Instant;

/// How many drafted tokens the model kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Acceptance {
    /// Tokens the draft proposed.
    pub drafted: usize,
    /// Of those, the ones the model kept.
    pub accepted: usize,
}

impl Acceptance {
    /// The share kept, from 0 to 1.
    pub fn rate(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }
}

/// Refuses a draft whose tokenizer maps any token to another id than the model's.
pub fn check_vocabulary(model: &Tokenizer, draft: &Tokenizer) -> Result<()> {
    let (ours, theirs) = (model.inner.get_vocab(true), draft.inner.get_vocab(true));
    let differs = ours
        .iter()
        .filter(|(token, id)| theirs.get(*token) != Some(id))
        .min_by_key(|(_, id)| **id);
    if ours.len() != theirs.len() || differs.is_some() {
        let example = match differs {
            Some((token, id)) => match theirs.get(token) {
                Some(other) => {
                    format!("{token:?} is id {id} in the model and {other} in the draft")
                }
                None => format!("{token:?} (id {id}) is missing from the draft"),
            },
            None => "the draft has tokens the model lacks".to_string(),
        };
        bail!(
            "the draft model's vocabulary differs from the model's ({} tokens against {}; {example}): speculative decoding needs a draft with the same tokenizer, such as a smaller model of the same family",
            theirs.len(),
            ours.len()
        );
    }
    Ok(())
}

/// Generates after `prompt` with `draft` proposing `num_draft` tokens a step, calling `on_text`
/// with each new piece of text; caches as `cache` and `draft_cache` come (empty, bounded or
/// not, without sinks: keys dropped by a bound cannot be taken back).
#[allow(clippy::too_many_arguments)]
pub fn generate_speculative<B: ModelBackend>(
    model: &Decoder<B>,
    draft: &Decoder<B>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    [mut cache, mut draft_cache]: [KvCache<B>; 2],
    num_draft: usize,
    limits: &GenerationLimits,
    sampling: &SamplingConfig,
    device: &B::Device,
    on_text: impl FnMut(&str),
) -> Result<(Generation, Acceptance)> {
    anyhow::ensure!(!prompt.is_empty(), "the prompt is empty");
    anyhow::ensure!(num_draft > 0, "--num-draft-tokens must be at least 1");
    if cache.has_sinks() || draft_cache.has_sinks() {
        bail!(
            "a draft model cannot run with a --max-kv-size bound that keeps sinks: rejected draft tokens must be taken back out of the cache, and the keys a bound dropped for them cannot; drop --max-kv-size or use --keep 0"
        );
    }
    let mut stream = Stream::new(prompt.to_vec(), sampling.clone());
    let mut draft_sampler = Sampler::new(sampling.clone());
    let mut text = TextOut::new(on_text);
    let mut acceptance = Acceptance::default();

    let start = Instant::now();
    let mut first = advance_one(model, &mut cache, prompt, prompt.len(), device);
    let prompt_secs = start.elapsed().as_secs_f64();

    let start = Instant::now();
    if stream
        .push(&mut first, limits, &tokenizer.stop_ids)
        .is_some()
    {
        text.show(tokenizer, &stream.ids)?;
    }
    // The draft's cache holds a prefix of the context; the model's all but the last token.
    while stream.finish.is_none() {
        let known = stream.context.len();
        let k = num_draft.min(limits.max_tokens - stream.ids.len());
        let mut proposed = stream.context.clone();
        for _ in 0..k {
            let new = proposed.len() - draft_cache.len();
            let mut logits = advance_one(draft, &mut draft_cache, &proposed, new, device);
            let d = draft_sampler.sample(&mut logits, &proposed);
            proposed.push(d);
        }
        let drafts = &proposed[known..];
        if model.cache_outdated(cache.len(), known + k) {
            cache = cache.emptied();
            model.forward_hidden(&stream.context[..known - 1], 1, Some(&mut cache), device);
        }
        let verify = &proposed[known - 1..];
        let mut logits = model.cached_logits(verify, 1, k + 1, &mut cache, device);
        let (mut kept, mut agreed) = (0, 0);
        for (i, row) in logits.iter_mut().enumerate() {
            let Some(token) = stream.push(row, limits, &tokenizer.stop_ids) else {
                break;
            };
            kept += 1;
            if drafts.get(i) != Some(&token) {
                break;
            }
            agreed += 1;
            if stream.finish.is_some() {
                break;
            }
        }
        acceptance.drafted += k;
        acceptance.accepted += agreed;
        // The model ran `known - 1 + k + 1` positions; it keeps the context but its last token.
        cache.rewind(k + 1 - kept);
        // The draft ran `known + k - 1`; it keeps the old context and the drafts kept, leaving
        // it at least one token to run next.
        let draft_valid = known + agreed.min(k - 1).min(kept.saturating_sub(1));
        draft_cache.rewind(draft_cache.len() - draft_valid);
        text.show(tokenizer, &stream.ids)?;
    }
    let gen_secs = start.elapsed().as_secs_f64();
    let out = text.finish(tokenizer, &stream.ids)?;
    let stats = GenerationStats::timed([prompt.len(), stream.ids.len()], [prompt_secs, gen_secs]);
    Ok((Generation::of(stream, out, stats), acceptance))
}
