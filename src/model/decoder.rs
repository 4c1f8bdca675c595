//! The decoder-only transformer shared by Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3,
//! Mixtral and Qwen2/3-MoE, generic over the Burn backend. Each piece is written to be checked against the reference math:
//!
//! ```text
//! h   = embed(ids)                                        (Gemma: · √hidden)
//! for each block:
//!   a = rmsnorm(h) ; q,k,v = a Wqᵀ (+bq), a Wkᵀ (+bk), a Wvᵀ (+bv)     (Phi-3: one fused GEMM)
//!   q,k = rmsnorm_head(q,k) (Qwen3, Gemma 3) ; q,k = rope(q,k)   (sliding layers: local rope)
//!   s = q kᵀ · scale ; s = cap · tanh(s / cap) (Gemma 2) ; + causal or sliding-window mask
//!   h  += post(softmax(s) v Woᵀ)                          (post = rmsnorm in Gemma, else identity)
//!   h  += post(W_down (act(rmsnorm(h) W_gateᵀ) ⊙ rmsnorm(h) W_upᵀ))   (act: silu, Gemma gelu_tanh)
//!         (Mixtral, Qwen-MoE: the top-k experts' MLPs, weighted by the router: `experts.rs`)
//! logits = rmsnorm(h) W_headᵀ            (W_head = embedding when tied; Gemma 2: soft-capped)
//! ```
//! Gemma's norms multiply by `1 + w` (the gain a norm holds once loaded).

use burn::tensor::{FloatDType, Tensor};

use super::adapter::LoraAdapter;
use super::config::ModelConfig;
use super::experts::SparseMoe;
use super::kv_cache::{KvCache, LayerCache};
use super::layout::{AttentionLayout, Layouts};
use super::linear::{FrozenLinear, FrozenWeight};
use super::names::{self, BlockLinear};
use super::projections::Projections;
use crate::ops::attention::{Scores, attention};
use crate::ops::elementwise::{Activation, gated};
use crate::ops::frozen_linear::ModelBackend;
use crate::ops::rope::{Rope, rope_leading};

/// RMSNorm over the last dimension: `x / √(mean(x²) + ε) ⊙ weight`.
#[derive(Debug, Clone)]
pub struct RmsNorm<B: ModelBackend> {
    /// Per-feature gain, as long as the normalised dimension (Gemma's `1 + w`, added in f32 when
    /// loading, as transformers adds it in every forward).
    pub weight: Tensor<B, 1>,
    /// `ε`, added to the mean square before the square root.
    pub eps: f64,
}

impl<B: ModelBackend> RmsNorm<B> {
    /// Normalises over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.forward_as(x, None)
    }

    /// [`Self::forward`] written in `dtype` (the next GEMM's input dtype) when given.
    pub fn forward_as<const D: usize>(
        &self,
        x: Tensor<B, D>,
        dtype: Option<FloatDType>,
    ) -> Tensor<B, D> {
        B::rms_norm(x, self.weight.clone(), self.eps, dtype)
    }
}

/// A block's self-attention: grouped-query heads with RoPE, a causal (or packed) mask and
/// an optional KV cache.
#[derive(Debug, Clone)]
pub struct Attention<B: ModelBackend> {
    /// `hidden` → the queries (`num_heads * head_dim`), keys and values (`num_kv_heads *
    /// head_dim` each): three linears, or Phi-3's fused one.
    pub qkv: Projections<B>,
    /// `num_heads * head_dim` → `hidden`: the heads' outputs back onto the residual stream.
    pub o_proj: FrozenLinear<B>,
    /// Qwen3's RMSNorm over each query head (`[head_dim]` weight), before RoPE.
    pub q_norm: Option<RmsNorm<B>>,
    /// Qwen3's RMSNorm over each key head (`[head_dim]` weight), before RoPE.
    pub k_norm: Option<RmsNorm<B>>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads, each shared by `num_heads / num_kv_heads` query heads.
    pub num_kv_heads: usize,
    /// Width of one head (queries, keys and values alike).
    pub head_dim: usize,
    /// How `q·k` becomes a score (scale, Gemma 2's soft-cap).
    pub scores: Scores,
}

impl<B: ModelBackend> Attention<B> {
    /// A projection's rows for `[batch, seq]` positions, as `[batch, heads, seq, d]`.
    fn heads(&self, y: Tensor<B, 2>, [batch, seq]: [usize; 2]) -> Tensor<B, 4> {
        let heads = y.dims()[1] / self.head_dim;
        y.reshape([batch, seq, heads, self.head_dim])
            .swap_dims(1, 2)
    }

