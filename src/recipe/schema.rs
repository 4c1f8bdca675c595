//! Every section of a recipe, with its defaults. Unknown keys are errors (`deny_unknown_fields`).
//! Defaults follow mlx-lm's LoRA defaults where they exist (rank 8, scale 20, lr 1e-5).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A whole run as one recipe file describes it: model, adapters, data, training, evaluation
/// and export.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Another recipe whose settings this one starts from (path relative to this file).
    #[serde(default, skip_serializing)]
    pub extends: Option<PathBuf>,
    /// Run name; defaults to the recipe's file stem.
    #[serde(default)]
    pub name: String,
    /// Where the run computes; default `auto`.
    #[serde(default)]
    pub device: DeviceKind,
    /// Seeds the adapters' initialisation, dropout and the batch order; default 0.
    #[serde(default)]
    pub seed: u64,
    /// `[model]`: the base the adapters are trained on (required).
    pub model: ModelSection,
    /// `[lora]`: the adapters and where they go.
    #[serde(default)]
    pub lora: LoraSection,
    /// `[data]`: the dataset and how its records become training sequences (required).
    pub data: DataSection,
    /// `[train]`: optimizer, learning-rate schedule, run length and cadence.
    #[serde(default)]
    pub train: TrainSection,
    /// `[output]`: where the run writes its files.
    #[serde(default)]
    pub output: OutputSection,
    /// `[eval]`: held-out prompts and how answers to them are sampled.
    #[serde(default)]
    pub eval: EvalSection,
    /// `[export]`: fuse the adapters into the base and write the result when `train` ends;
    /// no export when absent.
    #[serde(default)]
    pub export: Option<ExportSection>,
    /// `[distributed]`: data-parallel training over several GPUs; one device when absent.
    #[serde(default)]
    pub distributed: Option<DistributedSection>,
}

/// `[distributed]`: one worker per GPU, each with the whole base and a replica of the adapters;
/// a step's micro-batches are split across them and their gradients summed (NCCL).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistributedSection {
    /// Which GPUs: `"all"`, a count (the first N), or a list of device ids.
    pub gpus: GpuSet,
}

/// Which GPUs a data-parallel run takes (`[distributed] gpus`, `train --gpus`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum GpuSet {
    /// `"all"`: every device that answers (the only name accepted).
    Named(String),
    /// The first N devices.
    Count(usize),
    /// These device ids.
    Ids(Vec<usize>),
}

/// More workers than any one run could use: a bound for counts read from a recipe.
const MAX_GPUS: usize = 4096;

impl GpuSet {
    /// Whether the setting can name any GPUs (checked when the recipe is read, before any device
    /// is asked).
    pub fn check(&self) -> Result<(), String> {
        match self {
            GpuSet::Named(name) if name == "all" => Ok(()),
            other => other.ids(MAX_GPUS).map(|_| ()),
        }
    }

    /// `all`, a count, or ids separated by commas (`0,2,3`), as `--gpus` takes them.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "all" {
            return Ok(GpuSet::Named(text.into()));
        }
        if !text.contains(',')
            && let Ok(n) = text.parse()
        {
            return Ok(GpuSet::Count(n));
        }
        text.split(',')
            .map(|id| id.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map(GpuSet::Ids)
            .map_err(|_| format!("`{text}`: use all, a count (4) or device ids (0,2,3)"))
    }

    /// The device ids, when `available` devices answer; an error naming what is missing.
    pub fn ids(&self, available: usize) -> Result<Vec<usize>, String> {
        let ids: Vec<usize> = match self {
            GpuSet::Named(name) if name == "all" => (0..available).collect(),
            GpuSet::Named(name) => {
                return Err(format!("\"{name}\": use \"all\", a count or a list of ids"));
            }
            GpuSet::Count(n) if *n > available.min(MAX_GPUS) => {
                return Err(format!("{n} GPUs asked for; {available} answer"));
            }
            GpuSet::Count(n) => (0..*n).collect(),
            GpuSet::Ids(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err("no GPU selected: give at least one".into());
        }
        if let Some(bad) = ids.iter().find(|&&id| id >= available) {
            return Err(format!(
                "GPU {bad} does not exist: {available} answer (ids 0..{available})"
            ));
        }
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != ids.len() {
            return Err(format!("{ids:?} names a GPU twice"));
        }
        Ok(ids)
    }
}

