//! The recipe's held-out prompts (`[eval] prompts`, JSON lines with `prompt` and optionally
//! `expected` / `expected_contains`) and answering them with a model, the way `eval` and the
//! trainer's on-demand generations both do: chat template, then the recipe's seeded sampling,
//! all prompts in one batch.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::chat::{ChatTemplate, Message};
use crate::generate::batch::generate_batch;
use crate::generate::{GenerationLimits, SamplingConfig};
use crate::model::Decoder;
use crate::ops::ModelBackend;
use crate::recipe::EvalSection;
use crate::tokenizer::Tokenizer;

/// One held-out prompt, with what its answer is checked against.
#[derive(Debug, Clone, Deserialize)]
pub struct HeldOut {
    /// The question, sent as a single user turn.
    pub prompt: String,
    /// The whole answer expected (exact match after trimming).
    #[serde(default)]
    pub expected: Option<String>,
    /// Texts the answer must contain.
    #[serde(default)]
    pub expected_contains: Vec<String>,
}

/// Reads a held-out file; a bad line is named by number.
pub fn read(path: &Path) -> Result<Vec<HeldOut>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "{}:{}: expected {{\"prompt\": ..., \"expected_contains\"?: [...]}}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// Renders prompts through the chat template and generates with the recipe's settings.
pub struct Responder<'a> {
    tokenizer: &'a Tokenizer,
    template: ChatTemplate,
    limits: GenerationLimits,
    sampling: SamplingConfig,
}

impl<'a> Responder<'a> {
    /// A responder with the recipe's `[eval]` limit and sampling; errors when the model has no
    /// chat template.
    pub fn new(tokenizer: &'a Tokenizer, eval: &EvalSection) -> Result<Self> {
        Ok(Responder {
            tokenizer,
            template: ChatTemplate::from_tokenizer(tokenizer)?,
            limits: GenerationLimits {
                max_tokens: eval.max_tokens,
                stop_at_eos: true,
                top_logprobs: None,
                interrupt: None,
            },
            sampling: SamplingConfig {
                temperature: eval.temperature,
                top_p: eval.top_p,
                seed: eval.seed,
                ..Default::default()
            },
        })
    }

    /// The model's answers to `prompts`, each a single user turn, generated as one batch.
    pub fn answer_all<B: ModelBackend>(
        &self,
        model: &Decoder<B>,
        prompts: &[&str],
        device: &B::Device,
    ) -> Result<Vec<String>> {
        let ids = prompts
            .iter()
            .map(|p| {
                let text = self
                    .template
                    .render(&[Message::new("user", p)], true, None)?;
                self.tokenizer.encode(&text, false)
            })
            .collect::<Result<Vec<_>>>()?;
        let out = generate_batch(
            model,
            self.tokenizer,
            &ids,
            &self.limits,
            &self.sampling,
            None,
            device,
        )?;
        Ok(out.rows.into_iter().map(|r| r.text).collect())
    }
}
