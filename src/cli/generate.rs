//! `loraforge generate`: text from a prompt, optionally through the chat template and with
//! adapters applied.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use clap::builder::TypedValueParser as _;

use crate::backends::{BackendTask, DataParallel, DeviceMemory};
use crate::chat::{ChatTemplate, Message};
use crate::generate::batch::generate_batch;
use crate::generate::conversation::rewind_to_prefix;
use crate::generate::prompt_cache::{PromptCache, fingerprint};
use crate::generate::speculative::{check_vocabulary, generate_speculative};
use crate::generate::{GenerationLimits, Prompt, SamplingConfig, generate};
use crate::model::load::{BaseStorage, load_model_quantized};
use crate::model::{Bound, KvCache};
use crate::ops::ModelBackend;
use crate::recipe::{DeviceKind, Dtype};

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
    /// How dense weights are held: `auto` (the default) in bf16 on CUDA (a model's usual
    /// dtype; half the bytes a token reads) and f32 elsewhere; `f32` widens them on CUDA too.
    #[arg(long, value_enum, default_value_t = Dtype::Auto)]
    pub dtype: Dtype,
}

impl ModelArgs {
    /// How this command holds a base model's weights on its (resolved) device.
    pub fn storage(&self) -> Result<BaseStorage> {
        BaseStorage::for_device(self.dtype, None, self.device).map_err(|_| {
            let name = |v: &dyn std::fmt::Debug| format!("{v:?}").to_lowercase();
            let (dtype, device) = (name(&self.dtype), name(&self.device));
            anyhow::anyhow!(
                "--dtype {dtype} on --device {device}: the CPU computes in f32, CUDA in f32 or bf16, Metal and Vulkan in f32, bf16 or f16 (where the device has it); leave --dtype at auto or pick another"
            )
        })
    }

    /// The model on `device`, with the adapters applied.
    pub fn load<B: ModelBackend>(
        &self,
        device: &B::Device,
    ) -> Result<crate::model::LoadedModel<B>> {
        let mut model = load_model_quantized::<B>(&self.model, device, self.storage()?)?;
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
    /// The prompt.
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    prompt: Option<String>,
    /// Many prompts at once: a JSON-lines file of `{"prompt": ...}` or `{"messages": [...]}`;
    /// writes one JSON line per prompt, in the file's order.
    #[arg(long, value_name = "FILE.jsonl", conflicts_with = "prompt_cache_file")]
    prompts: Option<PathBuf>,
    /// Prompts generated together with --prompts.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    batch_size: usize,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// System message (implies --chat).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// How tokens are picked.
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print the generated token ids after the text.
    #[arg(long)]
    print_ids: bool,
    /// Keep generating past end-of-sequence (fixed-length runs for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Print the statistics as one JSON line instead of the text report.
    #[arg(long)]
    json: bool,
    /// Run the prompt and one step once before timing, so one-off costs (kernel compilation,
    /// the memory pool's first allocations) stay out of the figures, as benchmarks want.
    #[arg(long)]
    warmup: bool,
    /// Each generated token's log-probability with its K likeliest alternatives, as JSON (in
    /// the --json line, else one line per token after the text), as mlx-lm's responses carry.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u16).range(0..=1000).map(usize::from))]
    logprobs: Option<usize>,
    /// Continue from a prompt cache made by `loraforge cache-prompt` with this model: only
    /// --prompt's tokens are computed, after the cached ones.
    #[arg(long, value_name = "FILE")]
    prompt_cache_file: Option<PathBuf>,
    /// The KV cache's bound.
    #[command(flatten)]
    kv: KvArgs,
    /// A smaller model of the same tokenizer that drafts tokens for the model to check
    /// (speculative decoding; greedy output is unchanged).
    #[arg(long, value_name = "MODEL", conflicts_with_all = ["prompts", "prompt_cache_file"])]
    draft_model: Option<PathBuf>,
    /// Tokens the draft proposes a step.
    #[arg(long, value_name = "K", default_value_t = 3, requires = "draft_model", value_parser = clap::value_parser!(u16).range(1..=64).map(usize::from))]
    num_draft_tokens: usize,
}

/// How tokens are picked (greedy by default).
#[derive(Args)]
pub struct SamplingArgs {
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
}

impl SamplingArgs {
    /// The sampler's settings.
    pub fn config(&self) -> SamplingConfig {
        SamplingConfig {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }
}

/// A bound on the KV cache (mlx-lm's `--max-kv-size`).
#[derive(Args)]
pub struct KvArgs {
    /// Bound the KV cache to N positions (mlx-lm's rotating cache): the first --keep and the
    /// most recent are kept, so generation of any length runs in constant memory.
    #[arg(long, value_name = "N")]
    max_kv_size: Option<usize>,
    /// Positions at the start that a bounded cache always keeps (attention sinks).
    #[arg(long, value_name = "N", default_value_t = 4, requires = "max_kv_size")]
    keep: usize,
}

impl KvArgs {
    /// The bound, checked; `None` when unbounded.
    pub fn bound(&self) -> Result<Option<Bound>> {
        self.max_kv_size
            .map(|max| Bound::new(max, self.keep))
            .transpose()
    }
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
        let mut cache = crate::model::KvCache::new(&decoder.config, None);
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
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(Message::new("system", system));
    }
    messages.push(Message::new("user", prompt));
    encode_messages(tokenizer, &messages)
}

/// A conversation's token ids through the chat template, with the assistant's turn opened.
fn encode_messages(
    tokenizer: &crate::tokenizer::Tokenizer,
    messages: &[Message],
) -> Result<Vec<u32>> {
    let text = ChatTemplate::from_tokenizer(tokenizer)?.render(messages, true, None)?;
    // The template already wrote BOS where the model wants it.
    tokenizer.encode(&text, false)
}

impl BackendTask for GenerateArgs {
    type Output = ();

