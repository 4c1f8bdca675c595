//! The command line. Each subcommand parses its arguments and hands off to the library.

mod bench;
mod chat;
mod convert;
mod data;
mod fuse;
mod generate;
mod recipe;
mod train;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::backends::run_on;
use bench::BenchCommand;
use chat::ChatArgs;
use convert::ConvertArgs;
use data::DataCommand;
use fuse::FuseArgs;
use generate::{CachePromptArgs, GenerateArgs};
use recipe::RecipeCommand;
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
    /// Chat with a model in the terminal, its KV cache kept between turns.
    Chat(ChatArgs),
    /// Save a prompt's KV cache, for `generate --prompt-cache-file` to continue from.
    CachePrompt(CachePromptArgs),
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
    /// Convert a model to an mlx-community folder (optionally quantized) as mlx_lm.convert does,
    /// or to GGUF.
    Convert(ConvertArgs),
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

/// Parses the command line and runs the subcommand.
pub fn run() -> Result<()> {
    let command = Cli::parse().command;
    crate::backends::cpu::blas::check()?;
    match command {
        Command::Inspect { path } => {
            print!("{}", crate::inspect::report(&path)?);
            Ok(())
        }
        Command::Generate(mut args) => {
            args.target.device = crate::backends::resolve(args.target.device);
            run_on(args.target.device, args)
        }
        Command::Chat(mut args) => {
            args.target.device = crate::backends::resolve(args.target.device);
            run_on(args.target.device, args)
        }
        Command::CachePrompt(mut args) => {
            args.target.device = crate::backends::resolve(args.target.device);
            run_on(args.target.device, args)
        }
        Command::Eval {
            recipe,
            adapters,
            overrides,
        } => {
            let mut recipe = crate::recipe::load(&recipe, &overrides)?;
            recipe.device = crate::backends::resolve(recipe.device);
            run_on(recipe.device, EvalTask { recipe, adapters })
        }
        Command::Train(args) => {
            let mut recipe = crate::recipe::load(&args.recipe, &args.overrides)?;
            recipe.device = crate::backends::resolve(recipe.device);
            run_on(recipe.device, TrainTask { args, recipe })
        }
        Command::Convert(args) => convert::run(args),
        Command::Fuse(args) => fuse::run(args),
        Command::Bench { command } => bench::run(command),
        Command::Data { command } => data::run(command),
        Command::Recipe { command } => recipe::run(command),
        Command::Plot { run_dir, out } => {
            let path = crate::sinks::plot::plot(&run_dir, out.as_deref())?;
            println!("Wrote {}", path.display());
            Ok(())
        }
    }
}
