//! Training: the loss, the optimizer and schedule, and the loop that ties them to data,
//! checkpoints and events.

pub mod loss;
pub mod optimizer;
pub mod schedule;
pub mod step;
