use std::process::ExitCode;

/// glibc's malloc keeps freed mid-sized blocks (below its 32 MiB mmap threshold) resident in
/// per-thread arenas; training allocates and frees many such activation buffers from several
/// threads, which inflated peak RSS by ~10% on SmolLM2 (bench/NOTES.md). mimalloc returns them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // A write past a file-size limit (RLIMIT_FSIZE) then fails with EFBIG, an error that is
    // reported and cleaned up after like a full disk, instead of killing the process mid-write.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    match loraforge::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
