//! Our mlx-community exports of a fine-tuned SmolLM2-135M (the demo's base, a Q4_1 GGUF) load in
//! mlx-lm, live (`scripts/fetch-assets.sh interop`: mlx[cpu] + mlx-lm, no torch), and its greedy
//! generation of 32 tokens on 5 held-out prompts (2 in CI) gives the token ids ours gives on the same
//! folder: both with the adapted matrices requantized at 8 bits (untouched ones copied from the
//! base's 4-bit blocks) and fully dequantized. The exports use `--dtype f32` because mlx
//! computes in the dtype of the weights, and token-exact agreement needs both sides in f32.
//!
//! The adapters are random (B ≠ 0) on the last 4 blocks; `LORAFORGE_EXPORT_ADAPTERS=DIR` runs
//! the same check on a fine-tune of SmolLM2-135M instead (e.g. `runs/smollm2-demo/adapters`
//! after `just demo`).

use crate::common;

use std::path::Path;
use std::process::Command;

use burn::backend::NdArray;
use burn::tensor::{Distribution, Tensor};
use loraforge::chat::{ChatTemplate, Message};
use loraforge::generate::{GenerationLimits, Prompt, SamplingConfig, generate};
use loraforge::lora::{AdapterSpec, files, inject};
use loraforge::model::load_model;
use loraforge::model::names::BlockLinear;

type B = NdArray<f32>;

const TOKENS: usize = 32;

/// An adapter on every linear of the last 4 blocks (all, in a smaller model) with B ≠ 0, saved in
/// mlx-lm's layout.
fn make_adapters(base: &Path, dir: &Path) {
    let device = Default::default();
    let mut decoder = load_model::<B>(base, &device).unwrap().decoder;
    let blocks = decoder.config.num_layers;
    let spec = AdapterSpec {
        dora: false,
        rank: 8,
        scale: 20.0,
        dropout: 0.0,
        keys: BlockLinear::of(decoder.config.family)
            .iter()
            .map(|l| l.key(decoder.config.family).to_string())
            .collect(),
        layers: (blocks.saturating_sub(4)..blocks).collect(),
        num_layers: blocks.min(4) as i64,
        rslora: false,
    };
    <B as burn::tensor::backend::Backend>::seed(&device, 7);
    inject(&mut decoder, &spec, 7, &device);
    for (_, linear) in decoder.linears_mut() {
        if let Some(adapter) = linear.adapter.as_mut() {
            adapter.b = Tensor::random(
                adapter.b.dims(),
                Distribution::Uniform(-0.003, 0.003),
                &device,
            );
        }
    }
    files::save_mlx(dir, &decoder, &spec, &base.display().to_string(), None).unwrap();
}

/// The first 5 held-out prompts of the demo (2 in CI), as the chat template renders them.
fn prompts(model: &Path) -> Vec<Vec<u32>> {
    let loaded = load_model::<B>(model, &Default::default()).unwrap();
    let tokenizer = loraforge::tokenizer::for_model(&loaded.files).unwrap();
    let template = ChatTemplate::from_tokenizer(&tokenizer).unwrap();
    let text =
        std::fs::read_to_string(common::root().join("datasets/persona/heldout.jsonl")).unwrap();
    // CI: two prompts (each prompt is 3 greedy runs on our side and 2 in mlx-lm).
    text.lines()
        .take(if common::in_ci() { 2 } else { 5 })
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let chat = [Message::new("user", row["prompt"].as_str().unwrap())];
            let rendered = template.render(&chat, true, None).unwrap();
            tokenizer.encode(&rendered, false).unwrap()
        })
        .collect()
}

fn our_greedy(model: &Path, adapters: Option<&Path>, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let device = Default::default();
    let loaded = load_model::<B>(model, &device).unwrap();
    let tokenizer = loraforge::tokenizer::for_model(&loaded.files).unwrap();
    let mut decoder = loaded.decoder;
    if let Some(dir) = adapters {
        files::attach(&mut decoder, dir, &device).unwrap();
    }
    prompts
        .iter()
        .map(|ids| {
            let limits = GenerationLimits {
                max_tokens: TOKENS,
                stop_at_eos: false,
                top_logprobs: None,
                interrupt: None,
            };
            let greedy = SamplingConfig::default();
            generate(
                &decoder,
                &tokenizer,
                Prompt::new(ids),
                limits,
                greedy,
                &device,
                |_| {},
            )
            .unwrap()
            .ids
        })
        .collect()
}

