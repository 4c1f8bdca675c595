//! `loraforge generate`: text from a prompt, optionally through the chat template and with
//! adapters applied.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use clap::builder::TypedValueParser as _;

use crate::backends::{BackendTask, DataParallel, DeviceMemory};
use crate::chat::{ChatTemplate, Message};
use crate::generate::prompt_cache::{PromptCache, fingerprint};
use crate::generate::{GenerationLimits, Prompt, SamplingConfig, generate};
use crate::model::load_model;
use crate::ops::ModelBackend;
use crate::recipe::DeviceKind;

/// The model a command runs on: where it is, the adapters to apply, the device.
#[derive(Args)]
pub struct ModelArgs {
    /// A Hugging Face folder or name (`org/name`, from the hub cache), an mlx-community folder,
    /// or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// An adapter folder to apply (ours, `mlx_lm.lora`'s or peft's).
    #[arg(long)]
    adapters: Option<PathBuf>,
    /// Where to run: `auto` (the default) picks CUDA when a GPU answers, else the CPU.
    #[arg(long, value_enum, default_value_t = DeviceKind::Auto)]
    pub device: DeviceKind,
}

impl ModelArgs {
    /// The model on `device`, with the adapters applied.
    fn load<B: ModelBackend>(&self, device: &B::Device) -> Result<crate::model::LoadedModel<B>> {
        let mut model = load_model::<B>(&self.model, device)?;
        if let Some(dir) = &self.adapters {
            crate::lora::files::attach(&mut model.decoder, dir, device)?;
        }
        Ok(model)
    }
}

/// `loraforge generate`'s flags.
#[derive(Args)]
pub struct GenerateArgs {
    /// The model, its adapters and the device.
    #[command(flatten)]
    pub target: ModelArgs,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// System message (implies --chat).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the generated token ids after the text.
    #[arg(long)]
    print_ids: bool,
    /// Keep generating past end-of-sequence (fixed-length runs for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Print the statistics as one JSON line instead of the text report.
    #[arg(long)]
    json: bool,
    /// Each generated token's log-probability with its K likeliest alternatives, as JSON (in
    /// the --json line, else one line per token after the text), as mlx-lm's responses carry.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u16).range(0..=1000).map(usize::from))]
    logprobs: Option<usize>,
    /// Continue from a prompt cache made by `loraforge cache-prompt` with this model: only
    /// --prompt's tokens are computed, after the cached ones.
    #[arg(long, value_name = "FILE")]
    prompt_cache_file: Option<PathBuf>,
}

/// `loraforge cache-prompt`'s flags.
#[derive(Args)]
pub struct CachePromptArgs {
    /// The model (with its adapters: the cache belongs to the model with them).
    #[command(flatten)]
    pub target: ModelArgs,
    /// The prompt whose keys and values to keep.
    #[arg(long)]
    prompt: String,
    /// The cache file to write (safetensors).
    #[arg(long)]
    out: PathBuf,
}

impl BackendTask for CachePromptArgs {
    type Output = ();

    fn run<B: ModelBackend + DeviceMemory + DataParallel>(self, device: B::Device) -> Result<()> {
        let model = self.target.load::<B>(&device)?;
        let tokenizer = crate::tokenizer::for_model(&model.files)?;
        let ids = tokenizer.encode(&self.prompt, true)?;
        anyhow::ensure!(!ids.is_empty(), "the prompt is empty");
        let decoder = &model.decoder;
        let start = std::time::Instant::now();
        let mut cache = crate::model::KvCache::new(decoder.config.num_layers);
        decoder.next_logits(&ids, &mut cache, &device);
        let secs = start.elapsed().as_secs_f64();
        let name = self.target.model.display().to_string();
        PromptCache::capture(&cache, &ids, &name, fingerprint(decoder, &device))?
            .save(&self.out)?;
        println!(
            "Saved {} prompt tokens ({:.1} tokens-per-sec) to {}",
            ids.len(),
            ids.len() as f64 / secs.max(1e-9),
            self.out.display()
        );
        Ok(())
    }
}

/// The prompt's token ids: through the chat template as a user message when `chat` holds the
/// system message (or none), else the text with BOS where the tokenizer adds one, unless it
/// continues a prompt cache (`first` false).
fn encode_prompt(
    tokenizer: &crate::tokenizer::Tokenizer,
    prompt: &str,
    chat: Option<Option<&str>>,
    first: bool,
) -> Result<Vec<u32>> {
    let Some(system) = chat else {
        return tokenizer.encode(prompt, first);
    };
    let template = ChatTemplate::from_tokenizer(tokenizer)?;
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(Message::new("system", system));
    }
    messages.push(Message::new("user", prompt));
    let text = template.render(&messages, true, None)?;
    // The template already wrote BOS where the model wants it.
    tokenizer.encode(&text, false)
}

