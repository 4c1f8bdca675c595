//! A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE), as transformers computes it:
//!
//! ```text
//! p      = softmax(x W_routerᵀ)                      (f32, over the experts)
//! E(x)   = the top_k experts by p ; w_e = p_e  (/ Σ_{e∈E(x)} p_e  where normalize_top_k)
//! y      = Σ_{e∈E(x)} w_e · down_e(act(gate_e(x)) ⊙ up_e(x))
//!        + sigmoid(x W_sharedgateᵀ) · shared(x)          (Qwen2-MoE's shared expert)
//! ```
//!
//! The tokens' (token, expert) pairs are sorted by expert on the host, so each expert's
//! projections run as one product over its tokens ([`FrozenLinear::forward_grouped`]): one
//! gather before, one scatter-add after. The choice of experts is not differentiated (as in
//! transformers); the weights `w_e` are, back into `x` through the router.

use burn::tensor::activation::softmax;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};

use super::decoder::Mlp;
use super::linear::FrozenLinear;
use super::names::BlockLinear;
use crate::ops::elementwise::{Activation, gated};
use crate::ops::frozen_linear::ModelBackend;

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
    /// For each sorted pair, its index in the `[tokens, top_k]` choices.
    slots: Vec<i64>,
}

impl Routes {
    /// Sorts the `[tokens, top_k]` choices (`chosen`, row-major) by expert, stably.
    fn new(chosen: &[i64], experts: usize, top_k: usize) -> Self {
        let mut counts = vec![0usize; experts];
        for &e in chosen {
            counts[e as usize] += 1;
        }
        let mut slots: Vec<i64> = (0..chosen.len() as i64).collect();
        slots.sort_by_key(|&s| chosen[s as usize]);
        let tokens = slots.iter().map(|&s| s / top_k as i64).collect();
        Routes {
            counts,
            tokens,
            slots,
        }
    }
}

/// Host indices as a device tensor.
fn indices<B: ModelBackend>(values: &[i64], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

impl<B: ModelBackend> SparseMoe<B> {
    /// `x`: `[batch, seq, hidden]` → the same.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, hidden] = x.dims();
        let n = batch * seq;
        let device = x.device();
        let x = x.reshape([n, hidden]);
        let probs = softmax(self.router.forward_rows(x.clone()), 1);
        let experts = probs.dims()[1];
        let (_, chosen) = probs.clone().detach().topk_with_indices(self.top_k, 1);
        let mut weights = probs.gather(1, chosen.clone());
        if self.normalize_top_k {
            weights = weights.clone() / weights.sum_dim(1);
        }
        let chosen: Vec<i64> = chosen
            .into_data()
            .convert::<i64>()
            .into_vec()
            .expect("integer indices");
        let routes = Routes::new(&chosen, experts, self.top_k);
        let tokens = indices::<B>(&routes.tokens, &device);
        let rows = x.clone().select(0, tokens.clone());
        let y = self.experts(rows, &routes.counts);
        let w = weights
            .reshape([n * self.top_k])
            .select(0, indices::<B>(&routes.slots, &device))
            .unsqueeze_dim::<2>(1);
        let mut out = Tensor::zeros([n, hidden], &device).select_assign(
            0,
            tokens,
            y * w,
            IndexingUpdateOp::Add,
        );
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Routes;

    #[test]
    fn routes_sort_pairs_by_expert_and_keep_token_order_within_one() {
        // 3 tokens, top-2 of 4 experts: token 0 → (2, 0), token 1 → (0, 3), token 2 → (2, 3).
        let routes = Routes::new(&[2, 0, 0, 3, 2, 3], 4, 2);
        assert_eq!(routes.counts, [2, 0, 2, 2]);
        assert_eq!(routes.slots, [1, 2, 0, 4, 3, 5]);
        assert_eq!(routes.tokens, [0, 1, 0, 2, 1, 2]);
    }
}
