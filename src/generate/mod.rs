//! Text generation with a KV cache, streaming decoded text as it is produced.

pub mod batch;
pub mod conversation;
pub mod held_out;
pub mod logprobs;
pub mod prompt_cache;
pub mod prompts_file;
pub mod sampler;
pub mod speculative;
pub mod stream;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Result;

pub use logprobs::TokenLogprobs;
pub use sampler::{Sampler, SamplingConfig};
pub use stream::{Finish, Stream};

use crate::model::{Decoder, KvCache};
use crate::ops::decode::DecodeSession;
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
    /// Why it stopped.
    pub finish: Finish,
    /// Token counts and rates.
    pub stats: GenerationStats,
}

/// How much to generate and when to stop.
#[derive(Debug, Clone, Default)]
pub struct GenerationLimits {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop at one of the tokenizer's stop ids (off for fixed-length benchmarks).
    pub stop_at_eos: bool,
    /// Record each token's log-probability with this many likeliest alternatives.
    pub top_logprobs: Option<usize>,
    /// Stop after the current token once this is set (chat's Ctrl-C).
    pub interrupt: Option<Arc<AtomicBool>>,
}

impl GenerationLimits {
    /// Whether the interrupt flag is set.
    pub fn interrupted(&self) -> bool {
        self.interrupt
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Relaxed))
    }
}

/// What generation continues: new prompt tokens, after those a prompt cache already holds.
pub struct Prompt<'a, B: ModelBackend> {
    /// The keys and values of `cached`, or `None` to start from nothing; left holding the
    /// context but (after a length stop) its last token.
    pub cache: Option<&'a mut KvCache<B>>,
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
    on_text: impl FnMut(&str),
) -> Result<Generation> {
    let prompt_ids = prompt.ids;
    anyhow::ensure!(!prompt_ids.is_empty(), "the prompt is empty");
    let mut fresh = None;
    let cache = match prompt.cache {
        Some(cache) => cache,
        None => fresh.insert(KvCache::new(&model.config, None)),
    };
    let mut stream = Stream::new([prompt.cached, prompt_ids].concat(), sampling);

    let start = Instant::now();
    // A short prompt runs in the decode session, opened before it (`ModelBackend::
    // SESSION_PROMPT`); a longer one op by op, the session opening after it.
    let room = prompt_ids.len() + limits.max_tokens;
    let session_first = prompt_ids.len() <= B::SESSION_PROMPT;
    let mut session = session_first
        .then(|| decode_session(model, cache, room))
        .flatten();
    let mut logits = match session.as_mut() {
        Some(session) => session.run(prompt_ids),
        None => advance_one(model, cache, &stream.context, prompt_ids.len(), device),
    };
    let prompt_secs = start.elapsed().as_secs_f64();

    let start = Instant::now();
    if !session_first {
        session = decode_session(model, cache, limits.max_tokens);
    }
    if session.is_some() {
        // The session holds the keys and values now; they come back when it ends.
        *cache = cache.emptied();
    }
    let mut text = TextOut::new(on_text);
    let decoded = (|| -> Result<()> {
        while let Some(id) = stream.push(&mut logits, &limits, &tokenizer.stop_ids) {
            text.show(tokenizer, &stream.ids)?;
            if stream.finish.is_some() {
                break;
            }
            logits = match session.as_mut() {
                Some(session) => session.run(&[id]),
                None => advance_one(model, cache, &stream.context, 1, device),
            };
        }
        Ok(())
    })();
    // Back in the caller's cache however the loop ended (a chat continues from it).
    if let Some(session) = session {
        *cache = cache.refilled(session.into_kv());
    }
    decoded?;
    let gen_secs = start.elapsed().as_secs_f64();
    let text = text.finish(tokenizer, &stream.ids)?;
    let stats = GenerationStats::timed(
        [prompt_ids.len(), stream.ids.len()],
        [prompt_secs, gen_secs],
    );
    Ok(Generation::of(stream, text, stats))
}

impl GenerationStats {
    /// The figures for `[prompt, generated]` tokens over `[prompt, generation]` seconds, with
    /// the peak memory now.
    pub fn timed([prompt, generated]: [usize; 2], [prompt_secs, gen_secs]: [f64; 2]) -> Self {
        GenerationStats {
            prompt_tokens: prompt,
            prompt_tps: prompt as f64 / prompt_secs.max(1e-9),
            generated_tokens: generated,
            generation_tps: generated as f64 / gen_secs.max(1e-9),
            peak_memory_bytes: crate::backends::peak_rss_bytes(),
        }
    }
}

impl Generation {
    /// What `stream` produced, decoded to `text`.
    pub fn of(stream: Stream, text: String, stats: GenerationStats) -> Self {
        Generation {
            finish: stream.finish.unwrap_or(Finish::Length),
            ids: stream.ids,
            text,
            logprobs: stream.logprobs,
            stats,
        }
    }
}

/// Streams generated text: each call shows what the ids decode to beyond what was shown,
/// holding back an incomplete UTF-8 sequence until its last byte arrives.
pub struct TextOut<F: FnMut(&str)> {
    on_text: F,
    shown: usize,
}

