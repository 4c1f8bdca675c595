//! The keys and values of the positions seen so far, per block, for generation.
//!
//! A block's cache is unbounded, or bounded as mlx-lm's `RotatingKVCache`: before new positions
//! are appended it keeps at most `max − 1` keys, the first `keep` (attention sinks) and the most
//! recent, so each new query sees `max` keys at most (multi-token queries through a window of
//! `max`, as mlx-lm masks them). Sliding layers (Mistral's, Gemma's) are bounded by their window
//! with no sinks, which is exact: they never look further back. Keys are held in the order of
//! their positions, so the newest can be dropped again ([`KvCache::rewind`]).
//!
//! Rows of a batch are left-padded to one length: row `r`'s first `pads[r]` positions are
//! padding, hidden from its queries, and its RoPE positions count from its first real token.

use burn::tensor::ops::FloatTensor;
use burn::tensor::{Int, Tensor, TensorData};

use super::config::ModelConfig;
use crate::ops::frozen_linear::ModelBackend;
use crate::ops::primitive::{inner, primitive};

/// How many keys a bounded block keeps: mlx-lm's `max_kv_size` and `keep`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// Keys a query sees at most (its own included).
    pub max: usize,
    /// The first positions, kept however long the sequence grows.
    pub keep: usize,
}

impl Bound {
    /// A bound of `max` keys with `keep` sinks; `max` must leave room for the sinks and the
    /// newest position.
    pub fn new(max: usize, keep: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            max > keep,
            "--max-kv-size {max} is not larger than --keep {keep}: the cache holds the first {keep} positions and needs room for the newest one too; raise --max-kv-size or lower --keep"
        );
        Ok(Bound { max, keep })
    }
}

/// One block's keys and values, `[batch, kv_heads, kept, head_dim]` each, oldest first.
#[derive(Debug, Clone)]
pub struct LayerCache<B: ModelBackend> {
    kv: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    bound: Option<Bound>,
    /// Positions dropped after the sinks: kept key `i ≥ keep` is at position `i + dropped`.
    dropped: usize,
}

impl<B: ModelBackend> LayerCache<B> {
    fn new(bound: Option<Bound>) -> Self {
        LayerCache {
            kv: None,
            bound,
            dropped: 0,
        }
    }

    /// The kept keys and values, `None` before the block has run.
    pub fn kv(&self) -> Option<&(Tensor<B, 4>, Tensor<B, 4>)> {
        self.kv.as_ref()
    }

    /// Keys held.
    pub fn kept(&self) -> usize {
        self.kv.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Appends this pass's keys and values and returns all the keys and values its queries
    /// attend to.
    pub fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (k, v) = match self.kv.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.kv = Some((k.clone(), v.clone()));
        (k, v)
    }

    /// Drops keys so at most `max − 1` remain (the sinks and the most recent), before a pass.
    fn make_room(&mut self) {
        let Some(bound) = self.bound else {
            return;
        };
        let (kept, limit) = (self.kept(), bound.max - 1);
        let Some((k, v)) = self.kv.take_if(|_| kept > limit) else {
            return;
        };
        let cut = kept - limit;
        let keep = bound.keep.min(kept);
        let trim = |t: Tensor<B, 4>| {
            let recent = t.clone().narrow(2, keep + cut, kept - keep - cut);
            match keep {
                0 => recent,
                _ => Tensor::cat(vec![t.narrow(2, 0, keep), recent], 2),
            }
        };
        self.kv = Some((trim(k), trim(v)));
        self.dropped += cut;
    }

    /// Drops the newest `n` keys.
    fn rewind(&mut self, n: usize) {
        if let Some((k, v)) = self.kv.take() {
            let kept = k.dims()[2] - n;
            self.kv = (kept > 0).then(|| (k.narrow(2, 0, kept), v.narrow(2, 0, kept)));
        }
    }

    /// Keeps the batch rows `rows`.
    fn select_rows(&mut self, rows: &Tensor<B, 1, Int>) {
        if let Some((k, v)) = self.kv.take() {
            self.kv = Some((k.select(0, rows.clone()), v.select(0, rows.clone())));
        }
    }
}

/// What the next pass's queries of one kind of block (global or sliding) see of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CachedKeys {
    /// Keys held before the pass.
    pub kept: usize,
    /// Positions dropped after the sinks (see [`LayerCache`]).
    pub dropped: usize,
    /// The block's bound, whose `max` is the queries' window.
    pub bound: Option<Bound>,
}

/// One pass through a cache: where its new positions start, each row's padding, what the
/// global and the sliding blocks' queries see, and each block's slot, in order.
pub struct Pass<'a, B: ModelBackend> {
    /// Positions seen before the pass (padding included).
    pub offset: usize,
    /// Each row's left padding (empty for one unpadded row).
    pub pads: &'a [usize],
    /// What a global block's queries see.
    pub global: CachedKeys,
    /// What a sliding block's queries see, where the model has any.
    pub sliding: Option<CachedKeys>,
    /// Each block's cache, first to last.
    pub slots: Vec<&'a mut LayerCache<B>>,
}

/// Every block's cache, with the positions seen and each row's left padding.
#[derive(Debug, Clone)]
pub struct KvCache<B: ModelBackend> {
    layers: Vec<LayerCache<B>>,
    /// Whether each block slides (its cache bounded by the window).
    sliding: Vec<bool>,
    /// Positions seen, padding included.
    offset: usize,
    /// Each row's left padding; empty for one unpadded row.
    pads: Vec<usize>,
}

