//! [`Communicator`] for worker threads of one process: each all-reduce is a rendezvous where
//! every worker leaves its buffer, the last to arrive sums them in rank order, and all copy the
//! sum back. A worker that drops its end (its thread ended, a panic included) or does not arrive
//! within the timeout makes the others' calls fail, naming it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{CollectiveError, Communicator};

/// How long a worker waits for the others at a collective.
const TIMEOUT: Duration = Duration::from_secs(600);

/// One worker's end of an in-process group.
#[derive(Debug)]
pub struct InProcess {
    rank: usize,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Each worker's buffer for the current round, until the round completes.
    buffers: Vec<Option<Vec<f32>>>,
    /// The sum of the last completed round.
    sum: Vec<f32>,
    /// Completed rounds.
    round: u64,
    /// Workers that have read the last round's sum.
    read: usize,
    /// A worker that dropped its end.
    stopped: Option<usize>,
    /// A length mismatch found when summing: (rank, expected, found).
    mismatch: Option<(usize, usize, usize)>,
}

impl InProcess {
    /// The `world` ends of a new group, rank 0 first.
    pub fn group(world: usize) -> Vec<InProcess> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(State {
                buffers: vec![None; world],
                read: world,
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        (0..world)
            .map(|rank| InProcess {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked while holding the lock left the state as it was; the
        // collective reports it as stopped rather than propagating the poison.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Waits on the condition until `done(state)`, failing when a worker stopped or the wait
    /// exceeds [`TIMEOUT`] (the slowest worker is then named as stopped).
    fn wait_until<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        done: impl Fn(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>, CollectiveError> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if done(&state) {
                return Ok(state);
            }
            if let Some(rank) = state.stopped {
                return Err(self.stopped(rank));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let late = state.buffers.iter().position(Option::is_none).unwrap_or(0);
                return Err(self.stopped(late));
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|poison| poison.into_inner())
                .0;
        }
    }

    fn stopped(&self, rank: usize) -> CollectiveError {
        CollectiveError::PeerStopped {
            rank,
            world: self.shared.world,
        }
    }
}

impl Communicator for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), CollectiveError> {
        let world = self.shared.world;
        // Every worker has read the previous round's sum before a new round starts.
        let mut state = self.wait_until(self.lock(), |s| s.read == world)?;
        let round = state.round;
        state.buffers[self.rank] = Some(values.to_vec());
        if state.buffers.iter().all(Option::is_some) {
            let buffers: Vec<Vec<f32>> = state.buffers.iter_mut().flat_map(Option::take).collect();
            let expected = buffers[0].len();
            let mut sum = vec![0f32; expected];
            for (rank, buffer) in buffers.iter().enumerate() {
                if buffer.len() != expected {
                    state.mismatch = Some((rank, expected, buffer.len()));
                }
                sum.iter_mut().zip(buffer).for_each(|(s, v)| *s += v);
            }
            state.sum = sum;
            state.round += 1;
            state.read = 0;
            self.shared.changed.notify_all();
        }
        let mut state = self.wait_until(state, |s| s.round > round)?;
        state.read += 1;
        if state.read == world {
            self.shared.changed.notify_all();
        }
        if let Some((rank, expected, found)) = state.mismatch {
            return Err(CollectiveError::Mismatch {
                rank,
                expected,
                found,
            });
        }
        values.copy_from_slice(&state.sum[..values.len().min(state.sum.len())]);
        Ok(())
    }
}

impl Drop for InProcess {
    /// The others' collectives fail from now on, naming this worker.
    fn drop(&mut self) {
        let mut state = self.lock();
        if state.stopped.is_none() {
            state.stopped = Some(self.rank);
        }
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_worker_gets_the_rank_ordered_sum_round_after_round() {
        let ends = InProcess::group(3);
        let results: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = ends
                .into_iter()
                .map(|end| {
                    s.spawn(move || {
                        (0..4)
                            .map(|round| {
                                let r = end.rank() as f32;
                                let mut values = vec![r, r * 10.0 + round as f32];
                                end.all_reduce_sum(&mut values).unwrap();
                                values
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for per_worker in &results {
            for (round, values) in per_worker.iter().enumerate() {
                assert_eq!(values, &[3.0, 30.0 + 3.0 * round as f32]);
            }
        }
    }

    #[test]
    fn a_worker_that_stops_is_named_by_the_others() {
        let mut ends = InProcess::group(2);
        let last = ends.pop().unwrap();
        let first = ends.pop().unwrap();
        std::thread::scope(|s| {
            s.spawn(move || drop(last));
            let err = first.all_reduce_sum(&mut [1.0]).unwrap_err();
            assert_eq!(err, CollectiveError::PeerStopped { rank: 1, world: 2 });
            assert!(err.to_string().contains("worker 1 of 2 stopped"));
        });
    }
}
