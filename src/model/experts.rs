//! A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE), as transformers computes it:
//!
//! ```text
//! p      = softmax(x W_routerᵀ)                      (f32, over the experts)
//! E(x)   = the top_k experts by p ; w_e = p_e  (/ Σ_{e∈E(x)} p_e  where normalize_top_k)
//! y      = Σ_{e∈E(x)} w_e · down_e(act(gate_e(x)) ⊙ up_e(x))
//!        + sigmoid(x W_sharedgateᵀ) · shared(x)          (Qwen2-MoE's shared expert)
//! ```
//!
//! The experts are chosen on the host (one read of the probabilities), and the tokens' (token,
//! expert) pairs sorted by expert there, so each expert's projections run as one product over
//! its tokens ([`FrozenLinear::forward_grouped`]): the rows move to expert order and back by
//! gathers whose backward is a gather too (`ops/routing.rs`), and each token's `top_k` outputs
//! are summed with their weights. The choice of experts is not differentiated (as in
//! transformers); the weights `w_e` are, back into `x` through the router.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use burn::tensor::activation::softmax;
use burn::tensor::{Int, Tensor, TensorData};
use rayon::prelude::*;

use super::decoder::Mlp;
use super::linear::FrozenLinear;
use super::names::BlockLinear;
use super::route_memo;
use super::router_balance::RouterBalance;
use crate::ops::elementwise::{Activation, gated};
use crate::ops::frozen_linear::ModelBackend;
use crate::ops::routing::{add_to_gradient, pick_rows};

/// Host time the routers have spent since the last [`take_routing_time`], in nanoseconds:
/// waiting for and reading their probabilities, then choosing (the top-k, the sort by expert
/// and the indices' upload). On a GPU the device idles through both.
static ROUTING_NANOS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// The routers' host time since the last call, `[reading, choosing]`, and zero from here
/// (`bench train` reports it per step).
pub fn take_routing_time() -> [Duration; 2] {
    ROUTING_NANOS
        .each_ref()
        .map(|n| Duration::from_nanos(n.swap(0, Ordering::Relaxed)))
}

/// Adds the time since `since` to counter `which` of [`ROUTING_NANOS`]; returns now.
fn count_routing(which: usize, since: Instant) -> Instant {
    let now = Instant::now();
    let nanos = u64::try_from((now - since).as_nanos()).unwrap_or(u64::MAX);
    ROUTING_NANOS[which].fetch_add(nanos, Ordering::Relaxed);
    now
}

/// A block's mixture of experts.
#[derive(Debug, Clone)]
pub struct SparseMoe<B: ModelBackend> {
    /// `[experts, hidden]`: each expert's routing logit.
    pub router: FrozenLinear<B>,
    /// The experts' gate projections, stacked (`experts` set).
    pub gate: FrozenLinear<B>,
    /// The experts' up projections, stacked.
    pub up: FrozenLinear<B>,
    /// The experts' down projections, stacked.
    pub down: FrozenLinear<B>,
    /// Qwen2-MoE's shared expert, with its gate.
    pub shared: Option<SharedExpert<B>>,
    /// Experts each token goes through.
    pub top_k: usize,
    /// Whether the chosen experts' probabilities are rescaled to sum to 1.
    pub normalize_top_k: bool,
    /// The experts' gate activation.
    pub activation: Activation,
    /// The load-balancing loss's counts, when training asks for it (shared by every layer).
    pub balance: Option<RouterBalance>,
    /// This router's identity in a checkpointed step's memo of choices (`route_memo.rs`).
    pub id: usize,
}

/// An MLP every token goes through beside its experts, its output scaled by
/// `sigmoid(x W_gateᵀ)`.
#[derive(Debug, Clone)]
pub struct SharedExpert<B: ModelBackend> {
    /// The shared expert (its linears named `SharedGate`, `SharedUp`, `SharedDown`).
    pub mlp: Mlp<B>,
    /// `[1, hidden]`.
    pub gate: FrozenLinear<B>,
}

/// Where each (token, chosen expert) pair goes: sorted by expert.
struct Routes {
    /// Rows per expert, in expert order.
    counts: Vec<usize>,
    /// For each sorted pair, its token.
    tokens: Vec<i64>,
    /// For each sorted pair, its slot: its index in the `[tokens, top_k]` choices.
    slots: Vec<i64>,
    /// For each slot, its place among the sorted pairs (`slots` inverted).
    places: Vec<i64>,
}

impl Routes {
    /// Sorts the `[tokens, top_k]` choices (`chosen`, row-major) by expert, stably (a counting
    /// sort: one pass to count, one to place).
    fn new(chosen: &[i64], experts: usize, top_k: usize) -> Self {
        let mut counts = vec![0usize; experts];
        for &e in chosen {
            counts[e as usize] += 1;
        }
        let mut next: Vec<usize> = counts
            .iter()
            .scan(0, |start, &c| {
                let here = *start;
                *start += c;
                Some(here)
            })
            .collect();
        let (mut slots, mut places) = (vec![0i64; chosen.len()], vec![0i64; chosen.len()]);
        for (slot, &e) in chosen.iter().enumerate() {
            let place = next[e as usize];
            next[e as usize] += 1;
            slots[place] = slot as i64;
            places[slot] = place as i64;
        }
        let tokens = slots.iter().map(|&s| s / top_k as i64).collect();
        Routes {
            counts,
            tokens,
            slots,
            places,
        }
    }
}

