//! The model's operations, each as a backend trait with its reference form in Burn's ops and its
//! own autodiff backward beside its forward. Implementations for a particular backend live in
//! `crate::backends`.

pub mod attention;
pub mod decode;
pub mod elementwise;
pub mod frozen_linear;
pub mod grouped_matmul;
pub mod matmul;
pub mod primitive;
pub mod quantized_linear;
pub mod rope;
pub mod routing;
#[cfg(test)]
pub(crate) mod test_f64;
pub mod visibility;

use burn::tensor::backend::AutodiffBackend;

pub use frozen_linear::ModelBackend;

/// A backend that trains: autodiff over a backend that runs the model, whose inner backend runs
/// the model too (validation and generation during training use the inner one).
pub trait TrainBackend: AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend {}

impl<B> TrainBackend for B where B: AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend {}
