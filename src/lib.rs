//! loraforge: LoRA / QLoRA fine-tuning of open decoder LLMs on Burn.
//!
//! Data flows one way: recipe → model → lora → train → events → dashboard;
//! train → checkpoints → fuse → export → eval. This crate is the library; `main.rs` is a thin CLI.

pub mod backend;
pub mod bench;
pub mod chat;
pub mod cli;
pub mod dashboard;
pub mod data;
pub mod device_check;
pub mod eval;
pub mod events;
pub mod export;
pub mod generate;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod heldout;
pub mod inspect;
pub mod io;
pub mod lora;
pub mod model;
pub mod plot;
pub mod progress;
pub mod quant;
pub mod recipe;
pub mod sinks;
pub mod tokenizer;
pub mod train;