/// `[model]`: the frozen base model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face folder, an mlx-community folder, or a `.gguf` file.
    pub path: PathBuf,
    /// Quantize a float base on load (QLoRA). Already-quantized bases train as they are.
    #[serde(default)]
    pub quantize: Option<QuantizeSection>,
    /// Compute dtype of the frozen base.
    #[serde(default)]
    pub dtype: Dtype,
}

/// `[model] quantize`: MLX affine quantization applied to a float base on load (QLoRA).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuantizeSection {
    /// Bits per weight: 2, 3, 4, 5, 6 or 8; default 4.
    #[serde(default = "default_bits")]
    pub bits: u32,
    /// Consecutive weights of a row sharing one scale and bias: 32, 64 or 128; default 64.
    #[serde(default = "default_group_size")]
    pub group_size: usize,
}

/// Compute dtype of the frozen base (`[model] dtype`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// f32 (the default); the only choice off CUDA.
    #[default]
    F32,
    /// bf16 weights and GEMMs with f32 activations, adapters and optimizer state; CUDA only.
    Bf16,
    /// Accepted by the schema, but refused when the model loads: no backend computes in f16.
    F16,
    /// bf16 where the device is CUDA, else f32: one recipe for an NVIDIA box and a Mac.
    Auto,
}

/// The kind of adapter trained on each targeted linear (`[lora] type`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// LoRA: the low-rank update `s · (x A) B` is added to the frozen output (the default).
    #[default]
    Lora,
    /// DoRA: LoRA whose updated weight rows are rescaled to a trained per-row magnitude.
    Dora,
}

/// `"all-linear"` or a list of keys relative to a block (`self_attn.q_proj`, `mlp.down_proj`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Targets {
    /// `"all-linear"`: every linear of a block (the only name accepted).
    Named(String),
    /// Linear keys relative to a block, such as `self_attn.q_proj`.
    Keys(Vec<String>),
}

/// `-1` = every block, `N` = the last N blocks (mlx-lm's meaning), or explicit indices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Layers {
    /// `-1` for every block, or `N > 0` for the last N blocks.
    Last(i64),
    /// Explicit block indices, counted from 0.
    List(Vec<usize>),
}

/// `[lora]`: the adapters' kind, rank, scale and dropout, and which linears get one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Key `type`: `lora` (default) or `dora`.
    #[serde(default, rename = "type")]
    pub kind: AdapterKind,
    /// Rank of the low-rank factors A and B; at least 1, default 8.
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// Multiplies the adapter output directly (mlx-lm's `scale`). Mutually exclusive with `alpha`.
    #[serde(default)]
    pub scale: Option<f64>,
    /// PEFT-style: scale = alpha / rank (or alpha / sqrt(rank) with `rslora`).
    #[serde(default)]
    pub alpha: Option<f64>,
    /// With `alpha`, scale = alpha / sqrt(rank) instead of alpha / rank; default false.
    #[serde(default)]
    pub rslora: bool,
    /// Dropout probability on the adapter's input while training, in [0, 1); default 0.
    #[serde(default)]
    pub dropout: f64,
    /// Which linears of a block get an adapter; default `self_attn.q_proj` and `self_attn.v_proj`.
    #[serde(default = "default_targets")]
    pub targets: Targets,
    /// Which blocks get adapters; default the last 16.
    #[serde(default = "default_layers")]
    pub layers: Layers,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            kind: AdapterKind::Lora,
            rank: default_rank(),
            scale: None,
            alpha: None,
            rslora: false,
            dropout: 0.0,
            targets: default_targets(),
            layers: default_layers(),
        }
    }
}

