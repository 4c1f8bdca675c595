//! The decoder: configuration per family, the Burn modules, and loading weights into them.

pub mod attention_op;
pub mod config;
pub mod decoder;
pub mod device_quant;
pub mod elementwise_op;
pub mod frozen_op;
pub mod host_blas;
pub mod host_elementwise;
pub mod host_matmul;
pub mod host_softmax;
pub mod layout;
pub mod linear;
pub mod load;
pub mod matmul_op;
pub mod primitive;
pub mod rope;
pub mod tensors;
#[cfg(test)]
mod test_f64;
pub mod valid;
pub mod weights;

pub use config::{Family, ModelConfig, RopeScaling};
pub use decoder::{Decoder, KvCache};
pub use frozen_op::FrozenLinearBackend;
pub use load::{LoadedModel, ModelFiles, ModelFormat, load_model};
pub use matmul_op::MatmulBackend;