/// Each row's `k` most probable experts (`probs`: `[rows, experts]` row-major), the most
/// probable first, the lower expert first among equals → `[rows · k]`. A NaN ranks below every
/// number (it still fills a row of NaNs).
///
/// On the host between two device passes, so its time is the GPU's idle time: rows of 64 in
/// parallel, and past its first `k` a row's values are compared only with the `k`-th best so
/// far (8,192 rows of 128 experts: 7.6 ms in one loop, ~3 ms over the 2-core VM's threads).
fn top_k(probs: &[f32], experts: usize, k: usize) -> Vec<i64> {
    const ROWS: usize = 64;
    let mut chosen = vec![0i64; probs.len() / experts * k];
    chosen
        .par_chunks_mut(ROWS * k)
        .zip(probs.par_chunks(ROWS * experts))
        .for_each(|(out, rows)| {
            let mut best: Vec<(f32, i64)> = Vec::with_capacity(k + 1);
            let enter = |best: &mut Vec<(f32, i64)>, p: f32, e: usize| {
                let at = best.iter().position(|&(q, _)| p > q).unwrap_or(best.len());
                best.insert(at, (p, e as i64));
                best.truncate(k);
            };
            for (row, out) in rows.chunks_exact(experts).zip(out.chunks_exact_mut(k)) {
                best.clear();
                for (e, &p) in row[..k].iter().enumerate() {
                    enter(&mut best, if p.is_nan() { f32::NEG_INFINITY } else { p }, e);
                }
                // A later value enters only above the k-th (a NaN never does; an equal value
                // loses to the lower expert already there).
                let mut floor = best[k - 1].0;
                for (e, &p) in row.iter().enumerate().skip(k) {
                    if p > floor {
                        enter(&mut best, p, e);
                        floor = best[k - 1].0;
                    }
                }
                for (slot, &(_, e)) in out.iter_mut().zip(&best) {
                    *slot = e;
                }
            }
        });
    chosen
}

