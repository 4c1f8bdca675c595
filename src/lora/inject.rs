//! Which linears get an adapter: keys relative to a block, and which blocks (mlx-lm's meaning of
//! `num_layers`: the last N; -1 for all), or an explicit list.
//!
//! Where a family fuses projections (Phi-3's `qkv_proj`, `gate_up_proj`), the fused key adapts
//! the whole linear, as peft's and mlx-lm's Phi-3 adapters do, and a part's key
//! (`self_attn.q_proj`) adapts that part's rows alone: the fused linear is split into its parts
//! in the adapted blocks ([`Projections::split`]), and files hold the parts' adapters joined into
//! one on the fused linear (`fused_parts`), which mlx-lm and peft load.

use anyhow::{Result, bail};

use crate::model::Decoder;
use crate::model::LoraAdapter;
use crate::model::config::{Family, ModelConfig};
use crate::model::names::BlockLinear;
use crate::model::projections::Projections;
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
        let targetable = BlockLinear::targetable(config.family);
        let named: Vec<BlockLinear> = match &lora.targets {
            Targets::Named(_) => family_linears.to_vec(),
            Targets::Keys(keys) => keys
                .iter()
                .map(|key| {
                    let linear =
                        BlockLinear::from_key(key, config.family).filter(|l| targetable.contains(l));
                    linear.ok_or_else(|| {
                        anyhow::anyhow!(
                            "lora.targets: unknown key `{key}`; valid keys for {} are {} (or \"all-linear\")",
                            config.family.name(),
                            targetable
                                .iter()
                                .map(|l| l.key(config.family))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })
                })
                .collect::<Result<_>>()?,
        };
        let mut linears: Vec<BlockLinear> = Vec::new();
        for linear in named {
            if !linears.contains(&linear) {
                linears.push(linear);
            }
        }
        // A part of a fused linear (Phi-3's `q_proj` of `qkv_proj`) is adapted on its own rows;
        // the fused linear and a part of it cannot both be.
        for part in &linears {
            let Some(fused) = part.fused_in(config.family) else {
                continue;
            };
            if linears.contains(&fused) {
                bail!(
                    "lora.targets: `{}` and `{}` overlap (`{}` is part of it): list the fused linear or its parts, not both",
                    fused.key(config.family),
                    part.key(config.family),
                    part.key(config.family)
                );
            }
            if lora.kind == AdapterKind::Dora {
                bail!(
                    "lora.kind = \"dora\" on `{}`, a part of {}'s fused `{}`: DoRA's magnitudes cannot be written on a part for mlx-lm or peft; target `{}` itself, or use kind = \"lora\"",
                    part.key(config.family),
                    config.family.name(),
                    fused.key(config.family),
                    fused.key(config.family),
                );
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
    split_adapted_parts(decoder, spec);
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

/// Splits the fused linears one of whose parts `spec` adapts into their parts, in the blocks it
/// adapts (see [`Projections::split`]).
fn split_adapted_parts<B: ModelBackend>(decoder: &mut Decoder<B>, spec: &AdapterSpec) {
    let family = decoder.config.family;
    let adapts_a_part = |p: &Projections<B>| match p {
        Projections::Fused { name, .. } => name
            .parts()
            .iter()
            .any(|part| spec.keys.iter().any(|k| k == part.key(family))),
        Projections::Split(_) => false,
    };
    for &i in &spec.layers {
        for projections in decoder.layers[i].projections_mut() {
            if adapts_a_part(projections) {
                let fused = std::mem::replace(projections, Projections::Split(Vec::new()));
                *projections = fused.split();
            }
        }
    }
}

impl AdapterSpec {
    /// `keys` as files record them: a fused linear's key in place of its parts' (mlx-lm's and
    /// transformers' models have only the fused linear; see `fused_parts`).
    pub fn file_keys(&self, family: Family) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for key in &self.keys {
            let key = BlockLinear::from_key(key, family)
                .and_then(|l| l.fused_in(family))
                .map_or(key.as_str(), |f| f.key(family));
            if !out.iter().any(|k| k == key) {
                out.push(key.to_string());
            }
        }
        out
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn phi3() -> ModelConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/phi3/config.json");
        ModelConfig::from_config_json(&path).unwrap()
    }

    fn spec(keys: &[&str], kind: AdapterKind) -> Result<AdapterSpec> {
        let lora = LoraSection {
            kind,
            rank: 4,
            targets: Targets::Keys(keys.iter().map(|k| k.to_string()).collect()),
            ..Default::default()
        };
        AdapterSpec::from_recipe(&lora, &phi3())
    }

    /// On Phi-3 a part's key adapts the part (the files name the fused linear); a fused key with
    /// one of its parts, and DoRA on a part, are refused by name; an unknown key lists the parts.
    #[test]
    fn parts_of_a_fused_linear_are_targets_of_their_own() {
        let s = spec(
            &["self_attn.q_proj", "self_attn.v_proj", "mlp.gate_up_proj"],
            AdapterKind::Lora,
        )
        .unwrap();
        assert_eq!(
            s.keys,
            ["self_attn.q_proj", "self_attn.v_proj", "mlp.gate_up_proj"]
        );
        assert_eq!(
            s.file_keys(Family::Phi3),
            ["self_attn.qkv_proj", "mlp.gate_up_proj"]
        );
        let overlap = spec(
            &["self_attn.qkv_proj", "self_attn.k_proj"],
            AdapterKind::Lora,
        )
        .unwrap_err()
        .to_string();
        assert!(
            overlap.contains("`self_attn.qkv_proj` and `self_attn.k_proj` overlap"),
            "{overlap}"
        );
        let dora = spec(&["mlp.up_proj"], AdapterKind::Dora)
            .unwrap_err()
            .to_string();
        assert!(dora.contains("target `mlp.gate_up_proj` itself"), "{dora}");
        assert!(spec(&["mlp.gate_up_proj"], AdapterKind::Dora).is_ok());
        let unknown = spec(&["self_attn.qkv"], AdapterKind::Lora)
            .unwrap_err()
            .to_string();
        assert!(
            unknown.contains("self_attn.qkv_proj, self_attn.q_proj, self_attn.k_proj"),
            "{unknown}"
        );
    }
}
