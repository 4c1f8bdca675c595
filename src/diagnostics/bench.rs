//! `loraforge bench train`: timed LoRA training steps on a randomly initialised model of a known
//! shape (nothing is downloaded), reported as one JSON line. Flags, FLOP convention and result
//! fields follow `bench/peft_lora_bench.py` (the PyTorch + peft reference), so the two compare
//! one to one:
//!
//! ```text
//! tokens/s     = batch · seq / median step time           (every input position counts)
//! FLOPs/token  = 4 (N_dec + N_head) [+ 2 N_dec with activation checkpointing]
//!              + 8 · layers · seq · heads · head_dim       (attention, no causal halving)
//! MFU          = FLOPs/token · tokens/s / measured matmul peak of this backend
//! ```
//! A step is the trainer's own: forward, backward (with or without activation checkpointing),
//! global gradient norm, AdamW update. With `--data` the batches are a real dataset's
//! (`bench_data.rs`), padded or packed, and tokens/s counts the positions that are not padding
//! over all timed steps (no FLOPs or MFU: rows are not full).

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{Distribution, FloatDType, Tensor};
use rand::SeedableRng;
use serde_json::json;

use super::bench_data::DataBatches;
use super::random::{Shape, plain_adamw, random_batch, random_model_files};
use crate::lora::{AdapterSpec, inject};
use crate::model::config::ModelConfig;
use crate::model::load::BaseStorage;
use crate::model::names::BlockLinear;
use crate::ops::TrainBackend;
use crate::ops::elementwise::cast;
use crate::ops::matmul::{MatmulBackend, matmul};
use crate::recipe::{AdapterKind, Dtype, Layers, LoraSection, Targets};
use crate::train::recompute::Checkpointing;
use crate::train::trainer::{StepSettings, Trainer};

/// Options of `loraforge bench train`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchTrainArgs {
    /// Model shape to build with random weights.
    #[arg(long, value_enum, default_value_t = Shape::Tiny)]
    pub shape: Shape,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    pub seq: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha; the adapter output is scaled by alpha / rank (peft's convention).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// `all-linear`, or short names separated by commas (`q_proj,v_proj`), as peft takes them.
    #[arg(long, default_value = "q_proj,v_proj")]
    pub targets: String,
    /// Adapt only the last N blocks (default: all).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Timed steps; the median step time is reported.
    #[arg(long, default_value_t = 10, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub steps: usize,
    /// Untimed steps run before the timed ones.
    #[arg(long, default_value_t = 3)]
    pub warmup_steps: usize,
    /// Recompute each block's activations in the backward pass instead of keeping them.
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// With --grad-checkpoint: keep the block inputs in host memory.
    #[arg(long, requires = "grad_checkpoint")]
    pub offload_checkpoints: bool,
    /// With --grad-checkpoint: run each block's MLP this many tokens at a time when a batch
    /// holds more (0: never).
    #[arg(long, default_value_t = crate::recipe::DEFAULT_MLP_CHUNK_TOKENS)]
    pub mlp_chunk_tokens: usize,
    /// Quantize the base to this many bits (group 64) on load: QLoRA.
    #[arg(long)]
    pub quant: Option<u32>,
    /// The frozen base's compute dtype, as the recipe's `model.dtype` (bf16 on CUDA, Metal or
    /// Vulkan; f16 on Metal or Vulkan).
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    pub dtype: Dtype,
    /// Learning rate of the AdamW steps.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Seed of the random weights, the adapters' initialisation and the batches.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The shape's vocabulary, replaced (CI's lavapipe runs the tiny shape at 2,048: its
    /// 32,000-wide head and loss were most of each step there).
    #[arg(long, conflicts_with = "data", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..))]
    pub vocab: Option<usize>,
    /// Train on this dataset (JSON Lines, Parquet or CSV rows, as a recipe's data file) instead
    /// of random tokens: --seq is then its max_seq_len and --batch its rows per step.
    #[arg(long, requires = "tokenizer")]
    pub data: Option<std::path::PathBuf>,
    /// With --data: the tokenizer (a folder with tokenizer.json and its chat template, or a
    /// .gguf file).
    #[arg(long, requires = "data")]
    pub tokenizer: Option<std::path::PathBuf>,
    /// With --data: pack several examples into each row (attention stays inside each one).
    #[arg(long, requires = "data")]
    pub pack: bool,
    /// With --data: the first examples whose loss is computed both padded and packed at the
    /// initial weights (they must agree).
    #[arg(long, default_value_t = 48, requires = "data")]
    pub loss_check_examples: usize,
    /// With --data: write the encoded examples here (JSON Lines of ids and loss masks), the
    /// input of bench/reference/peft_data_bench.py.
    #[arg(long, requires = "data")]
    pub examples_out: Option<std::path::PathBuf>,
    /// Also append the JSON line to this file.
    #[arg(long)]
    pub jsonl: Option<std::path::PathBuf>,
    /// A label copied into the result's `tag` field, to tell runs apart.
    #[arg(long)]
    pub tag: Option<String>,
}

