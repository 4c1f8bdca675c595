//! Untrusted code (a chat template from a model file) run on its own thread under a memory
//! budget and a time limit, so a template that doubles a string forty times or loops forever
//! becomes an error instead of eating the machine.
//!
//! The memory budget needs the binary's global allocator to be [`Budgeted`] (`main.rs` installs
//! it): while a budget is armed on a thread, every byte that thread allocates is counted, and
//! past the budget the thread is parked for good before the allocation happens (its memory stays
//! at the budget; the process ends soon after with the error). Without `Budgeted` installed (the
//! library used on its own) only the time limit applies.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A global allocator that counts, per thread, what a thread allocates while a budget is armed.
pub struct Budgeted<A>(pub A);

thread_local! {
    /// Bytes the thread may still allocate; only consulted while `OVER` is set.
    static LEFT: Cell<isize> = const { Cell::new(0) };
    /// The flag to raise when the budget runs out; null while no budget is armed.
    static OVER: Cell<*const AtomicBool> = const { Cell::new(std::ptr::null()) };
}

/// Counts `bytes` (negative: freed) against the thread's budget, if one is armed; parks the
/// thread for good when it runs out.
fn charge(bytes: isize) {
    let Ok(flag) = OVER.try_with(Cell::get) else {
        return;
    };
    if flag.is_null() {
        return;
    }
    let left = LEFT.with(|l| {
        l.set(l.get() - bytes);
        l.get()
    });
    if left < 0 && bytes > 0 {
        OVER.with(|o| o.set(std::ptr::null()));
        // SAFETY: `flag` points into an `Arc` this thread's closure holds for its whole life.
        unsafe { (*flag).store(true, Ordering::SeqCst) };
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

// SAFETY: every call is forwarded to the inner allocator unchanged; counting allocates nothing.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Budgeted<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size() as isize);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size() as isize);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        charge(-(layout.size() as isize));
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        charge(new_size as isize - layout.size() as isize);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}

/// Why bounded work was stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Exceeded {
    /// It allocated more than this many bytes.
    #[error("it needed more than {} MiB of memory", .0 >> 20)]
    Memory(usize),
    /// It ran longer than this.
    #[error("it ran longer than {} s", .0.as_secs())]
    Time(Duration),
    /// It panicked (the panic's message is printed above).
    #[error("it crashed")]
    Panicked,
}

/// Runs `work` on a new thread with at most `bytes` of allocations and `time` of wall-clock
/// time. On `Exceeded` the thread is left parked (memory) or running (time); the caller is
/// expected to report the error and end.
pub fn run_bounded<T: Send + 'static>(
    bytes: usize,
    time: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Exceeded> {
    let over = Arc::new(AtomicBool::new(false));
    let (send, receive) = mpsc::channel();
    let flag = Arc::clone(&over);
    std::thread::spawn(move || {
        LEFT.with(|l| l.set(bytes.min(isize::MAX as usize) as isize));
        OVER.with(|o| o.set(Arc::as_ptr(&flag)));
        let out = work();
        OVER.with(|o| o.set(std::ptr::null()));
        let _ = send.send(out);
        drop(flag);
    });
    let started = Instant::now();
    loop {
        match receive.recv_timeout(Duration::from_millis(20)) {
            Ok(out) => return Ok(out),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Exceeded::Panicked);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if over.load(Ordering::SeqCst) {
            return Err(Exceeded::Memory(bytes));
        }
        if started.elapsed() > time {
            return Err(Exceeded::Time(time));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_work_returns_and_a_loop_past_the_time_limit_is_stopped() {
        assert_eq!(run_bounded(1 << 20, Duration::from_secs(5), || 7), Ok(7));
        let spin = run_bounded(1 << 20, Duration::from_millis(100), || {
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(2) {}
        });
        assert_eq!(spin, Err(Exceeded::Time(Duration::from_millis(100))));
    }
}
