//! `loraforge generate`: text from a prompt, optionally through the chat template and with
//! adapters applied.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::backends::{BackendTask, DataParallel, DeviceMemory};
use crate::chat::{ChatTemplate, Message};
use crate::generate::{GenerationLimits, SamplingConfig, generate};
use crate::model::load_model;
use crate::ops::ModelBackend;
use crate::recipe::DeviceKind;

/// `loraforge generate`'s flags.
#[derive(Args)]
pub struct GenerateArgs {
    /// A Hugging Face folder, an mlx-community folder, or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// An adapter folder (mlx-lm layout: adapters.safetensors + adapter_config.json) to apply.
    #[arg(long)]
    adapters: Option<PathBuf>,
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
    /// Where to run: `auto` (the default) picks CUDA when a GPU answers, else the CPU.
    #[arg(long, value_enum, default_value_t = DeviceKind::Auto)]
    pub device: DeviceKind,
    /// Print the generated token ids after the text.
    #[arg(long)]
    print_ids: bool,
    /// Keep generating past end-of-sequence (fixed-length runs for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
    /// Print the statistics as one JSON line instead of the text report.
    #[arg(long)]
    json: bool,
}

impl BackendTask for GenerateArgs {
    type Output = ();

    fn run<B: ModelBackend + DeviceMemory + DataParallel>(self, device: B::Device) -> Result<()> {
        let mut model = load_model::<B>(&self.model, &device)?;
        if let Some(dir) = &self.adapters {
            crate::lora::files::attach(&mut model.decoder, dir, &device)?;
        }
        let tokenizer = crate::tokenizer::for_model(&model.files)?;
        let prompt_ids = if self.chat || self.system.is_some() {
            let template = ChatTemplate::from_tokenizer(&tokenizer)?;
            let mut messages = Vec::new();
            if let Some(system) = &self.system {
                messages.push(Message::new("system", system));
            }
            messages.push(Message::new("user", &self.prompt));
            let text = template.render(&messages, true, None)?;
            // The template already wrote BOS where the model wants it.
            tokenizer.encode(&text, false)?
        } else {
            tokenizer.encode(&self.prompt, true)?
        };
        let context = model.decoder.config.max_position_embeddings;
        if prompt_ids.len() + self.max_tokens > context {
            eprintln!(
                "warning: the prompt is {} tokens and --max-tokens {}, past the model's context of {context} tokens (max_position_embeddings); text past it is unreliable, so shorten the prompt or lower --max-tokens",
                prompt_ids.len(),
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
        };
        let echo = !self.json;
        if echo {
            println!("==========");
        }
        let mut stdout = std::io::stdout();
        let out = generate(
            &model.decoder,
            &tokenizer,
            &prompt_ids,
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
                "model": self.model,
                "device": format!("{:?}", self.device).to_lowercase(),
                "threads": rayon::current_num_threads(),
                "prompt_tokens": s.prompt_tokens,
                "prompt_tps": s.prompt_tps,
                "generation_tokens": s.generated_tokens,
                "generation_tps": s.generation_tps,
                "peak_memory_bytes": s.peak_memory_bytes,
                "ids": out.ids,
            });
            println!("{line}");
            return Ok(());
        }
        println!("\n==========");
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
