//! The fault suite: hostile files, bad settings, crashes and contention. Each case asserts the
//! exact error (naming the file, key or line, and what to do) and that no finished work was
//! lost. Crashes are injected (`LORAFORGE_CRASH_AT_RENAME`, real `kill -9` and signals), not left
//! to timing luck. `docs/testing.md` lists the surfaces.

mod data;
mod fuse;
mod fuzz_corpus;
mod model_files;
mod run_folder;
mod templates;
mod training;
