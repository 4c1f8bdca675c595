//! Which linears get an adapter: keys relative to a block, and which blocks (mlx-lm's meaning of
//! `num_layers`: the last N; -1 for all), or an explicit list.
//!
//! Where a family fuses projections (Phi-3's `qkv_proj`, `gate_up_proj`), a key of one of the
//! fused parts (`self_attn.q_proj`, the default targets) selects the fused linear: its adapter
//! covers all of it, as peft's and mlx-lm's Phi-3 adapters do.

use anyhow::{Result, bail};

use crate::model::Decoder;
use crate::model::LoraAdapter;
use crate::model::config::ModelConfig;
use crate::model::names::BlockLinear;
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
        let family_linears = BlockLinear::of(config.family);
        let named: Vec<BlockLinear> = match &lora.targets {
            Targets::Named(_) => family_linears.to_vec(),
            Targets::Keys(keys) => keys
                .iter()
                .map(|key| {
                    let linear = BlockLinear::from_key(key, config.family).filter(|l| {
                        family_linears.contains(l) || l.fused_into().is_some()
                    });
                    linear.ok_or_else(|| {
                        anyhow::anyhow!(
                            "lora.targets: unknown key `{key}`; valid keys for {} are {} (or \"all-linear\")",
                            config.family.name(),
                            family_linears.iter().map(|l| l.key(config.family)).collect::<Vec<_>>().join(", ")
                        )
                    })
                })
                .collect::<Result<_>>()?,
        };
        let mut linears: Vec<BlockLinear> = Vec::new();
        for linear in named {
            let linear = match linear.fused_into() {
                Some(fused) if family_linears.contains(&fused) => fused,
                _ => linear,
            };
            if !linears.contains(&linear) {
                linears.push(linear);
            }
        }
        let keys: Vec<String> = linears
            .iter()
            .map(|l| l.key(config.family).to_string())
            .collect();
        if lora.kind == AdapterKind::Dora
            && let Some(experts) = linears.iter().find(|l| l.is_experts())
        {
            bail!(
                "lora.kind = \"dora\" with `{}` targeted: DoRA on the experts' stacks is not supported (nor in mlx-lm or peft); list attention and shared linears in lora.targets, or use kind = \"lora\"",
                experts.key(config.family)
            );
        }
        for (&linear, key) in linears.iter().zip(&keys) {
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

/// Adds a freshly initialised adapter to every targeted linear, its `A` drawn from a generator
/// seeded with `seed` (the same adapters on every backend and in every worker thread).
pub fn inject<B: ModelBackend>(
    decoder: &mut Decoder<B>,
    spec: &AdapterSpec,
    seed: u64,
    device: &B::Device,
) {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    for (path, linear) in decoder.linears_mut() {
        if spec.targets(&path) {
            linear.adapter = Some(LoraAdapter::init(
                &linear.weight,
                linear.experts,
                spec.rank,
                spec.scale,
                spec.dropout,
                spec.dora,
                &mut rng,
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
