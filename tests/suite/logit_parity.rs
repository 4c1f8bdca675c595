//! The CPU forward pass matches reference implementations on small random models:
//! transformers in float32 (1e-4) and mlx on its own quantized conversions (1e-3).

use std::path::Path;

use crate::common;

use burn::backend::NdArray;
use loraforge::model::{KvCache, load_model};

type B = NdArray<f32>;

fn check(name: &str, tolerance: f32) {
    let dir = common::fixture(&format!("models/{name}"));
    check_model(&dir, &dir, name, tolerance);
}

/// The model at `path` gives the logits of `reference`'s `reference.json`.
fn check_model(path: &Path, reference: &Path, name: &str, tolerance: f32) {
    let (ids, want) = common::reference_logits(&reference.join("reference.json"));
    let device = Default::default();
    let model = load_model::<B>(path, &device).unwrap();
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

/// A family fixture of `scripts/fixtures/make_family_models.py`: its logits from both config
/// spellings and from its GGUF copy (`make_family_gguf.py`), and transformers' greedy
/// continuation token by token through the KV cache.
fn check_family(name: &str) {
    check_family_files(name);
    let gguf = common::fixture(&format!("models/{name}.gguf"));
    check_model(
        &gguf,
        &common::fixture(&format!("models/{name}")),
        &format!("{name}.gguf"),
        1e-4,
    );
}

/// [`check_family`] without a GGUF copy.
fn check_family_files(name: &str) {
    let dir = common::fixture(&format!("models/{name}"));
    check_model(&dir, &dir, name, 1e-4);

    let legacy = common::temp_dir(&format!("legacy-{name}"));
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let to = match file.as_str() {
            "config.json" => continue,
            "config-legacy.json" => legacy.join("config.json"),
            _ => legacy.join(&file),
        };
        std::fs::copy(&path, to).unwrap();
    }
    let spelling = format!("{name} (rope_theta / rope_scaling spelling)");
    check_model(&legacy, &dir, &spelling, 1e-4);

    let reference = common::read_json(&dir.join("reference.json"));
    let (prompt, want) = (
        common::ids(&reference["input_ids"]),
        common::ids(&reference["greedy"]),
    );
    let device = Default::default();
    let decoder = load_model::<B>(&dir, &device).unwrap().decoder;
    // The script generates with `min_new_tokens`, so transformers never picks the stop id.
    let config = common::read_json(&dir.join("config.json"));
    let eos = config["eos_token_id"].as_u64().map(|id| id as usize);
    let mut cache = KvCache::new(&decoder.config, None);
    let mut next = prompt;
    let mut got = Vec::new();
    while got.len() < want.len() {
        let logits = decoder.next_logits(&next, &mut cache, &device);
        let id = (0..logits.len())
            .filter(|&i| Some(i) != eos)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap() as u32;
        got.push(id);
        next = vec![id];
    }
    assert_eq!(got, want, "{name}: greedy ids through the KV cache");
}

#[test]
fn gemma2_with_softcaps_and_a_window_shorter_than_the_prompt() {
    check_family("gemma2");
}

#[test]
fn gemma3_with_the_five_to_one_pattern_and_a_local_rope_base() {
    check_family("gemma3");
}

#[test]
fn phi3_with_fused_projections_longrope_past_its_original_length_and_a_window() {
    check_family("phi3");
}

/// Phi-4-mini's RoPE over 12 of each head's 16 dimensions, with LongRoPE past its original
/// length and tied embeddings.
#[test]
fn phi4_mini_with_rope_over_part_of_each_head() {
    check_family("phi4mini");
}

#[test]
fn mixtral_with_top_2_of_4_experts_and_a_window() {
    check_family("mixtral");
}

/// The routers count their host time (what `bench train` reports per step for a mixture of
/// experts): a forward pass of the Mixtral fixture adds to both counters.
#[test]
fn routers_count_their_host_time() {
    let device = Default::default();
    let decoder = load_model::<B>(&common::fixture("models/mixtral"), &device)
        .unwrap()
        .decoder;
    let ids: Vec<u32> = (0..16).map(|i| (i * 7 + 3) % 64).collect();
    let _ = decoder.forward(&ids, 1, &device);
    let [reading, choosing] = loraforge::model::experts::take_routing_time();
    assert!(
        !reading.is_zero() && !choosing.is_zero(),
        "{reading:?} {choosing:?}"
    );
}

/// No GGUF copy: llama.cpp (and gguf-py's tensor table) builds every Qwen2-MoE layer as experts,
/// so a dense layer (`mlp_only_layers`) has no llama.cpp name; mlx-lm cannot hold one either.
#[test]
fn qwen2_moe_with_a_shared_expert_unnormalised_weights_and_a_dense_layer() {
    check_family_files("qwen2_moe");
}

#[test]
fn qwen3_moe_with_renormalised_top_2_of_8_experts() {
    check_family("qwen3_moe");
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

/// mlx_lm.convert -q (4 bits, group 32) of the Gemma 2 fixture, against transformers on its
/// dequantized weights (mlx-lm's own gemma2 ignores the sliding window).
#[test]
fn mlx_gemma2_4bit_group32() {
    check("mlx-gemma2-q4", 1e-3);
}

/// mlx_lm.convert -q (4 bits, group 32) of the Gemma 3 fixture, against mlx-lm's logits.
#[test]
fn mlx_gemma3_4bit_group32() {
    check("mlx-gemma3-q4", 1e-3);
}

/// mlx_lm.convert -q (4 bits, group 32) of the Phi-3 fixture, against transformers on its
/// dequantized weights (mlx-lm's own phi3 ignores the sliding window).
#[test]
fn mlx_phi3_4bit_group32() {
    check("mlx-phi3-q4", 1e-3);
}

/// mlx_lm.convert -q (4 bits, group 32) of the Phi-4-mini fixture (RoPE over part of each
/// head), against mlx-lm's own logits.
#[test]
fn mlx_phi4_mini_4bit_group32() {
    check("mlx-phi4mini-q4", 1e-3);
}

/// mlx_lm.convert -q (4 bits, group 32) of the Mixtral fixture: the experts stacked and packed
/// as mlx-lm's SwitchLinear holds them.
#[test]
fn mlx_mixtral_4bit_group32() {
    check("mlx-mixtral-q4", 1e-3);
}

/// mlx_lm.convert -q (4 bits, group 32) of the Qwen3-MoE fixture.
#[test]
fn mlx_qwen3_moe_4bit_group32() {
    check("mlx-qwen3_moe-q4", 1e-3);
}
