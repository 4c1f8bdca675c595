//! Length-bucketed, padded batches with a seeded order. Examples are sorted by length and cut
//! into batches of neighbours (so padding is small — mlx-lm's sort is a no-op and wastes ~25%),
//! and the order of the batches is shuffled per epoch from the seed, so a cursor
//! `(epoch, position)` names every batch exactly, which is what resuming needs.

use anyhow::{Result, bail};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::batch::Batch;
use super::encode::Encoded;
use crate::recipe::Overflow;

/// One tokenized example with its loss mask.
pub type Example = Encoded;

/// A split's examples cut into padded batches of similar length, and the seeded order of the
/// batches in each epoch.
#[derive(Debug, Clone)]
pub struct BatchPlan {
    examples: Vec<Example>,
    /// The examples of each row: one, or several back to back when packing.
    rows: Vec<Vec<usize>>,
    /// Row indices of each batch, shortest batches first.
    batches: Vec<Vec<usize>>,
    pad_id: u32,
    packed: bool,
    /// Examples cut to `max_seq_len`.
    pub truncated: usize,
    /// Examples dropped for being longer than `max_seq_len` (`overflow = "drop"`).
    pub dropped: usize,
}

impl BatchPlan {
    /// With `pack`, short examples share a row of up to `max_seq_len` positions (first-fit,
    /// longest first), and attention never crosses from one example into the next.
    pub fn new(
        mut examples: Vec<Example>,
        batch_size: usize,
        max_seq_len: usize,
        overflow: Overflow,
        pad_id: u32,
        pack: bool,
        split: &str,
    ) -> Result<Self> {
        let (mut truncated, mut dropped) = (0, 0);
        examples.retain_mut(|e| {
            if e.ids.len() <= max_seq_len {
                return true;
            }
            match overflow {
                Overflow::Truncate => {
                    truncated += 1;
                    e.ids.truncate(max_seq_len);
                    e.trained.truncate(max_seq_len);
                    true
                }
                Overflow::Drop => {
                    dropped += 1;
                    false
                }
            }
        });
        // An example needs two tokens to give one (input, target) pair.
        examples.retain(|e| e.ids.len() >= 2 && e.trained[1..].iter().any(|&t| t));
        if examples.is_empty() {
            bail!(
                "the {split} split has no usable example (all empty, untrained or dropped for length)"
            );
        }
        let mut rows = if pack {
            pack_rows(&examples, max_seq_len)
        } else {
            (0..examples.len()).map(|i| vec![i]).collect()
        };
        if batch_size > rows.len() {
            let what = if pack { "packed rows" } else { "examples" };
            bail!(
                "train.batch_size {batch_size} is larger than the {} {what} of the {split} split; lower it",
                rows.len()
            );
        }
        let width =
            |row: &Vec<usize>| -> usize { row.iter().map(|&i| examples[i].ids.len() - 1).sum() };
        rows.sort_by_cached_key(|row| (width(row), row[0]));
        let batches = (0..rows.len())
            .collect::<Vec<_>>()
            .chunks(batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        Ok(BatchPlan {
            examples,
            rows,
            batches,
            pad_id,
            packed: pack,
            truncated,
            dropped,
        })
    }

    /// Number of batches in an epoch.
    pub fn len(&self) -> usize {
        self.batches.len()
    }

    /// Whether there are no batches (never true for a plan `new` returned).
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// The examples kept, after truncation and drops, in their original order.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// Input positions of each row (an example of n tokens gives n - 1 (input, target) pairs).
    pub fn row_widths(&self) -> Vec<usize> {
        self.rows.iter().map(|row| self.width(row)).collect()
    }

    /// Input positions of batch `index` that are not padding.
    pub fn positions(&self, index: usize) -> usize {
        self.batches[index]
            .iter()
            .map(|&r| self.width(&self.rows[r]))
            .sum()
    }

    fn width(&self, row: &[usize]) -> usize {
        row.iter().map(|&i| self.examples[i].ids.len() - 1).sum()
    }

    /// Batch indices in the order epoch `epoch` visits them.
    pub fn epoch_order(&self, seed: u64, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.batches.len()).collect();
        let mut rng = StdRng::seed_from_u64(
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(epoch as u64),
        );
        order.shuffle(&mut rng);
        order
    }

