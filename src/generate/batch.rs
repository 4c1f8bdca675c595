//! Many prompts at once (mlx-lm's `batch_generate`): the prompts left-padded into one batch
//! whose padding attention never sees, each row with its own sampler (seeded alike, so a row
//! generates what its prompt would alone), rows dropped from the batch as they finish. Sliding
//! layers' bounded caches serve batches exactly; a `--max-kv-size` bound only without sinks.

use std::time::Instant;

use anyhow::Result;

use super::stream::Stream;
use super::{
    Generation, GenerationLimits, GenerationStats, SamplingConfig, advance, left_padded, prefill,
};
use crate::model::{Bound, Decoder, KvCache};
use crate::ops::frozen_linear::ModelBackend;
use crate::tokenizer::Tokenizer;

/// What one call of [`generate_batch`] produced.
pub struct BatchGeneration {
    /// Each prompt's generation, in the prompts' order (their stats are the batch's).
    pub rows: Vec<Generation>,
    /// The batch's token counts and rates: every row's prompt tokens over the prompt passes,
    /// every row's generated tokens over the decoding steps.
    pub stats: GenerationStats,
}

/// Generates after each of `prompts` at once, through a cache bounded as `bound` says.
pub fn generate_batch<B: ModelBackend>(
    model: &Decoder<B>,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    limits: &GenerationLimits,
    sampling: &SamplingConfig,
    bound: Option<Bound>,
    device: &B::Device,
) -> Result<BatchGeneration> {
    if let Some(b) = bound.filter(|b| b.keep > 0) {
        anyhow::bail!(
            "a bounded cache that keeps {} sink positions cannot serve a batch (a left-padded row's first positions are padding, so it would lose its sinks); run the prompts one at a time with --prompt, or set --keep 0",
            b.keep
        );
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        anyhow::bail!("prompt {} of the batch is empty", i + 1);
    }
    let mut streams: Vec<Stream> = prompts
        .iter()
        .map(|p| Stream::new(p.clone(), sampling.clone()))
        .collect();
    let start = Instant::now();
    let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let (ids, pads) = left_padded(&rows);
    let mut cache = KvCache::new(&model.config, bound).padded(pads);
    let mut logits = prefill(model, &mut cache, &ids, rows.len(), device);
    let prompt_secs = start.elapsed().as_secs_f64();

    let start = Instant::now();
    // The stream each row of the cache belongs to.
    let mut active: Vec<usize> = (0..streams.len()).collect();
    loop {
        let mut going = Vec::new();
        for (row, &s) in active.iter().enumerate() {
            let stream = &mut streams[s];
            if stream
                .push(&mut logits[row], limits, &tokenizer.stop_ids)
                .is_some()
                && stream.finish.is_none()
            {
                going.push(row);
            }
        }
        if going.is_empty() {
            break;
        }
        if going.len() < active.len() {
            cache.select_rows(&going, device);
            active = going.iter().map(|&row| active[row]).collect();
        }
        let contexts: Vec<&[u32]> = active
            .iter()
            .map(|&s| streams[s].context.as_slice())
            .collect();
        logits = advance(model, &mut cache, &contexts, 1, device);
    }
    let gen_secs = start.elapsed().as_secs_f64();

    let prompt_tokens = prompts.iter().map(Vec::len).sum::<usize>();
    let generated_tokens = streams.iter().map(|s| s.ids.len()).sum::<usize>();
    let stats = GenerationStats::timed([prompt_tokens, generated_tokens], [prompt_secs, gen_secs]);
    let rows = streams
        .into_iter()
        .map(|s| {
            let text = tokenizer.decode(&s.ids)?;
            Ok(Generation::of(s, text, stats.clone()))
        })
        .collect::<Result<_>>()?;
    Ok(BatchGeneration { rows, stats })
}
