//! Adapters other tools trained load in loraforge with those tools' logits: one trained by
//! `mlx_lm.lora` on the 4-bit mlx fixture (its config leaves `keys` out), and one saved by peft
//! with rsLoRA scaling (scripts/fixtures/make_foreign_adapters.py). Both also go through
//! `loraforge fuse` and `loraforge generate --adapters`.

use crate::common;

use std::path::Path;

use burn::backend::NdArray;
use loraforge::lora::files;
use loraforge::model::load_model;

type B = NdArray<f32>;

fn logits(model: &Path, adapters: Option<&Path>, ids: &[u32]) -> Vec<f32> {
    let device = Default::default();
    let mut decoder = load_model::<B>(model, &device).unwrap().decoder;
    if let Some(dir) = adapters {
        files::attach(&mut decoder, dir, &device).unwrap();
    }
    decoder
        .forward(ids, 1, &device)
        .into_data()
        .into_vec()
        .unwrap()
}

fn reference(key: &str) -> (Vec<u32>, Vec<f32>) {
    let json = common::read_json(&common::fixture("foreign-adapters/reference.json"));
    (common::ids(&json["input_ids"]), common::flatten(&json[key]))
}

fn check(base: &str, adapters: &str, key: &str) {
    let (base, adapters) = (
        common::fixture(&format!("models/{base}")),
        common::fixture(&format!("foreign-adapters/{adapters}")),
    );
    let (ids, want) = reference(key);
    let ours = logits(&base, Some(&adapters), &ids);
    let diff = common::max_abs_diff(&ours, &want);
    println!("{key}: our logits vs the training tool's: max abs diff {diff:.2e}");
    assert!(diff <= 1e-3, "{key}: max abs diff {diff}");
    // The adapter moved the model: the base alone is far from these logits.
    let base_diff = common::max_abs_diff(&logits(&base, None, &ids), &want);
    assert!(
        base_diff > 0.1,
        "{key}: the adapter changes nothing ({base_diff})"
    );

    // Fused into float weights, it gives the same logits.
    let tmp = common::temp_dir(&format!("foreign-{key}"));
    let out = tmp.join("fused");
    let fused = common::fuse(
        &base,
        &adapters,
        &out,
        &["--format", "hf", "--dtype", "f32"],
    );
    assert!(
        fused.status.success(),
        "{}",
        String::from_utf8_lossy(&fused.stderr)
    );
    let diff = common::max_abs_diff(&logits(&out, None, &ids), &want);
    assert!(diff <= 1e-3, "{key} fused: max abs diff {diff}");

    let generated = common::loraforge(&[
        "generate",
        "--model",
        base.to_str().unwrap(),
        "--adapters",
        adapters.to_str().unwrap(),
        "--prompt",
        "hammer",
        "--max-tokens",
        "4",
    ]);
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn an_adapter_trained_by_mlx_lm_lora_gives_mlx_logits() {
    check("mlx-q4-g64", "mlx_lm_lora", "mlx_lm_lora");
}

#[test]
fn an_adapter_saved_by_peft_gives_peft_logits() {
    check("llama-llama3rope-tied", "peft", "peft");
}