/// Host indices as a device tensor.
fn indices<B: ModelBackend, const D: usize>(
    values: &[i64],
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

impl<B: ModelBackend> SparseMoe<B> {
    /// `x`: `[batch, seq, hidden]` → the same.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, hidden] = x.dims();
        let (n, k) = (batch * seq, self.top_k);
        let device = x.device();
        let x = x.reshape([n, hidden]);
        let probs = softmax(self.router.forward_rows(x.clone()), 1);
        let experts = probs.dims()[1];
        // The choice is made on the host from one read of `[n, experts]` probabilities, or
        // replayed in a checkpointed step's recomputed forward (`route_memo.rs`).
        let recalled = route_memo::recall(self.id, n * k);
        let started = Instant::now();
        let host: Vec<f32> = match recalled {
            Some(_) => Vec::new(),
            None => probs
                .clone()
                .into_data()
                .convert::<f32>()
                .into_vec()
                .expect("f32 probabilities"),
        };
        let read = count_routing(0, started);
        let chosen = recalled.unwrap_or_else(|| {
            let chosen = top_k(&host, experts, k);
            route_memo::remember(self.id, &chosen);
            chosen
        });
        assert_eq!(chosen.len(), n * k, "one choice of {k} experts a row");
        let probs = match self
            .balance
            .as_ref()
            .and_then(|b| b.route(n, &host, &chosen))
        {
            Some(term) => add_to_gradient(probs, term),
            None => probs,
        };
        let mut weights = probs.gather(1, indices::<B, 2>(&chosen, [n, k], &device));
        if self.normalize_top_k {
            weights = weights.clone() / weights.sum_dim(1);
        }
        let routes = Routes::new(&chosen, experts, k);
        let [tokens, places, slots] = [&routes.tokens, &routes.places, &routes.slots]
            .map(|v| indices::<B, 1>(v, [n * k], &device));
        count_routing(1, read);
        // Token order → expert order (each token picked k times) and back (each row once).
        let rows = pick_rows(x.clone(), tokens, places.clone(), k);
        let y = self.experts(rows, &routes.counts);
        let y = pick_rows(y, places, slots, 1);
        let mut out = (y.reshape([n, k, hidden]) * weights.unsqueeze_dim::<3>(2))
            .sum_dim(1)
            .reshape([n, hidden]);
        if let Some(shared) = &self.shared {
            let scale = burn::tensor::activation::sigmoid(shared.gate.forward_rows(x.clone()));
            let y = shared
                .mlp
                .forward(x.reshape([1, n, hidden]))
                .reshape([n, hidden]);
            out = out + y * scale;
        }
        out.reshape([batch, seq, hidden])
    }

    /// Rows sorted by expert (`counts` each) through their experts' gated MLPs.
    fn experts(&self, x: Tensor<B, 2>, counts: &[usize]) -> Tensor<B, 2> {
        let gate = self.gate.forward_grouped(x.clone(), counts);
        let up = self.up.forward_grouped(x, counts);
        let hidden = gated(
            self.activation,
            gate,
            up,
            self.down.input_dtype(),
            self.gate
                .output_grad_dtype()
                .and(self.up.output_grad_dtype()),
        );
        self.down.forward_grouped(hidden, counts)
    }

    /// The linears with their names, in [`super::names::mlp_linears`] order.
    pub fn linears(&self) -> Vec<(BlockLinear, &FrozenLinear<B>)> {
        let mut out = vec![
            (BlockLinear::Router, &self.router),
            (BlockLinear::ExpertGate, &self.gate),
            (BlockLinear::ExpertUp, &self.up),
            (BlockLinear::ExpertDown, &self.down),
        ];
        if let Some(shared) = &self.shared {
            out.extend(shared.mlp.gate_up.linears());
            out.push((BlockLinear::SharedDown, &shared.mlp.down_proj));
            out.push((BlockLinear::SharedExpertGate, &shared.gate));
        }
        out
    }

    /// The linears with their names, to change.
    pub fn linears_mut(&mut self) -> Vec<(BlockLinear, &mut FrozenLinear<B>)> {
        let mut out = vec![
            (BlockLinear::Router, &mut self.router),
            (BlockLinear::ExpertGate, &mut self.gate),
            (BlockLinear::ExpertUp, &mut self.up),
            (BlockLinear::ExpertDown, &mut self.down),
        ];
        if let Some(shared) = &mut self.shared {
            out.extend(shared.mlp.gate_up.linears_mut());
            out.push((BlockLinear::SharedDown, &mut shared.mlp.down_proj));
            out.push((BlockLinear::SharedExpertGate, &mut shared.gate));
        }
        out
    }

    /// The same mixture with every linear replaced by `f(linear)`.
    pub fn map<C: ModelBackend>(
        &self,
        mut f: impl FnMut(&FrozenLinear<B>) -> FrozenLinear<C>,
    ) -> SparseMoe<C> {
        SparseMoe {
            router: f(&self.router),
            gate: f(&self.gate),
            up: f(&self.up),
            down: f(&self.down),
            shared: self.shared.as_ref().map(|s| SharedExpert {
                mlp: s.mlp.map(&mut f),
                gate: f(&s.gate),
            }),
            top_k: self.top_k,
            normalize_top_k: self.normalize_top_k,
            activation: self.activation,
            balance: self.balance.clone(),
            id: self.id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Routes, top_k};

    #[test]
    fn routes_sort_pairs_by_expert_and_keep_token_order_within_one() {
        // 3 tokens, top-2 of 4 experts: token 0 → (2, 0), token 1 → (0, 3), token 2 → (2, 3).
        let routes = Routes::new(&[2, 0, 0, 3, 2, 3], 4, 2);
        assert_eq!(routes.counts, [2, 0, 2, 2]);
        assert_eq!(routes.slots, [1, 2, 0, 4, 3, 5]);
        assert_eq!(routes.tokens, [0, 1, 0, 2, 1, 2]);
        assert_eq!(routes.places, [2, 0, 1, 4, 3, 5]);
    }

    #[test]
    fn top_k_takes_the_most_probable_first_and_the_lower_expert_among_equals() {
        let probs = [0.1, 0.4, 0.1, 0.4, 0.7, 0.05, 0.2, 0.05];
        assert_eq!(top_k(&probs, 4, 2), [1, 3, 0, 2]);
        assert_eq!(top_k(&[f32::NAN, 0.5, 0.2], 3, 2), [1, 2]);
    }

    #[test]
    fn top_k_is_a_stable_sort_by_probability_over_many_rows() {
        // 300 rows (several parallel chunks) of 16 experts drawn from 5 values and NaN, so
        // ties and NaNs land anywhere; against each row sorted whole (stable, NaN last).
        let (rows, experts, k) = (300, 16, 5);
        let mut state = 7u64;
        let probs: Vec<f32> = (0..rows * experts)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                match (state >> 33) % 6 {
                    5 => f32::NAN,
                    v => v as f32 / 4.0,
                }
            })
            .collect();
        let want: Vec<i64> = probs
            .chunks_exact(experts)
            .flat_map(|row| {
                let mut order: Vec<usize> = (0..experts).collect();
                let key = |e: usize| {
                    if row[e].is_nan() {
                        f32::NEG_INFINITY
                    } else {
                        row[e]
                    }
                };
                order.sort_by(|&a, &b| key(b).total_cmp(&key(a)));
                order.into_iter().take(k).map(|e| e as i64)
            })
            .collect();
        assert_eq!(top_k(&probs, experts, k), want);
        assert_eq!(top_k(&probs, experts, experts).len(), rows * experts);
    }
}
