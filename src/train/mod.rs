//! Training: the loss, the optimizer and schedule, and the loop that ties them to data,
//! checkpoints and events.

pub mod checkpoint;
pub mod checkpointed;
mod head;
mod held_out;
pub mod loss;
pub mod optimizer;
pub mod run;
pub mod schedule;
pub mod step;
