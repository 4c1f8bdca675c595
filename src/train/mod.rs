//! Training: the loss, the optimizer and schedule, and the loop that ties them to data,
//! checkpoints and events.

mod generations;
mod head;
pub mod loss;
pub mod optimizer;
pub mod recompute;
pub mod run;
pub mod run_folder;
pub mod run_state;
pub mod schedule;
pub mod trainer;
