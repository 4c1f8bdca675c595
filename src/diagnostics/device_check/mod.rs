//! `loraforge bench check --device cuda`: is a device backend computing what the CPU computes?
//! One command to run on a GPU machine (issue 4, acceptance 5). It prints one JSON line per check
//! and fails if any is off:
//!
//! - `trajectory`: the tiny shape trained for 20 steps (`--steps`) on the device follows the CPU
//!   f32 run's losses within 1e-2 relative. Same random weights (seeded on the host), the CPU
//!   run's initial adapters copied to the device, the same batches. `trajectory_chunked_offloaded`: the same
//!   on the device with activation checkpointing, the MLP run 128 tokens at a time (4 chunks a
//!   batch) and the block inputs kept in host memory (`train/recompute.rs`), against the CPU's
//!   plain run. `trajectory_half`: the base held in the device's 16-bit float (bf16 on CUDA,
//!   f16 on the portable backend, whose runs scale the loss), against the CPU's f32 run. Each
//!   also compares the first step's gradient norm (Adam's path alone would not show a gradient
//!   off by a constant factor).
//! - `linear_dense`, `linear_q4` (and `_bf16` / `_f16` where the device holds such a base),
//!   `linear_q3_g16`, `linear_q6_g16` (a Q3_K's and a Q6_K's widths, widened on the device): the
//!   frozen linear (float, and quantized, dequantized on the device) against float64 on the CPU,
//!   on random inputs (never zeros) at several shapes: `y = x Wᵀ` and the input gradient
//!   `dx = r W` of `Σ r ⊙ y`.
//! - `attention`: the first attention layer of the tiny shape (projections, RoPE, causal
//!   softmax, output projection) on random hidden states, device against float64.
//! - `attention_grad`: the attention op on the device against the naive softmax form under the
//!   CPU's f32 autodiff (the output and the gradients of q, k and v): the sliced op (its own
//!   backward, slices of 64 queries) and the dispatch the model uses (the flash-attention kernels
//!   on CUDA, `backends/cuda/attention.cu`) at head dimensions 16 to 128, with cached keys, with
//!   grouped keys and values (fewer heads than the queries, read in place by the kernels), and
//!   with packed rows (varlen: 2 to 5 examples a row, boundaries differing per row and falling
//!   inside the kernels' tiles), against the masked reference.
//! - `attention_long_row`: one row of 65,536 tokens (`--long-row`; 4,096 where no fused kernel
//!   serves it)
//!   forward and backward, against float64 at sampled queries and keys: nothing the size of the
//!   row squared is allocated, and indices past 2³¹ score positions stay right.
//! - `rope_grad`: the rotary embedding's output and input gradient against float64, over whole
//!   heads and over part of each (`rope.rs`).
//! - `experts_grad`: an experts' stack with its adapters on rows grouped by expert (the grouped
//!   products of a mixture of experts), output and gradients against float64 (`experts.rs`).
//! - `grouped_products`: the grouped product (one cuBLAS call on CUDA) against one GEMM per
//!   group on the same backend, at LoRA's rank-8 shapes and widths not powers of two.
//! - `trajectory_experts`: two of Mixtral's blocks (top-2 of 4 experts) trained as `trajectory` is.
//! - `decode_session` (`_q4`, `_bf16`, ...): the whole-step decode session, where the backend
//!   has one (CUDA, the CPU), against its op-by-op path over 8 tokens, its cache handed back,
//!   and a session opened empty running the prompt itself (CUDA's prompt pass; `decode.rs`).
//! - `rms_norm_grad`, `swiglu_grad`, `cross_entropy_grad`: the element-wise ops' outputs and
//!   input gradients against their naive forms under the CPU's autodiff (`elementwise.rs`).
//!
//! The attention checks live in `attention.rs`, RoPE's in `rope.rs`;
//! `tests/suite/device_check_cpu.rs` runs them all on the CPU backend in CI.
//!
//! Errors are `max |device − reference| / max |reference|`, so one number per check reads the
//! same whatever the scale of the values.

mod attention;
mod decode;
mod elementwise;
mod experts;
mod rope;

use attention::{AttentionCase, attention, attention_grad};

use std::sync::Arc;

