//! The routers' choices in a checkpointed step, made once: the step's first forward pass records
//! each router's choices, and the recomputed forward of each block in its backward pass replays
//! them (`train/recompute.rs` brackets the two).
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

/// Starts recording this thread's routers' choices (a checkpointed step's forward pass).
pub fn record() {
    set(Phase::Recording, true);
}

/// Ends the recording: from here each router replays what it recorded.
pub fn replay() {
    set(Phase::Replaying, false);
}

/// Ends the step: the routers choose for themselves again, and the memo is emptied.
pub fn forget() {
    set(Phase::Off, true);
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

/// `router`'s next recorded choices while replaying (`None` otherwise, or when it has none
/// left: it then chooses for itself).
pub fn recall(router: usize) -> Option<Vec<i64>> {
    MEMO.with_borrow_mut(|m| match m.phase {
        Phase::Replaying => m.choices.get_mut(&router)?.pop_front(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_router_replays_its_choices_in_order_only_between_record_and_forget() {
        let (a, b) = (new_router(), new_router());
        remember(a, &[9]);
        assert_eq!(recall(a), None, "off: nothing kept");
        record();
        remember(a, &[1, 2]);
        remember(b, &[3]);
        remember(a, &[4]);
        assert_eq!(recall(a), None, "recording: nothing replayed");
        replay();
        assert_eq!(recall(a), Some(vec![1, 2]));
        assert_eq!(recall(b), Some(vec![3]));
        remember(b, &[7]);
        assert_eq!(recall(a), Some(vec![4]));
        assert_eq!(recall(a), None, "used up");
        assert_eq!(recall(b), None, "replaying records nothing");
        forget();
        record();
        replay();
        assert_eq!(recall(a), None, "a new step starts empty");
        forget();
    }
}