impl BenchTrainArgs {
    fn lora(&self, family: crate::model::Family) -> LoraSection {
        let targets = if self.targets == "all-linear" {
            Targets::Named("all-linear".into())
        } else {
            // peft's short names (`q_proj`) to their keys (`self_attn.q_proj`); an unknown name
            // is refused by `AdapterSpec::from_recipe`, which lists the keys.
            let keys = self.targets.split(',').map(|short| {
                let short = short.trim();
                BlockLinear::targetable(family)
                    .into_iter()
                    .find(|l| l.key(family).rsplit('.').next() == Some(short))
                    .map_or_else(|| short.to_string(), |l| l.key(family).to_string())
            });
            Targets::Keys(keys.collect())
        };
        LoraSection {
            kind: AdapterKind::Lora,
            rank: self.rank,
            scale: Some(self.alpha / self.rank as f64),
            targets,
            layers: Layers::Last(self.layers.map_or(-1, |n| n as i64)),
            ..Default::default()
        }
    }
}

/// Runs the benchmark and returns its JSON result (also printed by the caller).
pub fn bench_train<B: TrainBackend>(
    args: &BenchTrainArgs,
    storage: BaseStorage,
    device: &B::Device,
) -> Result<serde_json::Value> {
    let mut config = args.shape.config();
    config.vocab_size = args.vocab.unwrap_or(config.vocab_size);
    if let Some(half) = storage.half {
        B::check_half(half, device)?;
    }
    let peak = measure_matmul_peak::<B>(storage.half, device);
    eprintln!("matmul peak of this backend: {:.1} GFLOP/s", peak / 1e9);

    let started = Instant::now();
    let files = random_model_files(config.clone(), args.seed);
    let mut model = files.build_quantized::<B>(device, storage)?;
    let spec = AdapterSpec::from_recipe(&args.lora(config.family), &config)?;
    B::seed(device, args.seed);
    inject(&mut model, &spec, args.seed, device);
    let settings = StepSettings {
        grad_checkpoint: args.grad_checkpoint.then_some(Checkpointing {
            mlp_chunk_tokens: args.mlp_chunk_tokens,
            offload: args.offload_checkpoints,
        }),
        max_grad_norm: None,
    };
    let mut trainer = Trainer::new(model, plain_adamw(), settings, device);
    let data = match (&args.data, &args.tokenizer) {
        (Some(rows), Some(tokenizer)) => {
            let encoding = Instant::now();
            let data = DataBatches::load(
                rows,
                tokenizer,
                args.batch,
                args.seq,
                args.pack,
                config.vocab_size,
                args.seed,
            )?;
            eprintln!(
                "{}: {} examples in {} batches, encoded in {:.1} s",
                rows.display(),
                data.examples().len(),
                data.len(),
                encoding.elapsed().as_secs_f64()
            );
            if let Some(path) = &args.examples_out {
                data.write_examples(path)?;
            }
            Some(data)
        }
        _ => None,
    };
    let build_s = started.elapsed().as_secs_f64();
    // Packing must leave the loss as it is: both layouts at the initial weights.
    let packing_losses = match &data {
        Some(data) => {
            let losses =
                data.packing_loss_check(&trainer.model.valid(), args.loss_check_examples, device)?;
            eprintln!("loss of the first examples padded and packed: {losses:?}");
            Some(losses)
        }
        None => None,
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed + 1);
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let (mut timed_tokens, mut timed_trained) = (0, 0);
    let mut routing = [std::time::Duration::ZERO; 2];
    for i in 0..args.warmup_steps + args.steps {
        if i == args.warmup_steps {
            crate::model::experts::take_routing_time();
        }
        let (batch, tokens) = match &data {
            Some(data) => data.batch(i),
            None => (
                random_batch(&mut rng, args.batch, args.seq, config.vocab_size),
                args.batch * args.seq,
            ),
        };
        B::sync(device)?;
        let t0 = Instant::now();
        let loss = trainer
            .step(std::slice::from_ref(&batch), args.lr)
            .map_or_else(|e| e.loss, |stats| stats.loss);
        B::sync(device)?;
        let dt = t0.elapsed().as_secs_f64();
        let phase = if i < args.warmup_steps {
            "warm"
        } else {
            "meas"
        };
        eprintln!("step {i:3} [{phase}] {:10.2} ms  loss {loss:.4}", dt * 1e3);
        if i >= args.warmup_steps {
            times.push(dt);
            timed_tokens += tokens;
            timed_trained += batch.trained_tokens();
        }
        losses.push(loss);
    }
    if args.steps > 0 {
        routing = crate::model::experts::take_routing_time();
    }

    let (n_dec, n_head) = frozen_linear_params(&config);
    let attn_width = config.num_heads * config.head_dim;
    let linear_fpt = 4 * (n_dec + n_head) + if args.grad_checkpoint { 2 * n_dec } else { 0 };
    let attn_fpt = 8 * config.num_layers * args.seq * attn_width;
    let fpt = (linear_fpt + attn_fpt) as f64;
    let median = median(&times);
    let tokens = args.batch * args.seq;
    let timed_s: f64 = times.iter().sum();
    // Random batches are all alike: the median step. Real batches differ: all timed steps.
    let tps = match data {
        None => tokens as f64 / median,
        Some(_) => timed_tokens as f64 / timed_s,
    };
    let data_fields = data.as_ref().map(|d| {
        let (padded, packed) = packing_losses.unwrap_or_default();
        json!({
            "rows": args.data, "tokenizer": args.tokenizer, "pack": args.pack,
            "examples": d.examples().len(), "batches_per_epoch": d.len(),
            "padding_fraction_of_epoch": d.padding_fraction(),
            "timed_tokens": timed_tokens, "timed_trained_tokens": timed_trained,
            "trained_tokens_per_s": timed_trained as f64 / timed_s,
            "tokens_kind": "input positions that are not padding, over all timed steps",
            "loss_check": {"padded": padded, "packed": packed,
                           "relative_difference": (packed - padded).abs() / padded.abs(),
                           "examples": args.loss_check_examples,
                           "what": "mean loss over the first examples at the initial weights"},
        })
    });
    // FLOPs per token assume full rows of --seq: not what real rows are.
    let fpt_known = data.is_none().then_some(fpt);
    let result = json!({
        "bench": "loraforge_bench_train",
        "tag": args.tag,
        "argv": std::env::args().skip(1).collect::<Vec<_>>(),
        "settings": {
            "shape": clap::ValueEnum::to_possible_value(&args.shape).map(|v| v.get_name().to_string()),
            "batch": args.batch, "seq": args.seq, "rank": args.rank,
            "alpha": args.alpha, "targets": args.targets, "layers": args.layers,
            "steps": args.steps, "warmup_steps": args.warmup_steps,
            "grad_checkpoint": args.grad_checkpoint, "offload_checkpoints": args.offload_checkpoints,
            "mlp_chunk_tokens": args.mlp_chunk_tokens, "quant": args.quant, "dtype": args.dtype, "lr": args.lr,
            "backend": std::any::type_name::<B>(),
            "threads": rayon::current_num_threads(),
        },
        "flops": fpt_known.map(|fpt| json!({"per_token": fpt, "linear_per_token": linear_fpt, "attn_per_token": attn_fpt})),
        "data": data_fields,
        "matmul_peak_gflops": peak / 1e9,
        "results": {
            "step_ms_median": median * 1e3,
            "step_ms_all": times.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
            "tokens_per_step": tokens,
            "tokens_per_s": tps,
            "loss_first": losses.first(),
            "loss_last": losses.last(),
            "losses_finite": losses.iter().all(|l| l.is_finite()),
            "build_s": build_s,
            "achieved_tflops": fpt_known.map(|fpt| fpt * tps / 1e12),
            "mfu": fpt_known.map(|fpt| fpt * tps / peak),
            "peak_mem_bytes": crate::backends::peak_rss_bytes(),
            "peak_mem_kind": "peak RSS of the process (whole lifetime)",
            "moe_routing_host_ms_per_step": config.moe.is_some().then(|| {
                let per_step = |d: std::time::Duration| d.as_secs_f64() * 1e3 / args.steps as f64;
                json!({"reading": per_step(routing[0]), "choosing": per_step(routing[1]),
                       "what": "host time in the routers over the timed steps: waiting for and reading the probabilities (the device drains first), then the top-k, the sort and the indices' upload"})
            }),
        },
    });
    Ok(result)
}

