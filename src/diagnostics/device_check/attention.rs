//! `attention` (the tiny shape's first attention layer against f64) and `attention_grad` (the
//! attention op, sliced and through the model's dispatch, against the naive form under the CPU's
//! f32 autodiff): see the list in `mod.rs`.

use anyhow::{Result, bail};
use burn::backend::Autodiff;
use burn::tensor::Tensor;
use rand::SeedableRng;
use serde_json::json;

use super::{CpuTrain, HALF_TOLERANCE, KERNEL_TOLERANCE, gemm, scaled_error, tensor, uniform};
use crate::diagnostics::random::{Shape, random_model_files};
use crate::model::names::{self, BlockLinear};
use crate::model::weights::HostWeight;
use crate::ops::ModelBackend;
use crate::ops::attention::{Scores, repeat_kv};
use crate::ops::primitive::{inner, primitive};
use crate::ops::visibility::Visibility;

/// The tiny shape's first attention layer on random hidden states: the model's `Attention` on
/// the device against the same math written out in f64 here (projections, Hugging Face RoPE,
/// causal softmax, output projection), independent of Burn.
pub(super) fn attention<B: ModelBackend>(
    device: &B::Device,
    seq: usize,
) -> Result<serde_json::Value> {
    let config = Shape::Tiny.config();
    let files = random_model_files(config.clone(), 0);
    let dev = files.build::<B>(device)?;
    let batch = 2;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seq as u64);
    let h = uniform(&mut rng, batch * seq * config.hidden_size, 1.0);
    let shape = [batch, seq, config.hidden_size];
    let got: Vec<f32> = dev.layers[0]
        .self_attn
        .forward(
            tensor(&h, shape, device),
            &dev.layout(None, batch, seq, device).global,
            None,
        )
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32");
    let weight = |w: BlockLinear| -> Result<Vec<f64>> {
        let name = format!("{}.{}.weight", names::block(0), w.key(config.family));
        match files.weights.load(&name, &w.shape(&config), &config)? {
            HostWeight::Dense { values, .. } => Ok(values.into_iter().map(f64::from).collect()),
            HostWeight::Quantized(_) => bail!("random weights are dense"),
        }
    };
    let (wq, wk, wv, wo) = (
        weight(BlockLinear::Q)?,
        weight(BlockLinear::K)?,
        weight(BlockLinear::V)?,
        weight(BlockLinear::O)?,
    );
    let want = attention_f64(&h, batch, seq, &config, [&wq, &wk, &wv, &wo]);
    let error = scaled_error(&got, &want);
    let tolerance = attention_tolerance::<B>(config.head_dim, device);
    Ok(json!({
        "check": "attention", "shape": "tiny", "batch": batch, "seq": seq,
        "error": error, "tolerance": tolerance, "pass": error <= tolerance,
    }))
}

/// Where the backend's fused attention kernel serves this head dimension, its products are bf16
/// (as PyTorch's SDPA in a bf16 run): the bf16 tolerance.
pub(super) fn attention_tolerance<B: ModelBackend>(head_dim: usize, device: &B::Device) -> f64 {
    if B::fused_attention(head_dim, device) {
        HALF_TOLERANCE
    } else {
        KERNEL_TOLERANCE
    }
}

/// One `attention_grad` check.
#[derive(Debug, Clone, Copy)]
pub(super) struct AttentionCase {
    heads: usize,
    /// Query heads per key/value head (grouped-query attention; 1: every head its own).
    group: usize,
    past: usize,
    seq: usize,
    pub(super) head_dim: usize,
    /// Examples packed into each row, which must not see each other (1: one sequence a row).
    examples: usize,
    /// The sliced op in slices of 64 queries, else the dispatch the model uses.
    sliced: bool,
    /// A sliding window and Gemma 2's score soft-cap (the fused kernels where they take them,
    /// the sliced form elsewhere).
    window: Option<usize>,
    softcap: Option<f64>,
}

impl AttentionCase {
    const fn new(heads: usize, past: usize, seq: usize, head_dim: usize) -> Self {
        Self {
            heads,
            group: 1,
            past,
            seq,
            head_dim,
            examples: 1,
            sliced: false,
            window: None,
            softcap: None,
        }
    }

