//! A split as training sees it: its file found, its records read and encoded, then planned into
//! batches with the recipe's length limit, overflow rule and packing.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::batches::BatchPlan;
use super::encode::{Encoded, Encoder};
use super::records::{load_split, split_path};
use crate::recipe::{DataSection, FieldNames};
use crate::tokenizer::Tokenizer;

/// The file of `split` and its encoded records, or `None` when the recipe has no such split.
pub fn encode_split(
    data: &DataSection,
    encoder: &Encoder,
    split: &str,
) -> Result<Option<(PathBuf, Vec<Encoded>)>> {
    let Some(path) = split_path(data, split) else {
        return Ok(None);
    };
    let examples = encode_file(&path, &data.fields, encoder)?;
    Ok(Some((path, examples)))
}

/// The records of a data file (JSON Lines, Parquet or CSV) encoded; an error names the record.
pub fn encode_file(path: &Path, fields: &FieldNames, encoder: &Encoder) -> Result<Vec<Encoded>> {
    load_split(path, fields)?
        .iter()
        .enumerate()
        .map(|(i, r)| {
            encoder
                .encode(r)
                .with_context(|| format!("{}: record {}", path.display(), i + 1))
        })
        .collect()
}

/// Plans a split's encoded examples into batches with the recipe's `max_seq_len`, overflow rule
/// and packing, padding with the EOS id (0 without one).
pub fn plan_batches(
    data: &DataSection,
    examples: Vec<Encoded>,
    batch_size: usize,
    tokenizer: &Tokenizer,
    split: &str,
) -> Result<BatchPlan> {
    BatchPlan::new(
        examples,
        batch_size,
        data.max_seq_len,
        data.overflow,
        pad_id(tokenizer),
        data.packing,
        split,
    )
}

/// The id that pads a batch: padding is never trained or attended to, so any id serves; EOS is
/// what transformers uses.
pub fn pad_id(tokenizer: &Tokenizer) -> u32 {
    tokenizer
        .eos
        .as_deref()
        .and_then(|e| tokenizer.token_id(e))
        .unwrap_or(0)
}