    /// `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`. With a cache slot, the queries also
    /// attend to the cached keys, and this call's keys and values are appended to it.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        layout: &AttentionLayout<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [batch, seq, features] = x.dims();
        let x = self
            .qkv
            .first()
            .gemm_input(x)
            .reshape([batch * seq, features]);
        let [q, k, v]: [Tensor<B, 2>; 3] = self
            .qkv
            .forward_rows(x)
            .try_into()
            .expect("three projections: q, k, v");
        let [mut q, mut k, mut v] = [q, k, v].map(|y| self.heads(y, [batch, seq]));
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        q = rope_leading(q, layout.cos.clone(), layout.sin.clone());
        k = rope_leading(k, layout.cos.clone(), layout.sin.clone());
        if let Some(slot) = cache {
            (k, v) = slot.append(k, v);
        }
        let out = attention(q, k, v, &layout.visibility, self.scores)
            .swap_dims(1, 2)
            .reshape([batch, seq, self.num_heads * self.head_dim]);
        self.o_proj.forward(out)
    }
}

/// A block's gated feed-forward: `down(act(gate(x)) ⊙ up(x))` (SwiGLU, or Gemma's GeGLU).
#[derive(Debug, Clone)]
pub struct Mlp<B: ModelBackend> {
    /// The gate's activation.
    pub activation: Activation,
    /// `hidden` → the gate and the up projection (`intermediate` each): two linears, or
    /// Phi-3's fused one.
    pub gate_up: Projections<B>,
    /// `intermediate` → `hidden`.
    pub down_proj: FrozenLinear<B>,
}

impl<B: ModelBackend> Mlp<B> {
    /// The same MLP with every linear replaced by `f(linear)`.
    pub fn map<C: ModelBackend>(
        &self,
        mut f: impl FnMut(&FrozenLinear<B>) -> FrozenLinear<C>,
    ) -> Mlp<C> {
        Mlp {
            activation: self.activation,
            gate_up: self.gate_up.map(&mut f),
            down_proj: f(&self.down_proj),
        }
    }

    /// `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, seq, features] = x.dims();
        let x = self
            .gate_up
            .first()
            .gemm_input(x)
            .reshape([batch * seq, features]);
        let [gate, up]: [Tensor<B, 2>; 2] = self
            .gate_up
            .forward_rows(x)
            .try_into()
            .expect("two projections: gate, up");
        let grad_dtype = self.gate_up.output_grad_dtype();
        let dtype = self.down_proj.input_dtype();
        let hidden = gated(self.activation, gate, up, dtype, grad_dtype);
        self.down_proj
            .forward_rows(hidden)
            .reshape([batch, seq, self.down_proj.out_features()])
    }
}

/// A block's feed-forward half: one gated MLP, or a mixture of experts.
#[derive(Debug, Clone)]
pub enum FeedForward<B: ModelBackend> {
    /// A gated MLP every token goes through.
    Dense(Mlp<B>),
    /// Experts chosen per token by a router.
    Experts(Box<SparseMoe<B>>),
}

impl<B: ModelBackend> FeedForward<B> {
    /// `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            FeedForward::Dense(mlp) => mlp.forward(x),
            FeedForward::Experts(moe) => moe.forward(x),
        }
    }

    /// The dtype its first GEMMs read their input in (see [`FrozenLinear::input_dtype`]).
    pub fn input_dtype(&self) -> Option<FloatDType> {
        match self {
            FeedForward::Dense(mlp) => mlp.gate_up.first().input_dtype(),
            FeedForward::Experts(moe) => moe.router.input_dtype(),
        }
    }

    /// The linears with their names, in [`names::mlp_linears`] order.
    pub fn linears(&self) -> Vec<(BlockLinear, &FrozenLinear<B>)> {
        match self {
            FeedForward::Dense(mlp) => {
                let mut out = mlp.gate_up.linears();
                out.push((BlockLinear::Down, &mlp.down_proj));
                out
            }
            FeedForward::Experts(moe) => moe.linears(),
        }
    }

    /// The linears with their names, to change.
    pub fn linears_mut(&mut self) -> Vec<(BlockLinear, &mut FrozenLinear<B>)> {
        match self {
            FeedForward::Dense(mlp) => {
                let mut out = mlp.gate_up.linears_mut();
                out.push((BlockLinear::Down, &mut mlp.down_proj));
                out
            }
            FeedForward::Experts(moe) => moe.linears_mut(),
        }
    }

    /// The same feed-forward with every linear replaced by `f(linear)`.
    pub fn map<C: ModelBackend>(
        &self,
        f: impl FnMut(&FrozenLinear<B>) -> FrozenLinear<C>,
    ) -> FeedForward<C> {
        match self {
            FeedForward::Dense(mlp) => FeedForward::Dense(mlp.map(f)),
            FeedForward::Experts(moe) => FeedForward::Experts(Box::new(moe.map(f))),
        }
    }
}

