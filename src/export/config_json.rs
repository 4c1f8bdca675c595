//! `config.json` for an exported folder: the base's own, minus its quantization, or one written
//! from the architecture when the base was a GGUF file.

use serde_json::{Value, json};

use super::FloatDtype;
use crate::model::{Family, ModelConfig, ModelFiles};
use crate::ops::rope::RopeScaling;
use crate::tokenizer::Tokenizer;

/// The exported folder's `config.json` (float weights of `dtype`; a writer that quantizes adds
/// its `quantization` keys).
pub fn config_json(files: &ModelFiles, tokenizer: &Tokenizer, dtype: FloatDtype) -> Value {
    let mut config = match &files.config_json {
        Some(base) => base.clone(),
        None => from_architecture(files, tokenizer),
    };
    if let Some(map) = config.as_object_mut() {
        map.remove("quantization");
        map.remove("quantization_config");
        map.insert("torch_dtype".into(), json!(dtype.torch_name()));
        if map.contains_key("dtype") {
            map.insert("dtype".into(), json!(dtype.torch_name()));
        }
    }
    config
}

fn from_architecture(files: &ModelFiles, tokenizer: &Tokenizer) -> Value {
    let c = &files.config;
    let id = |token: &Option<String>| token.as_deref().and_then(|t| tokenizer.token_id(t));
    let mut config = json!({
        "architectures": [c.family.hf_class()],
        "model_type": c.family.name(),
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "bos_token_id": id(&tokenizer.bos),
        "eos_token_id": id(&tokenizer.eos),
    });
    add_older_keys(&mut config, c);
    let Some(map) = config.as_object_mut() else {
        return config;
    };
    if c.family.fuses_projections() {
        if let RopeScaling::LongRope {
            original_max_position_embeddings,
            ..
        } = c.rope_scaling
        {
            // mlx-lm's Phi-3 reads the pretrained length here only.
            map.insert(
                "original_max_position_embeddings".into(),
                json!(original_max_position_embeddings),
            );
        }
        map.insert("sliding_window".into(), json!(c.quirks.sliding_window));
    }
    if let Some(moe) = &c.moe {
        let dense: Vec<usize> = (0..c.num_layers).filter(|&i| !moe.sparse(i)).collect();
        let experts = match c.family {
            Family::Mixtral => "num_local_experts",
            _ => "num_experts",
        };
        map.insert(experts.into(), json!(moe.experts));
        map.insert("num_experts_per_tok".into(), json!(moe.top_k));
        if c.family != Family::Mixtral {
            map.insert(
                "moe_intermediate_size".into(),
                json!(moe.expert_intermediate_size),
            );
            map.insert("norm_topk_prob".into(), json!(moe.normalize_top_k));
            map.insert("decoder_sparse_step".into(), json!(1));
            map.insert("mlp_only_layers".into(), json!(dense));
        }
        if let Some(shared) = moe.shared_expert_intermediate_size {
            map.insert("shared_expert_intermediate_size".into(), json!(shared));
            map.insert("qkv_bias".into(), json!(c.attention_bias));
        }
        if c.family == Family::Mixtral {
            map.insert("sliding_window".into(), json!(c.quirks.sliding_window));
        }
    }
    if c.family.is_gemma() {
        let q = &c.quirks;
        map.remove("hidden_act");
        map.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
        map.insert(
            "query_pre_attn_scalar".into(),
            json!(q.query_pre_attn_scalar),
        );
        map.insert("attn_logit_softcapping".into(), json!(q.attn_softcap));
        map.insert("final_logit_softcapping".into(), json!(q.final_softcap));
        map.insert("sliding_window".into(), json!(q.sliding_window));
        let types: Vec<&str> = (0..c.num_layers)
            .map(|i| match q.slides(i) {
                true => "sliding_attention",
                false => "full_attention",
            })
            .collect();
        map.insert("layer_types".into(), json!(types));
    }
    config
}

/// The older spellings (`rope_theta`, `rope_scaling`, a top-level `partial_rotary_factor`,
/// Gemma's `rope_local_base_freq`, Gemma 3's
/// `sliding_window_pattern`, Qwen-MoE's `num_experts`), added where `config` lacks them: what a
/// config written from GGUF metadata spells them as, and what mlx-lm 0.32 reads: a transformers-5
/// config spells RoPE only under `rope_parameters`, which mlx-lm ignores (it would run RoPE at
/// its defaults, without the model's scaling), and Qwen3-MoE's expert count as
/// `num_local_experts`, which mlx-lm's `qwen3_moe` refuses to load without `num_experts`.
pub fn add_older_keys(config: &mut Value, c: &ModelConfig) {
    let Some(map) = config.as_object_mut() else {
        return;
    };
    if let Some(moe) = c.moe.as_ref().filter(|_| c.family != Family::Mixtral) {
        map.entry("num_experts").or_insert(json!(moe.experts));
    }
    map.entry("rope_theta").or_insert(json!(c.rope_theta));
    if let Some(s) = scaling_json(&c.rope_scaling) {
        map.entry("rope_scaling").or_insert(s);
    }
    if let Some((theta, _)) = c.quirks.local_rope {
        map.entry("rope_local_base_freq").or_insert(json!(theta));
    }
    if c.rotary_dim != c.head_dim {
        // Both tools rotate int(head_dim · factor) dimensions: the plain ratio where that floors
        // back to rotary_dim, else half a dimension more.
        let (r, d) = (c.rotary_dim as f64, c.head_dim as f64);
        let f = match (d * (r / d)) as usize == c.rotary_dim {
            true => r / d,
            false => (r + 0.5) / d,
        };
        map.entry("partial_rotary_factor").or_insert(json!(f));
    }
    // Gemma 3's reader takes the period from here; Gemma 2's (mlx-lm's, transformers', ours)
    // alternate by definition and never read it.
    if let Some(period) = c
        .quirks
        .sliding_period()
        .filter(|_| c.family == Family::Gemma3)
    {
        map.entry("sliding_window_pattern").or_insert(json!(period));
    }
}

/// `rope_scaling` as `config.json` spells it; `None` for unscaled RoPE. LongRoPE says `type`
/// (mlx-lm's Phi-3 requires it) and gives its attention factor, which transformers would
/// otherwise derive from `max_position_embeddings`.
fn scaling_json(scaling: &RopeScaling) -> Option<Value> {
    match *scaling {
        RopeScaling::LongRope {
            ref short_factor,
            ref long_factor,
            original_max_position_embeddings,
            attention_factor,
        } => Some(json!({
            "type": "longrope",
            "short_factor": short_factor,
            "long_factor": long_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
            "attention_factor": attention_factor,
        })),
        RopeScaling::None => None,
        RopeScaling::Linear { factor } => Some(json!({"rope_type": "linear", "factor": factor})),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => Some(json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        })),
    }
}
