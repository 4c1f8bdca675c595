//! Which keys each query of an attention call sees, as a rule rather than a mask tensor:
//!
//! ```text
//! query i sees keys max(start(i), past + i + 1 − window) ..= past + i
//! ```
//!
//! `window` is a sliding layer's (Mistral's, Gemma's local layers): none elsewhere.
//! One sequence per row has `start(i) = 0`: the causal rule after `past` cached keys. Packed rows,
//! which hold several examples back to back, give each query its example's first position (and
//! have no cache): FlashAttention's varlen layout. Nothing of size `seq × keys` is built for a
//! fused kernel, which applies the rule to its tiles; the sliced form builds each slice's
//! additive mask, `slice × keys`, when it needs it.

use std::ops::Range;
use std::sync::Arc;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, TensorData};

/// The rule for one attention call (see the module docs).
#[derive(Debug, Clone)]
pub struct Visibility<B: Backend> {
    /// Cached keys before the first query.
    pub past: usize,
    /// For packed rows, each query's first key.
    pub starts: Option<Starts<B>>,
    /// A sliding layer's window: a query sees itself and the `window − 1` keys before it.
    pub window: Option<usize>,
}

/// Packed rows' first key per query.
#[derive(Debug, Clone)]
pub struct Starts<B: Backend> {
    /// `[rows, seq]` row-major, on the host (the sliced form's masks come from it).
    pub host: Arc<Vec<u32>>,
    /// Rows.
    pub rows: usize,
    /// The same as f32 `[rows, 1, 1, seq]` on the device (exact below 2²⁴), for fused kernels.
    pub device: Tensor<B, 4>,
}

impl<B: Backend> Visibility<B> {
    /// One sequence per row after `past` cached keys.
    pub fn causal(past: usize) -> Self {
        Visibility {
            past,
            starts: None,
            window: None,
        }
    }

    /// Packed rows: `starts[r * seq + i]` is the first position of the example query `i` of row
    /// `r` belongs to (at most `i`, and never decreasing along a row).
    pub fn packed(starts: Vec<u32>, rows: usize, device: &B::Device) -> Self {
        let seq = starts.len() / rows.max(1);
        let values: Vec<f32> = starts.iter().map(|&s| s as f32).collect();
        let device = Tensor::from_data(TensorData::new(values, [rows, 1, 1, seq]), device);
        Visibility {
            past: 0,
            starts: Some(Starts {
                host: Arc::new(starts),
                rows,
                device,
            }),
            window: None,
        }
    }

    /// The same rule, restricted to a sliding window of `window` keys.
    pub fn with_window(self, window: Option<usize>) -> Self {
        Visibility { window, ..self }
    }

    /// The additive mask of the queries `queries` over keys `0..keys`, `[1 or rows, 1,
    /// queries.len(), keys]` in `dtype`: 0 where a query sees a key, −∞ elsewhere.
    pub fn additive(
        &self,
        queries: Range<usize>,
        keys: usize,
        dtype: DType,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        let rows = self.starts.as_ref().map_or(1, |s| s.rows);
        let n = queries.len();
        let mut mask = vec![f32::NEG_INFINITY; rows * n * keys];
        for r in 0..rows {
            for (i, query) in queries.clone().enumerate() {
                let first = self.starts.as_ref().map_or(0, |s| {
                    let seq = s.host.len() / s.rows;
                    s.host[r * seq + query] as usize
                });
                let end = (self.past + query + 1).min(keys);
                let first = match self.window {
                    Some(w) => first.max((self.past + query + 1).saturating_sub(w)),
                    None => first,
                };
                let row = (r * n + i) * keys;
                mask[row + first.min(end)..row + end].fill(0.0);
            }
        }
        Tensor::from_data(TensorData::new(mask, [rows, 1, n, keys]), (device, dtype))
    }
}

impl<B: AutodiffBackend> Visibility<B> {
    /// The same rule on the inner backend (its tensors shared, not copied).
    pub fn inner(&self) -> Visibility<B::InnerBackend> {
        Visibility {
            past: self.past,
            starts: self.starts.as_ref().map(|s| Starts {
                host: s.host.clone(),
                rows: s.rows,
                device: s.device.clone().inner(),
            }),
            window: self.window,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::NdArray<f32>;

    fn values(t: Tensor<B, 4>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec().unwrap()
    }

    #[test]
    fn the_causal_rule_after_a_cache() {
        let device = Default::default();
        let mask = Visibility::<B>::causal(2).additive(0..2, 4, DType::F32, &device);
        let inf = f32::NEG_INFINITY;
        assert_eq!(mask.dims(), [1, 1, 2, 4]);
        assert_eq!(values(mask), [0.0, 0.0, 0.0, inf, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn a_window_hides_the_keys_before_it() {
        let device = Default::default();
        let mask =
            Visibility::<B>::causal(2)
                .with_window(Some(2))
                .additive(0..2, 4, DType::F32, &device);
        let inf = f32::NEG_INFINITY;
        assert_eq!(values(mask), [inf, 0.0, 0.0, inf, inf, inf, 0.0, 0.0]);
    }

    #[test]
    fn packed_rows_see_only_their_own_example() {
        let device = Default::default();
        // Row 0: examples at 0..3 and 3..5; row 1: one example.
        let starts = vec![0, 0, 0, 3, 3, 0, 0, 0, 0, 0];
        let mask =
            Visibility::<B>::packed(starts, 2, &device).additive(3..5, 5, DType::F32, &device);
        let inf = f32::NEG_INFINITY;
        assert_eq!(mask.dims(), [2, 1, 2, 5]);
        #[rustfmt::skip]
        let want = [
            inf, inf, inf, 0.0, inf,   inf, inf, inf, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0, inf,   0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        assert_eq!(values(mask), want);
    }
}
