//! What `mlx_lm.convert` (mlx-lm 0.32) decides and writes, for `loraforge convert`: which
//! matrices `-q` quantizes and at what setting, the `config.json`, the index and the model card,
//! byte for byte. The tensors themselves go through the same writer as every mlx export
//! (`mlx.rs`); the quantizer is mlx's own, reproduced (`quant/quantize.rs`).
//!
//! `-q` quantizes every matrix (linears, embedding, head, experts' stacks) whose row length
//! divides by the group size, except where a predicate says otherwise:
//! - Qwen3-MoE's router (`mlp.gate`) at 8 bits, group 64 (its model's own predicate);
//! - a mixed recipe (`--quant-predicate mixed_3_6` …): the low bits everywhere, the high bits for
//!   `lm_head` and for the v and down projections of the first and last eighth of the layers and
//!   every third layer between (llama.cpp's Q4_K_M choice).
//!
//! Deliberate differences from mlx-lm, each where its output is wrong: a recipe without
//! `--q-group-size` writes the group size, where mlx-lm writes `"group_size": null` in every
//! per-layer entry; and a config spelling RoPE only as transformers 5 does gets the older keys
//! mlx-lm reads (`config_json::add_older_keys`), without which mlx-lm runs the model with the
//! wrong RoPE. Sharded models split at the same 5 GiB but in our tensor order, and tensor data
//! inside a file is in name order: mlx writes it in its C++ hash map's order, which depends on
//! the standard library mlx was built with, so no fixed order could match every mlx.

use serde_json::{Map, Value, json};

use crate::model::names::TensorSpec;
use crate::model::{Family, ModelConfig, ModelFiles};

/// `convert`'s `-q` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantize {
    /// Bits per weight (`--q-bits`, 4 by default).
    pub bits: u32,
    /// Weights per scale and bias (`--q-group-size`, 64 by default).
    pub group: usize,
    /// A mixed-bit recipe (`--quant-predicate`).
    pub recipe: Option<MixedRecipe>,
}

/// mlx-lm's mixed-bit recipes: `mixed_<low>_<high>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MixedRecipe {
    /// 2 bits, 6 for the sensitive matrices.
    #[value(name = "mixed_2_6")]
    Mixed2_6,
    /// 3 bits, 4 for the sensitive matrices.
    #[value(name = "mixed_3_4")]
    Mixed3_4,
    /// 3 bits, 6 for the sensitive matrices.
    #[value(name = "mixed_3_6")]
    Mixed3_6,
    /// 4 bits, 6 for the sensitive matrices.
    #[value(name = "mixed_4_6")]
    Mixed4_6,
}

impl MixedRecipe {
    /// `(low, high)` bits.
    fn bits(self) -> (u32, u32) {
        match self {
            MixedRecipe::Mixed2_6 => (2, 6),
            MixedRecipe::Mixed3_4 => (3, 4),
            MixedRecipe::Mixed3_6 => (3, 6),
            MixedRecipe::Mixed4_6 => (4, 6),
        }
    }
}

/// How one matrix is quantized, and whether `config.json` names it (mlx-lm records a module
/// whenever a predicate returned settings for it, even the defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setting {
    /// Bits per weight.
    pub bits: u32,
    /// Weights per group.
    pub group: usize,
    /// Recorded under its module in `quantization`: with `"mode"` (a recipe) or without (a
    /// model's own predicate).
    pub recorded: Option<bool>,
}

impl Quantize {
    /// The setting of matrix `spec`, or `None` where it stays float (its rows do not divide by
    /// the group size).
    pub fn setting(&self, spec: &TensorSpec, c: &ModelConfig) -> Option<Setting> {
        let cols = *spec.shape.last()?;
        if !spec.is_matrix() || !cols.is_multiple_of(self.group) {
            return None;
        }
        let module = spec.module();
        let plain = |bits| Setting {
            bits,
            group: self.group,
            recorded: None,
        };
        let Some(recipe) = self.recipe else {
            if c.family == Family::Qwen3Moe && module.ends_with("mlp.gate") {
                return Some(Setting {
                    bits: 8,
                    group: 64,
                    recorded: Some(false),
                });
            }
            return Some(plain(self.bits));
        };
        let (low, high) = recipe.bits();
        let layers = c.num_layers;
        let index = layer_of(module).unwrap_or(0);
        let sensitive =
            index < layers / 8 || index >= 7 * layers / 8 || (index - layers / 8) % 3 == 2;
        let high_here = module.contains("lm_head")
            || (sensitive
                && ["v_proj", "v_a_proj", "v_b_proj", "down_proj"]
                    .iter()
                    .any(|k| module.contains(k)));
        Some(Setting {
            recorded: Some(true),
            ..plain(if high_here { high } else { low })
        })
    }

