//! A `tokenizers` tokenizer rebuilt from GGUF metadata so that it splits text as llama.cpp does.
//!
//! GGUF stores the BPE vocabulary and merges in GPT-2's byte-level form, plus a `pre` name that
//! selects llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp). Several regexes apply in
//! sequence, each splitting the pieces of the previous one with matches and gaps both kept:
//! exactly `Split(behavior = Isolated)`, followed by a byte-level mapping without its own regex.

use anyhow::{Result, anyhow, bail};
use serde_json::{Value as J, json};
use tokenizers::SplitDelimiterBehavior::Isolated;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};

use super::{Tokenizer, TokenizerKind};
use crate::io::gguf::{GgufFile, Value};

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's regex list for a `tokenizer.ggml.pre` value, and whether that type skips merges
/// for words already in the vocabulary (`ignore_merges`) and adds BOS by default.
fn pre_tokenizer(pre: &str) -> Option<(Vec<&'static str>, bool, bool)> {
    Some(match pre {
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" => {
            (vec![GPT2], false, false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => (vec![LLAMA3], true, true),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => (vec![QWEN2], false, false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2], false, false)
        }
        "default" | "" => (
            vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
            false,
            false,
        ),
        _ => return None,
    })
}

/// Builds a byte-level BPE tokenizer from a GGUF file's `tokenizer.ggml.*` metadata, with its
/// special tokens, stop ids, chat template and llama.cpp's pre-tokenizer regexes.
pub fn from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
    let (mut tokenizer, regexes) = from_gguf_without_regexes(gguf)?;
    let mut steps = Vec::with_capacity(regexes.len() + 1);
    for r in regexes {
        let split = Split::new(SplitPattern::Regex(r.to_string()), Isolated, false)
            .map_err(|e| anyhow!("compiling the pre-tokenizer regex {r:?}: {e}"))?;
        steps.push(PreTokenizerWrapper::Split(split));
    }
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, false, false,
    )));
    tokenizer
        .inner
        .with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(steps))));
    Ok(tokenizer)
}

/// Everything [`from_gguf`] reads from the file, without the pre-tokenizer: that is a fixed
/// regex list chosen by `tokenizer.ggml.pre` (returned), whose compilation takes most of the
/// time and reads nothing from the file (the GGUF fuzz target skips it).
pub(crate) fn from_gguf_without_regexes(gguf: &GgufFile) -> Result<(Tokenizer, Vec<&'static str>)> {
    let path = gguf.path.display();
    let model = gguf.get_str("tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        bail!(
            "{path}: tokenizer model \"{model}\" is not supported from GGUF metadata yet (supported: gpt2, i.e. byte-level BPE); use the model's Hugging Face folder with tokenizer.json instead"
        );
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        gguf.get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("{path}: metadata `{key}` is missing"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("{path}: `{key}` holds a non-string"))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types: Vec<u64> = gguf
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("default");
    let (regexes, ignore_merges, default_bos) = pre_tokenizer(pre).ok_or_else(|| {
        anyhow!("{path}: pre-tokenizer \"{pre}\" is not supported yet (supported: gpt-2, llama-bpe, qwen2, smollm, default)")
    })?;
    let flag = |key: &str| gguf.get(key).and_then(Value::as_bool);
    let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(default_bos);
    let token_of = |key: &str| {
        gguf.get_u64(key)
            .and_then(|id| tokens.get(id as usize))
            .cloned()
    };
    let bos = token_of("tokenizer.ggml.bos_token_id");
    let eos = token_of("tokenizer.ggml.eos_token_id");

    let vocab: serde_json::Map<String, J> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), json!(id)))
        .collect();
    // CONTROL (3) and UNKNOWN (2) tokens are special; USER_DEFINED (4) are split out of text too.
    let added: Vec<J> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, ty))| matches!(ty, 2..=4))
        .map(|(id, (t, ty))| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *ty != 4})
        })
        .collect();
    let post_processor = match (&bos, add_bos) {
        (Some(b), true) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b: {"id": b, "ids": [vocab[b.as_str()]], "tokens": [b]}}
        }),
        _ => J::Null,
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}
    });
    let inner: tokenizers::Tokenizer = spec
        .to_string()
        .parse()
        .map_err(|e| anyhow!("{path}: building the tokenizer from GGUF metadata failed: {e}"))?;
    let stop_ids = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
        .iter()
        .filter_map(|k| gguf.get_u64(k).map(|v| v as u32))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let tokenizer = Tokenizer {
        inner,
        kind: TokenizerKind::ByteLevelBpe,
        bos,
        eos,
        stop_ids,
        chat_template: gguf.get_str("tokenizer.chat_template").map(str::to_string),
        chat_template_origin: format!("{path} (tokenizer.chat_template)"),
    };
    Ok((tokenizer, regexes))
}
