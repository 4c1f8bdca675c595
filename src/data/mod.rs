//! Training data: records from files (`records`), turned into token ids with a loss mask through
//! the chat template (`encode`), then length-bucketed into padded (or packed) batches
//! (`batches`); `split` ties the three together for one split, and `report` describes it.

pub mod batch;
pub mod batches;
pub mod encode;
pub mod records;
pub mod report;
pub mod split;

pub use batch::Batch;
pub use batches::{BatchPlan, Example};
pub use encode::Encoder;
pub use records::{Record, load_split};
pub use split::{encode_split, plan_batches};
