//! The decode session on the CPU (`ops/decode.rs`): one token through a Llama-shaped model as a
//! few passes over host buffers allocated once, the products straight from the packed codes
//! (`products.rs`), one parallel pass a product (q, k and v together; gate, up and the gating
//! together). Op by op, each block cost about forty Burn ops and seven rayon hand-offs a token,
//! and each packed row was expanded into a scratch buffer before its dot product: SmolLM2-135M
//! decoded at transformers' speed (bench/NOTES.md).
//!
//! A prompt (up to [`PASS_ROWS`] tokens a pass) runs the same way over all its tokens at once:
//! each product over every token's row (`products::rows_product`: two packed rows against four
//! inputs a block), each token's attention over the keys up to its own position, tokens and
//! heads in parallel.
//!
//! The keys and values are `[kv_heads, capacity, head_dim]` f32 a block, room for up to 1,024
//! more positions, doubled whenever full; handed back as `[1, kv_heads, len, head_dim]` tensors.

use burn::backend::NdArray;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};
use burn_ndarray::NdArrayTensor;
use rayon::prelude::*;

use super::elementwise::tensor;
use super::products::{Matrix, gated, products, rows_product, silu_times};
use crate::ops::decode::{
    DecodeLinear, DecodeMatrix, DecodeModel, DecodeSession, SessionBlock, cached_positions,
    first_capacity,
};
use crate::ops::primitive::primitive;

type Cpu = NdArray<f32>;

/// A prompt pass's tokens at most: the packed products' row limit
/// (`quant::packed_matmul::MAX_ROWS`); a longer run of tokens takes several passes.
pub const PASS_ROWS: usize = crate::quant::packed_matmul::MAX_ROWS;

/// A linear: its matrix and optional bias.
struct Linear {
    matrix: Matrix,
    bias: Option<Vec<f32>>,
}

impl Linear {
    fn new(l: DecodeLinear<Cpu>) -> Option<Self> {
        Some(Linear {
            matrix: matrix(l.matrix)?,
            bias: match l.bias {
                Some(b) => Some(values::<1>(b)?),
                None => None,
            },
        })
    }

    /// Adds the bias to `y`, if any.
    fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.bias {
            y.iter_mut().zip(b).for_each(|(y, b)| *y += b);
        }
    }

    /// `x Wᵀ (+ bias)` for `n` rows of `x` → `[n, out]`.
    fn rows(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = rows_product(&self.matrix, x, n);
        if self.bias.is_some() {
            y.chunks_exact_mut(self.matrix.rows())
                .for_each(|row| self.add_bias(row));
        }
        y
    }
}

/// One block's weights.
type Block = SessionBlock<Vec<f32>, Linear>;

/// One position's activations, allocated once.
struct Scratch {
    h: Vec<f32>,
    a: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    mlp: Vec<f32>,
    out: Vec<f32>,
    scores: Vec<f32>,
    /// The position's RoPE angles' sines and cosines, `head_dim / 2`.
    turn: Vec<(f32, f32)>,
}

/// A decode session over one model on the CPU.
pub struct Session {
    embed: Matrix,
    blocks: Vec<Block>,
    norm: Vec<f32>,
    head: Linear,
    /// Per block, keys and values `[kv_heads, capacity, head_dim]`.
    cache: Vec<[Vec<f32>; 2]>,
    inv_freq: Vec<f32>,
    scratch: Scratch,
    heads: [usize; 3],
    eps: f32,
    scale: f32,
    /// Positions held.
    len: usize,
    capacity: usize,
}

/// A matrix as the session reads it: dense f32 in row-major order, or packed on the host.
fn matrix(m: DecodeMatrix<Cpu>) -> Option<Matrix> {
    match m {
        DecodeMatrix::Dense(w) => {
            let plain = match &w {
                NdArrayTensor::F32(s) => s.ndim() == 2 && s.view().is_standard_layout(),
                _ => false,
            };
            plain.then_some(Matrix::Dense(w))
        }
        DecodeMatrix::Host(m) => Some(Matrix::Packed(m)),
        DecodeMatrix::Packed { .. } => None,
    }
}

/// A rank-`D` f32 tensor's values in row-major order.
fn values<const D: usize>(t: FloatTensor<Cpu>) -> Option<Vec<f32>> {
    Tensor::<Cpu, D>::from_primitive(TensorPrimitive::Float(t))
        .into_data()
        .into_vec()
        .ok()
}

