//! `config.json` for an exported folder: the base's own, minus its quantization, or one written
//! from the architecture when the base was a GGUF file.

use serde_json::{Value, json};

use super::FloatDtype;
use crate::model::ModelFiles;
use crate::model::config::Family;
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
    let architecture = match c.family {
        Family::Llama => "LlamaForCausalLM",
        Family::Mistral => "MistralForCausalLM",
        Family::Qwen2 => "Qwen2ForCausalLM",
        Family::Qwen3 => "Qwen3ForCausalLM",
    };
    let id = |token: &Option<String>| token.as_deref().and_then(|t| tokenizer.token_id(t));
    let mut config = json!({
        "architectures": [architecture],
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
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "bos_token_id": id(&tokenizer.bos),
        "eos_token_id": id(&tokenizer.eos),
    });
    let scaling = match c.rope_scaling {
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
    };
    if let (Some(s), Some(map)) = (scaling, config.as_object_mut()) {
        map.insert("rope_scaling".into(), s);
    }
    config
}
