//! Tokenizer files for an exported folder: the base folder's own files copied, or, for a GGUF
//! base, `tokenizer.json` and `tokenizer_config.json` (with the chat template) written from the
//! tokenizer built out of its metadata.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};

use crate::model::ModelFiles;
use crate::tokenizer::Tokenizer;

/// Files a Hugging Face or mlx-community folder may carry besides its weights.
const COPIED: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

pub fn write(files: &ModelFiles, tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    if files.path.is_dir() {
        for name in COPIED.iter().chain(&["generation_config.json"]) {
            let src = files.path.join(name);
            if src.exists() {
                std::fs::copy(&src, dir.join(name))
                    .with_context(|| format!("copying {} into the export", src.display()))?;
            }
        }
        return ensure_chat_template(tokenizer, dir);
    }
    let json = tokenizer
        .inner
        .to_string(false)
        .map_err(|e| anyhow!("serialising the tokenizer: {e}"))?;
    std::fs::write(dir.join("tokenizer.json"), json)?;
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos,
        "eos_token": tokenizer.eos,
        "chat_template": tokenizer.chat_template,
        "clean_up_tokenization_spaces": false,
        "model_max_length": files.config.max_position_embeddings,
    });
    super::write_json(&dir.join("tokenizer_config.json"), &config)?;
    super::write_json(
        &dir.join("special_tokens_map.json"),
        &json!({"bos_token": tokenizer.bos, "eos_token": tokenizer.eos}),
    )?;
    let id = |t: &Option<String>| t.as_deref().and_then(|t| tokenizer.token_id(t));
    super::write_json(
        &dir.join("generation_config.json"),
        &json!({
            "bos_token_id": id(&tokenizer.bos),
            "eos_token_id": tokenizer.stop_ids,
        }),
    )
}

/// Puts the chat template into `tokenizer_config.json` when the base kept it elsewhere, so every
/// loader finds it.
fn ensure_chat_template(tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    let path = dir.join("tokenizer_config.json");
    let (Some(template), true) = (&tokenizer.chat_template, path.exists()) else {
        return Ok(());
    };
    if dir.join("chat_template.jinja").exists() {
        return Ok(());
    }
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    if config.get("chat_template").is_none()
        && let Some(map) = config.as_object_mut()
    {
        map.insert("chat_template".into(), json!(template));
        super::write_json(&path, &config)?;
    }
    Ok(())
}