impl Session {
    /// A session over `model` continuing `kv` (none: no positions yet) with room for `room` more
    /// positions; `None` where a matrix or the cache is held in a way the session does not read.
    pub fn open(
        model: DecodeModel<Cpu>,
        kv: Vec<[FloatTensor<Cpu>; 2]>,
        room: usize,
    ) -> Option<Self> {
        let [heads, kv_heads, d] = model.heads;
        let blocks = model
            .blocks
            .into_iter()
            .map(|b| b.take(values::<1>, Linear::new))
            .collect::<Option<Vec<Block>>>()?;
        let len = cached_positions::<Cpu>(&kv, blocks.len())?;
        let intermediate = blocks.first()?.gate_up[0].matrix.rows();
        let head = Linear::new(model.head)?;
        let capacity = first_capacity(len, room);
        let cache = match kv.is_empty() {
            true => {
                let zeros = || vec![0f32; kv_heads * capacity * d];
                blocks.iter().map(|_| [zeros(), zeros()]).collect()
            }
            false => kv
                .into_iter()
                .map(|[k, v]| {
                    Some([
                        grown(k, [kv_heads, len, d], capacity)?,
                        grown(v, [kv_heads, len, d], capacity)?,
                    ])
                })
                .collect::<Option<Vec<_>>>()?,
        };
        let zeros = |n| vec![0f32; n];
        Some(Session {
            embed: matrix(model.embed)?,
            blocks,
            norm: values::<1>(model.norm)?,
            scratch: Scratch {
                h: zeros(model.hidden),
                a: zeros(model.hidden),
                q: zeros(heads * d),
                k: zeros(kv_heads * d),
                v: zeros(kv_heads * d),
                attn: zeros(heads * d),
                mlp: zeros(intermediate),
                out: zeros(model.hidden),
                scores: zeros(capacity),
                turn: vec![(0.0, 0.0); d / 2],
            },
            head,
            cache,
            inv_freq: model.inv_freq,
            heads: model.heads,
            eps: model.eps,
            scale: model.scale,
            len,
            capacity,
        })
    }

    /// Doubles the positions the cache holds.
    fn grow(&mut self) {
        let [_, kv_heads, d] = self.heads;
        let capacity = self.capacity * 2;
        for pair in &mut self.cache {
            for old in pair.iter_mut() {
                *old = moved(old, [kv_heads, self.len, d], self.capacity, capacity);
            }
        }
        self.scratch.scores.resize(capacity, 0.0);
        self.capacity = capacity;
    }

    fn block(&mut self, i: usize) {
        let b = &self.blocks[i];
        let s = &mut self.scratch;
        let [heads, kv_heads, d] = self.heads;
        rms_norm(&s.h, &b.attn_norm, self.eps, &mut s.a);
        let [q, k, v] = &b.qkv;
        products(
            &mut [
                (&q.matrix, &mut s.q),
                (&k.matrix, &mut s.k),
                (&v.matrix, &mut s.v),
            ],
            &s.a,
        );
        q.add_bias(&mut s.q);
        k.add_bias(&mut s.k);
        v.add_bias(&mut s.v);
        let pos = self.len;
        for head in s.q.chunks_exact_mut(d).chain(s.k.chunks_exact_mut(d)) {
            rope(head, &s.turn);
        }
        let [kc, vc] = &mut self.cache[i];
        for h in 0..kv_heads {
            let at = (h * self.capacity + pos) * d;
            kc[at..at + d].copy_from_slice(&s.k[h * d..][..d]);
            vc[at..at + d].copy_from_slice(&s.v[h * d..][..d]);
        }
        let group = heads / kv_heads;
        for h in 0..heads {
            let base = (h / group) * self.capacity * d;
            let keys = &kc[base..base + (pos + 1) * d];
            let vals = &vc[base..base + (pos + 1) * d];
            attend(
                &s.q[h * d..][..d],
                keys,
                vals,
                self.scale,
                &mut s.scores[..=pos],
                &mut s.attn[h * d..][..d],
            );
        }
        products(&mut [(&b.o.matrix, &mut s.out)], &s.attn);
        b.o.add_bias(&mut s.out);
        add_into(&mut s.h, &s.out);
        rms_norm(&s.h, &b.mlp_norm, self.eps, &mut s.a);
        let [gate, up] = &b.gate_up;
        gated(&gate.matrix, &up.matrix, &s.a, &mut s.mlp);
        products(&mut [(&b.down.matrix, &mut s.out)], &s.mlp);
        b.down.add_bias(&mut s.out);
        add_into(&mut s.h, &s.out);
    }
}