use anyhow::{Result, bail};
use burn::backend::{Autodiff, NdArray};
use burn::tensor::{DType, FloatDType, Tensor, TensorCreationOptions, TensorData};
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::random::{Shape, plain_adamw, random_batch, random_model_files};
use crate::lora::{AdapterSpec, inject};
use crate::model::adapter::{from_vec, to_vec};
use crate::model::linear::{FrozenLinear, FrozenWeight};
use crate::model::load::BaseStorage;
use crate::model::{Decoder, Family, ModelConfig};
use crate::ops::ModelBackend;
use crate::ops::TrainBackend;
use crate::ops::grouped_matmul::Stacked;
use crate::quant::QuantizedMatrix;
use crate::recipe::{AdapterKind, Layers, LoraSection, Targets};
use crate::train::recompute::Checkpointing;
use crate::train::trainer::{StepSettings, Trainer};

type CpuTrain = Autodiff<NdArray<f32>>;

/// The trajectories' steps unless `--steps` says otherwise.
pub const STEPS: usize = 20;
const TRAJECTORY_TOLERANCE: f64 = 1e-2;
/// AdamW's step for the trajectory. Adam moves every weight by about the learning rate whatever
/// its gradient's size, so a gradient component that rounding flips changes the path by a full
/// step: at 1e-2 the H200 run (TF32-level products) drifted 1.6% from the CPU by step 20 while
/// agreeing to 1e-5 over the first five steps.
const LEARNING_RATE: f64 = 5e-3;
/// The same with the base in 16 bits: each GEMM rounds its inputs to 8 (bf16) or 11 (f16)
/// mantissa bits, which moves Adam's path further. Measured on the H200 (session 16): bf16 on
/// CUDA 1.17% at worst (step 11; the last step within 0.09%), f16 through Vulkan 0.54%.
const HALF_TRAJECTORY_TOLERANCE: f64 = 2e-2;
/// The CPU run's loss must fall at least this much, or the trajectory proves nothing.
const MIN_LOSS_FALL: f64 = 0.5;
/// f32 storage with tensor-core products (TF32 rounds inputs to 10 mantissa bits): errors of a
/// few 1e-4 of the largest value are expected; 2e-3 leaves room and still catches a wrong
/// kernel (a bad offset or a missed transpose gives errors of order 1).
const KERNEL_TOLERANCE: f64 = 2e-3;
/// A 16-bit weight multiplies activations rounded to its type (bf16's 8 mantissa bits: 4e-3
/// relative each; f16's 11: 5e-4); the reference uses the same rounded weight, so what remains
/// is the activations' rounding.
const HALF_TOLERANCE: f64 = 1e-2;

/// How the frozen linear's weight is held.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Weight {
    Dense,
    /// Dense in a 16-bit float, as a base held so.
    DenseHalf(FloatDType),
    Q4,
    /// Dequantized to a 16-bit float for the GEMM, as such a base's quantized weights are.
    Q4Half(FloatDType),
    /// 3 or 6 bits in groups of 16, a Q3_K or Q6_K GGUF's (widened to 4 or 8 bits on the
    /// device).
    KQuant(u32),
}

impl Weight {
    fn half(self) -> Option<FloatDType> {
        match self {
            Weight::DenseHalf(h) | Weight::Q4Half(h) => Some(h),
            Weight::Dense | Weight::Q4 | Weight::KQuant(_) => None,
        }
    }

    /// Bits and group of a quantized weight.
    fn quantized(self) -> Option<(u32, usize)> {
        match self {
            Weight::Q4 | Weight::Q4Half(_) => Some((4, 64)),
            Weight::KQuant(bits) => Some((bits, 16)),
            Weight::Dense | Weight::DenseHalf(_) => None,
        }
    }

    /// `v` rounded to the weight's float type.
    fn round(self, v: f64) -> f64 {
        match self.half() {
            Some(FloatDType::BF16) => f64::from(half::bf16::from_f64(v)),
            Some(_) => f64::from(half::f16::from_f64(v)),
            None => v,
        }
    }

    /// The check's name.
    fn check(self) -> String {
        let name = match self {
            Weight::Dense | Weight::DenseHalf(_) => "linear_dense".into(),
            Weight::Q4 | Weight::Q4Half(_) => "linear_q4".into(),
            Weight::KQuant(bits) => format!("linear_q{bits}_g16"),
        };
        match self.half() {
            Some(FloatDType::BF16) => format!("{name}_bf16"),
            Some(_) => format!("{name}_f16"),
            None => name,
        }
    }
}

