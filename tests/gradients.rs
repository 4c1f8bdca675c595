//! Gradients against central finite differences on the f64 backend: LoRA and DoRA parameters on a tiny model,
//! and the frozen quantized op's input gradient against the dense reference.

mod common;

use std::sync::Arc;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Distribution, Tensor, TensorData, TensorPrimitive};
use loraforge::data::Batch;
use loraforge::lora::{AdapterSpec, inject};
use loraforge::model::{Decoder, load_model};
use loraforge::ops::ModelBackend;
use loraforge::quant::QuantizedMatrix;
use loraforge::quant::affine::pack_codes;
use loraforge::recipe::{AdapterKind, Layers, LoraSection, Targets};
use loraforge::train::recompute::Checkpointing;
use loraforge::train::trainer::{loss_and_gradients, parameters, set_parameters};

type B = Autodiff<NdArray<f64>>;

/// Holds the backend's one random generator for a whole test: the dropout check seeds it and
/// expects the same masks on every evaluation, which another test drawing in parallel breaks.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn batch() -> Batch {
    let inputs: Vec<u32> = vec![5, 77, 12, 200, 31, 9, 140, 66, 3, 250, 18, 42];
    let targets: Vec<u32> = vec![77, 12, 200, 31, 9, 140, 66, 3, 250, 18, 42, 7];
    let mask = vec![0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0];
    Batch {
        batch: 2,
        seq: 6,
        inputs,
        targets,
        mask,
        segments: None,
        lengths: vec![6, 6],
    }
}

/// The qwen2 fixture with adapters on `targets`, parameters moved off their initial values
/// (B starts at zero) so that no gradient vanishes.
fn adapted_model(kind: AdapterKind, targets: Targets) -> Decoder<B> {
    let device = Default::default();
    let mut model = load_model::<B>(&common::fixture("models/qwen2"), &device)
        .unwrap()
        .decoder;
    let lora = LoraSection {
        kind,
        rank: 2,
        scale: Some(1.5),
        targets,
        layers: Layers::Last(-1),
        ..Default::default()
    };
    let spec = AdapterSpec::from_recipe(&lora, &model.config).unwrap();
    inject(&mut model, &spec, 7, &device);
    let mut params = parameters(&model);
    for p in params.iter_mut() {
        *p = p.clone() + p.random_like(Distribution::Normal(0.0, 0.1));
    }
    set_parameters(&mut model, &params);
    model
}

