//! Data-parallel training's one collective: the workers' gradients summed, in place, on every
//! worker (an all-reduce). The trainer splits a step's micro-batches across the workers
//! (worker `r` of `W` takes micro-batches `r, r + W, ...`), each sums its own gradients, and
//! one all-reduce of one flat buffer (the gradients, then the losses) gives every worker the
//! single-worker sum: the optimizer step that follows is the same everywhere.
//!
//! [`InProcess`] is the communicator of worker threads in one process (the CPU tests); `Nccl`
//! (with `--features cuda`) that of one worker thread per GPU.

mod in_process;
#[cfg(feature = "cuda")]
mod nccl;

pub use in_process::InProcess;
#[cfg(feature = "cuda")]
pub use nccl::Nccl;

/// Why a collective failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CollectiveError {
    /// Another worker stopped (its thread ended, or it did not arrive in time).
    #[error(
        "worker {rank} of {world} stopped; the others stop too (resume from the last checkpoint)"
    )]
    PeerStopped {
        /// The worker that stopped.
        rank: usize,
        /// How many workers the run has.
        world: usize,
    },
    /// The collective library reported an error.
    #[error("worker {rank}'s all-reduce failed: {reason}")]
    Failed {
        /// The worker whose call failed.
        rank: usize,
        /// What the library said.
        reason: String,
    },
    /// The workers passed buffers of different lengths (their models differ).
    #[error(
        "worker {rank} all-reduced {found} values where worker 0 gave {expected}: the workers' adapters differ"
    )]
    Mismatch {
        /// The worker whose buffer differs.
        rank: usize,
        /// Worker 0's length.
        expected: usize,
        /// This worker's length.
        found: usize,
    },
}

/// A data-parallel group: each worker's device and its end of the group's communicator, rank
/// order.
pub type Group<D> = Vec<(D, Box<dyn Communicator>)>;

/// One worker's end of a group of `world` workers.
pub trait Communicator: Send {
    /// This worker's index, `0..world`.
    fn rank(&self) -> usize;

    /// How many workers the group has.
    fn world(&self) -> usize;

    /// Replaces `values` on every worker by the element-wise sum over the workers (all pass the
    /// same length), summed in rank order so that every worker gets the same bits.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), CollectiveError>;
}

/// The micro-batches of a step's `total` that worker `rank` of `world` runs: `rank, rank +
/// world, ...` (some workers get one fewer when `world` does not divide `total`).
pub fn shard(total: usize, rank: usize, world: usize) -> impl Iterator<Item = usize> {
    (rank..total).step_by(world.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_micro_batch_once() {
        for world in 1..5 {
            let mut seen: Vec<usize> = (0..world).flat_map(|r| shard(7, r, world)).collect();
            seen.sort();
            assert_eq!(seen, (0..7).collect::<Vec<_>>(), "world {world}");
        }
    }
}
