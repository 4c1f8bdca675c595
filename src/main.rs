use std::process::ExitCode;

/// glibc's malloc keeps freed mid-sized blocks (below its 32 MiB mmap threshold) resident in
/// per-thread arenas; training allocates and frees many such activation buffers from several
/// threads, which inflated peak RSS by ~10% on SmolLM2 (bench/NOTES.md). mimalloc returns them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match loraforge::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
