//! loraforge: LoRA / QLoRA fine-tuning of open decoder LLMs on Burn.
//!
//! Data flows one way: recipe → model → lora → train → events → sinks;
//! train → checkpoints → fuse → export → eval. The modules below are declared in layer order:
//! each imports only modules declared before it (`docs/architecture.md`; `tests/suite/layers.rs`
//! checks it). This crate is the library; `main.rs` is a thin CLI.

#![warn(missing_docs)]

/// Progress bars for long work outside training.
pub mod progress;
/// Untrusted code (chat templates) run under a memory budget and a time limit.
pub mod memory_budget;
/// The trainer's two channels: events out, controls in.
pub mod events;
/// File formats: safetensors, GGUF, atomic writes.
pub mod io;
/// MLX affine quantization and GGML blocks.
pub mod quant;
/// The TOML recipe.
pub mod recipe;
/// Data-parallel workers' gradient all-reduce (a leaf: backends hand out its communicators).
pub mod distributed;
/// Each op's trait, reference form and autodiff backward.
pub mod ops;
/// The backends' implementations of the ops, and backend selection.
pub mod backends;
/// The decoder: config, tensor names, weights, loading, modules.
pub mod model;
/// Which linears get adapters, and the adapter files.
pub mod lora;
/// Tokenizers from `tokenizer.json` and GGUF.
pub mod tokenizer;
/// Chat templates, rendered as transformers renders them.
pub mod chat;
/// Dataset files to batches.
pub mod data;
/// Sampling and generation with a KV cache.
pub mod generate;
/// The trainer: one step, the loop, optimizer, checkpoints.
pub mod train;
/// Consumers of events: log lines, metrics, TensorBoard, dashboard, plot.
pub mod sinks;
/// Fusing adapters into the base and exporting it.
pub mod export;
/// Base vs fine-tuned vs fused generations on held-out prompts.
pub mod eval;
/// `bench train` and `bench check`.
pub mod diagnostics;
/// What a model file holds.
pub mod inspect;
/// The command line.
pub mod cli;