impl LoraSection {
    /// The factor the adapter output is multiplied by.
    pub fn effective_scale(&self) -> f64 {
        match (self.scale, self.alpha) {
            (Some(s), _) => s,
            (None, Some(a)) if self.rslora => a / (self.rank as f64).sqrt(),
            (None, Some(a)) => a / self.rank as f64,
            (None, None) => 20.0,
        }
    }
}

/// What happens to an example longer than `[data] max_seq_len`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Cut the sequence at `max_seq_len` (reported once, with a count).
    #[default]
    Truncate,
    /// Skip the example.
    Drop,
}

/// `[data] fields`: the record field names to read, for datasets that use other names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct FieldNames {
    /// Field of a plain-text record; default `text`.
    #[serde(default)]
    pub text: Option<String>,
    /// Field of a record's prompt; default `prompt`.
    #[serde(default)]
    pub prompt: Option<String>,
    /// Field of the completion that follows the prompt; default `completion`.
    #[serde(default)]
    pub completion: Option<String>,
    /// Field of a chat record's list of messages; default `messages`.
    #[serde(default)]
    pub messages: Option<String>,
    /// Field of a chat record's tool definitions; default `tools`.
    #[serde(default)]
    pub tools: Option<String>,
}

/// `[data]`: where the splits are and how records become training sequences.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A folder holding `train` / `valid` / `test` files (.jsonl, .parquet or .csv).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Train split file; replaces the `train` file of `path`.
    #[serde(default)]
    pub train: Option<PathBuf>,
    /// Validation split file; replaces the `valid` file of `path`.
    #[serde(default)]
    pub valid: Option<PathBuf>,
    /// Test split file; replaces the `test` file of `path`.
    #[serde(default)]
    pub test: Option<PathBuf>,
    /// Record field names; the standard ones (`text`, `prompt`, `messages`, ...) when unset.
    #[serde(default)]
    pub fields: FieldNames,
    /// Train on assistant tokens only (every assistant turn).
    #[serde(default)]
    pub mask_prompt: bool,
    /// Longest sequence in tokens (and the length of a packed row); longer examples follow
    /// `overflow`. Default 2048.
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// What happens to examples longer than `max_seq_len`; default `truncate`.
    #[serde(default)]
    pub overflow: Overflow,
    /// Pack short examples into one sequence (attention does not cross examples).
    #[serde(default)]
    pub packing: bool,
}

/// The optimizer that updates the adapters (`[train] optimizer`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// AdamW, with weight decay decoupled from the gradient (the default).
    #[default]
    Adamw,
    /// Adam, with weight decay added to the gradient.
    Adam,
    /// Plain SGD without momentum; weight decay is added to the gradient.
    Sgd,
}

/// How the learning rate moves after warmup (`[train] schedule`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Stays at `learning_rate` (the default).
    #[default]
    Constant,
    /// Falls linearly from `learning_rate` to `min_learning_rate` over the remaining steps.
    Linear,
    /// Follows a half cosine from `learning_rate` to `min_learning_rate` over the remaining steps.
    Cosine,
}