impl Session {
    /// Runs token `id` at the next position and returns the next-token logits.
    fn step(&mut self, id: u32) -> Vec<f32> {
        if self.len == self.capacity {
            self.grow();
        }
        self.embed.row(id as usize, &mut self.scratch.h);
        // This position's angles, `pos · inv_freq[i]`, for every block's heads.
        let pos = self.len as f32;
        for (t, f) in self.scratch.turn.iter_mut().zip(&self.inv_freq) {
            *t = (pos * f).sin_cos();
        }
        for i in 0..self.blocks.len() {
            self.block(i);
        }
        let s = &mut self.scratch;
        rms_norm(&s.h, &self.norm, self.eps, &mut s.a);
        let mut logits = vec![0f32; self.head.matrix.rows()];
        products(&mut [(&self.head.matrix, &mut logits)], &s.a);
        self.head.add_bias(&mut logits);
        self.len += 1;
        logits
    }
}

impl Session {
    /// Runs `ids` (at most [`PASS_ROWS`]) at the next positions in one pass and returns the
    /// logits after the last.
    fn pass(&mut self, ids: &[u32]) -> Vec<f32> {
        let rows = ids.len();
        while self.len + rows > self.capacity {
            self.grow();
        }
        let hidden = self.scratch.h.len();
        let mut h = vec![0f32; rows * hidden];
        for (row, &id) in h.chunks_exact_mut(hidden).zip(ids) {
            self.embed.row(id as usize, row);
        }
        // Each row's angles, `(len + t) · inv_freq[i]`.
        let turns: Vec<Vec<(f32, f32)>> = (0..rows)
            .map(|t| {
                let pos = (self.len + t) as f32;
                self.inv_freq.iter().map(|f| (pos * f).sin_cos()).collect()
            })
            .collect();
        for i in 0..self.blocks.len() {
            self.block_rows(i, &mut h, &turns);
        }
        self.scratch.h.copy_from_slice(&h[(rows - 1) * hidden..]);
        let s = &mut self.scratch;
        rms_norm(&s.h, &self.norm, self.eps, &mut s.a);
        let mut logits = vec![0f32; self.head.matrix.rows()];
        products(&mut [(&self.head.matrix, &mut logits)], &s.a);
        self.head.add_bias(&mut logits);
        self.len += rows;
        logits
    }

    /// Block `i` over the pass's rows `h` (`[rows, hidden]`, row `t` at position `len + t`,
    /// whose RoPE angles are `turns[t]`).
    fn block_rows(&mut self, i: usize, h: &mut [f32], turns: &[Vec<(f32, f32)>]) {
        let rows = turns.len();
        let b = &self.blocks[i];
        let [heads, kv_heads, d] = self.heads;
        let (len, capacity, scale) = (self.len, self.capacity, self.scale);
        let a = rms_norm_rows(h, &b.attn_norm, self.eps);
        let [q, k, v] = &b.qkv;
        let (mut qs, mut ks, vs) = (q.rows(&a, rows), k.rows(&a, rows), v.rows(&a, rows));
        for (t, turn) in turns.iter().enumerate() {
            let q_heads = qs[t * heads * d..][..heads * d].chunks_exact_mut(d);
            let k_heads = ks[t * kv_heads * d..][..kv_heads * d].chunks_exact_mut(d);
            for head in q_heads.chain(k_heads) {
                rope(head, turn);
            }
        }
        let [kc, vc] = &mut self.cache[i];
        for t in 0..rows {
            for h in 0..kv_heads {
                let at = (h * capacity + len + t) * d;
                let from = (t * kv_heads + h) * d;
                kc[at..at + d].copy_from_slice(&ks[from..from + d]);
                vc[at..at + d].copy_from_slice(&vs[from..from + d]);
            }
        }
        // Query head `j % heads` of row `j / heads`, over the keys up to its own position.
        let group = heads / kv_heads;
        let mut attn = vec![0f32; rows * heads * d];
        let (kc, vc) = (&*kc, &*vc);
        attn.par_chunks_mut(d).enumerate().for_each_init(
            || vec![0f32; capacity],
            |scores, (j, out)| {
                let (t, h) = (j / heads, j % heads);
                let seen = len + t + 1;
                let base = (h / group) * capacity * d;
                let (keys, vals) = (&kc[base..][..seen * d], &vc[base..][..seen * d]);
                attend(
                    &qs[j * d..][..d],
                    keys,
                    vals,
                    scale,
                    &mut scores[..seen],
                    out,
                );
            },
        );
        add_into(h, &b.o.rows(&attn, rows));
        let a = rms_norm_rows(h, &b.mlp_norm, self.eps);
        let [gate, up] = &b.gate_up;
        let mut mlp = gate.rows(&a, rows);
        silu_times(&mut mlp, &up.rows(&a, rows));
        add_into(h, &b.down.rows(&mlp, rows));
    }
}

