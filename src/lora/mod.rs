//! LoRA / DoRA adapters on the frozen linears: which linears get one (`inject`), the adapter
//! files mlx-lm and peft read (`files`, peft's layout in `peft_layout`, a fused linear's parts'
//! adapters joined in `fused_parts`), and adapter folders
//! read back whoever wrote them (`stored`). The layer itself is `model::adapter`.

pub mod files;
pub mod fused_parts;
pub mod inject;
pub mod peft_layout;
pub mod stored;

pub use inject::{AdapterSpec, inject};
