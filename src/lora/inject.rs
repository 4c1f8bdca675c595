//! Which linears get an adapter: keys relative to a block, and which blocks (mlx-lm's meaning of
//! `num_layers`: the last N; -1 for all), or an explicit list.

use anyhow::{Result, bail};

use super::LoraAdapter;
use crate::model::{Decoder, FrozenLinearBackend};
use crate::recipe::{AdapterKind, Layers, LoraSection, Targets};

/// The seven linears of a block, by their key relative to the block.
pub const TARGET_KEYS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// A recipe's `[lora]` resolved against a model.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub dora: bool,
    pub rank: usize,
    pub scale: f64,
    pub dropout: f64,
    pub keys: Vec<String>,
    pub layers: Vec<usize>,
    /// As written in the recipe, for adapter_config.json (`num_layers`).
    pub num_layers: i64,
    pub rslora: bool,
}

impl AdapterSpec {
    pub fn from_recipe(lora: &LoraSection, num_blocks: usize) -> Result<Self> {
        let keys: Vec<String> = match &lora.targets {
            Targets::Named(_) => TARGET_KEYS.iter().map(|k| k.to_string()).collect(),
            Targets::Keys(keys) => keys.clone(),
        };
        for key in &keys {
            if !TARGET_KEYS.contains(&key.as_str()) {
                bail!(
                    "lora.targets: unknown key `{key}`; valid keys are {} (or \"all-linear\")",
                    TARGET_KEYS.join(", ")
                );
            }
        }
        let (layers, num_layers) = match &lora.layers {
            Layers::Last(-1) => ((0..num_blocks).collect(), -1),
            Layers::Last(n) => {
                let n = (*n as usize).min(num_blocks);
                ((num_blocks - n..num_blocks).collect(), n as i64)
            }
            Layers::List(list) => {
                if let Some(bad) = list.iter().find(|&&i| i >= num_blocks) {
                    bail!(
                        "lora.layers: block {bad} does not exist (the model has {num_blocks}: 0..{})",
                        num_blocks - 1
                    );
                }
                (list.clone(), list.len() as i64)
            }
        };
        Ok(AdapterSpec {
            dora: lora.kind == AdapterKind::Dora,
            rank: lora.rank,
            scale: lora.effective_scale(),
            dropout: lora.dropout,
            keys,
            layers,
            num_layers,
            rslora: lora.rslora,
        })
    }
}

/// Adds a freshly initialised adapter to every targeted linear.
pub fn inject<B: FrozenLinearBackend>(
    decoder: &mut Decoder<B>,
    spec: &AdapterSpec,
    device: &B::Device,
) {
    for (path, linear) in decoder.linears_mut() {
        if spec.targets(&path) {
            linear.adapter = Some(LoraAdapter::init(
                &linear.weight,
                spec.rank,
                spec.scale,
                spec.dropout,
                spec.dora,
                device,
            ));
        }
    }
}

impl AdapterSpec {
    /// Whether the linear at `path` (`model.layers.3.self_attn.q_proj`) gets an adapter.
    pub fn targets(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix("model.layers.") else {
            return false;
        };
        let Some((layer, key)) = rest.split_once('.') else {
            return false;
        };
        layer.parse().is_ok_and(|l: usize| self.layers.contains(&l))
            && self.keys.iter().any(|k| k == key)
    }
}