    pub(super) const ALL: [Self; 24] = [
        Self {
            sliced: true,
            ..Self::new(4, 0, 64, 32)
        },
        Self {
            sliced: true,
            ..Self::new(8, 3, 300, 32)
        },
        Self {
            sliced: true,
            examples: 4,
            ..Self::new(4, 0, 300, 32)
        },
        Self::new(4, 0, 64, 64),
        Self::new(8, 3, 300, 64),
        Self::new(4, 0, 200, 128),
        Self::new(2, 0, 100, 16),
        Self::new(4, 37, 1, 64),
        Self {
            examples: 2,
            ..Self::new(4, 0, 200, 64)
        },
        Self {
            examples: 5,
            ..Self::new(4, 0, 700, 64)
        },
        Self {
            group: 4,
            ..Self::new(8, 3, 300, 64)
        },
        Self {
            group: 2,
            ..Self::new(4, 0, 200, 128)
        },
        Self {
            group: 2,
            examples: 3,
            ..Self::new(4, 0, 520, 128)
        },
        Self {
            group: 2,
            window: Some(37),
            softcap: Some(1.0),
            ..Self::new(4, 5, 300, 64)
        },
        Self {
            group: 2,
            examples: 3,
            window: Some(50),
            ..Self::new(4, 0, 520, 128)
        },
        Self {
            softcap: Some(5.0),
            ..Self::new(4, 0, 200, 96)
        },
        Self {
            window: Some(16),
            ..Self::new(4, 37, 1, 64)
        },
        // Past 128 columns the CUDA kernels split each 16 rows' columns over two warps (Gemma's
        // 256-wide heads; 160: each warp an odd number of 16-column chunks).
        Self::new(4, 0, 200, 256),
        Self {
            group: 2,
            window: Some(37),
            softcap: Some(1.0),
            ..Self::new(4, 5, 300, 256)
        },
        Self {
            group: 2,
            examples: 3,
            ..Self::new(4, 0, 520, 256)
        },
        Self::new(4, 37, 1, 256),
        Self {
            group: 2,
            examples: 3,
            window: Some(50),
            ..Self::new(4, 0, 520, 256)
        },
        Self {
            window: Some(50),
            softcap: Some(5.0),
            ..Self::new(2, 0, 150, 160)
        },
        Self {
            group: 4,
            ..Self::new(8, 3, 300, 160)
        },
    ];

    /// Each query's first key, `[batch, seq]`, for packed rows: row `b`'s examples start at
    /// `e · seq / examples` shifted by a few positions that differ per row and per example, so
    /// that boundaries fall inside the kernels' tiles.
    fn starts(&self, batch: usize) -> Option<Vec<u32>> {
        if self.examples == 1 {
            return None;
        }
        let seq = self.seq;
        let mut starts = Vec::with_capacity(batch * seq);
        for b in 0..batch {
            let bounds: Vec<usize> = (1..self.examples)
                .map(|e| e * seq / self.examples + (b * 13 + e * 29) % 17)
                .collect();
            for i in 0..seq {
                starts.push(
                    bounds
                        .iter()
                        .rev()
                        .find(|&&x| x <= i)
                        .map_or(0, |&x| x as u32),
                );
            }
        }
        Some(starts)
    }

    /// The reference's additive mask, `[1 or batch, 1, seq, past + seq]`: −∞ after `past + i`
    /// and, for packed rows, before the query's example.
    fn mask(&self, batch: usize) -> (Vec<f64>, [usize; 4]) {
        let (seq, keys) = (self.seq, self.past + self.seq);
        let starts = self.starts(batch);
        let rows = if starts.is_some() { batch } else { 1 };
        let mut mask = vec![f64::NEG_INFINITY; rows * seq * keys];
        for b in 0..rows {
            for i in 0..seq {
                let first = starts.as_ref().map_or(0, |s| s[b * seq + i] as usize);
                let first = match self.window {
                    Some(w) => first.max((self.past + i + 1).saturating_sub(w)),
                    None => first,
                };
                mask[(b * seq + i) * keys..][first..=self.past + i].fill(0.0);
            }
        }
        (mask, [rows, 1, seq, keys])
    }

