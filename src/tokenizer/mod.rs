//! Tokenizers: `tokenizer.json` through the `tokenizers` crate, or the equivalent built from GGUF
//! metadata, together with the special tokens and chat template that come with them.

mod gguf;
mod hf;

use anyhow::{Result, anyhow};

pub use gguf::from_gguf;
pub(crate) use gguf::from_gguf_without_regexes;
pub use hf::from_folder;

/// Which algorithm the vocabulary uses, for `inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerKind {
    /// BPE over bytes mapped to printable characters, GPT-2 style (Llama 3, Qwen, SmolLM).
    ByteLevelBpe,
    /// BPE without a byte-level step, as SentencePiece writes it (Llama 2, Mistral).
    SentencePieceBpe,
    /// Any other model: the `model.type` the `tokenizers` crate reports (`Unigram`, `WordPiece`).
    Other(String),
}

impl std::fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenizerKind::ByteLevelBpe => f.write_str("byte-level BPE"),
            TokenizerKind::SentencePieceBpe => f.write_str("SentencePiece BPE"),
            TokenizerKind::Other(s) => f.write_str(s),
        }
    }
}

/// A tokenizer with the model's special tokens and chat template.
pub struct Tokenizer {
    /// The `tokenizers` tokenizer doing the work.
    pub inner: tokenizers::Tokenizer,
    /// Which algorithm the vocabulary uses.
    pub kind: TokenizerKind,
    /// The beginning-of-sequence token's text, if the model names one.
    pub bos: Option<String>,
    /// The end-of-sequence token's text, if the model names one.
    pub eos: Option<String>,
    /// Every id that ends generation (EOS plus e.g. `<|eot_id|>` from generation_config.json).
    pub stop_ids: Vec<u32>,
    /// The chat template (Jinja source), if the model ships one.
    pub chat_template: Option<String>,
    /// Where the chat template was read from, for errors.
    pub chat_template_origin: String,
}

impl Tokenizer {
    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The most bytes of text one token can stand for: the longest vocabulary entry's spelling
    /// (at least as long as the bytes it decodes to, in byte-level and SentencePiece vocabularies).
    pub fn longest_token_bytes(&self) -> usize {
        self.inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// Encodes text; `add_special` adds what the tokenizer's post-processor adds (e.g. BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| anyhow!("tokenizing failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding failed: {e}"))
    }

    /// The id of a token given as its text, added tokens included.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Special tokens listed for `inspect`: (role, text, id).
    pub fn special_tokens(&self) -> Vec<(&'static str, String, Option<u32>)> {
        let mut out = Vec::new();
        if let Some(b) = &self.bos {
            out.push(("bos", b.clone(), self.token_id(b)));
        }
        if let Some(e) = &self.eos {
            out.push(("eos", e.clone(), self.token_id(e)));
        }
        for &id in &self.stop_ids {
            let text = self.inner.id_to_token(id).unwrap_or_default();
            if Some(&text) != self.eos.as_ref() {
                out.push(("stop", text, Some(id)));
            }
        }
        out
    }
}

/// The tokenizer that belongs to a model: its folder's `tokenizer.json`, or its GGUF metadata.
/// Refused when it can produce an id past the model's embedding (an added token the embedding
/// lacks would otherwise stop training at the first batch that holds it, hours in).
pub fn for_model(files: &crate::model::ModelFiles) -> Result<Tokenizer> {
    let tokenizer = match &files.weights {
        crate::model::weights::WeightSource::Gguf(g) => from_gguf(g)?,
        crate::model::weights::WeightSource::Safetensors { .. } => from_folder(&files.path)?,
        crate::model::weights::WeightSource::Random { .. } => {
            anyhow::bail!("a model with random weights has no tokenizer")
        }
    };
    fits_embedding(&tokenizer, files)?;
    Ok(tokenizer)
}

/// Refuses a tokenizer that can produce an id past the model's embedding rows.
pub(crate) fn fits_embedding(
    tokenizer: &Tokenizer,
    files: &crate::model::ModelFiles,
) -> Result<()> {
    let rows = files.config.vocab_size;
    if let Some((token, id)) = tokenizer
        .inner
        .get_vocab(true)
        .into_iter()
        .max_by_key(|&(_, id)| id)
        .filter(|&(_, id)| id as usize >= rows)
    {
        anyhow::bail!(
            "{}: the tokenizer can produce id {id} ({token:?}), but the model's embedding has {rows} rows (vocab_size); use the tokenizer that came with the model, or resize the embedding",
            files.path.display()
        );
    }
    Ok(())
}
