//! Generations on demand during training (the dashboard's `e`): the first few held-out prompts
//! answered by the base model and by the adapters as they are now. The base's answers do not
//! change, so they are generated once.

use std::path::Path;

use anyhow::Result;

use crate::events::GenerationRow;
use crate::generate::held_out::Responder;
use crate::model::Decoder;
use crate::ops::ModelBackend;
use crate::recipe::EvalSection;
use crate::tokenizer::Tokenizer;

/// How many prompts a request answers: enough to see the change, few enough to keep the pause
/// in training short.
const PROMPTS: usize = 4;

pub struct HeldOutGenerations {
    prompts: Vec<String>,
    base_answers: Option<Vec<String>>,
}

impl HeldOutGenerations {
    pub fn read(path: &Path) -> Result<Self> {
        let prompts = crate::generate::held_out::read(path)?
            .into_iter()
            .take(PROMPTS)
            .map(|h| h.prompt)
            .collect();
        Ok(HeldOutGenerations {
            prompts,
            base_answers: None,
        })
    }

    fn questions(&self) -> Vec<&str> {
        self.prompts.iter().map(String::as_str).collect()
    }

    /// Answers from the base (first time only) and from `model`, which carries the adapters.
    pub fn generate<B: ModelBackend>(
        &mut self,
        model: &Decoder<B>,
        tokenizer: &Tokenizer,
        eval: &EvalSection,
        device: &B::Device,
    ) -> Result<Vec<GenerationRow>> {
        let responder = Responder::new(tokenizer, eval)?;
        if self.base_answers.is_none() {
            let mut base = model.clone();
            for (_, linear) in base.linears_mut() {
                linear.adapter = None;
            }
            self.base_answers = Some(responder.answer_all(&base, &self.questions(), device)?);
        }
        let base = self.base_answers.as_ref().expect("filled above");
        let tuned = responder.answer_all(model, &self.questions(), device)?;
        Ok(self
            .prompts
            .iter()
            .zip(base)
            .zip(tuned)
            .map(|((prompt, base), tuned)| GenerationRow {
                prompt: prompt.clone(),
                base: base.clone(),
                tuned,
            })
            .collect())
    }
}