    /// The rule the op is given.
    fn visibility<T: burn::tensor::backend::Backend>(
        &self,
        batch: usize,
        device: &T::Device,
    ) -> Visibility<T> {
        match self.starts(batch) {
            Some(starts) => Visibility::packed(starts, batch, device),
            None => Visibility::causal(self.past),
        }
        .with_window(self.window)
    }
}

/// The attention op's output and its q, k, v gradients (of `Σ r ⊙ out`) on the device, against
/// the naive form with an additive mask, differentiated by Burn's autodiff on the CPU in f32
/// (errors ~1e-6, far below the tolerance).
pub(super) fn attention_grad<B: ModelBackend>(
    device: &B::Device,
    case: AttentionCase,
) -> serde_json::Value {
    let AttentionCase {
        heads,
        group,
        past,
        seq,
        head_dim: d,
        ..
    } = case;
    let batch = 2;
    let mut rng = rand::rngs::StdRng::seed_from_u64((heads * 1000 + seq * 10 + d) as u64);
    let q = uniform(&mut rng, batch * heads * seq * d, 1.0);
    let kv_heads = heads / group;
    let k = uniform(&mut rng, batch * kv_heads * (past + seq) * d, 1.0);
    let v = uniform(&mut rng, batch * kv_heads * (past + seq) * d, 1.0);
    let r = uniform(&mut rng, batch * heads * seq * d, 1.0);
    let (mask, mask_shape) = case.mask(batch);
    let scores = Scores {
        scale: 1.0 / (d as f64).sqrt(),
        softcap: case.softcap,
    };
    let q_shape = [batch, heads, seq, d];
    let kv_shape = [batch, kv_heads, past + seq, d];

    fn run<T: crate::ops::TrainBackend>(
        inputs: [(&[f64], [usize; 4]); 5],
        device: &T::Device,
        op: impl Fn([Tensor<T, 4>; 4]) -> Tensor<T, 4>,
    ) -> [Vec<f32>; 4] {
        let [q, k, v, mask, r] =
            inputs.map(|(values, shape)| tensor::<T, 4>(values, shape, device));
        let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
        let out = op([q.clone(), k.clone(), v.clone(), mask]);
        let grads = (out.clone() * r).sum().backward();
        let host =
            |t: Tensor<T::InnerBackend, 4>| t.into_data().convert::<f32>().into_vec().expect("f32");
        [
            host(out.inner()),
            host(q.grad(&grads).expect("q tracked")),
            host(k.grad(&grads).expect("k tracked")),
            host(v.grad(&grads).expect("v tracked")),
        ]
    }
    let inputs = [
        (&q[..], q_shape),
        (&k[..], kv_shape),
        (&v[..], kv_shape),
        (&mask[..], mask_shape),
        (&r[..], q_shape),
    ];
    let visibility = case.visibility::<Autodiff<B>>(batch, device);
    let got = run::<Autodiff<B>>(inputs, device, |[q, k, v, _mask]| {
        if !case.sliced {
            return crate::ops::attention::attention(q, k, v, &visibility, scores);
        }
        let p = primitive::<Autodiff<B>, 4>;
        inner(crate::ops::attention::sliced::<
            B,
            burn::backend::autodiff::checkpoint::strategy::NoCheckpointing,
        >(p(q), p(k), p(v), &visibility, scores, 64))
    });
    let want = run::<CpuTrain>(inputs, &Default::default(), |[q, k, v, m]| {
        let (k, v) = (repeat_kv(k, group), repeat_kv(v, group));
        let mut s = q.matmul(k.swap_dims(2, 3)).mul_scalar(scores.scale);
        if let Some(cap) = scores.softcap {
            s = s.div_scalar(cap).tanh().mul_scalar(cap);
        }
        burn::tensor::activation::softmax(s + m, 3).matmul(v)
    });
    let errors: Vec<f64> = got
        .iter()
        .zip(&want)
        .map(|(g, w)| scaled_error(g, &w.iter().map(|&x| f64::from(x)).collect::<Vec<_>>()))
        .collect();
    let worst = errors.iter().copied().fold(0f64, f64::max);
    // Where the kernels do not take the window, the dispatch slices in f32.
    let sliced = case.sliced || (case.window.is_some() && !B::KERNELS_TAKE_WINDOW_AND_SOFTCAP);
    let tolerance = if sliced {
        KERNEL_TOLERANCE
    } else {
        attention_tolerance::<B>(d, device)
    };
    json!({
        "check": "attention_grad", "op": if case.sliced { "sliced" } else { "dispatch" },
        "batch": batch, "heads": heads, "kv_heads": kv_heads, "past": past, "seq": seq, "head_dim": d,
        "examples_per_row": case.examples, "window": case.window, "softcap": case.softcap,
        "output_error": errors[0], "dq_error": errors[1],
        "dk_error": errors[2], "dv_error": errors[3], "tolerance": tolerance,
        "pass": worst <= tolerance,
    })
}

