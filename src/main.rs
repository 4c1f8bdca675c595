use std::process::ExitCode;

/// glibc's malloc keeps freed mid-sized blocks (below its 32 MiB mmap threshold) resident in
/// per-thread arenas; training allocates and frees many such activation buffers from several
/// threads, which inflated peak RSS by ~10% on SmolLM2 (bench/NOTES.md). mimalloc returns them.
#[global_allocator]
static ALLOCATOR: loraforge::memory_budget::Budgeted<mimalloc::MiMalloc> =
    loraforge::memory_budget::Budgeted(mimalloc::MiMalloc);

fn main() -> ExitCode {
    // A write past a file-size limit (RLIMIT_FSIZE) then fails with EFBIG, an error that is
    // reported and cleaned up after like a full disk, instead of killing the process mid-write.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // Intel's OpenMP runtime (MKL named in LORAFORGE_BLAS) keeps its threads spinning for 200 ms
    // after each parallel GEMM, taking both cores from the passes between GEMMs: SmolLM2 steps
    // ran 1.1x faster with the spin off (bench/NOTES.md). An explicit setting is left alone.
    if std::env::var_os(loraforge::backends::cpu::blas::ENV).is_some()
        && std::env::var_os("KMP_BLOCKTIME").is_none()
    {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("KMP_BLOCKTIME", "0") };
    }
    // matrixmultiply (the built-in GEMM) sizes its own thread pool from MATMUL_NUM_THREADS, else
    // from the cores: told RAYON_NUM_THREADS=1, a run still multiplied on both of the VM's cores
    // (a 220-token SmolLM2 prompt: 391-396 tokens/s, 310 with both at 1; bench/NOTES.md). It
    // follows RAYON_NUM_THREADS unless set itself.
    if let Some(threads) = std::env::var_os("RAYON_NUM_THREADS")
        && std::env::var_os("MATMUL_NUM_THREADS").is_none()
    {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("MATMUL_NUM_THREADS", threads) };
    }
    match loraforge::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
