//! The routers' choices in a checkpointed step, made once: the step's first forward pass records
//! each router's choices, and the recomputed forward of each block in its backward pass replays
//! them (`train/recompute.rs` holds a [`Step`] across the two).
//!
//! A recomputed router would choose the same experts from the same probabilities, but only after
//! reading them to the host: on a GPU one more drain of the device and host round trip per
//! layer, half of a checkpointed mixture-of-experts step's. Replayed, the backward pass reads
//! nothing back. The choices are the forward pass's own, so a near tie cannot come out the other
//! way in the recompute either.
//!
//! The memo belongs to the thread running the step (data-parallel workers each run their own),
//! each router's choices in the order its forward passes made them (an MLP run in chunks records
//! one entry a chunk, recomputed in the same order).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};

/// What the routers on this thread do with the memo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Outside a checkpointed step: neither records nor replays.
    Off,
    /// The step's forward pass: each router's choices are kept.
    Recording,
    /// The recomputed forward passes: each router takes its next kept choices.
    Replaying,
}

struct Memo {
    phase: Phase,
    /// Per router, its kept choices (`[rows, top_k]` expert ids, row-major), oldest first.
    choices: HashMap<usize, VecDeque<Vec<i64>>>,
}

thread_local! {
    static MEMO: RefCell<Memo> = RefCell::new(Memo { phase: Phase::Off, choices: HashMap::new() });
}

/// A new router's identity (kept by its clones and by `SparseMoe::map`).
pub fn new_router() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn set(phase: Phase, clear: bool) {
    MEMO.with_borrow_mut(|m| {
        m.phase = phase;
        if clear {
            m.choices.clear();
        }
    });
}

/// A checkpointed step's memo on this thread: recording from [`record`], replaying from
/// [`Step::replay`], and emptied and off again when dropped (so a step that unwinds leaves
/// nothing for a later forward pass on the thread to replay).
#[must_use = "the memo is off again when the step is dropped"]
pub struct Step(());

/// Starts recording this thread's routers' choices (a checkpointed step's forward pass).
pub fn record() -> Step {
    set(Phase::Recording, true);
    Step(())
}

impl Step {
    /// Ends the recording: from here each router replays what it recorded.
    pub fn replay(&self) {
        set(Phase::Replaying, false);
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        set(Phase::Off, true);
    }
}

/// Keeps `router`'s `chosen` experts while recording.
pub fn remember(router: usize, chosen: &[i64]) {
    MEMO.with_borrow_mut(|m| {
        if m.phase == Phase::Recording {
            m.choices
                .entry(router)
                .or_default()
                .push_back(chosen.to_vec());
        }
    });
}

/// `router`'s next recorded choices for `len` ids while replaying (`None` otherwise, or when it
/// has none left or they are not `len` long: it then chooses for itself).
pub fn recall(router: usize, len: usize) -> Option<Vec<i64>> {
    MEMO.with_borrow_mut(|m| match m.phase {
        Phase::Replaying => m
            .choices
            .get_mut(&router)?
            .pop_front()
            .filter(|c| c.len() == len),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_router_replays_its_choices_in_order_only_while_a_step_lasts() {
        let (a, b) = (new_router(), new_router());
        remember(a, &[9]);
        assert_eq!(recall(a, 1), None, "off: nothing kept");
        {
            let step = record();
            remember(a, &[1, 2]);
            remember(b, &[3]);
            remember(a, &[4]);
            assert_eq!(recall(a, 2), None, "recording: nothing replayed");
            step.replay();
            assert_eq!(recall(a, 2), Some(vec![1, 2]));
            assert_eq!(recall(b, 2), None, "another length: chosen anew");
            remember(b, &[7]);
            assert_eq!(recall(a, 1), Some(vec![4]));
            assert_eq!(recall(a, 1), None, "used up");
            assert_eq!(recall(b, 1), None, "replaying records nothing");
            remember(a, &[5]);
        }
        let step = record();
        step.replay();
        assert_eq!(recall(a, 1), None, "a new step starts empty");
        drop(step);
        // A step that unwinds leaves the memo off.
        let unwound = std::panic::catch_unwind(|| {
            let step = record();
            remember(a, &[6]);
            step.replay();
            panic!("a failing step");
        });
        assert!(unwound.is_err());
        assert_eq!(recall(a, 1), None, "off after the unwind");
    }
}