fn mlx_greedy(python: &Path, model: &Path, prompts_file: &Path) -> Vec<Vec<u32>> {
    let out = Command::new(python)
        .arg(common::root().join("scripts/interop/check_export.py"))
        .arg("mlx-generate")
        .arg(model)
        .arg(prompts_file)
        .arg(TOKENS.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mlx-lm failed on {}:\n{}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn mlx_lm_generates_our_tokens_from_our_mlx_exports() {
    let base = common::asset("smollm2");
    let python = common::asset("interop");
    let tmp = common::temp_dir("export-mlx");
    let adapters = match std::env::var_os("LORAFORGE_EXPORT_ADAPTERS") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => {
            let dir = tmp.join("adapters");
            make_adapters(&base, &dir);
            dir
        }
    };
    let prompts = prompts(&base);
    let tuned = our_greedy(&base, Some(&adapters), &prompts);

    for (name, flags) in EXPORTS {
        let out = tmp.join(name);
        let ours =
            export_generates_mlx_lms_tokens(&python, &base, &adapters, &out, flags, &prompts);
        let config = common::read_json(&out.join("config.json"));
        assert!(out.join("model.safetensors.index.json").exists());
        let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(readme.contains("library_name: mlx") && readme.contains("base_model:"));
        if name == "requant8" {
            // Untouched matrices keep the base's 4-bit groups of 32; adapted ones are 8-bit.
            let q = &config["quantization"];
            assert_eq!(
                (q["bits"].as_u64(), q["group_size"].as_u64()),
                (Some(4), Some(32))
            );
            assert_eq!(q["model.layers.29.self_attn.q_proj"]["bits"], 8);
            assert_eq!(q, &config["quantization_config"]);
        } else {
            assert!(config.get("quantization").is_none());
        }
        let same_as_unfused = ours.iter().zip(&tuned).filter(|(a, b)| a == b).count();
        println!(
            "{name}: mlx-lm = ours on {n}/{n} prompts; equal to base + adapters on {same_as_unfused}/{n}",
            n = prompts.len()
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// The two exports each test checks: adapted matrices requantized at 8 bits, and all in float.
const EXPORTS: [(&str, &[&str]); 2] = [
    ("requant8", &["--dtype", "f32"]),
    ("dequantized", &["--dtype", "f32", "--dequantize"]),
];

/// Fuses `adapters` into `base` as an mlx folder at `out` and returns our greedy tokens from it,
/// after checking that mlx-lm generates the same.
fn export_generates_mlx_lms_tokens(
    python: &Path,
    base: &Path,
    adapters: &Path,
    out: &Path,
    flags: &[&str],
    prompts: &[Vec<u32>],
) -> Vec<Vec<u32>> {
    let fused = common::fuse(base, adapters, out, flags);
    let printed = String::from_utf8_lossy(&fused.stdout);
    assert!(
        fused.status.success(),
        "{}",
        String::from_utf8_lossy(&fused.stderr)
    );
    println!("{}: {printed}", out.display());
    assert!(printed.contains("ΔW survival"));
    let prompts_file = out.with_extension("prompts.json");
    std::fs::write(&prompts_file, serde_json::to_string(prompts).unwrap()).unwrap();
    let ours = our_greedy(out, None, prompts);
    let theirs = mlx_greedy(python, out, &prompts_file);
    assert_eq!(
        ours,
        theirs,
        "{}: mlx-lm's greedy tokens differ from ours",
        out.display()
    );
    ours
}

/// Gemma 3 (sliding layers with their own RoPE base and a 4-key window, q/k norms, `1 + w`
/// norms, GeGLU, a scaled embedding): our mlx exports with random adapters give mlx-lm's greedy
/// tokens, 32 past a 16-token prompt, from `mlx_lm.convert -q`'s folder and from the
/// transformers-5 folder (whose RoPE is spelled only as `rope_parameters`, which mlx-lm does not
/// read: the export adds the older keys). (Not Gemma 2: mlx-lm 0.32's gemma2 ignores the
/// sliding window, so its tokens are not the model's.)
#[test]
fn mlx_lm_generates_our_tokens_from_our_gemma3_exports() {
    family_exports_generate_mlx_lms_tokens("gemma3", |_| {});
}

/// Phi-3 (fused `qkv_proj` and `gate_up_proj` with adapters spanning them, LongRoPE past its
/// original length): the same check, on copies of the fixtures without their sliding window,
/// which mlx-lm 0.32's phi3 ignores (as Phi-3-mini-128k's window of 262,144 does not bind).
#[test]
fn mlx_lm_generates_our_tokens_from_our_phi3_exports() {
    family_exports_generate_mlx_lms_tokens("phi3", |config| {
        config.as_object_mut().unwrap().remove("sliding_window");
    });
}

/// Phi-4-mini (Phi-3's fused linears, RoPE over 3/4 of each head: `partial_rotary_factor`, which
/// the export writes top-level where mlx-lm reads it; LongRoPE past its original length): the
/// same check.
#[test]
fn mlx_lm_generates_our_tokens_from_our_phi4mini_exports() {
    family_exports_generate_mlx_lms_tokens("phi4mini", |_| {});
}

/// Qwen3-MoE (top-2 of 8 experts, adapters on attention and on every expert's gate, up and down,
/// in SwitchLinear's layout; the mlx base's router at mlx-lm's 8 bits): the same check. The
/// transformers-5 folder names its expert count `num_local_experts`, which mlx-lm's qwen3_moe
/// does not read: the export adds `num_experts`.
#[test]
fn mlx_lm_generates_our_tokens_from_our_qwen3_moe_exports() {
    family_exports_generate_mlx_lms_tokens("qwen3_moe", |_| {});
}

/// Mixtral (top-2 of 4 experts, the stacks under `block_sparse_moe.switch_mlp`): the same check,
/// without the fixture's sliding window, which mlx-lm 0.32's mixtral ignores.
#[test]
fn mlx_lm_generates_our_tokens_from_our_mixtral_exports() {
    family_exports_generate_mlx_lms_tokens("mixtral", |config| {
        config.as_object_mut().unwrap().remove("sliding_window");
    });
}

/// Our mlx exports of a family fixture (`mlx_lm.convert -q`'s folder and the transformers-5
/// folder), with random adapters, give mlx-lm's greedy tokens; `edit` changes each base's
/// `config.json` first.
fn family_exports_generate_mlx_lms_tokens(family: &str, edit: impl Fn(&mut serde_json::Value)) {
    let python = common::asset("interop");
    let tmp = common::temp_dir(&format!("export-mlx-{family}"));
    for base in [format!("mlx-{family}-q4"), family.to_string()] {
        let fixture = common::fixture(&format!("models/{base}"));
        let base_dir = tmp.join(&base);
        std::fs::create_dir_all(&base_dir).unwrap();
        for entry in std::fs::read_dir(&fixture).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, base_dir.join(path.file_name().unwrap())).unwrap();
        }
        let mut config = common::read_json(&base_dir.join("config.json"));
        edit(&mut config);
        std::fs::write(base_dir.join("config.json"), config.to_string()).unwrap();
        let adapters = tmp.join(format!("{base}-adapters"));
        make_adapters(&base_dir, &adapters);
        let reference = common::read_json(&fixture.join("reference.json"));
        let prompts = vec![common::ids(&reference["input_ids"])];
        let tuned = our_greedy(&base_dir, Some(&adapters), &prompts);
        for (name, flags) in EXPORTS {
            let out = tmp.join(format!("{base}-{name}"));
            let ours = export_generates_mlx_lms_tokens(
                &python, &base_dir, &adapters, &out, flags, &prompts,
            );
            println!("{base} {name}: equal to base + adapters: {}", ours == tuned);
        }
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}