/// One decoder block: pre-norm attention, then a pre-norm MLP, each added onto the residual
/// stream (Gemma also normalises each one's output before adding it).
#[derive(Debug, Clone)]
pub struct Block<B: ModelBackend> {
    /// The RMSNorm before attention (`input_layernorm`).
    pub input_layernorm: RmsNorm<B>,
    /// The block's attention.
    pub self_attn: Attention<B>,
    /// Gemma: the RMSNorm of attention's output (`post_attention_layernorm`).
    pub post_attention_norm: Option<RmsNorm<B>>,
    /// The RMSNorm before the MLP (Llama's `post_attention_layernorm`, Gemma's
    /// `pre_feedforward_layernorm`).
    pub pre_mlp_norm: RmsNorm<B>,
    /// The block's feed-forward: a gated MLP or a mixture of experts.
    pub mlp: FeedForward<B>,
    /// Gemma: the RMSNorm of the MLP's output (`post_feedforward_layernorm`).
    pub post_mlp_norm: Option<RmsNorm<B>>,
    /// Whether attention sees a sliding window (and its layout's RoPE) rather than the past.
    pub sliding: bool,
}

impl<B: ModelBackend> Block<B> {
    /// The block's linears, in the order adapters are listed everywhere ([`BlockLinear::of`]).
    pub fn linears_mut(&mut self) -> Vec<(BlockLinear, &mut FrozenLinear<B>)> {
        let a = &mut self.self_attn;
        let mut out = a.qkv.linears_mut();
        out.push((BlockLinear::O, &mut a.o_proj));
        out.extend(self.mlp.linears_mut());
        out
    }

    /// The block's projections of one input (q, k, v; gate, up of a dense MLP), to change.
    pub fn projections_mut(&mut self) -> Vec<&mut Projections<B>> {
        let mut out = vec![&mut self.self_attn.qkv];
        if let FeedForward::Dense(mlp) = &mut self.mlp {
            out.push(&mut mlp.gate_up);
        }
        out
    }

    /// The block's linears, in the order adapters are listed everywhere.
    pub fn linears(&self) -> Vec<(BlockLinear, &FrozenLinear<B>)> {
        let a = &self.self_attn;
        let mut out = a.qkv.linears();
        out.push((BlockLinear::O, &a.o_proj));
        out.extend(self.mlp.linears());
        out
    }

    /// The block's adapters with their linears, in [`BlockLinear::of`] order.
    pub fn adapters(&self) -> Vec<(BlockLinear, &LoraAdapter<B>)> {
        self.linears()
            .into_iter()
            .filter_map(|(w, l)| l.adapter.as_ref().map(|ad| (w, ad)))
            .collect()
    }

    /// `h`: `[batch, seq, hidden]` → the same, after attention and the MLP; the cache slot as
    /// in [`Attention::forward`].
    pub fn forward(
        &self,
        h: Tensor<B, 3>,
        layouts: &Layouts<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        self.mlp_part(self.attention_part(h, layouts, cache))
    }

    /// The block's first half, `h + attention(norm(h))` (Gemma: `h + norm(attention(norm(h)))`),
    /// attention laid out as `layouts` says for a sliding or a global layer.
    pub fn attention_part(
        &self,
        h: Tensor<B, 3>,
        layouts: &Layouts<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let attn_dtype = self.self_attn.qkv.first().input_dtype();
        let out = self.self_attn.forward(
            self.input_layernorm.forward_as(h.clone(), attn_dtype),
            layouts.get(self.sliding),
            cache,
        );
        h + post_norm(&self.post_attention_norm, out)
    }

    /// The block's second half, `h + mlp(norm(h))` (Gemma: `h + norm(mlp(norm(h)))`): position
    /// by position, so any rows of `[batch, seq, hidden]` can go through it apart.
    pub fn mlp_part(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let mlp_dtype = self.mlp.input_dtype();
        let out = self
            .mlp
            .forward(self.pre_mlp_norm.forward_as(h.clone(), mlp_dtype));
        h + post_norm(&self.post_mlp_norm, out)
    }
}