impl<B: ModelBackend> KvCache<B> {
    /// An empty cache for `config`'s blocks: sliding blocks bounded by their window, the others
    /// by `bound` when given (mlx-lm's `--max-kv-size`), else unbounded.
    pub fn new(config: &ModelConfig, bound: Option<Bound>) -> Self {
        let sliding: Vec<bool> = (0..config.num_layers)
            .map(|i| config.quirks.slides(i))
            .collect();
        let window = config.quirks.sliding_window;
        let layers = sliding
            .iter()
            .map(|&s| match (s, window) {
                (true, Some(max)) => LayerCache::new(Some(Bound { max, keep: 0 })),
                _ => LayerCache::new(bound),
            })
            .collect();
        KvCache {
            layers,
            sliding,
            offset: 0,
            pads: Vec::new(),
        }
    }

    /// The same, for rows left-padded by `pads` (positions each row's prompt is short of the
    /// longest).
    pub fn padded(self, pads: Vec<usize>) -> Self {
        KvCache { pads, ..self }
    }

    /// A cache continuing from these keys and values (one per block, one row, `positions`
    /// long).
    pub fn filled(mut self, kv: Vec<(Tensor<B, 4>, Tensor<B, 4>)>) -> Self {
        self.offset = kv.first().map_or(0, |(k, _)| k.dims()[2]);
        for (layer, kv) in self.layers.iter_mut().zip(kv) {
            layer.kv = Some(kv);
        }
        self
    }

    /// An empty cache with the same bounds and padding.
    pub fn emptied(&self) -> Self {
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| LayerCache::new(l.bound))
                .collect(),
            sliding: self.sliding.clone(),
            offset: 0,
            pads: self.pads.clone(),
        }
    }

    /// Each block's keys and values as the float primitives a decode session takes
    /// (`ModelBackend::decode_session`); `None` before the first pass.
    pub fn kv_primitives(&self) -> Option<Vec<[FloatTensor<B>; 2]>> {
        self.layers
            .iter()
            .map(|l| {
                l.kv()
                    .map(|(k, v)| [primitive(k.clone()), primitive(v.clone())])
            })
            .collect()
    }

    /// An empty cache with the same bounds and padding, holding the keys and values a decode
    /// session hands back.
    pub fn refilled(&self, kv: Vec<[FloatTensor<B>; 2]>) -> Self {
        let kv = kv.into_iter().map(|[k, v]| (inner(k), inner(v)));
        self.emptied().filled(kv.collect())
    }

    /// Whether any block's cache is bounded (by `--max-kv-size` or a sliding window).
    pub fn bounded(&self) -> bool {
        self.layers.iter().any(|l| l.bound.is_some())
    }

    /// Whether a bound keeps sinks, so which keys survive depends on how a prompt is cut.
    pub fn has_sinks(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.bound.is_some_and(|b| b.keep > 0))
    }

    /// Positions seen (padding included).
    pub fn len(&self) -> usize {
        self.offset
    }

    /// Whether no position is seen yet.
    pub fn is_empty(&self) -> bool {
        self.offset == 0
    }

    /// Each row's left padding (empty for one unpadded row).
    pub fn pads(&self) -> &[usize] {
        &self.pads
    }

    /// Each block's cache.
    pub fn layers(&self) -> &[LayerCache<B>] {
        &self.layers
    }

    /// Whether every position seen is still held (nothing was dropped by a bound).
    pub fn holds_everything(&self) -> bool {
        self.layers.iter().all(|l| l.dropped == 0)
    }

    /// Trims bounded blocks before a pass and returns what its queries see and each block's
    /// slot.
    pub fn begin_pass(&mut self) -> Pass<'_, B> {
        for layer in &mut self.layers {
            layer.make_room();
        }
        let keys = |sliding: bool| {
            let i = self.sliding.iter().position(|&s| s == sliding)?;
            let layer = &self.layers[i];
            Some(CachedKeys {
                kept: layer.kept(),
                dropped: layer.dropped,
                bound: layer.bound,
            })
        };
        // A model whose blocks all slide has no global layout to speak of: any will do.
        let global = keys(false).or_else(|| keys(true)).unwrap_or_default();
        let sliding = keys(true);
        Pass {
            offset: self.offset,
            pads: &self.pads,
            global,
            sliding,
            slots: self.layers.iter_mut().collect(),
        }
    }

    /// Counts `n` positions as seen, after a pass over them.
    pub fn advance(&mut self, n: usize) {
        self.offset += n;
    }

    /// Forgets the newest `n` positions (rejected draft tokens, a chat turn's tail).
    pub fn rewind(&mut self, n: usize) {
        let n = n.min(self.offset);
        for layer in &mut self.layers {
            layer.rewind(n);
        }
        self.offset -= n;
    }

    /// Keeps the batch rows `rows` (in that order), dropping the others.
    pub fn select_rows(&mut self, rows: &[usize], device: &B::Device) {
        let index: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let index = Tensor::from_data(TensorData::new(index, [rows.len()]), device);
        for layer in &mut self.layers {
            layer.select_rows(&index);
        }
        if !self.pads.is_empty() {
            self.pads = rows.iter().map(|&r| self.pads[r]).collect();
        }
    }
}