/// Queries (and keys) the long-row check compares: the first and the last few.
const LONG_ROW_SAMPLE: usize = 16;

/// One long row through the attention the model uses (65,536 tokens where the backend has a fused
/// kernel, 4,096 through the sliced form elsewhere), forward and backward, against f64 on the
/// host at sampled positions: the output and dQ of the first and last queries (the last see every
/// key), and dK and dV of the last keys (which only the last queries see). What it proves: no
/// buffer grows with the square of the row, and the kernels index past 2³¹ score positions right.
pub(super) fn long_row<B: ModelBackend>(device: &B::Device, tokens: usize) -> serde_json::Value {
    let (heads, d) = (2, 64);
    let seq = if B::fused_attention(d, device) {
        tokens
    } else {
        tokens.min(4096)
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seq as u64);
    let [q, k, v, r] = [(); 4].map(|_| uniform(&mut rng, heads * seq * d, 1.0));
    let scale = 1.0 / (d as f64).sqrt();
    let shape = [1, heads, seq, d];
    let [tq, tk, tv, tr] =
        [&q, &k, &v, &r].map(|x| tensor::<Autodiff<B>, 4>(x, shape, device).require_grad());
    let out = crate::ops::attention::attention(
        tq.clone(),
        tk.clone(),
        tv.clone(),
        &Visibility::causal(0),
        Scores::scaled(scale),
    );
    let grads = (out.clone() * tr).sum().backward();
    let host =
        |t: Tensor<B, 4>| -> Vec<f32> { t.into_data().convert::<f32>().into_vec().expect("f32") };
    let got = [
        host(out.inner()),
        host(tq.grad(&grads).expect("q tracked")),
        host(tk.grad(&grads).expect("k tracked")),
        host(tv.grad(&grads).expect("v tracked")),
    ];
    fn at(x: &[f64], h: usize, i: usize, seq: usize, d: usize) -> &[f64] {
        &x[(h * seq + i) * d..(h * seq + i + 1) * d]
    }
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let queries: Vec<usize> = (0..LONG_ROW_SAMPLE)
        .chain(seq - LONG_ROW_SAMPLE..seq)
        .collect();
    let (mut want, mut found) = (
        [vec![], vec![], vec![], vec![]],
        [vec![], vec![], vec![], vec![]],
    );
    for h in 0..heads {
        // Per sampled query: its probabilities over keys 0..=i, output, lse and dO·O.
        let mut lse_last = vec![0f64; seq];
        let mut delta_last = vec![0f64; seq];
        for &i in &queries {
            let s: Vec<f64> = (0..=i)
                .map(|j| scale * dot(at(&q, h, i, seq, d), at(&k, h, j, seq, d)))
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = s.iter().map(|x| (x - max).exp()).sum();
            let lse = max + sum.ln();
            let p: Vec<f64> = s.iter().map(|x| (x - lse).exp()).collect();
            let mut o = vec![0f64; d];
            for (j, pj) in p.iter().enumerate() {
                o.iter_mut()
                    .zip(at(&v, h, j, seq, d))
                    .for_each(|(o, v)| *o += pj * v);
            }
            let delta = dot(at(&r, h, i, seq, d), &o);
            let mut dq = vec![0f64; d];
            for (j, pj) in p.iter().enumerate() {
                let ds = pj * (dot(at(&r, h, i, seq, d), at(&v, h, j, seq, d)) - delta);
                dq.iter_mut()
                    .zip(at(&k, h, j, seq, d))
                    .for_each(|(g, k)| *g += scale * ds * k);
            }
            (lse_last[i], delta_last[i]) = (lse, delta);
            let row = (h * seq + i) * d;
            want[0].extend(o);
            want[1].extend(dq);
            found[0].extend(&got[0][row..row + d]);
            found[1].extend(&got[1][row..row + d]);
        }
        // dK and dV of the last keys: only the last queries, all sampled, see them.
        for j in seq - LONG_ROW_SAMPLE..seq {
            let (mut dk, mut dv) = (vec![0f64; d], vec![0f64; d]);
            for i in j..seq {
                let p =
                    (scale * dot(at(&q, h, i, seq, d), at(&k, h, j, seq, d)) - lse_last[i]).exp();
                let ds = p * (dot(at(&r, h, i, seq, d), at(&v, h, j, seq, d)) - delta_last[i]);
                dv.iter_mut()
                    .zip(at(&r, h, i, seq, d))
                    .for_each(|(g, r)| *g += p * r);
                dk.iter_mut()
                    .zip(at(&q, h, i, seq, d))
                    .for_each(|(g, q)| *g += scale * ds * q);
            }
            let row = (h * seq + j) * d;
            want[2].extend(dk);
            want[3].extend(dv);
            found[2].extend(&got[2][row..row + d]);
            found[3].extend(&got[3][row..row + d]);
        }
    }
    let errors: Vec<f64> = found
        .iter()
        .zip(&want)
        .map(|(g, w)| scaled_error(g, w))
        .collect();
    let worst = errors.iter().copied().fold(0f64, f64::max);
    let tolerance = attention_tolerance::<B>(d, device);
    json!({
        "check": "attention_long_row", "heads": heads, "seq": seq, "head_dim": d,
        "sampled_queries": queries.len(), "sampled_keys": LONG_ROW_SAMPLE,
        "output_error": errors[0], "dq_error": errors[1], "dk_error": errors[2],
        "dv_error": errors[3], "tolerance": tolerance, "pass": worst <= tolerance,
    })
}

