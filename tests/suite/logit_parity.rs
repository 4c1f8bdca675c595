//! The CPU forward pass matches reference implementations on small random models:
//! transformers in float32 (1e-4) and mlx on its own quantized conversions (1e-3).

use crate::common;

use burn::backend::NdArray;
use loraforge::model::load_model;

fn check(name: &str, tolerance: f32) {
    let dir = common::fixture(&format!("models/{name}"));
    let (ids, want) = common::reference_logits(&dir.join("reference.json"));
    let device = Default::default();
    let model = load_model::<NdArray<f32>>(&dir, &device).unwrap();
    let got: Vec<f32> = model
        .decoder
        .forward(&ids, 1, &device)
        .into_data()
        .into_vec()
        .unwrap();
    let diff = common::max_abs_diff(&got, &want);
    println!("{name}: max abs diff {diff:.3e}");
    assert!(
        diff <= tolerance,
        "{name}: max abs diff {diff} > {tolerance}"
    );
}

#[test]
fn llama_with_llama3_rope_and_tied_embeddings() {
    check("llama-llama3rope-tied", 1e-4);
}

#[test]
fn llama_with_linear_rope_and_untied_head() {
    check("llama-linearrope-untied", 1e-4);
}

#[test]
fn mistral_with_explicit_head_dim() {
    check("mistral", 1e-4);
}

#[test]
fn qwen2_with_qkv_bias() {
    check("qwen2", 1e-4);
}

#[test]
fn qwen3_with_qk_norm() {
    check("qwen3", 1e-4);
}

#[test]
fn mlx_4bit_group64() {
    check("mlx-q4-g64", 1e-3);
}

#[test]
fn mlx_8bit_group32() {
    check("mlx-q8-g32", 1e-3);
}

#[test]
fn mlx_mixed_per_layer_overrides_and_float_module() {
    check("mlx-mixed", 1e-3);
}