/// `[train]`: optimizer, learning-rate schedule, run length and the reporting, evaluation and
/// saving cadence.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps; `epochs` instead counts passes over the training split.
    #[serde(default)]
    pub iters: Option<usize>,
    /// Passes over the training split (fractions allowed), instead of `iters`; one pass when
    /// neither is set.
    #[serde(default)]
    pub epochs: Option<f64>,
    /// Sequences (packed rows with `packing`) per micro-batch; default 4.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Micro-batches whose gradients make one optimizer step; default 1.
    #[serde(default = "one")]
    pub grad_accumulation: usize,
    /// Peak learning rate, reached after warmup; must be positive, default 1e-5.
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    /// `adamw` (default), `adam` or `sgd`.
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// Adam's moment decay rates β1 and β2; default [0.9, 0.999].
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    /// Adam's ε, added to the denominator; default 1e-8.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Weight decay coefficient; default 0 (decoupled for AdamW, added to the gradient otherwise).
    #[serde(default)]
    pub weight_decay: f64,
    /// Learning-rate shape after warmup: `constant` (default), `linear` or `cosine`.
    #[serde(default)]
    pub schedule: ScheduleKind,
    /// Steps of linear warmup from `warmup_init` to `learning_rate`; default 0.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Learning rate at the first warmup step; default 0.
    #[serde(default)]
    pub warmup_init: f64,
    /// The schedule's floor.
    #[serde(default)]
    pub min_learning_rate: f64,
    /// Clip by the global gradient norm; none when absent.
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// A mixture of experts' router load-balancing loss, this much of it added to the loss
    /// (transformers' `router_aux_loss_coef` with `output_router_logits`); none when absent.
    #[serde(default)]
    pub router_aux_loss_coef: Option<f64>,
    /// Recompute each block's activations in the backward pass, keeping only its input;
    /// default false.
    #[serde(default)]
    pub grad_checkpoint: bool,
    /// With `grad_checkpoint`, keep each block's input in host memory instead of on the device
    /// (long context: 2 GiB a layer at llama3-8b's 256k); default false.
    #[serde(default)]
    pub offload_checkpoints: bool,
    /// With `grad_checkpoint`, a micro-batch of more tokens runs each block's MLP this many
    /// tokens at a time (0: never); default 16384.
    #[serde(default = "default_mlp_chunk_tokens")]
    pub mlp_chunk_tokens: usize,
    /// Optimizer steps between training reports (loss, learning rate, throughput); default 10.
    #[serde(default = "default_report_every")]
    pub steps_per_report: usize,
    /// Optimizer steps between validation-loss evaluations; default 200.
    #[serde(default = "default_eval_every")]
    pub steps_per_eval: usize,
    /// Validation batches per evaluation; -1 = the whole split.
    #[serde(default = "default_val_batches")]
    pub val_batches: i64,
    /// Optimizer steps between saves of the adapters and the resume checkpoint; default 100.
    #[serde(default = "default_save_every")]
    pub save_every: usize,
}

/// `train.mlp_chunk_tokens`'s default: llama3-8b's chunk activations are then under 1 GiB
/// each, and the chunk's GEMMs still fill an H200.
pub const DEFAULT_MLP_CHUNK_TOKENS: usize = 16_384;

fn default_mlp_chunk_tokens() -> usize {
    DEFAULT_MLP_CHUNK_TOKENS
}

impl Default for TrainSection {
    fn default() -> Self {
        toml::from_str("").expect("every train key has a default")
    }
}

/// `[output]`: where the run writes its files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Run folder (adapters, checkpoints, logs); defaults to `runs/<name>`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Write TensorBoard event files to `<run dir>/tensorboard/`; default true.
    #[serde(default = "yes")]
    pub tensorboard: bool,
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection {
            dir: None,
            tensorboard: true,
        }
    }
}

/// `[eval]`: held-out prompts and how answers to them are sampled.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// JSONL of held-out prompts (`prompt` or `messages`, optional `expected`).
    #[serde(default)]
    pub prompts: Option<PathBuf>,
    /// Most tokens generated per answer; default 128.
    #[serde(default = "default_eval_tokens")]
    pub max_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy.
    #[serde(default)]
    pub temperature: f32,
    /// Nucleus-sampling probability mass; 1 (the default) turns it off.
    #[serde(default = "one_f32")]
    pub top_p: f32,
    /// Seed of the sampler; default 0.
    #[serde(default)]
    pub seed: u64,
}

impl Default for EvalSection {
    fn default() -> Self {
        toml::from_str("").expect("every eval key has a default")
    }
}

/// The layout a fused export is written in.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// An mlx-community folder; a quantized base stays quantized.
    Mlx,
    /// A Hugging Face folder in one float type, with the adapters as a PEFT folder.
    Hf,
    /// One `.gguf` file as llama.cpp's converter writes it.
    Gguf,
}

