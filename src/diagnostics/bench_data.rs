//! The real-data mode of `bench train` (`--data`): a chat dataset encoded by a real tokenizer
//! through its chat template (the trainer's own data path, prompts masked), cut into the
//! trainer's batches: length-bucketed and padded, or packed (`--pack`: several examples a row,
//! their boundaries passed to the attention kernels, no mask tensor). Packing must not change
//! the loss, so [`DataBatches::packing_loss_check`] computes it both ways at the same weights.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::data::split::{encode_file, pad_id};
use crate::data::{Batch, BatchPlan, Encoder, Example};
use crate::model::{Decoder, ModelFiles};
use crate::ops::ModelBackend;
use crate::recipe::{FieldNames, Overflow};
use crate::tokenizer::{self, Tokenizer};
use crate::train::run::{evaluate_loss, first_batches};

/// A dataset's batches in the order one seeded epoch visits them.
pub struct DataBatches {
    plan: BatchPlan,
    order: Vec<usize>,
    pad_id: u32,
    max_seq_len: usize,
}

impl DataBatches {
    /// The records of `rows` (JSON Lines, Parquet or CSV, as a recipe's data file) encoded by the
    /// tokenizer at `tokenizer` (a folder with `tokenizer.json`, or a `.gguf` file), in batches
    /// of `batch` rows of at most `max_seq_len` positions (longer examples are truncated).
    pub fn load(
        rows: &Path,
        tokenizer: &Path,
        batch: usize,
        max_seq_len: usize,
        pack: bool,
        vocab_size: usize,
        seed: u64,
    ) -> Result<Self> {
        let tokenizer = load_tokenizer(tokenizer)?;
        if tokenizer.vocab_size() > vocab_size {
            bail!(
                "the tokenizer has {} tokens but the --shape's vocabulary has {vocab_size}; pick a shape whose vocabulary holds it (llama3.2-1b and llama3-8b: 128256)",
                tokenizer.vocab_size()
            );
        }
        let encoder = Encoder::new(&tokenizer, true).keeping(max_seq_len);
        let examples = encode_file(rows, &FieldNames::default(), &encoder)?;
        let pad_id = pad_id(&tokenizer);
        let plan = BatchPlan::new(
            examples,
            batch,
            max_seq_len,
            Overflow::Truncate,
            pad_id,
            pack,
            "--data",
        )?;
        let order = plan.epoch_order(seed, 0);
        Ok(DataBatches {
            plan,
            order,
            pad_id,
            max_seq_len,
        })
    }

    /// The batch of step `step` (the epoch repeats), and its input positions that are not
    /// padding.
    pub fn batch(&self, step: usize) -> (Batch, usize) {
        let index = self.order[step % self.order.len()];
        (self.plan.batch(index), self.plan.positions(index))
    }

    /// Batches in one epoch.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether the epoch has no batch (never true for a loaded dataset).
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The examples (after truncation), in file order.
    pub fn examples(&self) -> &[Example] {
        self.plan.examples()
    }

    /// Writes the examples as JSON Lines, `{"ids": [...], "trained": [0 or 1, ...]}`: what the
    /// reference (`bench/reference/peft_data_bench.py`) trains on, so both sides see the same
    /// tokens.
    pub fn write_examples(&self, path: &Path) -> Result<()> {
        crate::io::atomic::write_with(path, |file| {
            let mut out = std::io::BufWriter::new(file);
            for e in self.examples() {
                let trained: Vec<u8> = e.trained.iter().map(|&t| u8::from(t)).collect();
                let line = serde_json::json!({"ids": e.ids, "trained": trained});
                writeln!(out, "{line}")?;
            }
            out.flush()
        })
        .with_context(|| format!("writing the examples to {}", path.display()))
    }

    /// The token-weighted mean loss over the first `count` examples at the model's current
    /// weights, padded (one example a row) and packed: (padded, packed). Equal up to rounding
    /// when packing keeps every example to itself.
    pub fn packing_loss_check<B: ModelBackend>(
        &self,
        model: &Decoder<B>,
        count: usize,
        device: &B::Device,
    ) -> Result<(f64, f64)> {
        let first = &self.examples()[..count.clamp(1, self.examples().len())];
        let loss = |pack: bool| -> Result<f64> {
            let plan = BatchPlan::new(
                first.to_vec(),
                1,
                self.max_seq_len,
                Overflow::Truncate,
                self.pad_id,
                pack,
                "--data",
            )?;
            Ok(evaluate_loss(model, first_batches(&plan, -1), device).loss)
        };
        Ok((loss(false)?, loss(true)?))
    }

    /// Fraction of the epoch's batch positions that are padding.
    pub fn padding_fraction(&self) -> f64 {
        self.plan.padding_fraction()
    }
}

/// A tokenizer from a folder (`tokenizer.json`, `tokenizer_config.json`; no weights needed) or
/// a GGUF file.
fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.is_dir() {
        tokenizer::from_folder(path)
    } else {
        tokenizer::for_model(&ModelFiles::open(path)?)
    }
}
