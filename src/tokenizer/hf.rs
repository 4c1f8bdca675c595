//! `tokenizer.json` + `tokenizer_config.json` (+ `generation_config.json`) of a model folder.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use serde_json::Value;

use super::{Tokenizer, TokenizerKind};

/// Loads a model folder's tokenizer (`tokenizer.json`, or `vocab.json` + `merges.txt`) with its
/// special tokens, stop ids and chat template from the config files beside it.
pub fn from_folder(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    let inner =
        if !path.exists() && dir.join("vocab.json").exists() && dir.join("merges.txt").exists() {
            gpt2_from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt"))?
        } else {
            tokenizers::Tokenizer::from_file(&path)
                .map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?
        };
    let kind = kind_of(&inner);
    let config = read_json(&dir.join("tokenizer_config.json"))?;
    let token = |key: &str| -> Option<String> {
        let v = config.as_ref()?.get(key)?;
        v.as_str()
            .map(str::to_string)
            .or_else(|| v.get("content").and_then(Value::as_str).map(str::to_string))
    };
    let bos = token("bos_token");
    let eos = token("eos_token");
    let in_config = config
        .as_ref()
        .and_then(|c| c.get("chat_template"))
        .and_then(chat_template_from_json);
    let chat_template_origin = match in_config {
        Some(_) => dir.join("tokenizer_config.json"),
        None => dir.join("chat_template.jinja"),
    }
    .display()
    .to_string();
    let chat_template =
        in_config.or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
    let mut stop_ids: Vec<u32> = eos.iter().filter_map(|e| inner.token_to_id(e)).collect();
    if let Some(gen_config) = read_json(&dir.join("generation_config.json"))? {
        match gen_config.get("eos_token_id") {
            Some(Value::Array(ids)) => {
                stop_ids.extend(ids.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
            }
            Some(v) => stop_ids.extend(v.as_u64().map(|v| v as u32)),
            None => {}
        }
    }
    stop_ids.sort_unstable();
    stop_ids.dedup();
    Ok(Tokenizer {
        inner,
        kind,
        bos,
        eos,
        stop_ids,
        chat_template,
        chat_template_origin,
    })
}

/// `chat_template` is a string, or a list of `{name, template}` of which "default" is the one.
fn chat_template_from_json(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("{} is not valid JSON", path.display()))
}

fn kind_of(tok: &tokenizers::Tokenizer) -> TokenizerKind {
    let json = tok.to_string(false).unwrap_or_default();
    let v: Value = serde_json::from_str(&json).unwrap_or_default();
    let model = v
        .pointer("/model/type")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let byte_level = json.contains("\"ByteLevel\"");
    match model {
        "BPE" if byte_level => TokenizerKind::ByteLevelBpe,
        "BPE" => TokenizerKind::SentencePieceBpe,
        other => TokenizerKind::Other(other.to_string()),
    }
}

/// GPT-2's original format (`vocab.json` + `merges.txt`), which older folders ship instead of
/// `tokenizer.json`: byte-level BPE with the GPT-2 pre-tokenizer regex.
pub fn gpt2_from_vocab_merges(vocab: &Path, merges: &Path) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .build()
        .map_err(|e| {
            anyhow!(
                "cannot load {} / {}: {e}",
                vocab.display(),
                merges.display()
            )
        })?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let byte_level = ByteLevel::default().add_prefix_space(false);
    tok.with_pre_tokenizer(Some(byte_level))
        .with_decoder(Some(byte_level));
    Ok(tok)
}