/// `x` through Gemma's norm of a sublayer's output, where the block has one.
fn post_norm<B: ModelBackend>(norm: &Option<RmsNorm<B>>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    match norm {
        Some(norm) => norm.forward(x),
        None => x,
    }
}

/// The decoder-only transformer: embedding, blocks, final norm and head.
#[derive(Debug, Clone)]
pub struct Decoder<B: ModelBackend> {
    /// The architecture it was built from.
    pub config: ModelConfig,
    /// `[vocab, hidden]`: one row per token.
    pub embed_tokens: FrozenWeight<B>,
    /// The blocks, first to last.
    pub layers: Vec<Block<B>>,
    /// The RMSNorm after the last block, before the head.
    pub norm: RmsNorm<B>,
    /// Shares the embedding's weight when the model ties them.
    pub lm_head: FrozenLinear<B>,
    /// RoPE frequencies, shared by every global block's attention.
    pub rope: Rope,
    /// Gemma 3: the sliding blocks' RoPE frequencies, when they differ from the global ones.
    pub local_rope: Option<Rope>,
}

impl<B: ModelBackend> Decoder<B> {
    /// Final hidden states `[batch, seq, hidden]` for `ids` (`batch * seq` tokens, row-major).
    /// With a cache, the tokens continue the cached positions and the cache is extended.
    pub fn forward_hidden(
        &self,
        ids: &[u32],
        batch: usize,
        cache: Option<&mut KvCache<B>>,
        device: &B::Device,
    ) -> Tensor<B, 3> {
        let Some(cache) = cache else {
            return self
                .norm
                .forward(self.forward_blocks(ids, None, batch, device));
        };
        let seq = ids.len() / batch;
        let mut h = self.embed(ids, batch, device);
        let pass = cache.begin_pass();
        let layout = |rope: &Rope, keys| {
            AttentionLayout::cached(rope, pass.offset, pass.pads, seq, keys, device)
        };
        let local_rope = self.local_rope.as_ref().unwrap_or(&self.rope);
        let layouts = Layouts {
            global: layout(&self.rope, pass.global),
            sliding: pass.sliding.map(|keys| layout(local_rope, keys)),
        };
        for (block, slot) in self.layers.iter().zip(pass.slots) {
            h = block.forward(h, &layouts, Some(slot));
        }
        cache.advance(seq);
        self.norm.forward(h)
    }

    /// Token embeddings `[batch, seq, hidden]` (Gemma: times √hidden).
    pub fn embed(&self, ids: &[u32], batch: usize, device: &B::Device) -> Tensor<B, 3> {
        let seq = ids.len() / batch;
        let h = self
            .embed_tokens
            .rows(ids, device)
            .reshape([batch, seq, self.config.hidden_size]);
        match self.config.quirks.scale_embedding {
            true => h.mul_scalar((self.config.hidden_size as f64).sqrt()),
            false => h,
        }
    }

    /// The layouts of `batch` rows of `seq` tokens: causal rows, or packed rows when `segments`
    /// names each token's example (see [`AttentionLayout::packed`]).
    pub fn layout(
        &self,
        segments: Option<&[u32]>,
        batch: usize,
        seq: usize,
        device: &B::Device,
    ) -> Layouts<B> {
        self.layouts_with(|rope| match segments {
            Some(segments) => AttentionLayout::packed(rope, segments, batch, seq, device),
            None => AttentionLayout::causal(rope, 0, seq, device),
        })
    }

    /// The global layers' layout from `make(rope)`, and the sliding layers' where there are
    /// any: their window, and their own RoPE (Gemma 3) or the global tables.
    fn layouts_with(&self, make: impl Fn(&Rope) -> AttentionLayout<B>) -> Layouts<B> {
        let global = make(&self.rope);
        let window = self.config.quirks.sliding_window;
        let sliding = window
            .filter(|_| self.layers.iter().any(|b| b.sliding))
            .map(|w| {
                let local = match &self.local_rope {
                    Some(rope) => make(rope),
                    None => global.clone(),
                };
                AttentionLayout {
                    visibility: local.visibility.with_window(Some(w)),
                    ..local
                }
            });
        Layouts { global, sliding }
    }