/// Which checks run, and at what sizes.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The 16-bit float the device may hold a base in: such weights are checked too.
    pub half: Option<FloatDType>,
    /// Tokens of the long-row check where attention is fused.
    pub long_row: usize,
    /// The widest attention heads checked.
    pub max_head_dim: usize,
    /// Checks not to run, by name (of [`SKIPPABLE`]).
    pub skip: Vec<String>,
    /// The trajectories' vocabulary, if not the tiny shape's 32,000.
    pub vocab: Option<usize>,
    /// AdamW steps of each trajectory ([`STEPS`] by default).
    pub steps: usize,
}

/// The checks `CheckOptions::skip` may name: the trajectories, and the experts' grouped products.
const SKIPPABLE: [&str; 6] = [
    "trajectory",
    "trajectory_chunked_offloaded",
    "trajectory_fused_projections",
    "trajectory_experts",
    "experts_grad",
    "grouped_products",
];

/// Runs every check `options` asks for with `B` the device's backend; returns the JSON lines,
/// or fails listing those that missed their tolerance.
pub fn run<B: ModelBackend>(
    device: &B::Device,
    options: CheckOptions,
) -> Result<Vec<serde_json::Value>> {
    let CheckOptions {
        half,
        long_row,
        max_head_dim,
        skip,
        vocab,
        steps,
    } = options;
    if let Some(unknown) = skip.iter().find(|s| !SKIPPABLE.contains(&s.as_str())) {
        bail!("--skip {unknown}: not a check that can be skipped (those are {SKIPPABLE:?})");
    }
    if vocab == Some(0) {
        bail!("--vocab 0: the trajectories need at least one token; give --vocab 1 or more");
    }
    let skipped = |name: &str| skip.iter().any(|s| s == name);
    let chunked = StepSettings {
        grad_checkpoint: Some(Checkpointing {
            mlp_chunk_tokens: 128,
            offload: true,
        }),
        max_grad_norm: None,
    };
    let mut lines = Vec::new();
    // Each line printed as it is made: on a slow device the run shows where it is.
    let mut emit = |line: serde_json::Value| {
        println!("{line}");
        lines.push(line);
    };
    let plain = StepSettings::default();
    let mut tiny = Shape::Tiny.config();
    tiny.vocab_size = vocab.unwrap_or(tiny.vocab_size);
    // Phi-3's block: q, k, v and gate, up as fused linears whose outputs split.
    let fused = ModelConfig {
        family: Family::Phi3,
        ..tiny.clone()
    };
    // Mixtral's block: top-2 of 4 experts, their products grouped by expert (2 blocks: each
    // expert's products are launched apart, which costs on the CPU and lavapipe in CI).
    let experts = ModelConfig {
        family: Family::Mixtral,
        num_layers: 2,
        moe: Some(crate::model::config::MoeConfig {
            experts: 4,
            top_k: 2,
            expert_intermediate_size: tiny.intermediate_size,
            normalize_top_k: true,
            shared_expert_intermediate_size: None,
            sparse_layers: vec![true; 2],
        }),
        ..tiny.clone()
    };
    for (name, config, settings) in [
        ("trajectory", &tiny, plain),
        ("trajectory_chunked_offloaded", &tiny, chunked),
        ("trajectory_fused_projections", &fused, chunked),
        ("trajectory_experts", &experts, chunked),
    ] {
        if skipped(name) {
            continue;
        }
        emit(trajectory::<Autodiff<B>>(
            device, name, config, settings, None, steps,
        )?);
    }
    if let Some(half) = half {
        // The base held in 16 bits, as `model.dtype` asks (an f16 run scales its loss).
        emit(trajectory::<Autodiff<B>>(
            device,
            "trajectory_half",
            &tiny,
            plain,
            Some(half),
            steps,
        )?);
    }
    let mut weights = vec![Weight::Dense];
    weights.extend(half.map(Weight::DenseHalf));
    weights.push(Weight::Q4);
    weights.extend(half.map(Weight::Q4Half));
    // One and eight rows are decoding's (read packed on CUDA); the others go through the GEMM.
    for (n, inp, out) in [
        (1, 2048, 512),
        (7, 64, 96),
        (8, 576, 1536),
        (256, 576, 1536),
        (1000, 2048, 512),
    ] {
        for &weight in &weights {
            emit(linear::<B>(device, n, inp, out, weight));
        }
    }
    // K-quant widths: read packed for one row, dequantized for the GEMM at 256.
    for (n, inp, out) in [(1, 2048, 512), (256, 576, 1536)] {
        for bits in [3, 6] {
            emit(linear::<B>(device, n, inp, out, Weight::KQuant(bits)));
        }
    }
    for (inp, out) in [(64, 96), (576, 256)]
        .into_iter()
        .filter(|_| !skipped("experts_grad"))
    {
        for &weight in weights
            .iter()
            .filter(|w| matches!(w, Weight::Dense | Weight::DenseHalf(_)))
        {
            emit(experts::experts_grad::<B>(device, inp, out, weight));
        }
    }
    for &weight in weights
        .iter()
        .filter(|w| matches!(w, Weight::Q4 | Weight::Q4Half(_)))
    {
        for cols in [64, 128] {
            emit(embedding_rows::<B>(device, cols, weight));
        }
    }
    for &weight in &weights {
        decode::decode_session::<B>(device, weight, tiny.vocab_size)?
            .into_iter()
            .for_each(&mut emit);
    }
    // LoRA's rank-8 sides (A: `[in, 8]`, B: `[8, out]`) and experts' projections.
    for (k, m) in [
        (8, 96),
        (8, 256),
        (96, 8),
        (576, 8),
        (8, 100),
        (16, 96),
        (64, 96),
    ]
    .into_iter()
    .filter(|_| !skipped("grouped_products"))
    {
        for stacked in [Stacked::AsIs, Stacked::Transposed] {
            emit(experts::grouped_products::<B>(device, k, m, stacked));
        }
    }
    for seq in [16, 128, 512] {
        emit(attention::<B>(device, seq)?);
    }
    for case in AttentionCase::ALL
        .into_iter()
        .filter(|c| c.head_dim <= max_head_dim)
    {
        emit(attention_grad::<B>(device, case));
    }
    emit(attention::long_row::<B>(device, long_row));
    // Whole heads, and Phi-4-mini's 3/4 of each.
    for (per_row_tables, rotary) in [(false, 64), (true, 64), (false, 48)] {
        emit(rope::rope_grad::<B>(device, per_row_tables, rotary));
    }
    for check in [
        elementwise::rms_norm_grad::<B>,
        elementwise::swiglu_grad::<B>,
        elementwise::cross_entropy_grad::<B>,
    ] {
        check(device).into_iter().for_each(&mut emit);
    }
    let failed: Vec<String> = lines
        .iter()
        .filter(|l| l["pass"] == false)
        .map(|l| l.to_string())
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} device checks failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    Ok(lines)
}

