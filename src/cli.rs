//! The command line. Each subcommand parses its arguments and hands off to the library.

use std::io::Write;
use std::path::PathBuf;

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use burn::backend::Autodiff;

use clap::{Args, Parser, Subcommand};

use crate::backend::{BackendTask, DeviceKind, run_on};
use crate::chat::{ChatTemplate, Message};
use crate::dashboard::Dashboard;
use crate::events::{Event, plain_line};
use crate::generate::{GenerationLimits, SamplingConfig, generate};
use crate::model::frozen_op::FrozenLinearBackend;
use crate::model::load_model;
use crate::sinks::{MetricsFile, TensorBoard};
use crate::train::run::Controls;

#[derive(Parser)]
#[command(
    name = "loraforge",
    version,
    about = "LoRA / QLoRA fine-tuning for open LLMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's architecture, size, dtype, quantization and tokenizer.
    Inspect {
        /// A Hugging Face folder, an mlx-community folder, or a .gguf file.
        path: PathBuf,
    },
    /// Generate text from a prompt.
    Generate(GenerateArgs),
    /// Train the LoRA / DoRA adapters a recipe describes.
    Train(TrainArgs),
    /// Generate on the recipe's held-out prompts with the base and the fine-tuned model.
    Eval {
        recipe: PathBuf,
        /// Adapter folder; defaults to the run's `adapters/`.
        #[arg(long)]
        adapters: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Work with recipes.
    Recipe {
        #[command(subcommand)]
        command: RecipeCommand,
    },
    /// Look at a recipe's data as training will see it.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Timed LoRA training steps on a random model of a known shape; prints one JSON line with
    /// the fields of bench/peft_lora_bench.py.
    Train {
        #[command(flatten)]
        args: crate::bench::BenchTrainArgs,
        #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
        device: DeviceKind,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Counts, token-length percentiles, truncation, padding waste, and a sample with its mask.
    Report {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
}

#[derive(Subcommand)]
enum RecipeCommand {
    /// Validate a recipe and print it fully resolved (defaults filled in).
    Check {
        file: PathBuf,
        /// Override a key, e.g. --set train.learning_rate=2e-4 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
}

#[derive(Args)]
struct TrainArgs {
    recipe: PathBuf,
    /// Print plain progress lines instead of the dashboard (also when not a terminal or CI=true).
    #[arg(long)]
    no_tui: bool,
    /// Continue from the run's last checkpoint (or from the given run / checkpoint folder).
    #[arg(long, num_args = 0..=1, value_name = "DIR")]
    resume: Option<Option<PathBuf>>,
    /// Override a recipe key, e.g. --set train.iters=50 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

#[derive(Args)]
struct GenerateArgs {
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
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    device: DeviceKind,
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

pub fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Inspect { path } => {
            print!("{}", crate::inspect::report(&path)?);
            Ok(())
        }
        Command::Generate(args) => {
            let device = args.device;
            run_on(device, args)
        }
        Command::Eval {
            recipe,
            adapters,
            overrides,
        } => {
            let recipe = crate::recipe::load(&recipe, &overrides)?;
            let device = recipe.device;
            run_on(device, EvalTask { recipe, adapters })
        }
        Command::Train(args) => {
            let recipe = crate::recipe::load(&args.recipe, &args.overrides)?;
            let device = recipe.device;
            run_on(device, TrainTask { args, recipe })
        }
        Command::Bench {
            command: BenchCommand::Train { args, device },
        } => run_on(device, BenchTask(args)),
        Command::Data {
            command: DataCommand::Report { recipe, overrides },
        } => {
            let recipe = crate::recipe::load(&recipe, &overrides)?;
            let style = if std::io::stdout().is_terminal() {
                crate::data::report::MaskStyle::Color
            } else {
                crate::data::report::MaskStyle::Brackets
            };
            print!("{}", crate::data::report::report(&recipe, style)?);
            Ok(())
        }
        Command::Recipe {
            command: RecipeCommand::Check { file, overrides },
        } => {
            let recipe = crate::recipe::load(&file, &overrides)?;
            let resolved =
                toml::to_string_pretty(&recipe).context("rendering the resolved recipe")?;
            println!("# {} is valid; resolved with defaults:\n", file.display());
            print!("{resolved}");
            if !recipe.model.path.exists() {
                eprintln!(
                    "warning: model.path {} does not exist yet (fetch it before training)",
                    recipe.model.path.display()
                );
            }
            Ok(())
        }
    }
}

impl BackendTask for GenerateArgs {
    type Output = ();

    fn run<B: FrozenLinearBackend>(self, device: B::Device) -> Result<()> {
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

struct TrainTask {
    args: TrainArgs,
    recipe: crate::recipe::Recipe,
}

impl BackendTask for TrainTask {
    type Output = ();

    fn run<B: FrozenLinearBackend>(self, device: B::Device) -> Result<()> {
        let controls = Arc::new(Controls::default());
        let on_signal = Arc::clone(&controls);
        ctrlc::set_handler(move || {
            if on_signal.stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond Ctrl-C: aborting without saving");
                std::process::exit(130);
            }
            eprintln!(
                "\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again aborts)"
            );
        })
        .context("installing the Ctrl-C handler")?;
        let resume = self.args.resume.as_ref().map(|dir| {
            dir.clone()
                .unwrap_or_else(|| crate::train::run::run_dir(&self.recipe))
        });
        let run_dir = crate::train::run::run_dir(&self.recipe);
        let mut metrics = MetricsFile::open(&run_dir)?;
        let mut board = match self.recipe.output.tensorboard {
            true => Some(TensorBoard::create(
                &run_dir,
                &toml::to_string(&self.recipe)?,
            )?),
            false => None,
        };
        // The dashboard in an interactive terminal; plain lines for pipes, CI and --no-tui.
        let interactive =
            std::io::stdout().is_terminal() && std::env::var("CI").is_err() && !self.args.no_tui;
        let dashboard = match interactive {
            true => Some(Dashboard::start(
                self.recipe.name.clone(),
                Arc::clone(&controls),
            )?),
            false => None,
        };
        let mut lines = Vec::new();
        let mut log_failed = false;
        let mut emit = |event: Event| {
            match &dashboard {
                Some(d) => {
                    d.send(&event);
                    lines.push(plain_line(&event));
                }
                None => println!("{}", plain_line(&event)),
            }
            let written = metrics
                .write(&event)
                .and_then(|()| board.as_mut().map_or(Ok(()), |b| b.write(&event)));
            // A full disk must not stop training (checkpoints report their own errors).
            if let Err(e) = written
                && !log_failed
            {
                let message = format!("{e:#}; metrics and TensorBoard logs may be incomplete");
                match &dashboard {
                    Some(d) => d.send(&Event::Warning { message }),
                    None => eprintln!("warning: {message}"),
                }
                log_failed = true;
            }
        };
        let outcome = crate::train::run::train::<Autodiff<B>>(
            &self.recipe,
            resume.as_deref(),
            &controls,
            &mut emit,
            &device,
        );
        if let Some(d) = dashboard {
            d.finish()?;
            // What the dashboard showed, as the last lines of the normal screen.
            for line in lines.iter().rev().take(6).rev() {
                println!("{line}");
            }
        }
        let outcome = outcome?;
        if outcome.interrupted {
            println!(
                "Interrupted at step {}; the checkpoint is in {}. Resume with: loraforge train {} --resume",
                outcome.step,
                outcome.run_dir.join("checkpoint").display(),
                self.args.recipe.display()
            );
        } else {
            println!(
                "Done: adapters in {}",
                outcome.run_dir.join("adapters").display()
            );
        }
        Ok(())
    }
}

struct EvalTask {
    recipe: crate::recipe::Recipe,
    adapters: Option<PathBuf>,
}

impl BackendTask for EvalTask {
    type Output = ();

    fn run<B: FrozenLinearBackend>(self, device: B::Device) -> Result<()> {
        let run_dir = crate::train::run::run_dir(&self.recipe);
        let adapters = self
            .adapters
            .clone()
            .unwrap_or_else(|| run_dir.join("adapters"));
        let report = crate::eval::run::<B>(&self.recipe, &adapters, &run_dir, &device)?;
        print!("{}", crate::eval::markdown(&report));
        println!(
            "\nWritten to {} and {}",
            run_dir.join("eval.md").display(),
            run_dir.join("eval.json").display()
        );
        Ok(())
    }
}

struct BenchTask(crate::bench::BenchTrainArgs);

impl BackendTask for BenchTask {
    type Output = ();

    fn run<B: FrozenLinearBackend>(self, device: B::Device) -> Result<()> {
        let result = crate::bench::bench_train::<Autodiff<B>>(&self.0, &device)?;
        let line = serde_json::to_string(&result)?;
        println!("{line}");
        if let Some(path) = &self.0.jsonl {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            writeln!(file, "{line}")?;
        }
        Ok(())
    }
}