/// `softmax(rope(q) rope(k)ᵀ / √d + causal) v Woᵀ` for `h [batch, seq, hidden]`, in f64.
fn attention_f64(
    h: &[f64],
    batch: usize,
    seq: usize,
    c: &crate::model::ModelConfig,
    [wq, wk, wv, wo]: [&[f64]; 4],
) -> Vec<f64> {
    let (heads, kv_heads, hd, hidden) = (c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size);
    let rows = batch * seq;
    let q = gemm(h, wq, rows, hidden, heads * hd, true);
    let k = gemm(h, wk, rows, hidden, kv_heads * hd, true);
    let v = gemm(h, wv, rows, hidden, kv_heads * hd, true);
    // Rotate-half RoPE: pairs (i, i + d/2) turn by position · θ^(−2i/d).
    let half = hd / 2;
    let rope = |x: &mut [f64], pos: usize| {
        for i in 0..half {
            let angle = pos as f64 * c.rope_theta.powf(-2.0 * i as f64 / hd as f64);
            let (x1, x2) = (x[i], x[i + half]);
            x[i] = x1 * angle.cos() - x2 * angle.sin();
            x[i + half] = x2 * angle.cos() + x1 * angle.sin();
        }
    };
    let (mut q, mut k) = (q, k);
    for row in 0..rows {
        let pos = row % seq;
        q[row * heads * hd..(row + 1) * heads * hd]
            .chunks_mut(hd)
            .for_each(|x| rope(x, pos));
        k[row * kv_heads * hd..(row + 1) * kv_heads * hd]
            .chunks_mut(hd)
            .for_each(|x| rope(x, pos));
    }
    let group = heads / kv_heads;
    let mut out = vec![0f64; rows * heads * hd];
    for b in 0..batch {
        for head in 0..heads {
            let kv = head / group;
            for i in 0..seq {
                let qi = &q[((b * seq + i) * heads + head) * hd..][..hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kj = &k[((b * seq + j) * kv_heads + kv) * hd..][..hd];
                        qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                let o = &mut out[((b * seq + i) * heads + head) * hd..][..hd];
                for (j, w) in weights.iter().enumerate() {
                    let vj = &v[((b * seq + j) * kv_heads + kv) * hd..][..hd];
                    o.iter_mut().zip(vj).for_each(|(o, v)| *o += w / total * v);
                }
            }
        }
    }
    gemm(&out, wo, rows, heads * hd, hidden, true)
}