/// Frozen weights a token goes through in the blocks (attention, and the MLP: a mixture of
/// experts counts its router, its `top_k` experts and any shared expert, as the reference does
/// not count the router), and in the head (counted even when tied).
fn frozen_linear_params(c: &ModelConfig) -> (usize, usize) {
    let (h, kv) = (c.hidden_size, c.num_kv_heads * c.head_dim);
    let q = c.num_heads * c.head_dim;
    let attention = h * q + 2 * h * kv + q * h;
    let mlp = |layer: usize| match &c.moe {
        Some(m) if m.sparse(layer) => {
            let shared = m.shared_expert_intermediate_size.map_or(0, |s| 3 * h * s);
            m.top_k * 3 * h * m.expert_intermediate_size + shared
        }
        _ => 3 * h * c.intermediate_size,
    };
    let blocks = (0..c.num_layers).map(|l| attention + mlp(l)).sum();
    (blocks, c.vocab_size * h)
}

/// Median FLOP/s of square matmuls through the model's GEMM path (2n³ per product, after a
/// warm-up), with 16-bit operands when the base is held so: the peak MFU is quoted against,
/// measured the way the reference measures its own.
fn measure_matmul_peak<B: MatmulBackend>(half: Option<FloatDType>, device: &B::Device) -> f64 {
    // wgpu caps a buffer at 256 MiB (Mesa's lavapipe allocates less): 8192² f32 is exactly that.
    let name = std::any::type_name::<B>();
    let n = if name.contains("NdArray") {
        1024
    } else if name.contains("Wgpu") {
        2048
    } else {
        8192
    };
    let operand = || {
        let t = Tensor::<B, 2>::random([n, n], Distribution::Default, device);
        cast(t, half)
    };
    let (a, b) = (operand(), operand());
    let mut times = Vec::new();
    for i in 0..6 {
        let _ = B::sync(device);
        let t0 = Instant::now();
        let c = matmul(a.clone(), b.clone());
        let _ = B::sync(device);
        drop(c);
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    2.0 * (n as f64).powi(3) / median(&times)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_parameter_counts_match_the_reference_presets() {
        // As bench/reference/peft_lora_bench.py counted them on the same presets
        // (bench/results/train-cpu-vm-2026-11-27.jsonl): frozen decoder linears, head.
        let (dec, head) = frozen_linear_params(&Shape::Tiny.config());
        assert_eq!((dec, head), (3_162_112, 8_192_000));
        let (dec, head) = frozen_linear_params(&Shape::Smollm2_135m.config());
        assert_eq!((dec, head), (106_168_320, 28_311_552));
    }
}
