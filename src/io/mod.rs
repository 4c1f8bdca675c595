//! Reading and writing model files: safetensors (single and sharded), GGUF, and atomic writes.

pub mod atomic;
pub mod gguf;
pub mod raw;
pub mod safetensors;

pub use raw::{RawDtype, RawTensor};
