//! `loraforge train` and `loraforge eval`: the trainer wired to its sinks (dashboard or plain
//! lines, metrics.jsonl, TensorBoard), then the recipe's export and evaluation when it ends.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use burn::backend::Autodiff;
use clap::Args;

use crate::backends::{BackendTask, DataParallel, DeviceMemory};
use crate::events::Controls;
use crate::events::Event;
use crate::export::ExportOptions;
use crate::ops::frozen_linear::ModelBackend;
use crate::sinks::dashboard::Dashboard;
use crate::sinks::plain::plain_line;
use crate::sinks::{MetricsFile, TensorBoard};
use crate::train::run_folder::{self, Existing};

#[derive(Args)]
pub struct TrainArgs {
    pub recipe: PathBuf,
    /// Print plain progress lines instead of the dashboard (also when not a terminal or CI=true).
    #[arg(long)]
    pub no_tui: bool,
    /// Continue from the run's last checkpoint (or from the given run / checkpoint folder).
    #[arg(long, num_args = 0..=1, value_name = "DIR")]
    pub resume: Option<Option<PathBuf>>,
    /// Start over in a run folder that holds an earlier run: its checkpoint, adapters and logs
    /// are deleted first.
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// Override a recipe key, e.g. --set train.iters=50 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Train data-parallel on several GPUs (CUDA): `all`, a count, or ids such as 0,2,3; the
    /// recipe's `[distributed] gpus` otherwise. The global batch stays the recipe's.
    #[arg(long, value_name = "all|N|IDS", value_parser = crate::recipe::GpuSet::parse)]
    pub gpus: Option<crate::recipe::GpuSet>,
}

pub struct TrainTask {
    pub args: TrainArgs,
    pub recipe: crate::recipe::Recipe,
}

impl BackendTask for TrainTask {
    type Output = ();

    fn run<B: ModelBackend + DeviceMemory + DataParallel>(self, device: B::Device) -> Result<()> {
        let controls = Arc::new(Controls::default());
        let on_signal = Arc::clone(&controls);
        ctrlc::set_handler(move || {
            if on_signal.stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: aborting without saving");
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupted (Ctrl-C or SIGTERM): finishing this step and saving a checkpoint (a second one aborts)"
            );
        })
        .context("installing the Ctrl-C / SIGTERM handler")?;
        // The GPUs first: a missing one or a backend without NCCL is refused before the run
        // folder is touched.
        let gpus = self
            .args
            .gpus
            .clone()
            .or_else(|| self.recipe.distributed.as_ref().map(|d| d.gpus.clone()));
        let workers = gpus.map(|gpus| B::workers(&gpus)).transpose()?;
        let resume = self.args.resume.as_ref().map(|dir| {
            dir.clone()
                .unwrap_or_else(|| crate::train::run::run_dir(&self.recipe))
        });
        let run_dir = crate::train::run::run_dir(&self.recipe);
        let existing = match (&resume, self.args.force) {
            (Some(_), _) => Existing::Resume,
            (None, true) => Existing::Replace,
            (None, false) => Existing::Refuse,
        };
        // Held until this function returns: the export and evaluation write into the folder too.
        let (_claim, removed) = run_folder::claim(&run_dir, existing)?;
        if !removed.is_empty() {
            eprintln!(
                "--force: removed the earlier run's {} from {}",
                removed.join(", "),
                run_dir.display()
            );
        }
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
        if interactive {
            crate::progress::disable_bars();
        }
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
            // Logged before it is shown: whatever the screen has shown is in metrics.jsonl.
            let written = metrics
                .write(&event)
                .and_then(|()| board.as_mut().map_or(Ok(()), |b| b.write(&event)));
            match &dashboard {
                Some(d) => {
                    d.send(&event);
                    lines.push(plain_line(&event));
                }
                None => println!("{}", plain_line(&event)),
            }
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
        let outcome = match workers {
            None => crate::train::run::train::<Autodiff<B>>(
                &self.recipe,
                resume.as_deref(),
                &controls,
                &mut emit,
                &device,
            ),
            Some(workers) => crate::train::run::train_data_parallel::<Autodiff<B>>(
                &self.recipe,
                resume.as_deref(),
                &controls,
                &mut emit,
                workers,
            ),
        };
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
            return Ok(());
        }
        let adapters = outcome.run_dir.join("adapters");
        println!("Done: adapters in {}", adapters.display());
        if let Some(export) = &self.recipe.export {
            let opts = ExportOptions::from_recipe(export, &outcome.run_dir);
            let report = crate::export::export(&self.recipe.model.path, Some(&adapters), &opts)?;
            println!("{}", report.summary());
        }
        if self.recipe.eval.prompts.is_some() {
            let report = run_eval::<B>(&self.recipe, &adapters, &outcome.run_dir, &device)?;
            // The final generations go to the logs too (TensorBoard shows them as text).
            let event = Event::Generations {
                step: outcome.step,
                rows: report.generation_rows(),
            };
            metrics.write(&event)?;
            if let Some(board) = board.as_mut() {
                board.write(&event)?;
            }
        }
        Ok(())
    }
}

pub struct EvalTask {
    pub recipe: crate::recipe::Recipe,
    pub adapters: Option<PathBuf>,
}

impl BackendTask for EvalTask {
    type Output = ();

    fn run<B: ModelBackend + DeviceMemory + DataParallel>(self, device: B::Device) -> Result<()> {
        let run_dir = crate::train::run::run_dir(&self.recipe);
        let adapters = self
            .adapters
            .clone()
            .unwrap_or_else(|| run_dir.join("adapters"));
        run_eval::<B>(&self.recipe, &adapters, &run_dir, &device).map(|_| ())
    }
}

/// Evaluates the run's adapters and, when the recipe exports and the export exists, the export.
fn run_eval<B: ModelBackend>(
    recipe: &crate::recipe::Recipe,
    adapters: &std::path::Path,
    run_dir: &std::path::Path,
    device: &B::Device,
) -> Result<crate::eval::EvalReport> {
    let fused = recipe
        .export
        .as_ref()
        .map(|e| ExportOptions::from_recipe(e, run_dir).out)
        .filter(|out| out.exists())
        .map(|out| crate::export::model_path(&out));
    let report = crate::eval::run::<B>(recipe, adapters, fused.as_deref(), run_dir, device)?;
    print!("{}", crate::eval::markdown(&report));
    println!(
        "\nWritten to {} and {}",
        run_dir.join("eval.md").display(),
        run_dir.join("eval.json").display()
    );
    Ok(report)
}
