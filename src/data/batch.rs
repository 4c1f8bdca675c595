//! The unit of training data the model sees: token ids, next-token targets and the loss mask of
//! a few rows, padded (or packed) to one length.

/// A padded batch: `inputs`, `targets` and `mask` are `[batch, seq]` row-major; `targets` is the
/// input shifted by one and `mask` is 1 where the target is trained. Packed rows also carry
/// `segments`: the example each position belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Rows.
    pub batch: usize,
    /// Positions per row.
    pub seq: usize,
    /// Token ids, `[batch, seq]`.
    pub inputs: Vec<u32>,
    /// The token each position predicts, `[batch, seq]`.
    pub targets: Vec<u32>,
    /// 1 where the target is trained, 0 for prompts and padding, `[batch, seq]`.
    pub mask: Vec<f32>,
    /// For packed rows, the example each position belongs to (attention stays inside it).
    pub segments: Option<Vec<u32>>,
    /// Each row's positions before its padding (`seq` for a full row).
    pub lengths: Vec<usize>,
}

impl Batch {
    /// Positions whose loss counts.
    pub fn trained_tokens(&self) -> usize {
        self.mask.iter().filter(|&&m| m > 0.0).count()
    }

    /// `[batch, seq]`: true for a token, false for padding.
    pub fn tokens(&self) -> Vec<bool> {
        self.lengths
            .iter()
            .flat_map(|&n| (0..self.seq).map(move |i| i < n))
            .collect()
    }
}
