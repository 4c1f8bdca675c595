//! The command line. Each subcommand parses its arguments and hands off to the library.

mod train;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::backend::Autodiff;
use clap::{Args, Parser, Subcommand};

use crate::backend::{BackendTask, DeviceKind, DeviceMemory, run_on};
use crate::chat::{ChatTemplate, Message};
use crate::export::{ExportFormat, ExportOptions, FloatDtype, GgufType};
use crate::generate::{GenerationLimits, SamplingConfig, generate};
use crate::model::frozen_op::FrozenLinearBackend;
use crate::model::load_model;
use train::{EvalTask, TrainArgs, TrainTask};

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
    /// Fold adapters into their base and export it for mlx-lm, transformers or llama.cpp.
    Fuse(FuseArgs),
    /// Draw a run's loss curves and learning rate into a PNG (RUN_DIR/loss.png).
    Plot {
        run_dir: PathBuf,
        /// Where to write the PNG instead.
        #[arg(long)]
        out: Option<PathBuf>,
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
    /// Checks a device backend against the CPU: a 20-step loss trajectory, and the frozen
    /// linear and attention against float64 on random inputs (one JSON line per check).
    Check {
        #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
        device: DeviceKind,
    },
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
struct FuseArgs {
    /// The base: a Hugging Face folder, an mlx-community folder, or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Adapter folder (loraforge's, mlx_lm.lora's or peft's); without it the base is converted.
    #[arg(long)]
    adapters: Option<PathBuf>,
    /// Output folder (refused if it exists, unless --force).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = ExportFormat::Mlx)]
    format: ExportFormat,
    /// Write every weight in float, even where the base is quantized.
    #[arg(long)]
    dequantize: bool,
    /// Bits for the adapted matrices when the result stays quantized (mlx).
    #[arg(long, default_value_t = 8)]
    requant_bits: u32,
    /// Float type of float weights (default: the base's own; f16 for GGUF bases).
    #[arg(long, value_enum)]
    dtype: Option<FloatDtype>,
    /// Tensor type of a GGUF export's matrices.
    #[arg(long, value_enum, default_value_t = GgufType::Q8_0)]
    gguf_type: GgufType,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
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
    let command = Cli::parse().command;
    crate::model::host_blas::check()?;
    match command {
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
        Command::Fuse(args) => {
            let opts = ExportOptions {
                format: args.format,
                out: args.out,
                dequantize: args.dequantize,
                requant_bits: args.requant_bits,
                dtype: args.dtype,
                gguf_type: args.gguf_type,
                force: args.force,
            };
            let report = crate::export::export(&args.model, args.adapters.as_deref(), &opts)?;
            println!("{}", report.summary());
            Ok(())
        }
        Command::Plot { run_dir, out } => {
            let path = crate::plot::plot(&run_dir, out.as_deref())?;
            println!("Wrote {}", path.display());
            Ok(())
        }
        Command::Bench {
            command: BenchCommand::Train { args, device },
        } => {
            let quantize = args.quant.map(|bits| (bits, 64));
            let storage = crate::backend::base_storage(args.dtype, quantize, device)?;
            run_on(device, BenchTask(args, storage))
        }
        Command::Bench {
            command: BenchCommand::Check { device },
        } => {
            // The bf16 linear check runs where a bf16 base can: the same rule `model.dtype` obeys.
            let bf16 =
                crate::backend::base_storage(crate::recipe::Dtype::Bf16, None, device).is_ok();
            run_on(device, DeviceCheckTask { bf16 }).map(|_| ())
        }
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

    fn run<B: FrozenLinearBackend + DeviceMemory>(self, device: B::Device) -> Result<()> {
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

struct BenchTask(
    crate::bench::BenchTrainArgs,
    crate::model::load::BaseStorage,
);

impl BackendTask for BenchTask {
    type Output = ();

    fn run<B: FrozenLinearBackend + DeviceMemory>(self, device: B::Device) -> Result<()> {
        let mut result = crate::bench::bench_train::<Autodiff<B>>(&self.0, self.1, &device)?;
        if let Some(bytes) = B::reserved_bytes(&device) {
            result["results"]["device_mem_reserved_gib"] =
                (bytes as f64 / (1u64 << 30) as f64).into();
            result["results"]["device_mem_reserved_kind"] =
                "bytes the backend's memory pool holds at the end (it keeps what it reserves)"
                    .into();
        }
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

struct DeviceCheckTask {
    /// The device holds a bf16 base.
    bf16: bool,
}

impl BackendTask for DeviceCheckTask {
    type Output = Vec<serde_json::Value>;

    fn run<B: FrozenLinearBackend + DeviceMemory>(self, device: B::Device) -> Result<Self::Output> {
        crate::device_check::run::<B>(&device, self.bf16)
    }
}
