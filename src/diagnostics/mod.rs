//! Programs that measure and check the trainer rather than run it: `bench train` (timed steps on
//! random models of known shapes, against the PyTorch + peft reference) and `bench check` (a
//! device backend against the CPU).

pub mod bench;
pub mod bench_data;
pub mod device_check;
pub mod fuzz;
pub mod random;