fn lora() -> LoraSection {
    LoraSection {
        kind: AdapterKind::Lora,
        rank: 8,
        scale: Some(2.0),
        targets: Targets::Named("all-linear".into()),
        layers: Layers::Last(-1),
        ..Default::default()
    }
}

/// A tiny model's losses over `steps` AdamW steps, on the CPU (plain steps) and on the device
/// (steps with `settings`).
fn trajectory<D: TrainBackend>(
    device: &D::Device,
    name: &str,
    config: &ModelConfig,
    settings: StepSettings,
    half: Option<FloatDType>,
    steps: usize,
) -> Result<serde_json::Value> {
    let config = config.clone();
    let files = random_model_files(config.clone(), 0);
    let spec = AdapterSpec::from_recipe(&lora(), &config)?;
    let cpu_device = Default::default();
    let mut cpu = files.build::<CpuTrain>(&cpu_device)?;
    inject(&mut cpu, &spec, 1, &cpu_device);
    let storage = BaseStorage {
        half,
        ..Default::default()
    };
    let mut dev = files.build_quantized::<D>(device, storage)?;
    inject(&mut dev, &spec, 1, device);
    copy_adapters(&cpu, &mut dev, device);
    let (cpu_losses, cpu_norm) = train_steps(cpu, StepSettings::default(), &cpu_device, steps);
    let (dev_losses, dev_norm) = train_steps(dev, settings, device, steps);
    // The first step's gradient norm, from identical weights: Adam's steps hardly depend on the
    // gradients' overall size, so the losses alone would not see a gradient off by a factor
    // (an f16 run's loss scale not undone).
    let norm_diff = ((dev_norm - cpu_norm) / cpu_norm).abs();
    let worst = cpu_losses
        .iter()
        .zip(&dev_losses)
        .map(|(c, d)| ((c - d) / c).abs())
        .fold(0.0, f64::max);
    let fall = cpu_losses[0] - cpu_losses[steps - 1];
    let tolerance = match half {
        Some(_) => HALF_TRAJECTORY_TOLERANCE,
        None => TRAJECTORY_TOLERANCE,
    };
    Ok(json!({
        "check": name, "shape": "tiny", "family": config.family.name(), "steps": steps,
        "cpu_losses": cpu_losses, "device_losses": dev_losses,
        "loss_fall": fall, "max_relative_diff": worst, "tolerance": tolerance,
        "cpu_first_grad_norm": cpu_norm, "device_first_grad_norm": dev_norm,
        "grad_norm_relative_diff": norm_diff,
        "pass": worst <= tolerance && norm_diff <= tolerance && fall > MIN_LOSS_FALL,
    }))
}

