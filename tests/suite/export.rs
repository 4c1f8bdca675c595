//! `loraforge fuse`: exports that the reference tools load with our numbers, and bad input.
//!
//! - transformers / peft / transformers' GGUF loader (F16, Q8_0, Q4_0, Q4_1): their logits on
//!   our exports of the tiny Llama fixture are committed (made by
//!   scripts/fixtures/make_export_interop.py, which needs torch); this test re-exports, checks
//!   the files are byte-identical to the ones those tools read (SHA-256), and compares our
//!   logits on them.
//! - mlx-lm runs live (`scripts/fetch-assets.sh interop`, mlx[cpu] without torch): see
//!   tests/suite/export_mlx.rs.

use crate::common;

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use loraforge::model::load_model;

type B = NdArray<f32>;

const BASE: &str = "models/llama-llama3rope-tied";
const ADAPTERS: &str = "adapter-interop/llama-llama3rope-tied/mlx";

fn fuse(out: &Path, flags: &[&str]) -> std::process::Output {
    common::fuse(
        &common::fixture(BASE),
        &common::fixture(ADAPTERS),
        out,
        flags,
    )
}

fn fuse_ok(out: &Path, flags: &[&str]) -> String {
    let result = fuse(out, flags);
    assert!(
        result.status.success(),
        "fuse {flags:?} failed:\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
    String::from_utf8(result.stdout).unwrap()
}

/// Our logits, every position of every prompt, flattened.
fn our_logits(model: &Path, adapters: Option<&Path>, prompts: &[Vec<u32>]) -> Vec<f32> {
    let device = Default::default();
    let mut model = load_model::<B>(model, &device).unwrap().decoder;
    if let Some(dir) = adapters {
        loraforge::lora::files::attach(&mut model, dir, &device).unwrap();
    }
    prompts
        .iter()
        .flat_map(|ids| {
            model
                .forward(ids, 1, &device)
                .into_data()
                .into_vec::<f32>()
                .unwrap()
        })
        .collect()
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

fn gguf_in(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "gguf"))
        .expect("a .gguf file in the export")
}

