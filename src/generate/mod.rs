//! Text generation with a KV cache, streaming decoded text as it is produced.

pub mod held_out;
pub mod logprobs;
pub mod prompt_cache;
pub mod sampler;

use std::time::Instant;

use anyhow::Result;

pub use logprobs::TokenLogprobs;
pub use sampler::{Sampler, SamplingConfig};

use crate::model::{Decoder, KvCache};
use crate::ops::frozen_linear::ModelBackend;
use crate::tokenizer::Tokenizer;

/// Throughput figures, as `mlx_lm.generate` prints them.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationStats {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens per second: the prompt's length over the time of its one forward pass.
    pub prompt_tps: f64,
    /// Tokens generated, the stop token not counted.
    pub generated_tokens: usize,
    /// Generated tokens per second, from sampling the first token to the last.
    pub generation_tps: f64,
    /// Peak resident memory of the process (Linux `VmHWM`); `None` where it cannot be read.
    pub peak_memory_bytes: Option<u64>,
}

/// What one call of [`generate`] produced.
pub struct Generation {
    /// The generated ids, without the prompt or the stop token.
    pub ids: Vec<u32>,
    /// The generated text, decoded whole.
    pub text: String,
    /// Each generated token's log-probability and the likeliest alternatives, when
    /// [`GenerationLimits::top_logprobs`] asks for them.
    pub logprobs: Vec<TokenLogprobs>,
    /// Token counts and rates.
    pub stats: GenerationStats,
}

/// How much to generate and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationLimits {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop at one of the tokenizer's stop ids (off for fixed-length benchmarks).
    pub stop_at_eos: bool,
    /// Record each token's log-probability with this many likeliest alternatives.
    pub top_logprobs: Option<usize>,
}

/// What generation continues: new prompt tokens, after those a prompt cache already holds.
pub struct Prompt<'a, B: ModelBackend> {
    /// The keys and values of `cached`, or `None` to start from nothing.
    pub cache: Option<KvCache<B>>,
    /// The tokens the cache holds.
    pub cached: &'a [u32],
    /// The tokens to run through the model first.
    pub ids: &'a [u32],
}

impl<'a, B: ModelBackend> Prompt<'a, B> {
    /// A prompt of these tokens alone.
    pub fn new(ids: &'a [u32]) -> Self {
        Prompt {
            cache: None,
            cached: &[],
            ids,
        }
    }
}

/// Generates after the prompt, calling `on_text` with each new piece of decoded text. Only the
/// prompt's new tokens are computed, and counted in the prompt's tokens/s (but for LongRoPE
/// crossing its pretrained length, which recomputes the cached tokens too).
pub fn generate<B: ModelBackend>(
    model: &Decoder<B>,
    tokenizer: &Tokenizer,
    prompt: Prompt<'_, B>,
    limits: GenerationLimits,
    sampling: SamplingConfig,
    device: &B::Device,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    let prompt_ids = prompt.ids;
    anyhow::ensure!(!prompt_ids.is_empty(), "the prompt is empty");
    let layers = model.config.num_layers;
    let mut cache = prompt.cache.unwrap_or_else(|| KvCache::new(layers));
    let mut sampler = Sampler::new(sampling);
    let mut context = [prompt.cached, prompt_ids].concat();

    let start = Instant::now();
    let mut logits = advance(model, &mut cache, &context, prompt_ids.len(), device);
    let prompt_secs = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut generated = Vec::new();
    let mut logprobs = Vec::new();
    let mut printed = 0;
    let max_tokens = limits.max_tokens;
    while generated.len() < max_tokens {
        let next = sampler.sample(&mut logits, &context);
        if limits.stop_at_eos && tokenizer.stop_ids.contains(&next) {
            break;
        }
        if let Some(k) = limits.top_logprobs {
            // The sampler left the penalised logits it picked from.
            logprobs.push(TokenLogprobs::of(&logits, next, k));
        }
        generated.push(next);
        context.push(next);
        let text = tokenizer.decode(&generated)?;
        // Hold back an incomplete UTF-8 sequence until its last byte arrives.
        if !text.ends_with('\u{FFFD}') && text.len() > printed {
            on_text(&text[printed..]);
            printed = text.len();
        }
        if generated.len() == max_tokens {
            break;
        }
        logits = advance(model, &mut cache, &context, 1, device);
    }
    let gen_secs = start.elapsed().as_secs_f64();
    let text = tokenizer.decode(&generated)?;
    if text.len() > printed {
        on_text(&text[printed..]);
    }
    Ok(Generation {
        stats: GenerationStats {
            prompt_tokens: prompt_ids.len(),
            prompt_tps: prompt_ids.len() as f64 / prompt_secs.max(1e-9),
            generated_tokens: generated.len(),
            generation_tps: generated.len() as f64 / gen_secs.max(1e-9),
            peak_memory_bytes: crate::backends::peak_rss_bytes(),
        },
        ids: generated,
        text,
        logprobs,
    })
}

/// The next token's logits after `context`, whose last `new` tokens `cache` does not hold yet:
/// only those run, unless LongRoPE crosses its pretrained length, where every key is rotated
/// anew from the whole context (transformers recomputes its cache there too).
fn advance<B: ModelBackend>(
    model: &Decoder<B>,
    cache: &mut KvCache<B>,
    context: &[u32],
    new: usize,
    device: &B::Device,
) -> Vec<f32> {
    if model.cache_outdated(cache.len(), context.len()) {
        *cache = KvCache::new(model.config.num_layers);
        return model.next_logits(context, cache, device);
    }
    model.next_logits(&context[context.len() - new..], cache, device)
}