fn copy_adapters<A: ModelBackend, D: ModelBackend>(
    from: &Decoder<A>,
    to: &mut Decoder<D>,
    device: &D::Device,
) {
    let source = from.adapters();
    for ((_, linear), (_, adapter)) in to
        .linears_mut()
        .into_iter()
        .filter(|(_, l)| l.adapter.is_some())
        .zip(source)
    {
        let target = linear.adapter.as_mut().expect("filtered");
        target.a = from_vec(to_vec(&adapter.a), adapter.a.dims(), device);
        target.b = from_vec(to_vec(&adapter.b), adapter.b.dims(), device);
    }
}

/// The losses of `steps` steps, and the first step's gradient norm.
fn train_steps<D: TrainBackend>(
    model: Decoder<D>,
    settings: StepSettings,
    device: &D::Device,
    steps: usize,
) -> (Vec<f64>, f64) {
    let mut trainer = Trainer::new(model, plain_adamw(), settings, device);
    // One batch, seen every step: the adapters memorise it, so the loss falls steeply and a
    // wrong gradient anywhere shows in the trajectory (random batches would keep it flat at
    // ln(vocab), where any two backends agree).
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let batch = random_batch(&mut rng, 4, 128, trainer.model.config.vocab_size);
    let stats: Vec<(f64, f64)> = (0..steps)
        .map(|_| {
            trainer
                .step(std::slice::from_ref(&batch), LEARNING_RATE)
                .map_or_else(|e| (e.loss, e.grad_norm), |s| (s.loss, s.grad_norm))
        })
        .collect();
    (stats.iter().map(|s| s.0).collect(), stats[0].1)
}

fn uniform(rng: &mut impl Rng, len: usize, bound: f64) -> Vec<f64> {
    // Never zero: |v| ≥ bound/100, so a kernel that drops values cannot hide behind zeros.
    (0..len)
        .map(|_| {
            let v: f64 = rng.random_range(bound / 100.0..bound);
            if rng.random_bool(0.5) { v } else { -v }
        })
        .collect()
}

fn scaled_error(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(g, w)| (f64::from(*g) - w).abs())
        .fold(0f64, f64::max);
    worst / scale
}

