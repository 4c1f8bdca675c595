//! Where each token sits and what it may attend to: the RoPE tables and the attention's
//! [`Visibility`] rule, built once per forward pass and shared by every block.
//!
//! Sliding layers (Mistral's, Gemma's) see a window of the keys, with their own RoPE tables in
//! Gemma 3: [`Layouts`] holds one layout per kind of layer.
//!
//! Two layouts: one sequence per row (causal, continuing any cached positions), and packed rows
//! that hold several examples back to back, where positions restart at each example and
//! attention never crosses from one example into another.

use burn::tensor::{Tensor, backend::Backend};

use super::kv_cache::CachedKeys;
use crate::ops::rope::Rope;
use crate::ops::visibility::Visibility;

/// The RoPE tables and attention rule for one forward pass, shared by every block.
#[derive(Debug, Clone)]
pub struct AttentionLayout<B: Backend> {
    /// `[1 or batch, 1, seq, head_dim]`
    pub cos: Tensor<B, 4>,
    /// `[1 or batch, 1, seq, head_dim]`, as `cos`.
    pub sin: Tensor<B, 4>,
    /// Which keys each query sees.
    pub visibility: Visibility<B>,
}

impl<B: Backend> AttentionLayout<B> {
    /// `seq` new tokens per row after `past` cached ones: query `i` sees keys `0..=past + i`.
    pub fn causal(rope: &Rope, past: usize, seq: usize, device: &B::Device) -> Self {
        let positions: Vec<usize> = (past..past + seq).collect();
        let (cos, sin) = rope.tables(&positions, 1, device);
        AttentionLayout {
            cos,
            sin,
            visibility: Visibility::causal(past),
        }
    }

    /// `seq` new tokens per row after `offset` positions of which a cache keeps `keys`, rows
    /// left-padded by `pads` (empty: one unpadded row). Each row's positions count from its
    /// first real token; a query sees the kept keys and the new ones up to itself, through the
    /// cache bound's window, never padding (a padding query sees only itself, so its row of
    /// scores is never empty).
    pub fn cached(
        rope: &Rope,
        offset: usize,
        pads: &[usize],
        seq: usize,
        keys: CachedKeys,
        device: &B::Device,
    ) -> Self {
        let window = keys.bound.map(|b| b.max);
        if pads.iter().all(|&p| p == 0) {
            let visibility = Visibility::causal(keys.kept).with_window(window);
            return AttentionLayout {
                visibility,
                ..AttentionLayout::causal(rope, offset, seq, device)
            };
        }
        let keep = keys.bound.map_or(0, |b| b.keep);
        let mut positions = Vec::with_capacity(pads.len() * seq);
        let mut starts = Vec::with_capacity(pads.len() * seq);
        for &pad in pads {
            // The kept index of the row's first real position: sinks are positions
            // `0..keep`, kept key `i ≥ keep` is position `i + dropped`.
            let first = match pad <= keep {
                true => pad,
                false => pad.saturating_sub(keys.dropped).max(keep),
            };
            for t in 0..seq {
                let position = offset + t;
                positions.push(position.saturating_sub(pad));
                starts.push(match position < pad {
                    true => keys.kept + t,
                    false => first,
                } as u32);
            }
        }
        let (cos, sin) = rope.tables(&positions, pads.len(), device);
        let visibility = Visibility {
            past: keys.kept,
            ..Visibility::packed(starts, pads.len(), device)
        };
        AttentionLayout {
            cos,
            sin,
            visibility: visibility.with_window(window),
        }
    }

    /// Packed rows: `segments[b * seq + t]` names the example that token `t` of row `b` belongs
    /// to (examples are contiguous). Token `t` sees the earlier tokens of its own example only,
    /// and its position counts from that example's first token.
    pub fn packed(
        rope: &Rope,
        segments: &[u32],
        batch: usize,
        seq: usize,
        device: &B::Device,
    ) -> Self {
        let mut positions = Vec::with_capacity(segments.len());
        let mut starts = Vec::with_capacity(segments.len());
        for row in segments.chunks_exact(seq) {
            let mut start = 0;
            for t in 0..seq {
                if t > 0 && row[t] != row[t - 1] {
                    start = t;
                }
                positions.push(t - start);
                starts.push(start as u32);
            }
        }
        let (cos, sin) = rope.tables(&positions, batch, device);
        AttentionLayout {
            cos,
            sin,
            visibility: Visibility::packed(starts, batch, device),
        }
    }
}

/// The layouts of one forward pass: the global layers', and the sliding layers' (their window,
/// and Gemma 3's local RoPE) where the model has any.
#[derive(Debug, Clone)]
pub struct Layouts<B: Backend> {
    /// What a global layer sees.
    pub global: AttentionLayout<B>,
    /// What a sliding layer sees.
    pub sliding: Option<AttentionLayout<B>>,
}

impl<B: Backend> Layouts<B> {
    /// The layout of a sliding (`true`) or a global layer.
    pub fn get(&self, sliding: bool) -> &AttentionLayout<B> {
        match (&self.sliding, sliding) {
            (Some(local), true) => local,
            _ => &self.global,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rope::RopeScaling;
    use burn::backend::NdArray;
    use burn::tensor::DType;

    type B = NdArray<f32>;

    fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().into_vec().unwrap()
    }

    #[test]
    fn packed_rows_restart_positions_and_block_attention_between_examples() {
        let rope = Rope::new(4, 10000.0, &RopeScaling::None);
        let device = Default::default();
        // One row: example 7 (3 tokens), then example 9 (2 tokens).
        let packed = AttentionLayout::<B>::packed(&rope, &[7, 7, 7, 9, 9], 1, 5, &device);
        // Each query's first key: its example's first position.
        let starts = packed
            .visibility
            .starts
            .as_ref()
            .expect("packed rows have starts");
        assert_eq!(starts.host.as_slice(), &[0, 0, 0, 3, 3]);
        assert_eq!(values(starts.device.clone()), [0.0, 0.0, 0.0, 3.0, 3.0]);
        let mask = values(packed.visibility.additive(0..5, 5, DType::F32, &device));
        let sees = |q: usize, k: usize| mask[q * 5 + k] == 0.0;
        assert!(sees(2, 0) && sees(2, 2) && !sees(2, 3));
        assert!(sees(4, 3) && !sees(4, 2) && !sees(3, 4));
        // The second example's tokens sit at positions 0 and 1, like a fresh sequence.
        let fresh = AttentionLayout::<B>::causal(&rope, 0, 2, &device);
        let cos = values(packed.cos);
        assert_eq!(&cos[3 * 4..5 * 4], values(fresh.cos).as_slice());
    }

    #[test]
    fn causal_after_a_cache_sees_every_past_key() {
        let rope = Rope::new(4, 10000.0, &RopeScaling::None);
        let device = Default::default();
        let layout = AttentionLayout::<B>::causal(&rope, 3, 2, &device);
        assert!(layout.visibility.starts.is_none());
        let mask = layout.visibility.additive(0..2, 5, DType::F32, &device);
        assert_eq!(mask.dims(), [1, 1, 2, 5]);
        let mask = values(mask);
        assert_eq!(&mask[..5], &[0.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(&mask[5..], &[0.0; 5]);
    }
}
