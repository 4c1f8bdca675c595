//! `loraforge bench train` and `loraforge bench check`.

use std::io::Write;

use anyhow::{Context, Result};
use burn::backend::Autodiff;
use clap::Subcommand;

use crate::diagnostics::device_check::CheckOptions;
use crate::recipe::Dtype;

use crate::backends::{BackendTask, DataParallel, DeviceMemory, run_on};
use crate::model::load::BaseStorage;
use crate::ops::ModelBackend;
use crate::recipe::DeviceKind;

/// `loraforge bench`'s subcommands.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Checks a device backend against the CPU: a 20-step loss trajectory, and the frozen
    /// linear and attention against float64 on random inputs (one JSON line per check).
    Check {
        #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
        device: DeviceKind,
        /// Tokens of the long-row attention check where a fused kernel serves it (4,096 where
        /// none does); a CPU's Vulkan driver (lavapipe) takes hours at the default.
        #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(64..))]
        long_row: u32,
        /// Skips the attention cases with wider heads (16, 32, 64, 96, 128, 160 or 256):
        /// lavapipe's LLVM takes many minutes over the 128-wide kernels.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(16..=256))]
        max_head_dim: u32,
        /// Skips a trajectory check (`trajectory_experts`, ...) or `experts_grad` by name
        /// (repeatable): lavapipe compiles kernels for every expert's row count, which takes
        /// many minutes in CI.
        #[arg(long, value_name = "CHECK")]
        skip: Vec<String>,
        /// The trajectories' vocabulary, if not the tiny shape's 32,000 (CI's lavapipe runs
        /// 2,048: the head and the loss were most of each step there).
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..))]
        vocab: Option<usize>,
        /// AdamW steps of each trajectory (CI's lavapipe runs 8: a step of the tiny shape takes
        /// about 10 s there, most of its check).
        #[arg(long, default_value_t = crate::diagnostics::device_check::STEPS,
              value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(4..=1000))]
        steps: usize,
    },
    /// Timed LoRA training steps on a random model of a known shape; prints one JSON line with
    /// the fields of bench/peft_lora_bench.py.
    Train {
        #[command(flatten)]
        args: Box<crate::diagnostics::bench::BenchTrainArgs>,
        #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
        device: DeviceKind,
    },
}

/// Runs a `loraforge bench` subcommand.
pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Train { args, device } => {
            // `auto` resolved before the storage rule reads it (bf16 is CUDA's only).
            let device = crate::backends::resolve(device);
            let quantize = args.quant.map(|bits| (bits, 64));
            let storage = BaseStorage::for_device(args.dtype, quantize, device)?;
            run_on(device, BenchTask(*args, storage))
        }
        BenchCommand::Check {
            device,
            long_row,
            max_head_dim,
            skip,
            vocab,
            steps,
        } => {
            let device = crate::backends::resolve(device);
            let options = CheckOptions {
                // 16-bit weights are checked where a base can be held so: bf16 on CUDA, f16 (which
                // Vulkan and Metal devices compute in) on the portable backend, if the device does.
                half: [Dtype::F16, Dtype::Bf16]
                    .into_iter()
                    .find_map(|d| BaseStorage::for_device(d, None, device).ok()?.half),
                long_row: long_row as usize,
                max_head_dim: max_head_dim as usize,
                skip,
                vocab,
                steps,
            };
            run_on(device, DeviceCheckTask(options)).map(|_| ())
        }
    }
}

struct BenchTask(crate::diagnostics::bench::BenchTrainArgs, BaseStorage);

impl BackendTask for BenchTask {
    type Output = ();

    fn run<B: ModelBackend + DeviceMemory + DataParallel>(self, device: B::Device) -> Result<()> {
        let mut result =
            crate::diagnostics::bench::bench_train::<Autodiff<B>>(&self.0, self.1, &device)?;
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

struct DeviceCheckTask(CheckOptions);

impl BackendTask for DeviceCheckTask {
    type Output = Vec<serde_json::Value>;

    fn run<B: ModelBackend + DeviceMemory + DataParallel>(
        self,
        device: B::Device,
    ) -> Result<Self::Output> {
        let mut options = self.0;
        options.half = options.half.filter(|&h| B::check_half(h, &device).is_ok());
        crate::diagnostics::device_check::run::<B>(&device, options)
    }
}