#[test]
fn exports_match_transformers_peft_and_gguf_references() {
    let reference = common::read_json(&common::fixture("export-interop/reference.json"));
    let prompts: Vec<Vec<u32>> = serde_json::from_value(reference["ids"].clone()).unwrap();
    let tmp = common::temp_dir("export-ref");
    let exports: [(&str, &[&str], f32); 5] = [
        ("hf", &["--format", "hf", "--dtype", "f32"], 1e-3),
        (
            "gguf-f16",
            &["--format", "gguf", "--gguf-type", "f16"],
            1e-3,
        ),
        (
            "gguf-q8_0",
            &["--format", "gguf", "--gguf-type", "q8_0"],
            1e-2,
        ),
        (
            "gguf-q4_0",
            &["--format", "gguf", "--gguf-type", "q4_0"],
            1e-2,
        ),
        (
            "gguf-q4_1",
            &["--format", "gguf", "--gguf-type", "q4_1"],
            1e-2,
        ),
    ];
    for (name, flags, tolerance) in exports {
        let out = tmp.join(name);
        let printed = fuse_ok(&out, flags);
        assert!(printed.contains("ΔW survival"), "{printed}");
        for (file, want) in reference["sha256"].as_object().unwrap() {
            if let Some(rel) = file.strip_prefix(&format!("{name}/")) {
                assert_eq!(
                    &sha256(&out.join(rel)),
                    want.as_str().unwrap(),
                    "{file} differs from the file the references were computed on; rerun scripts/fixtures/make_export_interop.py"
                );
            }
        }
        let path = if name == "hf" {
            out.clone()
        } else {
            gguf_in(&out)
        };
        if let Some(read) = reference.get(format!("gguf_read_{name}")) {
            // The gguf package lists the same tensors, types and shapes (innermost first).
            let file = loraforge::io::gguf::GgufFile::open(&path).unwrap();
            let ours: Vec<serde_json::Value> = file
                .tensors
                .iter()
                .map(|t| {
                    let shape: Vec<usize> = t.shape.iter().rev().copied().collect();
                    serde_json::json!({"name": t.name, "type": t.kind.name(), "shape": shape})
                })
                .collect();
            assert_eq!(&serde_json::Value::Array(ours), &read["tensors"], "{name}");
            assert_eq!(read["architecture"], "llama");
        }
        let ours = our_logits(&path, None, &prompts);
        let theirs = common::flatten(&reference["logits"][name]);
        let diff = common::max_abs_diff(&ours, &theirs);
        println!("{name}: our logits vs the reference tool's: max abs diff {diff:.2e}");
        assert!(diff <= tolerance, "{name}: max abs diff {diff}");
    }

    // The PEFT adapter beside the HF export, on the base, in peft.
    let ours = our_logits(
        &common::fixture(BASE),
        Some(&tmp.join("hf/adapter")),
        &prompts,
    );
    let diff = common::max_abs_diff(&ours, &common::flatten(&reference["logits"]["peft"]));
    println!("base + our PEFT adapter in peft: max abs diff {diff:.2e}");
    assert!(diff <= 1e-3, "peft: max abs diff {diff}");

    // The fused float export equals base + adapters in our own runtime too.
    let fused = our_logits(&tmp.join("hf"), None, &prompts);
    let diff = common::max_abs_diff(&fused, &ours);
    assert!(diff <= 1e-4, "fused vs base + adapters: {diff}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn adapters_for_another_base_are_refused_by_name() {
    let tmp = common::temp_dir("export-mismatch");
    let result = common::loraforge(&[
        "fuse",
        "--model",
        common::fixture("models/mistral").to_str().unwrap(),
        "--adapters",
        common::fixture(ADAPTERS).to_str().unwrap(),
        "--out",
        tmp.join("out").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    assert!(
        stderr.contains("model.layers.") && stderr.contains("different base"),
        "{stderr}"
    );
    assert!(!tmp.join("out").exists(), "a refused export left a folder");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Gemma 2 (GGUF stores its norms as `1 + w`, and the soft-caps, window and query scale in its
/// metadata): the peft adapter trained by the parity fixture, fused and exported as a Hugging
/// Face folder and as an f32 GGUF, gives base + adapter's logits through our loaders.
#[test]
fn gemma2_exports_keep_base_plus_adapter_logits() {
    let tmp = exports_keep_base_plus_adapter_logits("gemma2");
    let file = loraforge::io::gguf::GgufFile::open(&gguf_in(&tmp.join("gguf"))).unwrap();
    let norm = file.tensor("blk.0.post_ffw_norm.weight").unwrap();
    let stored = loraforge::quant::ggml::float_values(norm.kind, file.data(norm)).unwrap();
    let base = common::fixture("models/gemma2");
    let hf = &common::tensors(&base.join("model.safetensors"))["model.layers.0.post_feedforward_layernorm.weight"];
    assert!(stored.iter().zip(hf).all(|(s, w)| *s == w + 1.0));
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Phi-3 (fused projections under llama.cpp's `attn_qkv` and `ffn_up`, LongRoPE's factor lists as
/// tensors): the same.
#[test]
fn phi3_exports_keep_base_plus_adapter_logits() {
    let tmp = exports_keep_base_plus_adapter_logits("phi3");
    let file = loraforge::io::gguf::GgufFile::open(&gguf_in(&tmp.join("gguf"))).unwrap();
    assert!(file.tensor("blk.0.attn_qkv.weight").is_some());
    assert!(file.tensor("rope_factors_long.weight").is_some());
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// The family fixture's parity adapter (`peft-parity-{family}`) fused and exported as a Hugging
/// Face folder and as an f32 GGUF: both give base + adapter's logits through our loaders. Returns
/// the folder holding `hf/` and `gguf/`.
fn exports_keep_base_plus_adapter_logits(family: &str) -> std::path::PathBuf {
    let base = common::fixture(&format!("models/{family}"));
    let adapters = common::fixture(&format!("peft-parity-{family}/adapter_final"));
    let reference = common::read_json(&base.join("reference.json"));
    let prompts = vec![common::ids(&reference["input_ids"])];
    let want = our_logits(&base, Some(&adapters), &prompts);
    let tmp = common::temp_dir(&format!("export-{family}"));
    for (name, flags) in [
        ("hf", &["--format", "hf", "--dtype", "f32"][..]),
        ("gguf", &["--format", "gguf", "--gguf-type", "f32"][..]),
    ] {
        let out = tmp.join(name);
        let result = common::fuse(&base, &adapters, &out, flags);
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        let path = if name == "hf" {
            out.clone()
        } else {
            gguf_in(&out)
        };
        let diff = common::max_abs_diff(&our_logits(&path, None, &prompts), &want);
        println!("{family} {name}: fused vs base + adapter: max abs diff {diff:.2e}");
        assert!(diff <= 1e-4, "{family} {name}: max abs diff {diff}");
    }
    tmp
}

/// Adapters on every adaptable linear of a mixture of experts (attention, the experts' gate, up
/// and down stacks, Qwen2-MoE's shared expert and its dense layer), each `B` drawn non-zero:
/// saved in mlx-lm's layout (SwitchLinear's `(experts, r, in)` / `(experts, out, r)`) and in
/// peft's (`target_parameters`, gate and up fused block-diagonally), each read back onto the base
/// gives the trained model's logits, and so does each export fused from them.
#[test]
fn moe_adapters_round_trip_through_mlx_and_peft_layouts_and_every_export() {
    use burn::tensor::{Distribution, Tensor};
    use loraforge::lora::{AdapterSpec, files, inject};
    use loraforge::recipe::{Layers, LoraSection, Targets};
    for family in ["qwen2_moe", "qwen3_moe", "mixtral"] {
        let base = common::fixture(&format!("models/{family}"));
        let reference = common::read_json(&base.join("reference.json"));
        let prompts = vec![common::ids(&reference["input_ids"])];
        let device = Default::default();
        let mut model = load_model::<B>(&base, &device).unwrap().decoder;
        let lora = LoraSection {
            rank: 4,
            alpha: Some(8.0),
            targets: Targets::Named("all-linear".into()),
            layers: Layers::Last(-1),
            ..Default::default()
        };
        let spec = AdapterSpec::from_recipe(&lora, &model.config).unwrap();
        assert!(
            spec.keys
                .iter()
                .any(|k| k.ends_with("switch_mlp.down_proj")),
            "{:?}",
            spec.keys
        );
        inject(&mut model, &spec, 7, &device);
        let mut experts = 0;
        for (_, linear) in model.linears_mut() {
            if let Some(adapter) = &mut linear.adapter {
                adapter.b =
                    Tensor::random(adapter.b.dims(), Distribution::Normal(0.0, 0.05), &device);
                experts += usize::from(linear.experts > 1);
            }
        }
        assert!(experts > 0, "{family}: the experts' stacks are adapted");
        let want: Vec<f32> = model
            .forward(&prompts[0], 1, &device)
            .into_data()
            .into_vec()
            .unwrap();
        let tmp = common::temp_dir(&format!("moe-adapters-{family}"));
        let base_name = base.display().to_string();
        files::save_mlx(&tmp.join("mlx"), &model, &spec, &base_name, None).unwrap();
        files::save_peft(&tmp.join("peft"), &model, &spec, &base_name).unwrap();
        for layout in ["mlx", "peft"] {
            let got = our_logits(&base, Some(&tmp.join(layout)), &prompts);
            let diff = common::max_abs_diff(&got, &want);
            println!("{family} {layout} adapters: max abs diff {diff:.2e}");
            assert!(diff <= 1e-5, "{family} {layout}: max abs diff {diff}");
        }
        for (name, flags) in [
            ("hf", vec!["--format", "hf", "--dtype", "f32"]),
            ("mlx-export", vec!["--format", "mlx", "--dtype", "f32"]),
            ("gguf", vec!["--format", "gguf", "--gguf-type", "f32"]),
        ] {
            let out = tmp.join(name);
            let result = common::fuse(&base, &tmp.join("mlx"), &out, &flags);
            assert!(
                result.status.success(),
                "{}",
                String::from_utf8_lossy(&result.stderr)
            );
            let path = if name == "gguf" {
                gguf_in(&out)
            } else {
                out.clone()
            };
            let diff = common::max_abs_diff(&our_logits(&path, None, &prompts), &want);
            println!("{family} {name}: fused vs base + adapter: max abs diff {diff:.2e}");
            assert!(diff <= 1e-4, "{family} {name}: max abs diff {diff}");
        }
        // The Hugging Face export stores the experts one matrix per expert, as the Hub does.
        let names = common::tensors(&tmp.join("hf/model.safetensors"));
        let expert = match family {
            "mixtral" => "model.layers.0.block_sparse_moe.experts.1.w2.weight",
            _ => "model.layers.0.mlp.experts.1.down_proj.weight",
        };
        assert!(names.contains_key(expert), "{family}: {expert}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
