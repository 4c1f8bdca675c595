//! The Hugging Face folder: every weight in one float type (`model.safetensors`, sharded past
//! 5 GB with an index as transformers does), `config.json`, tokenizer files, a model card, and
//! the adapters again as a PEFT folder (`adapter/`) for people who keep the base separate.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Result, bail};

use super::ExportOptions;
use super::fuse::{FusedModel, Survival};
use crate::io::safetensors_write::{PlannedTensor, index_json, write_shards};
use crate::lora::files::{PeftConfig, peft_config, safetensors_bytes};
use crate::lora::peft_layout::peft_layout;
use crate::lora::stored::HostAdapters;
use crate::model::names::per_expert_names;
use crate::tokenizer::Tokenizer;

const MAX_SHARD_BYTES: usize = 5_000_000_000;

pub fn write(
    model: &FusedModel,
    tokenizer: &Tokenizer,
    opts: &ExportOptions,
    dir: &Path,
) -> Result<(Survival, String)> {
    let dtype = opts.float_dtype(model.files);
    let c = &model.files.config;
    // Hugging Face checkpoints store an experts' stack one matrix per expert.
    let groups: Vec<Vec<PlannedTensor>> = model
        .specs
        .iter()
        .map(|s| match per_expert_names(&s.name, c) {
            Some(names) => names
                .iter()
                .map(|n| PlannedTensor::new(n, dtype.raw(), &s.shape[1..]))
                .collect(),
            None => vec![PlannedTensor::new(&s.name, dtype.raw(), &s.shape)],
        })
        .collect();
    let mut survival = Survival::default();
    let progress = model.progress();
    let produce = |i: usize| -> Result<Vec<Vec<u8>>> {
        progress.inc();
        let spec = &model.specs[i];
        let tensor = model.tensor(spec)?;
        let bytes = tensor.float_bytes(spec.module(), dtype, &mut survival);
        let parts = groups[i].len();
        Ok(bytes
            .chunks_exact(bytes.len() / parts)
            .map(<[u8]>::to_vec)
            .collect())
    };
    let written = write_shards(dir, &groups, MAX_SHARD_BYTES, &[("format", "pt")], produce)?;
    progress.finish();
    if written.files.len() > 1 {
        super::write_json(
            &dir.join("model.safetensors.index.json"),
            &index_json(&written, model.parameter_count()),
        )?;
    }
    let config = super::config_json::config_json(model.files, tokenizer, dtype);
    super::write_json(&dir.join("config.json"), &config)?;
    super::tokenizer_files::write(model.files, tokenizer, dir)?;
    if let Some(adapters) = model.adapters {
        write_peft(
            adapters,
            &model.files.path.display().to_string(),
            &dir.join("adapter"),
        )?;
    }
    let encoding = dtype.torch_name().to_string();
    let usage = format!(
        "from transformers import AutoModelForCausalLM, AutoTokenizer\nmodel = AutoModelForCausalLM.from_pretrained(\"{0}\")\ntokenizer = AutoTokenizer.from_pretrained(\"{0}\")",
        opts.out.display()
    );
    let card = super::card::model_card(model, "transformers", &encoding, &survival, &usage);
    std::fs::write(dir.join("README.md"), card)?;
    Ok((survival, encoding))
}

/// The adapters as peft saves them (`lora_A` `[r, in]` = Aᵀ, `lora_B` `[out, r]` = Bᵀ).
fn write_peft(adapters: &HostAdapters, base_model: &str, dir: &Path) -> Result<()> {
    let first = adapters
        .modules
        .values()
        .next()
        .expect("read() refuses empty folders");
    if adapters.modules.values().any(|a| a.scale != first.scale) {
        bail!(
            "{}: the adapters differ in scale between modules, which one peft config cannot describe",
            adapters.dir.display()
        );
    }
    // `r` is the smallest rank; larger ones (a fused linear's parts joined) go in rank_pattern.
    let rank = adapters
        .modules
        .values()
        .map(|a| a.rank)
        .min()
        .unwrap_or(first.rank);
    let layout = peft_layout(&adapters.modules);
    let layers: BTreeSet<usize> = adapters
        .modules
        .keys()
        .filter_map(|path| {
            path.strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors_bytes(&layout.tensors, &[("format", "pt")])?,
    )?;
    let config = peft_config(&PeftConfig {
        rank,
        scale: first.scale,
        dropout: 0.0,
        rslora: false,
        dora: adapters.dora,
        modules: layout.modules,
        parameters: layout.parameters,
        ranks: layout.ranks,
        layers: layers.into_iter().collect(),
        base_model: base_model.to_string(),
    });
    super::write_json(&dir.join("adapter_config.json"), &config)
}
