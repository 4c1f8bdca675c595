//! `experts_grad`: an experts' stack (its own matrix and LoRA adapter per expert) on rows grouped
//! by expert, as a mixture of experts runs it (`model/experts.rs`, `ops/grouped_matmul.rs`: on
//! CUDA one grouped cuBLAS call per product, one GEMM per expert for the stacks' gradients),
//! against float64 on the host: the output
//! `y_e = x_e W_eᵀ + s (x_e A_e) B_e` and the gradients of `Σ r ⊙ y` for `x`, `A` and `B`.

use burn::backend::Autodiff;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorCreationOptions, TensorData, TensorPrimitive};
use rand::SeedableRng;
use serde_json::json;

use super::{HALF_TOLERANCE, KERNEL_TOLERANCE, Weight, gemm, scaled_error, tensor, uniform};
use crate::model::LoraAdapter;
use crate::model::linear::{FrozenLinear, FrozenWeight};
use crate::ops::ModelBackend;
use crate::ops::grouped_matmul::{Stacked, grouped_by_groups};
use crate::ops::primitive::primitive;

/// Rows per expert: an empty expert, one with a single row, and unequal groups.
const COUNTS: [usize; 8] = [5, 0, 17, 1, 64, 3, 0, 30];

/// One expert's rows of a row-major `[n, cols]` matrix.
fn rows(m: &[f64], start: usize, count: usize, cols: usize) -> &[f64] {
    &m[start * cols..(start + count) * cols]
}

/// The check for `inp` → `out` experts at rank `r`, the weight held as `kind` (dense, or dense in
/// 16 bits).
pub fn experts_grad<B: ModelBackend>(
    device: &B::Device,
    inp: usize,
    out: usize,
    kind: Weight,
) -> serde_json::Value {
    let (experts, r, scale) = (COUNTS.len(), 8, 2.0);
    let n: usize = COUNTS.iter().sum();
    let mut rng = rand::rngs::StdRng::seed_from_u64((inp * 13 + out) as u64);
    let x = uniform(&mut rng, n * inp, 1.0);
    let w: Vec<f64> = uniform(&mut rng, experts * out * inp, 0.05)
        .into_iter()
        .map(|v| kind.round(v))
        .collect();
    let a = uniform(&mut rng, experts * inp * r, 0.1);
    let b = uniform(&mut rng, experts * r * out, 0.1);
    let upstream = uniform(&mut rng, n * out, 1.0);

    type D<B> = Autodiff<B>;
    let weight = match kind.half() {
        Some(half) => Tensor::from_data(
            TensorData::new(w.clone(), [experts * out, inp]),
            TensorCreationOptions::new(device.clone()).with_dtype(DType::from(half)),
        ),
        None => tensor(&w, [experts * out, inp], device),
    };
    let (ad, bd) = (
        tensor::<D<B>, 2>(&a, [experts * inp, r], device).require_grad(),
        tensor::<D<B>, 2>(&b, [experts * r, out], device).require_grad(),
    );
    let linear = FrozenLinear {
        experts,
        adapter: Some(LoraAdapter {
            a: ad.clone(),
            b: bd.clone(),
            magnitude: None,
            scale,
            dropout: 0.0,
            dropout_without_autodiff: false,
        }),
        ..FrozenLinear::new(FrozenWeight::Dense(weight), None)
    };
    let xd = tensor::<D<B>, 2>(&x, [n, inp], device).require_grad();
    let y = linear.forward_grouped(xd.clone(), &COUNTS);
    let grads = (y.clone() * tensor::<D<B>, 2>(&upstream, [n, out], device))
        .sum()
        .backward();
    let values =
        |t: Tensor<B, 2>| -> Vec<f32> { t.into_data().convert::<f32>().into_vec().expect("f32") };
    let got = [
        values(y.inner()),
        values(xd.grad(&grads).expect("x is tracked")),
        values(ad.grad(&grads).expect("A is tracked")),
        values(bd.grad(&grads).expect("B is tracked")),
    ];

    // The same in f64, expert by expert.
    let mut want = [
        vec![0f64; n * out],
        vec![0f64; n * inp],
        vec![0f64; a.len()],
        vec![0f64; b.len()],
    ];
    let transpose = |m: &[f64], rows: usize, cols: usize| -> Vec<f64> {
        (0..cols * rows)
            .map(|i| m[(i % rows) * cols + i / rows])
            .collect()
    };
    let mut start = 0;
    for (e, &count) in COUNTS.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let (xe, re) = (
            rows(&x, start, count, inp),
            rows(&upstream, start, count, out),
        );
        let we = &w[e * out * inp..(e + 1) * out * inp];
        let ae = &a[e * inp * r..(e + 1) * inp * r];
        let be = &b[e * r * out..(e + 1) * r * out];
        let u: Vec<f64> = gemm(xe, ae, count, inp, r, false)
            .iter()
            .map(|v| v * scale)
            .collect();
        let y = gemm(xe, we, count, inp, out, true);
        let lora = gemm(&u, be, count, r, out, false);
        // dU = s · r Bᵀ; dx = r W + dU Aᵀ; dA = xᵀ dU; dB = uᵀ r.
        let du: Vec<f64> = gemm(re, be, count, out, r, true)
            .iter()
            .map(|v| v * scale)
            .collect();
        let dx_base = gemm(re, we, count, out, inp, false);
        let dx_lora = gemm(&du, ae, count, r, inp, true);
        let da = gemm(&transpose(xe, count, inp), &du, inp, count, r, false);
        let db = gemm(&transpose(&u, count, r), re, r, count, out, false);
        for (i, v) in y.iter().zip(&lora).map(|(p, q)| p + q).enumerate() {
            want[0][start * out + i] = v;
        }
        for (i, v) in dx_base.iter().zip(&dx_lora).map(|(p, q)| p + q).enumerate() {
            want[1][start * inp + i] = v;
        }
        want[2][e * inp * r..(e + 1) * inp * r].copy_from_slice(&da);
        want[3][e * r * out..(e + 1) * r * out].copy_from_slice(&db);
        start += count;
    }
    let errors: Vec<f64> = got
        .iter()
        .zip(&want)
        .map(|(g, w)| scaled_error(g, w))
        .collect();
    let tolerance = match kind.half() {
        Some(_) => HALF_TOLERANCE,
        None => KERNEL_TOLERANCE,
    };
    json!({
        "check": "experts_grad", "weight": kind.check(), "experts": experts, "counts": COUNTS,
        "in": inp, "out": out, "rank": r, "output_error": errors[0],
        "grad_errors": {"x": errors[1], "a": errors[2], "b": errors[3]},
        "tolerance": tolerance, "pass": errors.iter().all(|&e| e <= tolerance),
    })
}

