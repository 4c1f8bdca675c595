//! Every integration test in one binary (one link of Burn, polars and tokenizers instead of one per
//! file). The f64 finite-difference checks stay apart in `tests/gradients.rs`: Burn fixes a
//! device's default dtype at the first tensor made on it, and in this process that is f32.

/// As in the binary: chat templates render under a memory budget (the fault and fuzz tests
/// rely on it).
#[global_allocator]
static ALLOCATOR: loraforge::memory_budget::Budgeted<std::alloc::System> =
    loraforge::memory_budget::Budgeted(std::alloc::System);

#[path = "../common/mod.rs"]
mod common;

mod adapter_interop;
mod chat_repl;
mod convert;
mod cpu_blas;
mod dashboard;
mod data_parallel;
mod data_report;
mod device_check_cpu;
#[cfg(feature = "vulkan")]
mod device_check_vulkan;
mod export;
mod export_mlx;
mod faults;
mod foreign_adapters;
mod generate_batch;
mod generate_logprobs;
mod generate_rotating;
mod generate_speculative;
mod gguf_kquants;
mod hub_cache;
mod layers;
mod logit_parity;
mod mlx_lora_parity;
mod packing;
mod peft_parity;
mod plot;
mod prompt_cache;
mod recipes_check;
mod smollm2;
mod table_datasets;
mod tensorboard;
mod tokenizer_conformance;
mod train_qlora;
mod train_resume;