fn tensor<B: burn::tensor::backend::Backend, const D: usize>(
    values: &[f64],
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

/// `y = x Wᵀ` and `dx` on the device against f64, for a dense (f32 or bf16) or a quantized
/// weight.
fn linear<B: ModelBackend>(
    device: &B::Device,
    n: usize,
    inp: usize,
    out: usize,
    kind: Weight,
) -> serde_json::Value {
    let mut rng = rand::rngs::StdRng::seed_from_u64((n * 31 + inp * 7 + out) as u64);
    let x = uniform(&mut rng, n * inp, 1.0);
    let mut w = uniform(&mut rng, out * inp, 0.05);
    let r = uniform(&mut rng, n * out, 1.0);
    let weight = if let Some((bits, group)) = kind.quantized() {
        let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let q =
            crate::quant::quantize::quantize(&w32, out, inp, bits, group).expect("valid geometry");
        w = q.dequantize().into_iter().map(f64::from).collect();
        Some(Arc::new(q))
    } else {
        None
    };
    w = w.iter().map(|&v| kind.round(v)).collect();
    fn frozen<C: ModelBackend>(
        weight: &Option<Arc<QuantizedMatrix>>,
        w: &[f64],
        kind: Weight,
        [out, inp]: [usize; 2],
        device: &C::Device,
    ) -> FrozenLinear<C> {
        FrozenLinear::new(
            match weight {
                Some(q) => FrozenWeight::quantized((**q).clone(), kind.half(), device),
                None if let Some(half) = kind.half() => FrozenWeight::Dense(Tensor::from_data(
                    TensorData::new(w.to_vec(), [out, inp]),
                    TensorCreationOptions::new(device.clone()).with_dtype(DType::from(half)),
                )),
                None => FrozenWeight::Dense(tensor(w, [out, inp], device)),
            },
            None,
        )
    }
    let xd = tensor::<Autodiff<B>, 3>(&x, [1, n, inp], device).require_grad();
    let y = frozen::<Autodiff<B>>(&weight, &w, kind, [out, inp], device).forward(xd.clone());
    let loss = (y.clone() * tensor::<Autodiff<B>, 3>(&r, [1, n, out], device)).sum();
    let grads = loss.backward();
    let dx: Vec<f32> = xd
        .grad(&grads)
        .expect("x is tracked")
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32");
    let y: Vec<f32> = y.into_data().convert::<f32>().into_vec().expect("f32");
    // The same product as inference runs it, without autodiff: on CUDA, up to 8 rows of a
    // quantized weight are read packed (`backends/cuda/qgemv.cu`).
    let plain: Vec<f32> = frozen::<B>(&weight, &w, kind, [out, inp], device)
        .forward(tensor::<B, 3>(&x, [1, n, inp], device))
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32");

    let y_ref = gemm(&x, &w, n, inp, out, true);
    let dx_ref = gemm(&r, &w, n, out, inp, false);
    let (fwd, bwd) = (scaled_error(&y, &y_ref), scaled_error(&dx, &dx_ref));
    let inference = scaled_error(&plain, &y_ref);
    let tolerance = match kind.half() {
        Some(_) => HALF_TOLERANCE,
        None => KERNEL_TOLERANCE,
    };
    json!({
        "check": kind.check(), "n": n, "in": inp, "out": out,
        "forward_error": fwd, "input_grad_error": bwd, "inference_error": inference,
        "tolerance": tolerance,
        "pass": fwd <= tolerance && bwd <= tolerance && inference <= tolerance,
    })
}

/// An embedding lookup from a 4-bit weight (groups of 64, so a 64-wide row is one group)
/// against the host's dequantization of the same rows.
fn embedding_rows<B: ModelBackend>(
    device: &B::Device,
    cols: usize,
    kind: Weight,
) -> serde_json::Value {
    let rows = 96;
    let mut rng = rand::rngs::StdRng::seed_from_u64(cols as u64);
    let w: Vec<f32> = uniform(&mut rng, rows * cols, 0.05)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let q = crate::quant::quantize::quantize(&w, rows, cols, 4, 64).expect("valid geometry");
    let ids = [3u32, 0, 95, 3, 41];
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&id| {
            let mut row = vec![0f32; cols];
            q.dequantize_row(id as usize, &mut row);
            row.into_iter().map(|v| kind.round(f64::from(v)))
        })
        .collect();
    let got: Vec<f32> = FrozenWeight::<B>::quantized(q, kind.half(), device)
        .rows(&ids, device)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32");
    let error = scaled_error(&got, &want);
    let tolerance = match kind.half() {
        Some(_) => HALF_TOLERANCE,
        None => KERNEL_TOLERANCE,
    };
    json!({
        "check": format!("embedding_{}", kind.check().trim_start_matches("linear_")), "cols": cols,
        "error": error, "tolerance": tolerance, "pass": error <= tolerance,
    })
}

/// `a [m, k] · b` in f64, with `b` given as `[n, k]` (`transposed`, i.e. `a bᵀ`) or `[k, n]`.
fn gemm(a: &[f64], b: &[f64], m: usize, k: usize, n: usize, transposed: bool) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    let (rsb, csb) = if transposed {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    // SAFETY: the strides describe the row-major buffers, whose lengths are m·k, k·n and m·n.
    unsafe {
        matrixmultiply::dgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            rsb,
            csb,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
    c
}
