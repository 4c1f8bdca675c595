//! Reading and writing model files: safetensors (single and sharded), GGUF, atomic writes, and
//! Hugging Face hub names resolved through the local cache (`hub`).

pub mod atomic;
pub mod gguf;
pub mod gguf_write;
pub mod hub;
pub mod hub_download;
pub mod python_json;
pub mod raw;
pub mod safetensors;
pub mod safetensors_write;

pub use raw::{RawDtype, RawTensor};

/// Drops `len` bytes at `start` of a read-only file mapping from the process's resident set,
/// once they have been copied out: touched again, they are re-read from the file, so this only
/// lowers peak memory while a model loads (the pages stay in the kernel's page cache).
pub(crate) fn release_pages(map: &memmap2::Mmap, start: usize, len: usize) {
    #[cfg(unix)]
    // SAFETY: the mapping is read-only and file-backed, so MADV_DONTNEED discards nothing that
    // cannot be read back; no reference into the range outlives the load that copied it.
    unsafe {
        let _ = map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len);
    }
    #[cfg(not(unix))]
    let _ = (map, start, len);
}