/// `grouped_products`: the backend's grouped product (one cuBLAS call on CUDA) against one GEMM
/// per group on the same backend, for a `[groups, k, m]` stack read as is or transposed, at
/// LoRA's rank-8 sides and widths that are not powers of two. (The stack's gradient is checked
/// against float64 by `experts_grad`.)
pub fn grouped_products<B: ModelBackend>(
    device: &B::Device,
    k: usize,
    m: usize,
    stacked: Stacked,
) -> serde_json::Value {
    let (groups, n) = (COUNTS.len(), COUNTS.iter().sum::<usize>());
    let mut rng = rand::rngs::StdRng::seed_from_u64((k * 31 + m) as u64);
    let x = tensor::<B, 2>(&uniform(&mut rng, n * k, 1.0), [n, k], device);
    let shape = match stacked {
        Stacked::AsIs => [groups, k, m],
        Stacked::Transposed => [groups, m, k],
    };
    let stack = tensor::<B, 3>(&uniform(&mut rng, groups * k * m, 0.1), shape, device);
    let values = |t: FloatTensor<B>| -> Vec<f32> {
        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t))
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32")
    };
    let (x, stack) = (primitive(x), primitive(stack));
    let got = values(B::model_grouped_matmul(
        x.clone(),
        stack.clone(),
        stacked,
        &COUNTS,
    ));
    let want: Vec<f64> = values(grouped_by_groups::<B>(x, stack, stacked, &COUNTS))
        .into_iter()
        .map(f64::from)
        .collect();
    let error = scaled_error(&got, &want);
    json!({
        "check": "grouped_products", "k": k, "m": m, "stacked": format!("{stacked:?}"),
        "counts": COUNTS, "product_error": error, "tolerance": KERNEL_TOLERANCE,
        "pass": error <= KERNEL_TOLERANCE,
    })
}
