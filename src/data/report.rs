//! `loraforge data report RECIPE`: what training will see, before it runs. Per split: records,
//! token-length percentiles, how many examples the length limit cuts or drops, trained tokens,
//! batches and padding waste; then one training example rendered with its loss mask.

use std::fmt::Write;

use anyhow::{Context, Result};

use super::encode::{Encoded, Encoder};
use super::split::{encode_split, plan_batches};
use crate::model::ModelFiles;
use crate::recipe::Recipe;
use crate::tokenizer::{self, Tokenizer};

/// How trained tokens are shown in the sample: colour in a terminal, brackets elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskStyle {
    /// Trained spans in green (ANSI escapes).
    Color,
    /// `⟦ ⟧` around trained spans.
    Brackets,
}

/// The data report of a recipe's splits, as `loraforge data report` prints it.
pub fn report(recipe: &Recipe, style: MaskStyle) -> Result<String> {
    let files = ModelFiles::open(&recipe.model.path)?;
    let tokenizer = tokenizer::for_model(&files)?;
    let encoder =
        Encoder::new(&tokenizer, recipe.data.mask_prompt).keeping(recipe.data.max_seq_len);
    let data = &recipe.data;
    let mut out = String::new();
    writeln!(
        out,
        "data report for `{}`: model {}, max_seq_len {} ({:?} longer), batch_size {}, packing {}, mask_prompt {}\n",
        recipe.name,
        recipe.model.path.display(),
        data.max_seq_len,
        data.overflow,
        recipe.train.batch_size,
        if data.packing { "on" } else { "off" },
        if data.mask_prompt { "on" } else { "off" },
    )?;
    writeln!(
        out,
        "{:<6} {:>8} {:>10} {:>6} {:>6} {:>6} {:>6} {:>6} {:>10} {:>8} {:>8}",
        "split",
        "records",
        "tokens",
        "p50",
        "p90",
        "p99",
        "max",
        "over",
        "trained",
        "batches",
        "padding"
    )?;
    let mut sample = None;
    for split in ["train", "valid", "test"] {
        let Some((path, examples)) = encode_split(data, &encoder, split)? else {
            writeln!(out, "{split:<6} (none)")?;
            continue;
        };
        let mut lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
        lengths.sort_unstable();
        let over = lengths.iter().filter(|&&n| n > data.max_seq_len).count();
        let tokens: usize = lengths.iter().sum();
        let trained: usize = examples
            .iter()
            .map(|e| {
                e.trained[1..e.trained.len().min(data.max_seq_len)]
                    .iter()
                    .filter(|&&t| t)
                    .count()
            })
            .sum();
        if split == "train" {
            sample = examples.first().cloned();
        }
        let records = examples.len();
        let batch_size = recipe.train.batch_size.min(records);
        let plan = plan_batches(data, examples, batch_size, &tokenizer, split)
            .with_context(|| path.display().to_string())?;
        writeln!(
            out,
            "{split:<6} {records:>8} {tokens:>10} {:>6} {:>6} {:>6} {:>6} {over:>6} {trained:>10} {:>8} {:>7.1}%",
            percentile(&lengths, 50.0),
            percentile(&lengths, 90.0),
            percentile(&lengths, 99.0),
            lengths.last().copied().unwrap_or(0),
            plan.len(),
            100.0 * plan.padding_fraction(),
        )?;
    }
    writeln!(
        out,
        "\n(lengths in tokens; `over` = longer than max_seq_len, {} by data.overflow; `trained` = targets in the loss)",
        match data.overflow {
            crate::recipe::Overflow::Truncate => "truncated",
            crate::recipe::Overflow::Drop => "dropped",
        }
    )?;
    if let Some(example) = sample {
        let legend = match style {
            MaskStyle::Color => "trained tokens in green",
            MaskStyle::Brackets => "trained tokens between ⟦ ⟧",
        };
        writeln!(out, "\nfirst train record, {legend}:\n")?;
        writeln!(out, "{}", render_mask(&tokenizer, &example, style)?)?;
    }
    Ok(out)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[usize], p: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The example's text with its trained spans marked; spans are decoded whole so multi-token
/// characters stay intact.
pub fn render_mask(tokenizer: &Tokenizer, example: &Encoded, style: MaskStyle) -> Result<String> {
    let (open, close) = match style {
        MaskStyle::Color => ("\x1b[32m", "\x1b[0m"),
        MaskStyle::Brackets => ("⟦", "⟧"),
    };
    let mut out = String::new();
    let mut start = 0;
    while start < example.ids.len() {
        let trained = example.trained[start];
        let end = (start..example.ids.len())
            .find(|&t| example.trained[t] != trained)
            .unwrap_or(example.ids.len());
        let text = tokenizer.decode(&example.ids[start..end])?;
        if trained {
            write!(out, "{open}{text}{close}")?;
        } else {
            out.push_str(&text);
        }
        start = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<usize> = (1..=10).collect();
        assert_eq!(percentile(&v, 50.0), 5);
        assert_eq!(percentile(&v, 90.0), 9);
        assert_eq!(percentile(&v, 99.0), 10);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
