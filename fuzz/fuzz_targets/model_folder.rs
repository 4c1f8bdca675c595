//! `loraforge::diagnostics::fuzz::model_folder` under libFuzzer.
#![no_main]

#[global_allocator]
static ALLOCATOR: loraforge::memory_budget::Budgeted<std::alloc::System> =
    loraforge::memory_budget::Budgeted(std::alloc::System);

libfuzzer_sys::fuzz_target!(|data: &[u8]| loraforge::diagnostics::fuzz::model_folder(data));