impl DecodeSession<Cpu> for Session {
    /// One token is a step; more run in passes of up to [`PASS_ROWS`].
    fn run(&mut self, ids: &[u32]) -> Vec<f32> {
        if let [id] = ids {
            return self.step(*id);
        }
        ids.chunks(PASS_ROWS)
            .map(|chunk| self.pass(chunk))
            .last()
            .expect("tokens to run")
    }

    fn into_kv(self: Box<Self>) -> Vec<[FloatTensor<Cpu>; 2]> {
        let [_, kv_heads, d] = self.heads;
        let shape = [kv_heads, self.len, d];
        let back = |c: &[f32]| {
            let held = moved(c, shape, self.capacity, self.len);
            primitive(tensor(held, [1, kv_heads, self.len, d]))
        };
        self.cache.iter().map(|[k, v]| [back(k), back(v)]).collect()
    }
}

/// `out = x / √(mean(x²) + ε) ⊙ gain`, as `model/norm.rs` computes it.
fn rms_norm(x: &[f32], gain: &[f32], eps: f32, out: &mut [f32]) {
    let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let rms = (mean + eps).sqrt();
    for ((o, x), g) in out.iter_mut().zip(x).zip(gain) {
        *o = x / rms * g;
    }
}

/// [`rms_norm`] of each row of `x` (rows of `gain.len()`).
fn rms_norm_rows(x: &[f32], gain: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (x, out) in x
        .chunks_exact(gain.len())
        .zip(out.chunks_exact_mut(gain.len()))
    {
        rms_norm(x, gain, eps, out);
    }
    out
}

/// `h += y`.
fn add_into(h: &mut [f32], y: &[f32]) {
    h.iter_mut().zip(y).for_each(|(h, y)| *h += y);
}

/// RoPE (rotate_half layout) of one head: pair `(i, i + d/2)` turned by the angle whose sine
/// and cosine are `turn[i]`.
fn rope(x: &mut [f32], turn: &[(f32, f32)]) {
    let half = x.len() / 2;
    for (i, &(sin, cos)) in turn.iter().enumerate() {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos - b * sin;
        x[i + half] = b * cos + a * sin;
    }
}

/// `out = softmax(q · Kᵀ · scale) V` over the positions of `keys` and `values` (`[len, d]`).
fn attend(q: &[f32], keys: &[f32], values: &[f32], scale: f32, p: &mut [f32], out: &mut [f32]) {
    let d = q.len();
    for (p, k) in p.iter_mut().zip(keys.chunks_exact(d)) {
        *p = q.iter().zip(k).map(|(q, k)| q * k).sum::<f32>() * scale;
    }
    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0;
    for p in p.iter_mut() {
        *p = (*p - max).exp();
        total += *p;
    }
    out.fill(0.0);
    for (p, v) in p.iter().zip(values.chunks_exact(d)) {
        let w = p / total;
        out.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
    }
}

/// The keys or values `t` (`[1, heads, len, d]` f32), in a buffer of `capacity` rows a head.
fn grown(t: FloatTensor<Cpu>, [heads, len, d]: [usize; 3], capacity: usize) -> Option<Vec<f32>> {
    if t.shape().as_slice() != [1, heads, len, d] {
        return None;
    }
    let held = values::<4>(t)?;
    Some(moved(&held, [heads, len, d], len, capacity))
}

/// The first `len` rows of each of `heads` heads of `from` (`from_rows` rows of `d` a head) in
/// a new buffer of `to_rows` rows a head.
fn moved(from: &[f32], [heads, len, d]: [usize; 3], from_rows: usize, to_rows: usize) -> Vec<f32> {
    let mut to = vec![0f32; heads * to_rows * d];
    for h in 0..heads {
        to[h * to_rows * d..][..len * d].copy_from_slice(&from[h * from_rows * d..][..len * d]);
    }
    to
}