    /// The `quantization` object: the defaults, then each recorded module in the order mlx-lm
    /// visits them (the embedding, each block's attention then MLP as its model class declares
    /// them, the head).
    pub fn config_json(&self, settings: &[(&str, Setting)]) -> Value {
        let mut q = Map::new();
        q.insert("group_size".into(), json!(self.group));
        q.insert("bits".into(), json!(self.bits));
        q.insert("mode".into(), json!("affine"));
        let mut recorded: Vec<&(&str, Setting)> = settings
            .iter()
            .filter(|(_, s)| s.recorded.is_some())
            .collect();
        recorded.sort_by_cached_key(|(module, _)| mlx_lm_order(module));
        for (module, s) in recorded {
            let mut entry = json!({"group_size": s.group, "bits": s.bits});
            if s.recorded == Some(true) {
                entry["mode"] = json!("affine");
            }
            q.insert((*module).to_string(), entry);
        }
        Value::Object(q)
    }
}

/// The block index in `model.layers.N.…`.
fn layer_of(module: &str) -> Option<usize> {
    module
        .strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Where mlx-lm's module tree puts `module`: the embedding first, then block by block (attention
/// before the MLP, each in its class's declaration order), the head last.
fn mlx_lm_order(module: &str) -> (usize, usize) {
    /// Leaf names in declaration order across our families' mlx-lm classes (the dense MLP
    /// declares gate, down, up; SwitchGLU gate, up, down; Qwen2-MoE's shared expert follows).
    const LEAVES: [&str; 17] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "qkv_proj",
        "o_proj",
        "gate",
        "switch_mlp.gate_proj",
        "switch_mlp.up_proj",
        "switch_mlp.down_proj",
        "shared_expert.gate_proj",
        "shared_expert.down_proj",
        "shared_expert.up_proj",
        "shared_expert_gate",
        "gate_proj",
        "gate_up_proj",
        "down_proj",
        "up_proj",
    ];
    if module.ends_with("embed_tokens") {
        return (0, 0);
    }
    let Some(layer) = layer_of(module) else {
        return (usize::MAX, 0);
    };
    let leaf = LEAVES
        .iter()
        .position(|l| {
            ["self_attn.", "mlp.", "block_sparse_moe."]
                .iter()
                .any(|p| module.ends_with(&format!(".{p}{l}")))
        })
        .unwrap_or(LEAVES.len());
    (layer + 1, leaf)
}

/// `config.json` as mlx-lm writes it: the source's own, with `generation_config.json`'s
/// `eos_token_id` (mlx-lm's `load_config` merges it), without `_name_or_path` and
/// `vision_config`, `quantization` (when given) under both its keys, top-level keys sorted.
pub fn config(files: &ModelFiles, source: &Value, quantization: Option<Value>) -> Value {
    let mut config = source.clone();
    let Some(map) = config.as_object_mut() else {
        return config;
    };
    let generation = std::fs::read_to_string(files.path.join("generation_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok());
    if let Some(eos) = generation
        .as_ref()
        .and_then(|g| g.get("eos_token_id"))
        .filter(|v| truthy(v))
    {
        map.insert("eos_token_id".into(), eos.clone());
    }
    for key in [
        "_name_or_path",
        "vision_config",
        "quantization",
        "quantization_config",
    ] {
        map.shift_remove(key);
    }
    if let Some(q) = quantization {
        map.insert("quantization".into(), q.clone());
        map.insert("quantization_config".into(), q);
    }
    super::config_json::add_older_keys(&mut config, &files.config);
    if let Some(map) = config.as_object_mut() {
        map.sort_keys();
    }
    config
}

/// Python's truth value of a JSON value (mlx-lm tests `eos_token_id` so).
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// The model card mlx-lm writes (huggingface_hub's template with mlx's tags and no text);
/// `base_model` names the hub repository converted, where one was.
pub fn model_card(base_model: Option<&str>) -> String {
    let mut card = String::from(
        "---\nlanguage: en\nlibrary_name: mlx\npipeline_tag: text-generation\ntags:\n- mlx\n",
    );
    if let Some(name) = base_model {
        card += &format!("base_model: {name}\n");
    }
    card + "---\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_sort_as_mlx_lm_declares_them() {
        let mut names = vec![
            "lm_head",
            "model.layers.1.mlp.up_proj",
            "model.layers.0.mlp.down_proj",
            "model.layers.0.mlp.gate_proj",
            "model.layers.0.self_attn.o_proj",
            "model.layers.0.self_attn.q_proj",
            "model.embed_tokens",
            "model.layers.0.mlp.switch_mlp.up_proj",
            "model.layers.0.mlp.gate",
        ];
        names.sort_by_key(|m| mlx_lm_order(m));
        assert_eq!(
            names,
            [
                "model.embed_tokens",
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.self_attn.o_proj",
                "model.layers.0.mlp.gate",
                "model.layers.0.mlp.switch_mlp.up_proj",
                "model.layers.0.mlp.gate_proj",
                "model.layers.0.mlp.down_proj",
                "model.layers.1.mlp.up_proj",
                "lm_head",
            ]
        );
    }
}