    fn run<B: ModelBackend + DeviceMemory + DataParallel>(self, device: B::Device) -> Result<()> {
        let bound = self.kv.bound()?;
        let model = self.target.load::<B>(&device)?;
        let tokenizer = crate::tokenizer::for_model(&model.files)?;
        if let Some(path) = &self.prompts {
            return self.run_batch(path, &model.decoder, &tokenizer, bound, &device);
        }
        let prompt = self
            .prompt
            .as_deref()
            .expect("clap requires --prompt or --prompts");
        let cached = match &self.prompt_cache_file {
            Some(file) => {
                let ours = fingerprint(&model.decoder, &device);
                Some(PromptCache::load(file, &model.decoder, &ours)?)
            }
            None => None,
        };
        let chat = self.chat || self.system.is_some();
        let prompt_ids = encode_prompt(
            &tokenizer,
            prompt,
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
        let (sampling, limits) = (self.sampling.config(), self.limits());
        if self.warmup {
            // Two tokens through the path the timed run takes, whatever they are: the decode
            // session, where the backend has one, compiles its kernels when it opens and
            // captures its step at the first.
            let short = GenerationLimits {
                max_tokens: 2,
                stop_at_eos: false,
                top_logprobs: None,
                ..limits.clone()
            };
            let mut scratch = KvCache::new(&model.decoder.config, bound);
            let prompt = Prompt {
                cache: Some(&mut scratch),
                cached: &[],
                ids: &prompt_ids,
            };
            generate(
                &model.decoder,
                &tokenizer,
                prompt,
                short,
                sampling.clone(),
                &device,
                |_| {},
            )?;
        }
        let echo = !self.json;
        if echo {
            println!("==========");
        }
        let mut stdout = std::io::stdout();
        let mut cache = match &cached {
            Some(c) => c.to_device(&model.decoder.config, bound, &device),
            None => KvCache::new(&model.decoder.config, bound),
        };
        // Through the chat template the prompt is whole (its system turn may be what the cache
        // holds): the cache keeps the prefix they share. A plain prompt continues the cache.
        let (cached_ids, prompt_ids) = match chat && !cached_ids.is_empty() {
            true => {
                let reuse = rewind_to_prefix(&mut cache, cached_ids, &prompt_ids);
                (&prompt_ids[..reuse], &prompt_ids[reuse..])
            }
            false => (cached_ids, &prompt_ids[..]),
        };
        let on_text = |piece: &str| {
            if echo {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
        };
        let (out, acceptance) = match &self.draft_model {
            Some(path) => {
                let draft = load_model_quantized::<B>(path, &device, self.target.storage()?)?;
                let draft_tokenizer = crate::tokenizer::for_model(&draft.files)?;
                check_vocabulary(&tokenizer, &draft_tokenizer)
                    .with_context(|| format!("draft model {}", path.display()))?;
                let caches = [cache, KvCache::new(&draft.decoder.config, bound)];
                let (out, acceptance) = generate_speculative(
                    &model.decoder,
                    &draft.decoder,
                    &tokenizer,
                    prompt_ids,
                    caches,
                    self.num_draft_tokens,
                    &limits,
                    &sampling,
                    &device,
                    on_text,
                )?;
                (out, Some(acceptance))
            }
            None => {
                let out = generate(
                    &model.decoder,
                    &tokenizer,
                    Prompt {
                        cache: Some(&mut cache),
                        cached: cached_ids,
                        ids: prompt_ids,
                    },
                    limits,
                    sampling,
                    &device,
                    on_text,
                )?;
                (out, None)
            }
        };
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
                "draft_tokens": acceptance.map(|a| a.drafted),
                "draft_accepted": acceptance.map(|a| a.accepted),
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
        if let Some(a) = acceptance {
            println!(
                "Speculative: {} of {} drafted tokens accepted ({:.1}%)",
                a.accepted,
                a.drafted,
                100.0 * a.rate()
            );
        }
        if let Some(peak) = s.peak_memory_bytes {
            println!("Peak memory: {:.3} GB", peak as f64 / 1e9);
        }
        Ok(())
    }
}

impl GenerateArgs {
    fn limits(&self) -> GenerationLimits {
        GenerationLimits {
            max_tokens: self.max_tokens,
            stop_at_eos: !self.ignore_eos,
            top_logprobs: self.logprobs,
            interrupt: None,
        }
    }

    /// `--prompts`: the file's prompts `--batch-size` at a time, one JSON line each on stdout
    /// as each batch ends, the throughput on stderr.
    fn run_batch<B: ModelBackend>(
        &self,
        path: &std::path::Path,
        model: &crate::model::Decoder<B>,
        tokenizer: &crate::tokenizer::Tokenizer,
        bound: Option<Bound>,
        device: &B::Device,
    ) -> Result<()> {
        let lines = crate::generate::prompts_file::read(path)?;
        let chat = (self.chat || self.system.is_some()).then_some(self.system.as_deref());
        let prompts = lines
            .iter()
            .enumerate()
            .map(|(i, line)| {
                match (&line.prompt, &line.messages) {
                    (Some(p), _) => encode_prompt(tokenizer, p, chat, true),
                    (None, Some(m)) => encode_messages(tokenizer, m),
                    (None, None) => unreachable!("read refuses such lines"),
                }
                .with_context(|| format!("{}: prompt {}", path.display(), i + 1))
            })
            .collect::<Result<Vec<_>>>()?;
        let (limits, sampling) = (self.limits(), self.sampling.config());
        if self.warmup {
            let short = GenerationLimits {
                max_tokens: 2,
                ..limits.clone()
            };
            let batch = &prompts[..self.batch_size.min(prompts.len())];
            generate_batch(model, tokenizer, batch, &short, &sampling, bound, device)?;
        }
        let mut stdout = std::io::stdout().lock();
        let (mut prompt_tokens, mut generated, mut prompt_secs, mut gen_secs) = (0, 0, 0.0, 0.0);
        for (first, batch) in (0..)
            .step_by(self.batch_size)
            .zip(prompts.chunks(self.batch_size))
        {
            let out = generate_batch(model, tokenizer, batch, &limits, &sampling, bound, device)?;
            for (i, row) in out.rows.iter().enumerate() {
                let index = first + i;
                let mut line = serde_json::json!({
                    "index": index,
                    "text": row.text,
                    "ids": row.ids,
                    "finish_reason": row.finish,
                    "prompt_tokens": batch[i].len(),
                    "generation_tokens": row.ids.len(),
                });
                if let Some(prompt) = &lines[index].prompt {
                    line["prompt"] = prompt.as_str().into();
                }
                if let Some(messages) = &lines[index].messages {
                    line["messages"] = serde_json::to_value(messages)?;
                }
                if self.logprobs.is_some() {
                    line["logprobs"] = logprob_lines(&row.logprobs, tokenizer)?.into();
                }
                writeln!(stdout, "{line}")?;
            }
            stdout.flush()?;
            let s = &out.stats;
            prompt_tokens += s.prompt_tokens;
            generated += s.generated_tokens;
            let secs = |tokens: usize, tps: f64| {
                if tokens == 0 {
                    0.0
                } else {
                    tokens as f64 / tps
                }
            };
            prompt_secs += secs(s.prompt_tokens, s.prompt_tps);
            gen_secs += secs(s.generated_tokens, s.generation_tps);
        }
        eprintln!(
            "Batch: {} prompts, {} at a time; prompt: {prompt_tokens} tokens, {:.3} tokens-per-sec; generation: {generated} tokens, {:.3} tokens-per-sec",
            prompts.len(),
            self.batch_size,
            prompt_tokens as f64 / prompt_secs.max(1e-9),
            generated as f64 / gen_secs.max(1e-9)
        );
        if let Some(peak) = crate::backends::peak_rss_bytes() {
            eprintln!("Peak memory: {:.3} GB", peak as f64 / 1e9);
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
