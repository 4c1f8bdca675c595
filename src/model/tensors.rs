//! Every weight of a decoder under its Hugging Face name, with its shape, in file order: what an
//! exporter writes and a loader reads.

use super::config::ModelConfig;

/// One stored weight.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    fn new(name: String, shape: &[usize]) -> Self {
        TensorSpec {
            name,
            shape: shape.to_vec(),
        }
    }

    /// The module path of a `.weight` (`model.layers.0.mlp.up_proj`).
    pub fn module(&self) -> &str {
        self.name.strip_suffix(".weight").unwrap_or(&self.name)
    }

    /// A 2-D matrix (linear, embedding or head), as opposed to a norm or bias vector.
    pub fn is_matrix(&self) -> bool {
        self.shape.len() == 2
    }
}

/// The weights of a model with this configuration (`lm_head.weight` absent when tied).
pub fn tensor_specs(c: &ModelConfig) -> Vec<TensorSpec> {
    let (h, hd, i) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q, kv) = (c.num_heads * hd, c.num_kv_heads * hd);
    let mut out = vec![TensorSpec::new(
        "model.embed_tokens.weight".into(),
        &[c.vocab_size, h],
    )];
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let mut add = |leaf: &str, shape: &[usize]| {
            out.push(TensorSpec::new(format!("{p}.{leaf}"), shape));
        };
        add("input_layernorm.weight", &[h]);
        add("self_attn.q_proj.weight", &[q, h]);
        add("self_attn.k_proj.weight", &[kv, h]);
        add("self_attn.v_proj.weight", &[kv, h]);
        if c.attention_bias {
            add("self_attn.q_proj.bias", &[q]);
            add("self_attn.k_proj.bias", &[kv]);
            add("self_attn.v_proj.bias", &[kv]);
        }
        if c.qk_norm {
            add("self_attn.q_norm.weight", &[hd]);
            add("self_attn.k_norm.weight", &[hd]);
        }
        add("self_attn.o_proj.weight", &[h, q]);
        add("post_attention_layernorm.weight", &[h]);
        add("mlp.gate_proj.weight", &[i, h]);
        add("mlp.up_proj.weight", &[i, h]);
        add("mlp.down_proj.weight", &[h, i]);
    }
    out.push(TensorSpec::new("model.norm.weight".into(), &[h]));
    if !c.tie_word_embeddings {
        out.push(TensorSpec::new("lm_head.weight".into(), &[c.vocab_size, h]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Family, RopeScaling};

    #[test]
    fn specs_count_every_parameter_once() {
        for (tied, bias, qk_norm) in [
            (true, false, false),
            (false, true, false),
            (false, false, true),
        ] {
            let config = ModelConfig {
                family: Family::Qwen3,
                vocab_size: 100,
                hidden_size: 32,
                intermediate_size: 48,
                num_layers: 3,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 8,
                rms_norm_eps: 1e-6,
                rope_theta: 1e4,
                rope_scaling: RopeScaling::None,
                max_position_embeddings: 64,
                tie_word_embeddings: tied,
                attention_bias: bias,
                qk_norm,
                dtype: "float32".into(),
            };
            let specs = tensor_specs(&config);
            let total: usize = specs
                .iter()
                .map(|s| s.shape.iter().product::<usize>())
                .sum();
            assert_eq!(total, config.parameter_count(), "{tied} {bias} {qk_norm}");
            assert_eq!(specs.iter().any(|s| s.name == "lm_head.weight"), !tied);
        }
    }
}
