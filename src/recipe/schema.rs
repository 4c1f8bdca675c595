//! Every section of a recipe, with its defaults. Unknown keys are errors (`deny_unknown_fields`).
//! Defaults follow mlx-lm's LoRA defaults where they exist (rank 8, scale 20, lr 1e-5).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::backend::DeviceKind;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Another recipe whose settings this one starts from (path relative to this file).
    #[serde(default, skip_serializing)]
    pub extends: Option<PathBuf>,
    /// Run name; defaults to the recipe's file stem.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub device: DeviceKind,
    #[serde(default)]
    pub seed: u64,
    pub model: ModelSection,
    #[serde(default)]
    pub lora: LoraSection,
    pub data: DataSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub output: OutputSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub export: Option<ExportSection>,
}

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

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuantizeSection {
    #[serde(default = "default_bits")]
    pub bits: u32,
    #[serde(default = "default_group_size")]
    pub group_size: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    #[default]
    Lora,
    Dora,
}

/// `"all-linear"` or a list of keys relative to a block (`self_attn.q_proj`, `mlp.down_proj`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Targets {
    Named(String),
    Keys(Vec<String>),
}

/// `-1` = every block, `N` = the last N blocks (mlx-lm's meaning), or explicit indices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Layers {
    Last(i64),
    List(Vec<usize>),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    #[serde(default, rename = "type")]
    pub kind: AdapterKind,
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// Multiplies the adapter output directly (mlx-lm's `scale`). Mutually exclusive with `alpha`.
    #[serde(default)]
    pub scale: Option<f64>,
    /// PEFT-style: scale = alpha / rank (or alpha / sqrt(rank) with `rslora`).
    #[serde(default)]
    pub alpha: Option<f64>,
    #[serde(default)]
    pub rslora: bool,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub targets: Targets,
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

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Cut the sequence at `max_seq_len` (reported once, with a count).
    #[default]
    Truncate,
    /// Skip the example.
    Drop,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct FieldNames {
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub completion: Option<String>,
    #[serde(default)]
    pub messages: Option<String>,
    #[serde(default)]
    pub tools: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A folder holding `train` / `valid` / `test` files (.jsonl, .parquet or .csv).
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub train: Option<PathBuf>,
    #[serde(default)]
    pub valid: Option<PathBuf>,
    #[serde(default)]
    pub test: Option<PathBuf>,
    #[serde(default)]
    pub fields: FieldNames,
    /// Train on assistant tokens only (every assistant turn).
    #[serde(default)]
    pub mask_prompt: bool,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    #[serde(default)]
    pub overflow: Overflow,
    /// Pack short examples into one sequence (attention does not cross examples).
    #[serde(default)]
    pub packing: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    #[default]
    Adamw,
    Adam,
    Sgd,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    #[default]
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps; `epochs` instead counts passes over the training split.
    #[serde(default)]
    pub iters: Option<usize>,
    #[serde(default)]
    pub epochs: Option<f64>,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "one")]
    pub grad_accumulation: usize,
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    #[serde(default)]
    pub optimizer: OptimizerKind,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub schedule: ScheduleKind,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub warmup_init: f64,
    /// The schedule's floor.
    #[serde(default)]
    pub min_learning_rate: f64,
    /// Clip by the global gradient norm; none when absent.
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    #[serde(default)]
    pub grad_checkpoint: bool,
    #[serde(default = "default_report_every")]
    pub steps_per_report: usize,
    #[serde(default = "default_eval_every")]
    pub steps_per_eval: usize,
    /// Validation batches per evaluation; -1 = the whole split.
    #[serde(default = "default_val_batches")]
    pub val_batches: i64,
    #[serde(default = "default_save_every")]
    pub save_every: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        toml::from_str("").expect("every train key has a default")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Run folder (adapters, checkpoints, logs); defaults to `runs/<name>`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// JSONL of held-out prompts (`prompt` or `messages`, optional `expected`).
    #[serde(default)]
    pub prompts: Option<PathBuf>,
    #[serde(default = "default_eval_tokens")]
    pub max_tokens: usize,
    #[serde(default)]
    pub temperature: f32,
    #[serde(default = "one_f32")]
    pub top_p: f32,
    #[serde(default)]
    pub seed: u64,
}

impl Default for EvalSection {
    fn default() -> Self {
        toml::from_str("").expect("every eval key has a default")
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    Mlx,
    Hf,
    Gguf,
}

/// A float type to store weights in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FloatDtype {
    F32,
    F16,
    Bf16,
}

/// The tensor type of a GGUF export's matrices (norms and biases are always F32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
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