/// A float type to store weights in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FloatDtype {
    /// 32-bit IEEE float.
    #[serde(alias = "float32")]
    #[value(alias = "float32")]
    F32,
    /// 16-bit IEEE half float.
    #[serde(alias = "float16")]
    #[value(alias = "float16")]
    F16,
    /// bfloat16: 16 bits with f32's exponent range.
    #[serde(alias = "bfloat16")]
    #[value(alias = "bfloat16")]
    Bf16,
}

/// The tensor type of a GGUF export's matrices (norms and biases are always F32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum GgufType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE half float.
    F16,
    /// bfloat16.
    Bf16,
    /// ggml Q8_0: blocks of 32 signed 8-bit codes with an f16 scale (the `[export]` default).
    #[value(name = "q8_0")]
    Q8_0,
    /// ggml Q4_0: blocks of 32 4-bit codes with an f16 scale.
    #[value(name = "q4_0")]
    Q4_0,
    /// ggml Q4_1: blocks of 32 4-bit codes with an f16 scale and an f16 minimum.
    #[value(name = "q4_1")]
    Q4_1,
    /// ggml Q4_K: super-blocks of 256, 8 groups of 32 4-bit codes with 6-bit scales and minima
    /// (rows not a multiple of 256 are written F16).
    #[value(name = "q4_k")]
    Q4K,
    /// ggml Q6_K: super-blocks of 256, 16 groups of 16 6-bit codes with 8-bit scales.
    #[value(name = "q6_k")]
    Q6K,
}

/// `[export]`: fuse the adapters into the base when `train` ends and write the result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    /// `mlx`, `hf` or `gguf`; required.
    pub format: ExportFormat,
    /// Output folder; defaults to `<run dir>/fused-<format>`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Write float weights instead of requantizing.
    #[serde(default)]
    pub dequantize: bool,
    /// Bits for the layers LoRA touched when writing a quantized result.
    #[serde(default = "default_requant_bits")]
    pub requant_bits: u32,
    /// Float type of float weights; the base's own when unset.
    #[serde(default)]
    pub dtype: Option<FloatDtype>,
    /// Tensor type of a GGUF export's matrices.
    #[serde(default = "default_gguf_type")]
    pub gguf_type: GgufType,
}

fn default_bits() -> u32 {
    4
}
fn default_group_size() -> usize {
    64
}
fn default_rank() -> usize {
    8
}
fn default_targets() -> Targets {
    Targets::Keys(vec!["self_attn.q_proj".into(), "self_attn.v_proj".into()])
}
fn default_layers() -> Layers {
    Layers::Last(16)
}
fn default_max_seq_len() -> usize {
    2048
}
fn default_batch_size() -> usize {
    4
}
fn one() -> usize {
    1
}
fn one_f32() -> f32 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_learning_rate() -> f64 {
    1e-5
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_report_every() -> usize {
    10
}
fn default_eval_every() -> usize {
    200
}
fn default_val_batches() -> i64 {
    25
}
fn default_save_every() -> usize {
    100
}
fn default_eval_tokens() -> usize {
    128
}
fn default_gguf_type() -> GgufType {
    GgufType::Q8_0
}
fn default_requant_bits() -> u32 {
    8
}

/// Where a run computes: `device = "auto" | "cpu" | "cuda" | "metal" | "vulkan"` in a recipe,
/// `--device` on the command line.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
    Default,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The default: CUDA if this binary has it and a GPU answers, else Metal on macOS if this
    /// binary has it, else the CPU (Vulkan only when asked); the choice is printed at start.
    #[default]
    Auto,
    /// Burn's NdArray backend on the CPU.
    Cpu,
    /// An NVIDIA GPU through Burn's CUDA backend; needs the `cuda` feature.
    Cuda,
    /// Apple Silicon through wgpu/Metal; needs the `metal` feature. Has never run on Apple
    /// hardware.
    Metal,
    /// Any Vulkan device through wgpu (the same portable backend as Metal); needs the `vulkan`
    /// feature.
    Vulkan,
}
