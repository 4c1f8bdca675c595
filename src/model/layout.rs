//! Where each token sits and what it may attend to: the RoPE tables and the additive attention
//! mask, built once per forward pass and shared by every block.
//!
//! Two layouts: one sequence per row (causal, continuing any cached positions), and packed rows
//! that hold several examples back to back, where positions restart at each example and
//! attention never crosses from one example into another.

use burn::tensor::{Tensor, TensorData, backend::Backend};

use crate::ops::rope::Rope;

/// The RoPE tables and attention mask for one forward pass, shared by every block.
#[derive(Debug, Clone)]
pub struct AttentionLayout<B: Backend> {
    /// `[1 or batch, 1, seq, head_dim]`
    pub cos: Tensor<B, 4>,
    /// `[1 or batch, 1, seq, head_dim]`, as `cos`.
    pub sin: Tensor<B, 4>,
    /// Additive, `[1 or batch, 1, seq, past + seq]`: 0 where a query sees a key, -inf elsewhere.
    pub mask: Tensor<B, 4>,
    /// The mask is exactly "query `i` sees keys `0..=past + i`" (a fused kernel may apply that
    /// rule instead of reading the mask).
    pub causal: bool,
}

impl<B: Backend> AttentionLayout<B> {
    /// `seq` new tokens per row after `past` cached ones: query `i` sees keys `0..=past + i`.
    pub fn causal(rope: &Rope, past: usize, seq: usize, device: &B::Device) -> Self {
        let total = past + seq;
        let positions: Vec<usize> = (past..total).collect();
        let (cos, sin) = rope.tables(&positions, 1, device);
        let mut mask = vec![0f32; seq * total];
        for i in 0..seq {
            mask[i * total + past + i + 1..(i + 1) * total].fill(f32::NEG_INFINITY);
        }
        let mask = Tensor::from_data(TensorData::new(mask, [1, 1, seq, total]), device);
        AttentionLayout {
            cos,
            sin,
            mask,
            causal: true,
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
        let mut mask = vec![f32::NEG_INFINITY; batch * seq * seq];
        for (b, row) in segments.chunks_exact(seq).enumerate() {
            let mut start = 0;
            for t in 0..seq {
                if t > 0 && row[t] != row[t - 1] {
                    start = t;
                }
                positions.push(t - start);
                let base = (b * seq + t) * seq;
                mask[base + start..=base + t].fill(0.0);
            }
        }
        let (cos, sin) = rope.tables(&positions, batch, device);
        let mask = Tensor::from_data(TensorData::new(mask, [batch, 1, seq, seq]), device);
        AttentionLayout {
            cos,
            sin,
            mask,
            causal: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rope::RopeScaling;
    use burn::backend::NdArray;

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
        // Not the causal rule: a fused kernel must read this mask.
        assert!(!packed.causal);
        let mask = values(packed.mask);
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
        let layout = AttentionLayout::<B>::causal(&rope, 3, 2, &Default::default());
        assert_eq!(layout.mask.dims(), [1, 1, 2, 5]);
        assert!(layout.causal);
        let mask = values(layout.mask);
        assert_eq!(&mask[..5], &[0.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(&mask[5..], &[0.0; 5]);
    }
}
