//! Which linears get an adapter: keys relative to a block, and which blocks (mlx-lm's meaning of
//! `num_layers`: the last N; -1 for all), or an explicit list.

use anyhow::{Result, bail};

use crate::model::Decoder;
use crate::model::LoraAdapter;
use crate::model::config::ModelConfig;
use crate::model::names::{BlockLinear, BlockModule};
use crate::ops::ModelBackend;
use crate::recipe::{AdapterKind, Layers, LoraSection, Targets};

/// A recipe's `[lora]` resolved against a model.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    /// DoRA rather than plain LoRA: each adapted row also learns a magnitude.
    pub dora: bool,
    /// The adapters' rank `r`.
    pub rank: usize,
    /// The factor the adapter's output is multiplied by (from `scale`, or `alpha` over r or √r).
    pub scale: f64,
    /// Dropout probability on the adapter's input in training.
    pub dropout: f64,
    /// Module paths relative to a block (`self_attn.q_proj`), as mlx-lm's adapter `keys`.
    pub keys: Vec<String>,
    /// The decoder blocks that get adapters, by index.
    pub layers: Vec<usize>,
    /// As written in the recipe, for adapter_config.json (`num_layers`).
    pub num_layers: i64,
    /// rsLoRA: the scale was derived from `alpha` as alpha/√r (recorded in peft's config).
    pub rslora: bool,
}

impl AdapterSpec {
    /// Resolves `[lora]` for a model of this configuration; unknown keys and blocks, and a rank
    /// above a targeted matrix's smaller side, are errors.
    pub fn from_recipe(lora: &LoraSection, config: &ModelConfig) -> Result<Self> {
        let num_blocks = config.num_layers;
        let keys: Vec<String> = match &lora.targets {
            Targets::Named(_) => BlockLinear::ALL.map(|l| l.key().to_string()).to_vec(),
            Targets::Keys(keys) => keys.clone(),
        };
        for key in &keys {
            let Some(linear) = BlockLinear::from_key(key) else {
                bail!(
                    "lora.targets: unknown key `{key}`; valid keys are {} (or \"all-linear\")",
                    BlockLinear::ALL.map(BlockLinear::key).join(", ")
                );
            };
            // A × B of rank r on an [out, in] weight has rank at most min(out, in): past that
            // the adapter only adds parameters (and memory) that cannot change the product.
            let [out, inp] = linear.shape(config);
            if lora.rank > out.min(inp) {
                bail!(
                    "lora.rank = {} is larger than `{key}`'s smaller side ({out} x {inp}): use at most {}",
                    lora.rank,
                    out.min(inp)
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
pub fn inject<B: ModelBackend>(decoder: &mut Decoder<B>, spec: &AdapterSpec, device: &B::Device) {
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