impl<F: FnMut(&str)> TextOut<F> {
    /// Nothing shown yet.
    pub fn new(on_text: F) -> Self {
        TextOut { on_text, shown: 0 }
    }

    /// Shows the new text of `ids`, unless it ends inside a character.
    pub fn show(&mut self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<()> {
        let text = tokenizer.decode(ids)?;
        if !text.ends_with('\u{FFFD}') {
            self.emit(&text);
        }
        Ok(())
    }

    /// Shows whatever is left and returns the whole text.
    pub fn finish(mut self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
        let text = tokenizer.decode(ids)?;
        self.emit(&text);
        Ok(text)
    }

    fn emit(&mut self, text: &str) {
        if text.len() > self.shown {
            (self.on_text)(&text[self.shown..]);
            self.shown = text.len();
        }
    }
}

/// A session running the decode steps whole where the backend has one for this model and the
/// cache is one unpadded, unbounded row (`ops/decode.rs`); `LORAFORGE_DECODE=ops` keeps the
/// op-by-op path (for comparisons).
fn decode_session<B: ModelBackend>(
    model: &Decoder<B>,
    cache: &KvCache<B>,
    room: usize,
) -> Option<Box<dyn DecodeSession<B>>> {
    if !B::DECODE_SESSIONS
        || std::env::var_os("LORAFORGE_DECODE").is_some_and(|v| v == "ops")
        || !cache.pads().is_empty()
        || cache.bounded()
    {
        return None;
    }
    let kv = match cache.is_empty() {
        true => Vec::new(),
        false => cache.kv_primitives()?,
    };
    B::decode_session(model.decode_model()?, kv, room)
}

/// Each row's next-token logits after its context, whose last `new` tokens `cache` does not
/// hold yet: only those run, unless LongRoPE crosses its pretrained length, where every key is
/// rotated anew from the whole contexts (transformers recomputes its cache there too; in a
/// batch the longest row decides, as it does in transformers).
pub fn advance<B: ModelBackend>(
    model: &Decoder<B>,
    cache: &mut KvCache<B>,
    contexts: &[&[u32]],
    new: usize,
    device: &B::Device,
) -> Vec<Vec<f32>> {
    if model.cache_outdated(cache.len(), cache.len() + new) {
        let (ids, pads) = left_padded(contexts);
        *cache = cache.emptied().padded(pads);
        return prefill(model, cache, &ids, contexts.len(), device);
    }
    let ids: Vec<u32> = contexts
        .iter()
        .flat_map(|c| &c[c.len() - new..])
        .copied()
        .collect();
    prefill(model, cache, &ids, contexts.len(), device)
}

/// [`advance`] for one sequence: its next-token logits.
pub fn advance_one<B: ModelBackend>(
    model: &Decoder<B>,
    cache: &mut KvCache<B>,
    context: &[u32],
    new: usize,
    device: &B::Device,
) -> Vec<f32> {
    let mut rows = advance(model, cache, &[context], new, device);
    rows.pop().expect("advance returns one row per context")
}

/// The rows left-padded to the longest (with id 0, which attention never sees), row-major, and
/// each row's padding.
pub fn left_padded(rows: &[&[u32]]) -> (Vec<u32>, Vec<usize>) {
    let longest = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let pads: Vec<usize> = rows.iter().map(|r| longest - r.len()).collect();
    let ids = rows
        .iter()
        .zip(&pads)
        .flat_map(|(r, &pad)| std::iter::repeat_n(0, pad).chain(r.iter().copied()))
        .collect();
    (ids, pads)
}

/// Prompt positions a pass takes at most where a bound drops keys (mlx-lm's
/// `prefill_step_size`).
pub const PREFILL_STEP: usize = 2048;

/// Runs `ids` (`rows` rows, row-major) through the cache and returns each row's last logits: in
/// one pass, or where a `--max-kv-size` bound keeps sinks, as mlx-lm does, in passes of
/// [`PREFILL_STEP`] with the last token alone (which keys survive depends on how the prompt is
/// cut).
pub fn prefill<B: ModelBackend>(
    model: &Decoder<B>,
    cache: &mut KvCache<B>,
    ids: &[u32],
    rows: usize,
    device: &B::Device,
) -> Vec<Vec<f32>> {
    let seq = ids.len() / rows;
    if !cache.has_sinks() || seq == 1 {
        return model.cached_logits(ids, rows, 1, cache, device);
    }
    let columns = |from: usize, to: usize| -> Vec<u32> {
        ids.chunks_exact(seq)
            .flat_map(|row| &row[from..to])
            .copied()
            .collect()
    };
    let body = seq - 1;
    for from in (0..body).step_by(PREFILL_STEP) {
        let to = (from + PREFILL_STEP).min(body);
        model.forward_hidden(&columns(from, to), rows, Some(cache), device);
    }
    model.cached_logits(&columns(body, seq), rows, 1, cache, device)
}
