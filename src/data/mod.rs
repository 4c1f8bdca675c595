//! Training data: records from files (`records`), turned into token ids with a loss mask through
//! the chat template (`encode`), then length-bucketed into padded batches (`batches`).

pub mod batches;
pub mod encode;
pub mod records;

pub use batches::{BatchPlan, Example};
pub use encode::Encoder;
pub use records::{Record, load_split};