    /// Batch `index` (in sorted order), padded to its widest row.
    pub fn batch(&self, index: usize) -> Batch {
        let members = &self.batches[index];
        let seq = members
            .iter()
            .map(|&r| self.width(&self.rows[r]))
            .max()
            .unwrap_or(0);
        let cells = members.len() * seq;
        let mut batch = Batch {
            batch: members.len(),
            seq,
            inputs: Vec::with_capacity(cells),
            targets: Vec::with_capacity(cells),
            mask: Vec::with_capacity(cells),
            segments: self.packed.then(|| Vec::with_capacity(cells)),
            lengths: Vec::with_capacity(members.len()),
        };
        for &r in members {
            for &i in &self.rows[r] {
                let e = &self.examples[i];
                let n = e.ids.len() - 1;
                batch.inputs.extend(&e.ids[..n]);
                batch.targets.extend(&e.ids[1..]);
                batch
                    .mask
                    .extend(e.trained[1..].iter().map(|&t| if t { 1.0 } else { 0.0 }));
                if let Some(segments) = &mut batch.segments {
                    segments.extend(std::iter::repeat_n(i as u32, n));
                }
            }
            // Padding is never trained, so it adds nothing to the loss (mlx-lm counts one pad).
            let width = self.width(&self.rows[r]);
            batch.lengths.push(width);
            let pad = seq - width;
            batch.inputs.extend(std::iter::repeat_n(self.pad_id, pad));
            batch.targets.extend(std::iter::repeat_n(self.pad_id, pad));
            batch.mask.extend(std::iter::repeat_n(0.0, pad));
            if let Some(segments) = &mut batch.segments {
                segments.extend(std::iter::repeat_n(u32::MAX, pad));
            }
        }
        batch
    }

    /// Fraction of batch positions that are padding.
    pub fn padding_fraction(&self) -> f64 {
        let (mut total, mut real) = (0usize, 0usize);
        for members in &self.batches {
            let widths: Vec<usize> = members.iter().map(|&r| self.width(&self.rows[r])).collect();
            total += widths.iter().max().unwrap_or(&0) * widths.len();
            real += widths.iter().sum::<usize>();
        }
        1.0 - real as f64 / total.max(1) as f64
    }
}

/// First-fit decreasing: each example, longest first, goes into the first row with room for it.
fn pack_rows(examples: &[Example], max_seq_len: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(examples[i].ids.len()), i));
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
    for i in order {
        let width = examples[i].ids.len() - 1;
        match rows
            .iter_mut()
            .find(|(used, _)| used + width <= max_seq_len)
        {
            Some((used, row)) => {
                *used += width;
                row.push(i);
            }
            None => rows.push((width, vec![i])),
        }
    }
    rows.into_iter().map(|(_, row)| row).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(len: usize) -> Example {
        Encoded {
            ids: (0..len as u32).collect(),
            trained: vec![true; len],
        }
    }

    #[test]
    fn batches_group_similar_lengths_and_pad_untrained() {
        let plan = BatchPlan::new(
            vec![example(9), example(3), example(8), example(2)],
            2,
            100,
            Overflow::Truncate,
            0,
            false,
            "train",
        )
        .unwrap();
        assert_eq!(plan.len(), 2);
        let short = plan.batch(0);
        assert_eq!((short.batch, short.seq), (2, 2));
        // Rows in length order: the 2-token example is padded by one untrained position.
        assert_eq!(short.mask, vec![1.0, 0.0, 1.0, 1.0]);
        assert_eq!(plan.batch(1).seq, 8);
    }

    #[test]
    fn overflow_truncates_or_drops_and_counts() {
        let plan = BatchPlan::new(
            vec![example(10), example(3)],
            1,
            5,
            Overflow::Truncate,
            0,
            false,
            "train",
        )
        .unwrap();
        assert_eq!((plan.truncated, plan.batch(1).seq), (1, 4));
        let plan = BatchPlan::new(
            vec![example(10), example(3)],
            1,
            5,
            Overflow::Drop,
            0,
            false,
            "train",
        )
        .unwrap();
        assert_eq!((plan.dropped, plan.len()), (1, 1));
    }

    #[test]
    fn batch_larger_than_dataset_is_an_error() {
        let err = BatchPlan::new(
            vec![example(4)],
            4,
            10,
            Overflow::Truncate,
            0,
            false,
            "train",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("batch_size 4 is larger than the 1 examples"),
            "{err}"
        );
    }

    #[test]
    fn epoch_order_is_seeded() {
        let plan = BatchPlan::new(
            (2..40).map(example).collect(),
            2,
            100,
            Overflow::Truncate,
            0,
            false,
            "train",
        )
        .unwrap();
        assert_eq!(plan.epoch_order(1, 0), plan.epoch_order(1, 0));
        assert_ne!(plan.epoch_order(1, 0), plan.epoch_order(1, 1));
    }

    #[test]
    fn packing_fills_rows_and_marks_each_example() {
        // Widths (tokens - 1): 6, 5, 3, 2, 1 into rows of 8: [6, 2], [5, 3], [1].
        let examples = [7, 6, 4, 3, 2].map(example).to_vec();
        let plan = BatchPlan::new(examples, 1, 8, Overflow::Truncate, 0, true, "train").unwrap();
        let mut widths = plan.row_widths();
        widths.sort();
        assert_eq!(widths, vec![1, 8, 8]);
        let row = plan.batch(1);
        assert_eq!(row.seq, 8);
        let segments = row.segments.unwrap();
        // Each example's tokens are contiguous, and its targets are its own next tokens.
        assert_eq!(segments.iter().filter(|&&s| s == segments[0]).count(), 6);
        assert_eq!(row.inputs[6..], [0, 1]);
        assert_eq!(row.targets[6..], [1, 2]);
        assert!(row.mask.iter().all(|&m| m == 1.0));
    }
}
