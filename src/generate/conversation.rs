//! A conversation over one KV cache (`loraforge chat`): each turn renders the whole
//! conversation through the chat template, as transformers and chat servers do, and runs only
//! the tokens past the longest prefix the cache already holds, so a turn costs its new tokens.
//! (mlx-lm's chat renders only the newest message and appends it to its cache: the model never
//! sees the end-of-turn marker after its own answers, and the system prompt comes again each
//! turn.)

use std::path::Path;

use anyhow::{Context, Result};

use super::{Generation, GenerationLimits, Prompt, SamplingConfig, generate};
use crate::chat::{ChatTemplate, Message};
use crate::io::atomic;
use crate::model::{Decoder, KvCache};
use crate::ops::frozen_linear::ModelBackend;
use crate::tokenizer::Tokenizer;

/// What one turn ran and produced.
pub struct Turn {
    /// The whole conversation's prompt, ending with the assistant's turn opened.
    pub prompt_ids: Vec<u32>,
    /// The answer.
    pub generation: Generation,
}

/// The messages so far and the cache holding their tokens.
pub struct Conversation<'m, B: ModelBackend> {
    model: &'m Decoder<B>,
    tokenizer: &'m Tokenizer,
    template: ChatTemplate,
    system: Option<String>,
    messages: Vec<Message>,
    cache: KvCache<B>,
    /// The tokens the cache holds, oldest first.
    held: Vec<u32>,
}

impl<'m, B: ModelBackend> Conversation<'m, B> {
    /// A conversation with `model`, through its chat template, opened by `system` when given,
    /// over `cache` holding `held` (empty, or a prompt cache's).
    pub fn new(
        model: &'m Decoder<B>,
        tokenizer: &'m Tokenizer,
        system: Option<String>,
        cache: KvCache<B>,
        held: Vec<u32>,
    ) -> Result<Self> {
        Ok(Conversation {
            model,
            tokenizer,
            template: ChatTemplate::from_tokenizer(tokenizer)?,
            system,
            messages: Vec::new(),
            cache,
            held,
        })
    }

    /// The messages so far, the system message first when there is one.
    pub fn messages(&self) -> Vec<Message> {
        let system = self.system.iter().map(|s| Message::new("system", s));
        system.chain(self.messages.iter().cloned()).collect()
    }

    /// Forgets every message but the system message (the cache keeps its tokens until a turn
    /// renders something else).
    pub fn reset(&mut self) {
        self.messages.clear();
    }

    /// Sets (or clears) the system message and starts over.
    pub fn set_system(&mut self, system: Option<String>) {
        self.system = system;
        self.reset();
    }

    /// The model's answer to `user`, streamed to `on_text`; the answer joins the conversation
    /// (as far as it got, when interrupted).
    pub fn say(
        &mut self,
        user: &str,
        limits: &GenerationLimits,
        sampling: &SamplingConfig,
        device: &B::Device,
        on_text: impl FnMut(&str),
    ) -> Result<Turn> {
        let mut messages = self.messages();
        messages.push(Message::new("user", user));
        let text = self.template.render(&messages, true, None)?;
        // The template writes BOS where the model wants it.
        let prompt_ids = self.tokenizer.encode(&text, false)?;
        let reuse = rewind_to_prefix(&mut self.cache, &self.held, &prompt_ids);
        let generation = generate(
            self.model,
            self.tokenizer,
            Prompt {
                cache: Some(&mut self.cache),
                cached: &prompt_ids[..reuse],
                ids: &prompt_ids[reuse..],
            },
            limits.clone(),
            sampling.clone(),
            device,
            on_text,
        );
        let generation = match generation {
            Ok(generation) => generation,
            Err(e) => {
                // What the cache holds after a failed turn is unknown: the next starts over.
                self.cache = self.cache.emptied();
                self.held.clear();
                return Err(e);
            }
        };
        let context = [&prompt_ids[..], &generation.ids].concat();
        self.held = context[..self.cache.len().min(context.len())].to_vec();
        self.messages.push(Message::new("user", user));
        self.messages
            .push(Message::new("assistant", &generation.text));
        Ok(Turn {
            prompt_ids,
            generation,
        })
    }

    /// Writes the messages so far to `path` as JSON (`{"messages": [...]}`), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(&serde_json::json!({ "messages": self.messages() }))?;
        atomic::write(path, &json).with_context(|| format!("writing {}", path.display()))
    }
}

/// Rewinds `cache`, which holds `held`, to the longest prefix it shares with `ids` (leaving at
/// least one of `ids` to run) and returns that prefix's length. Keys a bound dropped cannot come
/// back, so such a cache starts over rather than continue from what it lacks.
pub fn rewind_to_prefix<B: ModelBackend>(
    cache: &mut KvCache<B>,
    held: &[u32],
    ids: &[u32],
) -> usize {
    let same = held
        .iter()
        .zip(ids)
        .take_while(|(a, b)| a == b)
        .count()
        .min(ids.len().saturating_sub(1));
    if same == held.len() {
        return same;
    }
    if cache.holds_everything() {
        cache.rewind(held.len() - same);
        return same;
    }
    *cache = cache.emptied();
    0
}
