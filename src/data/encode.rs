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
}

impl<'a> Encoder<'a> {
    /// An encoder for the tokenizer, with its chat template if it has a usable one.
    pub fn new(tokenizer: &'a Tokenizer, mask_prompt: bool) -> Self {
        Encoder {
            tokenizer,
            template: ChatTemplate::from_tokenizer(tokenizer).ok(),
            mask_prompt,
        }
    }

    /// Encodes one record: text with what the tokenizer adds (BOS) and EOS after it, chat
    /// through the template (with `mask_prompt`, only assistant turns are trained).
    pub fn encode(&self, record: &Record) -> Result<Encoded> {
        match record {
            Record::Text(text) => {
                let mut ids = self.tokenizer.encode(text, true)?;
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
                let render = |n: usize, gen_prompt: bool| -> Result<Vec<u32>> {
                    let text = template.render(&messages[..n], gen_prompt, tools.as_ref())?;
                    self.tokenizer.encode(&text, false)
                };
                let ids = render(messages.len(), false)?;
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
                    if start > end {
                        bail!(
                            "the chat template renders assistant turn {i} before its prompt; cannot mask the prompt"
                        );
                    }
                    trained[start..end].iter_mut().for_each(|t| *t = true);
                }
                if !trained.iter().any(|&t| t) {
                    bail!(
                        "no assistant turn to train on (mask_prompt = true needs at least one assistant message)"
                    );
                }
                Ok(Encoded { ids, trained })
            }
        }
    }
}
