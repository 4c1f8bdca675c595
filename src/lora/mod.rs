//! LoRA / DoRA adapters on the frozen linears: which linears get one (`inject`), the adapter
//! files mlx-lm and peft read (`files`), and adapter folders read back whoever wrote them
//! (`stored`). The layer itself is `model::adapter`.

pub mod files;
pub mod inject;
pub mod stored;

pub use inject::{AdapterSpec, inject};