impl BackendTask for GenerateArgs {
    type Output = ();

    fn run<B: ModelBackend + DeviceMemory + DataParallel>(self, device: B::Device) -> Result<()> {
        let model = self.target.load::<B>(&device)?;
        let tokenizer = crate::tokenizer::for_model(&model.files)?;
        let cached = match &self.prompt_cache_file {
            Some(file) => {
                if self.chat || self.system.is_some() {
                    anyhow::bail!(
                        "--chat (or --system) with --prompt-cache-file is not supported yet (prompt caches hold plain prompts): drop --chat, or drop the cache"
                    );
                }
                let ours = fingerprint(&model.decoder, &device);
                Some(PromptCache::load(file, &model.decoder, &ours)?)
            }
            None => None,
        };
        let chat = self.chat || self.system.is_some();
        let prompt_ids = encode_prompt(
            &tokenizer,
            &self.prompt,
            chat.then_some(self.system.as_deref()),
            cached.is_none(),
        )?;
        let cached_ids = cached.as_ref().map_or(&[][..], |c| c.ids.as_slice());
        let context = model.decoder.config.max_position_embeddings;
        if cached_ids.len() + prompt_ids.len() + self.max_tokens > context {
            eprintln!(
                "warning: the prompt is {} tokens ({} of them cached) and --max-tokens {}, past the model's context of {context} tokens (max_position_embeddings); text past it is unreliable, so shorten the prompt or lower --max-tokens",
                cached_ids.len() + prompt_ids.len(),
                cached_ids.len(),
                self.max_tokens
            );
        }
        let sampling = SamplingConfig {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        };
        let limits = GenerationLimits {
            max_tokens: self.max_tokens,
            stop_at_eos: !self.ignore_eos,
            top_logprobs: self.logprobs,
        };
        let echo = !self.json;
        if echo {
            println!("==========");
        }
        let mut stdout = std::io::stdout();
        let prompt = Prompt {
            cache: cached.as_ref().map(|c| c.to_device(&device)),
            cached: cached_ids,
            ids: &prompt_ids,
        };
        let out = generate(
            &model.decoder,
            &tokenizer,
            prompt,
            limits,
            sampling,
            &device,
            |piece| {
                if echo {
                    let _ = stdout.write_all(piece.as_bytes());
                    let _ = stdout.flush();
                }
            },
        )?;
        let s = &out.stats;
        if self.json {
            let line = serde_json::json!({
                "bench": "loraforge_generate",
                "model": self.target.model,
                "device": format!("{:?}", self.target.device).to_lowercase(),
                "threads": rayon::current_num_threads(),
                "prompt_tokens": s.prompt_tokens,
                "prompt_tps": s.prompt_tps,
                "generation_tokens": s.generated_tokens,
                "generation_tps": s.generation_tps,
                "peak_memory_bytes": s.peak_memory_bytes,
                "ids": out.ids,
                "logprobs": self.logprobs.map(|_| logprob_lines(&out.logprobs, &tokenizer)).transpose()?,
            });
            println!("{line}");
            return Ok(());
        }
        println!("\n==========");
        if self.logprobs.is_some() {
            for line in logprob_lines(&out.logprobs, &tokenizer)? {
                println!("{line}");
            }
        }
        if self.print_ids {
            println!("ids: {:?}", out.ids);
        }
        println!(
            "Prompt: {} tokens, {:.3} tokens-per-sec",
            s.prompt_tokens, s.prompt_tps
        );
        println!(
            "Generation: {} tokens, {:.3} tokens-per-sec",
            s.generated_tokens, s.generation_tps
        );
        if let Some(peak) = s.peak_memory_bytes {
            println!("Peak memory: {:.3} GB", peak as f64 / 1e9);
        }
        Ok(())
    }
}

/// Each token's log-probabilities as JSON, its text and its alternatives' decoded as pieces.
fn logprob_lines(
    logprobs: &[crate::generate::TokenLogprobs],
    tokenizer: &crate::tokenizer::Tokenizer,
) -> Result<Vec<serde_json::Value>> {
    let entry = |id: u32, logprob: f32| -> Result<serde_json::Value> {
        Ok(serde_json::json!({"id": id, "token": tokenizer.decode(&[id])?, "logprob": logprob}))
    };
    logprobs
        .iter()
        .map(|t| {
            let mut line = entry(t.id, t.logprob)?;
            let top = t
                .top
                .iter()
                .map(|&(id, lp)| entry(id, lp))
                .collect::<Result<Vec<_>>>()?;
            line["top_logprobs"] = serde_json::Value::Array(top);
            Ok(line)
        })
        .collect()
}