    /// Every decoder linear with its Hugging Face module path (`model.layers.0.self_attn.q_proj`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut FrozenLinear<B>)> {
        let family = self.config.family;
        let mut out = Vec::new();
        for (i, block) in self.layers.iter_mut().enumerate() {
            for (which, linear) in block.linears_mut() {
                out.push((format!("{}.{}", names::block(i), which.key(family)), linear));
            }
        }
        out
    }

    /// The adapters, with their module paths, in a fixed order.
    pub fn adapters(&self) -> Vec<(String, &LoraAdapter<B>)> {
        self.adapters_with_experts()
            .into_iter()
            .map(|(path, adapter, _)| (path, adapter))
            .collect()
    }

    /// [`Self::adapters`] with the experts each one's linear stacks (1 for a plain linear).
    pub fn adapters_with_experts(&self) -> Vec<(String, &LoraAdapter<B>, usize)> {
        let family = self.config.family;
        let mut out = Vec::new();
        for (i, block) in self.layers.iter().enumerate() {
            for (which, linear) in block.linears() {
                if let Some(adapter) = &linear.adapter {
                    let path = format!("{}.{}", names::block(i), which.key(family));
                    out.push((path, adapter, linear.experts));
                }
            }
        }
        out
    }

    /// Logits `[batch, seq, vocab]` from final hidden states (Gemma 2: soft-capped,
    /// `cap · tanh(z / cap)`).
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let z = self.lm_head.forward(hidden);
        match self.config.quirks.final_softcap {
            Some(cap) => z.div_scalar(cap).tanh().mul_scalar(cap),
            None => z,
        }
    }

    /// The dtype the loss may hand the logits' gradient back in: the head's
    /// ([`FrozenLinear::output_grad_dtype`]), or f32 (`None`) through Gemma 2's soft-cap, whose
    /// backward multiplies it by f32 values (Burn's binary ops take one dtype).
    pub fn logits_grad_dtype(&self) -> Option<FloatDType> {
        match self.config.quirks.final_softcap {
            Some(_) => None,
            None => self.lm_head.output_grad_dtype(),
        }
    }

    /// The logits of the last hidden states `h`: the final norm (written in the head's GEMM
    /// input dtype), then the head.
    pub fn head(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        self.logits(self.norm.forward_as(h, self.lm_head.input_dtype()))
    }

    /// Logits for every position.
    pub fn forward(&self, ids: &[u32], batch: usize, device: &B::Device) -> Tensor<B, 3> {
        self.forward_with_segments(ids, None, batch, device)
    }

    /// Logits for every position of rows laid out by [`Decoder::layout`].
    pub fn forward_with_segments(
        &self,
        ids: &[u32],
        segments: Option<&[u32]>,
        batch: usize,
        device: &B::Device,
    ) -> Tensor<B, 3> {
        let h = self.forward_blocks(ids, segments, batch, device);
        self.head(h)
    }

    /// The last block's output `[batch, seq, hidden]` (before the final norm) for rows laid out
    /// by [`Decoder::layout`].
    pub fn forward_blocks(
        &self,
        ids: &[u32],
        segments: Option<&[u32]>,
        batch: usize,
        device: &B::Device,
    ) -> Tensor<B, 3> {
        let layouts = self.layout(segments, batch, ids.len() / batch, device);
        let mut h = self.embed(ids, batch, device);
        for block in &self.layers {
            h = block.forward(h, &layouts, None);
        }
        h
    }

    /// Whether a cache of `cached` positions must be rebuilt before a pass reaching `len`:
    /// LongRoPE switched to its long factors in between (see [`Rope::cache_outdated`]).
    pub fn cache_outdated(&self, cached: usize, len: usize) -> bool {
        self.rope.cache_outdated(cached, len)
    }

    /// Runs `ids` (one sequence) through the cache and returns the last position's logits.
    pub fn next_logits(&self, ids: &[u32], cache: &mut KvCache<B>, device: &B::Device) -> Vec<f32> {
        let mut rows = self.cached_logits(ids, 1, 1, cache, device);
        rows.pop().expect("one row")
    }

    /// Runs `ids` (`batch` rows, row-major) through the cache and returns the logits of each
    /// row's last `last` positions, row by row.
    pub fn cached_logits(
        &self,
        ids: &[u32],
        batch: usize,
        last: usize,
        cache: &mut KvCache<B>,
        device: &B::Device,
    ) -> Vec<Vec<f32>> {
        let hidden = self.forward_hidden(ids, batch, Some(cache), device);
        let seq = ids.len() / batch;
        let logits = self
            .logits(hidden.narrow(1, seq - last, last))
            .into_data()
            .into_vec::<f32>()
            .expect("f32 logits");
        let vocab = logits.len() / (batch * last);
        logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect()
    }
}
