//! The decoder: configuration per family, the one table of tensor names, the weights and where
//! they come from, loading, and the Burn modules (with the LoRA/DoRA layer a linear may carry).

pub mod adapter;
pub mod config;
pub mod decode;
pub mod decoder;
pub mod experts;
pub mod kv_cache;
pub mod layout;
pub mod linear;
pub mod load;
pub mod names;
pub mod projections;
pub mod route_memo;
pub mod router_balance;
pub mod valid;
pub mod weights;

pub use adapter::LoraAdapter;
pub use config::{Family, ModelConfig};
pub use decoder::Decoder;
pub use kv_cache::{Bound, KvCache};
pub use load::{LoadedModel, ModelFiles, ModelFormat, load_model};
