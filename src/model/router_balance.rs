//! Switch Transformer's router load-balancing loss (`train.router_aux_loss_coef`), as
//! transformers' `load_balancing_loss_func` computes it over one forward pass's routers:
//!
//! ```text
//! T_e = Σ_layers Σ_t m_t · [e ∈ top_k(t)]        P_e = Σ_layers Σ_t m_t · p_{t,e}
//! R   = Σ_layers Σ_t m_t                          (m_t: 1 for a token, 0 for padding)
//! aux = E · Σ_e (T_e / R) · (P_e / R)              loss = cross-entropy + coef · aux
//! ∂aux/∂p_{t,e} = E · T_e · m_t / R²               (the choice of experts is not differentiated)
//! ```
//!
//! `T` and `R` are known only once every layer has routed, so the trainer brackets a
//! micro-batch's forward pass with [`RouterBalance::start`] and [`RouterBalance::finish`] (and its
//! backward pass with `finish` and [`RouterBalance::end`], which gives the loss's term), and each
//! router's probabilities pass through an op whose backward adds `scale · coef · ∂aux/∂p` when
//! the backward pass reaches it (`ops/routing.rs`'s `add_to_gradient`). Activation
//! checkpointing's recomputed forward adds the same term without counting again (the rows of a
//! chunked MLP are taken from the token mask in order). One handle is shared by every
//! mixture-of-experts layer of a decoder.

use std::sync::{Arc, Mutex, MutexGuard};

use super::decoder::{Decoder, FeedForward};
use crate::ops::ModelBackend;
use crate::ops::routing::LateGradient;

/// The load-balancing loss of a decoder's routers: where a micro-batch's counts gather.
#[derive(Debug, Clone)]
pub struct RouterBalance(Arc<Mutex<Balance>>);

#[derive(Debug)]
struct Balance {
    coef: f64,
    experts: usize,
    phase: Phase,
    /// The micro-batch's tokens (`[batch · seq]`, false for padding).
    tokens: Vec<bool>,
    /// Rows of `tokens` the routers have taken so far (wrapping at each layer's end).
    cursor: usize,
    /// `T_e`, `P_e`, `R` of the module docs.
    chosen: Vec<f64>,
    probs: Vec<f64>,
    rows: f64,
    /// What each row's gradient gains per expert: `scale · coef · E · T_e / R²`.
    weights: Vec<f32>,
    /// What the micro-batch's loss is differentiated times.
    scale: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Outside a training step (validation, generation): the routers are left alone.
    Idle,
    /// A micro-batch's forward pass: each router's choices are counted.
    Counting,
    /// The backward pass (and checkpointing's recomputed forward): the gradient is known.
    Applying,
}

impl RouterBalance {
    /// A balance of `experts` experts weighted `coef` in the loss.
    pub fn new(coef: f64, experts: usize) -> Self {
        RouterBalance(Arc::new(Mutex::new(Balance {
            coef,
            experts,
            phase: Phase::Idle,
            tokens: Vec::new(),
            cursor: 0,
            chosen: vec![0.0; experts],
            probs: vec![0.0; experts],
            rows: 0.0,
            weights: Vec::new(),
            scale: 1.0,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Balance> {
        // A panic elsewhere cannot leave the counts half-written in a way that matters: the
        // next `start` resets them.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a micro-batch: `tokens` (`[batch · seq]`, false for padding), its loss
    /// differentiated `scale` times.
    pub fn start(&self, tokens: Vec<bool>, scale: f64) {
        let mut b = self.lock();
        b.phase = Phase::Counting;
        b.tokens = tokens;
        b.scale = scale;
        b.cursor = 0;
        b.chosen.iter_mut().for_each(|v| *v = 0.0);
        b.probs.iter_mut().for_each(|v| *v = 0.0);
        b.rows = 0.0;
    }

    /// Ends the counting once the forward pass has run every router: the gradient is known
    /// from here on.
    pub fn finish(&self) {
        let mut b = self.lock();
        b.phase = Phase::Applying;
        b.cursor = 0;
        let (e, r2) = (b.experts as f64, b.rows * b.rows);
        let per = if r2 > 0.0 {
            b.scale * b.coef * e / r2
        } else {
            0.0
        };
        b.weights = b.chosen.iter().map(|t| (per * t) as f32).collect();
    }

    /// Ends the micro-batch (the routers are left alone until the next `start`): `coef · aux`,
    /// the term its loss gains.
    pub fn end(&self) -> f64 {
        let mut b = self.lock();
        b.phase = Phase::Idle;
        if b.rows == 0.0 {
            return 0.0;
        }
        let aux = b
            .chosen
            .iter()
            .zip(&b.probs)
            .map(|(t, p)| t * p)
            .sum::<f64>();
        b.coef * b.experts as f64 * aux / (b.rows * b.rows)
    }

    /// A router's `rows` of `[rows, experts]` probabilities and `[rows, top_k]` choices (host,
    /// row-major): counted while counting; the gradient term of these rows once it is known
    /// (`None` outside a step). The probabilities are read only while counting (a recomputed
    /// forward, whose choices are replayed, hands none).
    pub fn route(&self, rows: usize, probs: &[f32], chosen: &[i64]) -> Option<LateGradient> {
        let mut b = self.lock();
        if b.phase == Phase::Idle || b.tokens.is_empty() {
            return None;
        }
        let experts = b.experts;
        let top_k = chosen.len() / rows.max(1);
        let start = b.cursor;
        let len = b.tokens.len();
        let mask: Vec<bool> = (0..rows).map(|i| b.tokens[(start + i) % len]).collect();
        b.cursor = (start + rows) % len;
        if b.phase == Phase::Counting {
            assert_eq!(probs.len(), rows * experts, "the probabilities are counted");
            for (i, &token) in mask.iter().enumerate() {
                if !token {
                    continue;
                }
                b.rows += 1.0;
                for &e in &chosen[i * top_k..(i + 1) * top_k] {
                    b.chosen[e as usize] += 1.0;
                }
                for (e, &p) in probs[i * experts..(i + 1) * experts].iter().enumerate() {
                    b.probs[e] += f64::from(p);
                }
            }
        }
        let balance = self.clone();
        Some(LateGradient::new(move || balance.gradient(&mask)))
    }

    /// `[rows, experts]`: each token's row of weights, zero for padding.
    fn gradient(&self, mask: &[bool]) -> Vec<f32> {
        let b = self.lock();
        let zeros = vec![0.0; b.experts];
        mask.iter()
            .flat_map(|&token| if token { &b.weights } else { &zeros }.iter().copied())
            .collect()
    }
}

impl<B: ModelBackend> Decoder<B> {
    /// Adds the routers' load-balancing loss, weighted `coef`, to training: one count shared by
    /// every layer with experts. False for a model without experts.
    pub fn balance_routers(&mut self, coef: f64) -> bool {
        let Some(moe) = &self.config.moe else {
            return false;
        };
        let balance = RouterBalance::new(coef, moe.experts);
        for block in &mut self.layers {
            if let FeedForward::Experts(moe) = &mut block.mlp {
                moe.balance = Some(balance.clone());
            }
        }
        true
    }

    /// The routers' load-balancing loss, when training adds it.
    pub fn router_balance(&self) -> Option<RouterBalance> {
        self.layers.iter().find_map(|block| match &block.mlp {
            FeedForward::Experts(moe) => moe.balance.clone(),
            FeedForward::Dense(_) => None,
        })
    }
}
