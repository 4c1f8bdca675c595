//! Random models of known shapes and random batches, generated on the host from a seed so that
//! every backend gets the same values: what `bench train` times and `bench check` compares.

use rand::Rng;

use crate::data::Batch;
use crate::model::config::{Family, ModelConfig, MoeConfig, Quirks};
use crate::model::load::{ModelFiles, ModelFormat};
use crate::model::weights::WeightSource;
use crate::ops::elementwise::Activation;
use crate::ops::rope::RopeScaling;
use crate::recipe::OptimizerKind;
use crate::train::optimizer::OptimizerConfig;

/// The model shapes of the reference benchmark's presets (`bench/reference/peft_lora_bench.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// The smallest preset: 4 layers, hidden 256, 4 heads, vocabulary 32000.
    Tiny,
    /// SmolLM2-135M: 30 layers, hidden 576, 9 heads (3 kv), tied embeddings.
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
    /// Llama 3.2 1B: 16 layers, hidden 2048, 32 heads (8 kv), tied embeddings.
    #[value(name = "llama3.2-1b")]
    Llama3_2_1b,
    /// Llama 3 8B: 32 layers, hidden 4096, 32 heads (8 kv), vocabulary 128256.
    #[value(name = "llama3-8b")]
    Llama3_8b,
    /// Gemma 2 9B: 42 layers, hidden 3584, 16 heads (8 kv) of 256, ffn 14336, vocabulary
    /// 256000, tied; soft-caps 50 and 30, every other layer a 4096-key window.
    #[value(name = "gemma2-9b")]
    Gemma2_9b,
    /// Phi-3.5-mini: 32 layers, hidden 3072, 32 heads (32 kv) of 96, ffn 8192, vocabulary
    /// 32064; q, k, v and gate, up fused (plain RoPE: LongRoPE's short factors time the same).
    #[value(name = "phi3-mini")]
    Phi3Mini,
    /// Mixtral 8x7B: 32 layers, hidden 4096, 32 heads (8 kv), 8 experts of ffn 14336, top 2,
    /// vocabulary 32000.
    #[value(name = "mixtral-8x7b")]
    Mixtral8x7b,
    /// Qwen3-30B-A3B: 48 layers, hidden 2048, 32 heads (4 kv) of 128 with q/k norms, 128
    /// experts of ffn 768, top 8 renormalised, vocabulary 151936.
    #[value(name = "qwen3-30b-a3b")]
    Qwen3_30bA3b,
}

impl Shape {
    /// The reference script's presets: (hidden, layers, heads, kv heads, ffn, vocab, tied, θ).
    pub fn config(self) -> ModelConfig {
        let (hidden, layers, heads, kv_heads, ffn, vocab, tied, theta) = match self {
            Shape::Tiny => (256, 4, 4, 4, 688, 32000, false, 10000.0),
            Shape::Smollm2_135m => (576, 30, 9, 3, 1536, 49152, true, 100000.0),
            Shape::Llama3_2_1b => (2048, 16, 32, 8, 8192, 128256, true, 500000.0),
            Shape::Llama3_8b => (4096, 32, 32, 8, 14336, 128256, false, 500000.0),
            Shape::Gemma2_9b => (3584, 42, 16, 8, 14336, 256000, true, 10000.0),
            Shape::Phi3Mini => (3072, 32, 32, 32, 8192, 32064, false, 10000.0),
            Shape::Mixtral8x7b => (4096, 32, 32, 8, 14336, 32000, false, 1e6),
            Shape::Qwen3_30bA3b => (2048, 48, 32, 4, 6144, 151936, false, 1e6),
        };
        let moe = |experts, top_k, width| MoeConfig {
            experts,
            top_k,
            expert_intermediate_size: width,
            normalize_top_k: true,
            shared_expert_intermediate_size: None,
            sparse_layers: vec![true; layers],
        };
        let (family, head_dim, quirks) = match self {
            Shape::Gemma2_9b => (
                Family::Gemma2,
                256,
                Quirks {
                    activation: Activation::GeluTanh,
                    norm_plus_one: true,
                    scale_embedding: true,
                    sandwich_norms: true,
                    query_pre_attn_scalar: Some(256.0),
                    attn_softcap: Some(50.0),
                    final_softcap: Some(30.0),
                    sliding_window: Some(4096),
                    sliding_layers: (0..layers).map(|i| i % 2 == 0).collect(),
                    local_rope: None,
                },
            ),
            Shape::Phi3Mini => (Family::Phi3, hidden / heads, Quirks::default()),
            Shape::Mixtral8x7b => (Family::Mixtral, hidden / heads, Quirks::default()),
            Shape::Qwen3_30bA3b => (Family::Qwen3Moe, 128, Quirks::default()),
            _ => (Family::Llama, hidden / heads, Quirks::default()),
        };
        ModelConfig {
            family,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: ffn,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rotary_dim: head_dim,
            rms_norm_eps: if family.is_gemma() || family == Family::Qwen3Moe {
                1e-6
            } else {
                1e-5
            },
            rope_theta: theta,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 131072,
            tie_word_embeddings: tied,
            attention_bias: false,
            qk_norm: family == Family::Qwen3Moe,
            quirks,
            moe: match self {
                Shape::Mixtral8x7b => Some(moe(8, 2, ffn)),
                Shape::Qwen3_30bA3b => Some(moe(128, 8, 768)),
                _ => None,
            },
            dtype: "float32".into(),
        }
    }
}

/// AdamW with PyTorch's defaults and no weight decay, as the reference benchmark uses.
pub fn plain_adamw() -> OptimizerConfig {
    OptimizerConfig {
        kind: OptimizerKind::Adamw,
        betas: [0.9, 0.999],
        eps: 1e-8,
        weight_decay: 0.0,
    }
}

/// A model of `config` with seeded random weights (generated on the host, so every backend
/// gets the same values).
pub fn random_model_files(config: ModelConfig, seed: u64) -> ModelFiles {
    ModelFiles {
        path: "<random weights>".into(),
        format: ModelFormat::HfSafetensors,
        config,
        weights: WeightSource::Random { seed },
        config_json: None,
    }
}

/// `batch` rows of `seq` random token ids, `labels = inputs` as the reference passes them:
/// position t predicts t + 1, and the last position has no target.
pub fn random_batch(rng: &mut impl Rng, batch: usize, seq: usize, vocab: usize) -> Batch {
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let mut targets = Vec::with_capacity(ids.len());
    let mut mask = Vec::with_capacity(ids.len());
    for row in ids.chunks_exact(seq) {
        targets.extend(&row[1..]);
        targets.push(0);
        mask.extend(std::iter::repeat_n(1.0, seq - 1));
        mask.push(0.0);
    }
    Batch {
        batch,
        seq,
        inputs: ids,
        targets,
        mask,
        segments: None,
        lengths: vec![seq; batch],
    }
}
