//! Records to token ids and a loss mask. Chat records go through the model's chat template,
//! exactly as transformers renders it; with `mask_prompt`, only assistant tokens are trained,
//! in every assistant turn. Each turn's span is found by rendering the conversation up to it:
//! tokens of `render(turns[..i], generation prompt)` are the prompt, tokens of
//! `render(turns[..=i])` end the answer.

use anyhow::{Context, Result, bail};

use super::records::Record;
use crate::chat::ChatTemplate;
use crate::tokenizer::Tokenizer;

/// One encoded example: `ids` and `trained[t]` (whether token `t` counts in the loss).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Token ids of the whole example.
    pub ids: Vec<u32>,
    /// Whether each token counts in the loss, one per id.
    pub trained: Vec<bool>,
}

/// Turns records into token ids and a loss mask for one model.
pub struct Encoder<'a> {
    /// The model's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The model's chat template; `None` when it has none or it fails to load (chat records are
    /// then an error).
    pub template: Option<ChatTemplate>,
    /// Train only on assistant turns of chat records; the rest of the tokens are masked out.
    pub mask_prompt: bool,
    /// Text past this many bytes is cut before tokenising (see [`Encoder::keeping`]).
    pub max_text_bytes: usize,
}

impl<'a> Encoder<'a> {
    /// An encoder for the tokenizer, with its chat template if it has a usable one.
    pub fn new(tokenizer: &'a Tokenizer, mask_prompt: bool) -> Self {
        Encoder {
            tokenizer,
            template: ChatTemplate::from_tokenizer(tokenizer).ok(),
            mask_prompt,
            max_text_bytes: usize::MAX,
        }
    }

    /// The encoder for examples that keep at most `max_tokens` tokens: text is cut before it is
    /// tokenised, at twice the bytes that `max_tokens + 1` of the longest tokens could span, so
    /// a 50 MB line costs what a 2048-token one does, and an example that is too long still
    /// comes out too long (it is truncated or dropped, and counted, as before).
    pub fn keeping(mut self, max_tokens: usize) -> Self {
        let span = max_tokens.saturating_add(1);
        self.max_text_bytes = span
            .saturating_mul(self.tokenizer.longest_token_bytes())
            .saturating_mul(2);
        self
    }

    /// `text` cut to at most `max_text_bytes`, at a character boundary.
    fn capped<'t>(&self, text: &'t str) -> &'t str {
        if text.len() <= self.max_text_bytes {
            return text;
        }
        let mut end = self.max_text_bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[..end]
    }

    /// Encodes one record: text with what the tokenizer adds (BOS) and EOS after it, chat
    /// through the template (with `mask_prompt`, only assistant turns are trained).
    pub fn encode(&self, record: &Record) -> Result<Encoded> {
        match record {
            Record::Text(text) => {
                let mut ids = self.tokenizer.encode(self.capped(text), true)?;
                ids.extend(
                    self.tokenizer
                        .eos
                        .as_deref()
                        .and_then(|e| self.tokenizer.token_id(e)),
                );
                let trained = vec![true; ids.len()];
                Ok(Encoded { ids, trained })
            }
            Record::Chat { messages, tools } => {
                let template = self.template.as_ref().context(
                    "chat records need a chat template, and this model has none; use {\"text\"} records instead",
                )?;
                let render_text = |n: usize, gen_prompt: bool| {
                    template.render(&messages[..n], gen_prompt, tools.as_ref())
                };
                let render = |n: usize, gen_prompt: bool| -> Result<Vec<u32>> {
                    let text = render_text(n, gen_prompt)?;
                    self.tokenizer.encode(self.capped(&text), false)
                };
                let full = render_text(messages.len(), false)?;
                // A conversation cut before its first answer is dropped later as untrained.
                let cut = full.len() > self.max_text_bytes;
                let ids = self.tokenizer.encode(self.capped(&full), false)?;
                if !self.mask_prompt {
                    let trained = vec![true; ids.len()];
                    return Ok(Encoded { ids, trained });
                }
                let mut trained = vec![false; ids.len()];
                for (i, m) in messages.iter().enumerate() {
                    if m.role != "assistant" {
                        continue;
                    }
                    let start = render(i, true)?.len();
                    let end = render(i + 1, false)?.len().min(ids.len());
                    if start > end && !cut {
                        bail!(
                            "the chat template renders assistant turn {i} before its prompt; cannot mask the prompt"
                        );
                    }
                    trained[start.min(end)..end]
                        .iter_mut()
                        .for_each(|t| *t = true);
                }
                if !trained.iter().any(|&t| t) && !cut {
                    bail!(
                        "no assistant turn to train on (mask_prompt = true needs at least one assistant message)"
                    );
                }
                Ok(Encoded { ids, trained })
            }
        }
    }
}
