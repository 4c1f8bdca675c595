//! `loraforge bench train` and `loraforge bench check`.

use std::io::Write;

use anyhow::{Context, Result};
use burn::backend::Autodiff;
use clap::Subcommand;

use crate::backends::{BackendTask, DeviceMemory, run_on};
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
        BenchCommand::Check { device, long_row } => {
            let device = crate::backends::resolve(device);
            // The bf16 linear check runs where a bf16 base can: the same rule `model.dtype` obeys.
            let bf16 = BaseStorage::for_device(crate::recipe::Dtype::Bf16, None, device).is_ok();
            let long_row = long_row as usize;
            run_on(device, DeviceCheckTask { bf16, long_row }).map(|_| ())
        }
    }
}

struct BenchTask(crate::diagnostics::bench::BenchTrainArgs, BaseStorage);

impl BackendTask for BenchTask {
    type Output = ();

    fn run<B: ModelBackend + DeviceMemory>(self, device: B::Device) -> Result<()> {
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

struct DeviceCheckTask {
    /// The device holds a bf16 base.
    bf16: bool,
    /// Tokens of the long-row check where attention is fused.
    long_row: usize,
}

impl BackendTask for DeviceCheckTask {
    type Output = Vec<serde_json::Value>;

    fn run<B: ModelBackend + DeviceMemory>(self, device: B::Device) -> Result<Self::Output> {
        crate::diagnostics::device_check::run::<B>(&device, self.bf16, self.long_row)
    }
}