/// Autodiff against finite differences of the same loss, with LoRA `dropout` and the given
/// checkpointing. The backend is seeded before each evaluation, so the dropout masks are the
/// same every time and the loss is a smooth function of the parameters.
fn check(kind: AdapterKind, dropout: f64, checkpointing: Option<Checkpointing>) {
    let device = Default::default();
    let mut model = adapted_model(
        kind,
        Targets::Keys(vec!["self_attn.q_proj".into(), "mlp.down_proj".into()]),
    );
    for (_, linear) in model.linears_mut() {
        if let Some(adapter) = &mut linear.adapter {
            adapter.dropout = dropout;
        }
    }
    let seeded = |m: &Decoder<B>| {
        <B as burn::tensor::backend::Backend>::seed(&device, 3);
        loss_and_gradients(m, &batch(), 1.0, checkpointing, &device)
    };
    let params = parameters(&model);
    let analytic = seeded(&model).2;

    // The loss carries rounding noise of about 1e-8 (some constants, such as the RoPE tables, are
    // computed in f32), so h is large enough for that noise to stay below the tolerance.
    let eps = 1e-2;
    let mut checked = 0;
    // DoRA's row norm is held constant in the backward pass (as in peft and mlx-lm, DoRA paper
    // §4.3), so only its magnitude vector has the exact gradient a finite difference measures.
    let checked_params: Vec<usize> = match kind {
        AdapterKind::Lora => (0..params.len()).collect(),
        AdapterKind::Dora => (2..params.len()).step_by(3).collect(),
    };
    for i in checked_params {
        let p = &params[i];
        let n = p.dims()[0];
        for j in [0, n / 3, n - 1] {
            let bump = |delta: f64| {
                let mut moved = params.clone();
                let mut values: Vec<f64> = moved[i].to_data().into_vec().unwrap();
                values[j] += delta;
                moved[i] = Tensor::from_data(TensorData::new(values, [n]), &device);
                let mut m = model.clone();
                set_parameters(&mut m, &moved);
                seeded(&m).0
            };
            // Central differences at h and 2h, Richardson-extrapolated (error O(h⁴)).
            let central = |h: f64| (bump(h) - bump(-h)) / (2.0 * h);
            let numeric = (4.0 * central(eps) - central(2.0 * eps)) / 3.0;
            let got: f64 = analytic[i].to_data().into_vec::<f64>().unwrap()[j];
            // 1e-4 relative; for gradients below 0.1 that is 1e-5 absolute (the noise floor).
            let err = (got - numeric).abs() / numeric.abs().max(0.1);
            assert!(
                err < 1e-4,
                "{kind:?} dropout {dropout} {checkpointing:?} parameter {i}[{j}]: autodiff {got} vs finite difference {numeric}"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 12 || (kind == AdapterKind::Dora && checked >= 6),
        "checked {checked}"
    );
}

#[test]
fn lora_gradients_match_finite_differences() {
    let _serial = serial();
    check(AdapterKind::Lora, 0.0, None);
}

/// With dropout, checkpointing's no-grad forward pass must drop what its recomputation drops
/// (it once drew no masks, so its loss and the recomputed gradients were of two functions),
/// with the MLP whole and in chunks.
#[test]
fn lora_gradients_with_dropout_and_checkpointing_match_finite_differences() {
    let _serial = serial();
    check(AdapterKind::Lora, 0.3, None);
    check(AdapterKind::Lora, 0.3, Some(Checkpointing::default()));
    let chunked = Checkpointing {
        mlp_chunk_tokens: 5,
        offload: false,
    };
    check(AdapterKind::Lora, 0.3, Some(chunked));
}

#[test]
fn dora_gradients_match_finite_differences() {
    let _serial = serial();
    check(AdapterKind::Dora, 0.0, None);
}

#[test]
fn quantized_linear_input_gradient_matches_dense() {
    let _serial = serial();
    let device = Default::default();
    for (bits, rows, cols, n) in [(4, 24, 64, 3), (8, 16, 128, 40), (3, 8, 64, 5)] {
        let codes: Vec<u32> = (0..rows * cols)
            .map(|i| ((i * 2654435761) >> 7) as u32 % (1 << bits))
            .collect();
        let packed = pack_codes(&codes, bits);
        let groups = rows * cols / 32;
        let scales: Vec<f32> = (0..groups).map(|g| 0.01 + 0.002 * (g % 7) as f32).collect();
        let biases: Vec<f32> = (0..groups).map(|g| -0.05 + 0.01 * (g % 5) as f32).collect();
        let w =
            Arc::new(QuantizedMatrix::new(rows, cols, bits, 32, packed, scales, biases).unwrap());
        let x = Tensor::<B, 2>::random([n, cols], Distribution::Normal(0.0, 1.0), &device)
            .require_grad();
        let r = Tensor::<B, 2>::random([n, rows], Distribution::Normal(0.0, 1.0), &device);
        let y = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(B::quantized_linear(
            x.clone().into_primitive().tensor(),
            &w,
        )));
        let grads = (y * r.clone()).sum().backward();
        let got: Vec<f64> = x.grad(&grads).unwrap().into_data().into_vec().unwrap();
        // Reference: dL/dx = r · deq(W), in f64 on the host.
        let dense = w.dequantize();
        let r: Vec<f64> = r.into_data().into_vec().unwrap();
        for t in 0..n {
            for c in 0..cols {
                let want: f64 = (0..rows)
                    .map(|o| r[t * rows + o] * dense[o * cols + c] as f64)
                    .sum();
                assert!(
                    (got[t * cols + c] - want).abs() < 1e-9,
                    "bits {bits}: dx[{t},{c}] {} vs {want}",
                    got[t * cols + c]
                );
            }
        }
    }
}

/// Activation checkpointing recomputes each block in the backward pass; the loss and every
/// gradient must come out as without it, for plain and packed rows, with the block inputs on
/// the device or in host memory, and with the MLP run whole or in chunks of 5 rows (12 rows a
/// batch: chunks of 5, 5 and 2, one crossing from the first sequence into the second).
#[test]
fn activation_checkpointing_gives_the_plain_gradients() {
    let _serial = serial();
    let device = Default::default();
    for kind in [AdapterKind::Lora, AdapterKind::Dora] {
        let model = adapted_model(kind, Targets::Named("all-linear".into()));
        let packed = Batch {
            segments: Some(vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]),
            ..batch()
        };
        for batch in [batch(), packed] {
            let (plain_loss, _, plain) = loss_and_gradients(&model, &batch, 0.5, None, &device);
            for how in [
                Checkpointing::default(),
                Checkpointing {
                    mlp_chunk_tokens: 5,
                    offload: true,
                },
            ] {
                let (ckpt_loss, _, ckpt) =
                    loss_and_gradients(&model, &batch, 0.5, Some(how), &device);
                assert!(
                    (plain_loss - ckpt_loss).abs() < 1e-12,
                    "{plain_loss} vs {ckpt_loss}"
                );
                assert_eq!(plain.len(), ckpt.len());
                for (i, (p, c)) in plain.iter().zip(&ckpt).enumerate() {
                    let p: Vec<f64> = p.to_data().into_vec().unwrap();
                    let c: Vec<f64> = c.to_data().into_vec().unwrap();
                    let scale = p.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
                    let diff = p
                        .iter()
                        .zip(&c)
                        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
                    assert!(
                        diff / scale < 1e-9,
                        "{kind:?} {how:?} parameter {i}: {diff:e} of {scale:e}"
                    );
                }
            }
        }
    }
}
