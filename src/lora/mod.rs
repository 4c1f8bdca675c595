//! LoRA / DoRA adapters on the frozen linears: the layer (`adapter`), which linears get one
//! (`inject`), and the adapter files mlx-lm and peft read (`files`).

pub mod adapter;
pub mod files;
pub mod host;
pub mod inject;

pub use adapter::LoraAdapter;
pub use inject::{AdapterSpec, TARGET_KEYS, inject};
