//! `rms_norm_grad`, `swiglu_grad`, `cross_entropy_grad`: the element-wise ops as the model calls
//! them on the device (a backend's kernels where it has them) against their naive forms in
//! Burn's ops, differentiated by Burn's autodiff on the CPU in f32: the output and the inputs'
//! gradients of `Σ r ⊙ op(..)` on random inputs, at widths that do not divide a kernel's cube.

use burn::backend::Autodiff;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::{CpuTrain, scaled_error, tensor, uniform};
use crate::ops::ModelBackend;
use crate::ops::TrainBackend;
use crate::ops::elementwise::ElementwiseBackend;

/// f32 on both sides: errors of 1e-7 (SwiGLU, the loss) to 3e-5 (RMSNorm's input gradient,
/// a difference of two sums over the row, measured on the CPU); a wrong index gives errors
/// of order 1.
const TOLERANCE: f64 = 1e-3;
const EPS: f64 = 1e-5;

/// Rows and features of the checked tensors.
const SHAPES: [[usize; 2]; 2] = [[37, 576], [300, 1000]];

/// The op's output and its inputs' gradients of `Σ r ⊙ op(inputs)`, as f32 on the host.
fn run<T: TrainBackend, const N: usize>(
    inputs: [&[f64]; N],
    shape: [usize; 2],
    r: &[f64],
    device: &T::Device,
    op: impl Fn([Tensor<T, 2>; N]) -> Tensor<T, 2>,
) -> Vec<Vec<f32>> {
    let tracked = inputs.map(|v| tensor::<T, 2>(v, shape, device).require_grad());
    let out = op(tracked.clone());
    let r = tensor::<T, 2>(r, out.dims(), device);
    let grads = (out.clone() * r).sum().backward();
    let host = |t: Tensor<T::InnerBackend, 2>| -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec().expect("f32")
    };
    let mut all = vec![host(out.inner())];
    all.extend(
        tracked
            .iter()
            .map(|t| host(t.grad(&grads).expect("tracked"))),
    );
    all
}

/// The worst of each pair's scaled error, and the JSON line.
fn line(check: &str, shape: [usize; 2], got: &[Vec<f32>], want: &[Vec<f32>]) -> serde_json::Value {
    let errors: Vec<f64> = got
        .iter()
        .zip(want)
        .map(|(g, w)| scaled_error(g, &w.iter().map(|&x| f64::from(x)).collect::<Vec<_>>()))
        .collect();
    let worst = errors.iter().copied().fold(0f64, f64::max);
    json!({
        "check": check, "rows": shape[0], "features": shape[1],
        "output_error": errors[0], "grad_errors": &errors[1..], "tolerance": TOLERANCE,
        "pass": worst <= TOLERANCE,
    })
}

/// RMSNorm with a random weight: the output and the input's gradient.
pub(super) fn rms_norm_grad<B: ModelBackend>(device: &B::Device) -> Vec<serde_json::Value> {
    SHAPES
        .map(|shape @ [rows, n]| {
            let mut rng = rand::rngs::StdRng::seed_from_u64((rows * n) as u64);
            let [x, r] = [(); 2].map(|_| uniform(&mut rng, rows * n, 2.0));
            let w = uniform(&mut rng, n, 1.5);
            let got = run::<Autodiff<B>, 1>([&x], shape, &r, device, |[x]| {
                let w = tensor::<Autodiff<B>, 1>(&w, [n], device);
                Autodiff::<B>::rms_norm(x, w, EPS, None)
            });
            let want = run::<CpuTrain, 1>([&x], shape, &r, &Default::default(), |[x]| {
                let w = tensor::<CpuTrain, 1>(&w, [n], &Default::default());
                let rms = x.clone().square().mean_dim(1).add_scalar(EPS).sqrt();
                x / rms * w.unsqueeze::<2>()
            });
            line("rms_norm_grad", shape, &got, &want)
        })
        .to_vec()
}

/// SwiGLU: the output and the gradients of the gate and the up projection.
pub(super) fn swiglu_grad<B: ModelBackend>(device: &B::Device) -> Vec<serde_json::Value> {
    SHAPES
        .map(|shape @ [rows, n]| {
            let mut rng = rand::rngs::StdRng::seed_from_u64((rows * n + 1) as u64);
            let [gate, up, r] = [(); 3].map(|_| uniform(&mut rng, rows * n, 6.0));
            let got = run::<Autodiff<B>, 2>([&gate, &up], shape, &r, device, |[g, u]| {
                Autodiff::<B>::swiglu(g, u, None, None)
            });
            let want =
                run::<CpuTrain, 2>([&gate, &up], shape, &r, &Default::default(), |[g, u]| {
                    silu(g) * u
                });
            line("swiglu_grad", shape, &got, &want)
        })
        .to_vec()
}

/// The weighted cross-entropy over rows of logits (the loss and the logits' gradient), with
/// random targets and row weights (some zero, as a masked prompt's).
pub(super) fn cross_entropy_grad<B: ModelBackend>(device: &B::Device) -> Vec<serde_json::Value> {
    SHAPES
        .map(|shape @ [rows, vocab]| {
            let mut rng = rand::rngs::StdRng::seed_from_u64((rows * vocab + 2) as u64);
            let logits = uniform(&mut rng, rows * vocab, 12.0);
            let targets: Vec<i64> = (0..rows)
                .map(|_| rng.random_range(0..vocab as i64))
                .collect();
            let weights: Vec<f64> = (0..rows)
                .map(|i| {
                    if i % 5 == 0 {
                        0.0
                    } else {
                        rng.random_range(0.1..1.0)
                    }
                })
                .collect();
            fn inputs<T: Backend>(
                targets: &[i64],
                weights: &[f64],
                device: &T::Device,
            ) -> (Tensor<T, 2, Int>, Tensor<T, 2>) {
                let rows = targets.len();
                let t = TensorData::new(targets.to_vec(), [rows, 1]);
                (
                    Tensor::from_data(t, device),
                    tensor(weights, [rows, 1], device),
                )
            }
            // The loss is a scalar: r is one value, and the "output" compared is the loss.
            let r = [0.75];
            let got = run::<Autodiff<B>, 1>([&logits], shape, &r, device, |[x]| {
                let (t, w) = inputs::<Autodiff<B>>(&targets, &weights, device);
                Autodiff::<B>::cross_entropy(x, t, w, None).reshape([1, 1])
            });
            let want = run::<CpuTrain, 1>([&logits], shape, &r, &Default::default(), |[x]| {
                let (t, w) = inputs::<CpuTrain>(&targets, &weights, &Default::default());
                let max = x.clone().max_dim(1).detach();
                let lse = (x.clone() - max.clone()).exp().sum_dim(1).log() + max;
                ((lse - x.gather(1, t)) * w).sum().reshape([1, 1])
            });
            line("cross_entropy_grad", shape, &got, &want)
        })
        .to_vec()
}
