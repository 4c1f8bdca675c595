//! `loraforge convert` against `mlx_lm.convert` (mlx-lm 0.32): for the same input and settings,
//! `config.json`, `model.safetensors.index.json`, `README.md` and `generation_config.json` are
//! the same bytes, and every tensor of `model.safetensors` has the same name, dtype, shape and
//! bytes (mlx lays the data out in its C++ hash map's order, so the files' headers differ in
//! offsets only). References: `scripts/fixtures/make_mlx_quantized.py` (4-bit/g64, 8-bit/g32),
//! `make_convert_reference.py` (bf16 4-bit/g32, mixed_3_6, f16) and `make_family_mlx.py` (six
//! families at 4-bit/g32, Qwen3-MoE's router at 8 bits).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::common;

/// A copy of fixture `name` as mlx-lm's conversions read it: `config.json` with the older RoPE
/// keys (the families' `config-legacy.json`; for the Llama, `rope_parameters` split into
/// `rope_theta` and `rope_scaling`, as make_mlx_quantized.py stages it).
fn staged(name: &str, dir: &Path) -> PathBuf {
    let src = common::fixture(&format!("models/{name}"));
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        match file.as_str() {
            "reference.json" | "config.json" | "config-legacy.json" => {}
            _ => {
                std::fs::copy(&path, out.join(&file)).unwrap();
            }
        }
    }
    let config = match src.join("config-legacy.json").exists() {
        true => common::read_json(&src.join("config-legacy.json")),
        false => {
            let mut config = common::read_json(&src.join("config.json"));
            let map = config.as_object_mut().unwrap();
            let mut rope = map.shift_remove("rope_parameters").unwrap();
            let theta = rope
                .as_object_mut()
                .unwrap()
                .shift_remove("rope_theta")
                .unwrap();
            map.insert("rope_theta".into(), theta);
            map.insert("rope_scaling".into(), rope);
            config
        }
    };
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    out
}

/// Each tensor's dtype, shape and bytes, and the file's metadata.
type Tensors = (Value, BTreeMap<String, (Value, Value, Vec<u8>)>);

fn tensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let metadata = header.shift_remove("__metadata__").unwrap_or(Value::Null);
    let data = &bytes[8 + n..];
    let tensors = header
        .into_iter()
        .map(|(name, t)| {
            let at = |i: usize| t["data_offsets"][i].as_u64().unwrap() as usize;
            let raw = data[at(0)..at(1)].to_vec();
            (name, (t["dtype"].clone(), t["shape"].clone(), raw))
        })
        .collect();
    (metadata, tensors)
}

/// Asserts `ours` holds what mlx-lm wrote into `reference`, and the source's tokenizer files.
fn assert_same(ours: &Path, reference: &Path, source: &Path) {
    for file in [
        "config.json",
        "model.safetensors.index.json",
        "README.md",
        "generation_config.json",
    ] {
        if !reference.join(file).exists() {
            continue;
        }
        let (a, b) = (
            std::fs::read_to_string(ours.join(file)).unwrap(),
            std::fs::read_to_string(reference.join(file)).unwrap(),
        );
        assert!(
            a == b,
            "{}: {file} differs\nours:\n{a}\nmlx-lm:\n{b}",
            ours.display()
        );
    }
    let (meta, ours_t) = tensors(&ours.join("model.safetensors"));
    let (want_meta, want) = tensors(&reference.join("model.safetensors"));
    assert_eq!(meta, want_meta);
    assert_eq!(
        ours_t.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, (dtype, shape, bytes)) in &want {
        let (d, s, b) = &ours_t[name];
        assert_eq!((d, s), (dtype, shape), "{name}");
        let differing = b.iter().zip(bytes).filter(|(x, y)| x != y).count();
        assert_eq!(
            differing,
            0,
            "{name}: {differing} of {} bytes differ",
            b.len()
        );
    }
    // The tokenizer files are the source's (mlx-lm's are transformers' re-serialisation).
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(ours.join(file)).unwrap(),
            std::fs::read(source.join(file)).unwrap(),
            "{file}"
        );
    }
}

fn convert(model: &Path, out: &Path, flags: &[&str]) -> std::process::Output {
    let (model, out) = (model.to_str().unwrap(), out.to_str().unwrap());
    let out = common::loraforge(&[&["convert", "--model", model, "--out", out], flags].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn llama_conversions_are_what_mlx_lm_convert_writes() {
    let dir = common::temp_dir("convert-llama");
    let source = staged("llama-llama3rope-tied", &dir);
    let cases: [(&str, &[&str]); 5] = [
        ("models/mlx-q4-g64", &["-q"]),
        (
            "models/mlx-q8-g32",
            &["-q", "--q-bits", "8", "--q-group-size", "32"],
        ),
        // bf16 weights put many codes exactly half-way: mlx rounds them to even.
        (
            "convert/q4-g32-bf16",
            &["-q", "--q-group-size", "32", "--dtype", "bfloat16"],
        ),
        (
            "convert/mixed_3_6",
            &[
                "-q",
                "--q-group-size",
                "64",
                "--quant-predicate",
                "mixed_3_6",
            ],
        ),
        ("convert/f16", &["--dtype", "float16"]),
    ];
    for (i, (reference, flags)) in cases.iter().enumerate() {
        let out = dir.join(format!("out-{i}"));
        convert(&source, &out, flags);
        assert_same(&out, &common::fixture(reference), &source);
    }
}

#[test]
fn family_conversions_are_what_mlx_lm_convert_writes() {
    let dir = common::temp_dir("convert-families");
    for family in [
        "gemma2",
        "gemma3",
        "phi3",
        "phi4mini",
        "mixtral",
        "qwen3_moe",
    ] {
        let source = staged(family, &dir);
        let out = dir.join(format!("{family}-q4"));
        convert(
            &source,
            &out,
            &["-q", "--q-bits", "4", "--q-group-size", "32"],
        );
        let reference = common::fixture(&format!("models/mlx-{family}-q4"));
        assert_same(&out, &reference, &source);
    }
}

#[test]
fn a_recipe_without_a_group_size_records_the_default_and_loads() {
    // mlx-lm writes `"group_size": null` into every entry here; we write 64, and read its null.
    let dir = common::temp_dir("convert-recipe-default");
    let source = staged("llama-llama3rope-tied", &dir);
    let out = dir.join("mixed");
    convert(&source, &out, &["-q", "--quant-predicate", "mixed_3_6"]);
    let config = common::read_json(&out.join("config.json"));
    let entry = &config["quantization"]["model.layers.1.mlp.down_proj"];
    assert_eq!(entry["group_size"], 64);
    assert_eq!(entry["bits"], 6);
    let with_null = dir.join("mixed-null");
    std::fs::create_dir_all(&with_null).unwrap();
    for file in std::fs::read_dir(&out).unwrap() {
        let path = file.unwrap().path();
        std::fs::copy(&path, with_null.join(path.file_name().unwrap())).unwrap();
    }
    let mut config = config;
    for key in ["quantization", "quantization_config"] {
        for (_, v) in config[key].as_object_mut().unwrap().iter_mut() {
            if let Some(o) = v.as_object_mut() {
                o.insert("group_size".into(), Value::Null);
            }
        }
    }
    std::fs::write(with_null.join("config.json"), config.to_string()).unwrap();
    assert_eq!(greedy_ids(&out), greedy_ids(&with_null));
}

/// Eight greedy tokens after a short prompt, on the CPU.
fn greedy_ids(model: &Path) -> Vec<u32> {
    let out = common::loraforge(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hello there",
        "--max-tokens",
        "8",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::ids(&serde_json::from_slice::<Value>(&out.stdout).unwrap()["ids"])
}

#[test]
fn bad_conversions_are_refused_by_name() {
    let dir = common::temp_dir("convert-refused");
    let source = staged("llama-llama3rope-tied", &dir);
    let mlx = common::fixture("models/mlx-q4-g64");
    let refused = |model: &Path, out: &str, flags: &[&str]| -> String {
        let out = dir.join(out);
        let args = [
            &["convert", "--model", model.to_str().unwrap(), "--out"],
            &[out.to_str().unwrap()][..],
            flags,
        ]
        .concat();
        let run = common::loraforge(&args);
        assert!(!run.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&run.stderr).into_owned()
    };
    let err = refused(&mlx, "requantized", &["-q"]);
    assert!(
        err.contains("mlx-q4-g64 is already quantized") && err.contains("-d"),
        "{err}"
    );
    let err = refused(&source, "seven", &["-q", "--q-bits", "7"]);
    assert!(
        err.contains("--q-bits 7 is not an MLX quantization"),
        "{err}"
    );
    let err = refused(&source, "group", &["-q", "--q-group-size", "48"]);
    assert!(
        err.contains("--q-group-size 48 is not an MLX group size"),
        "{err}"
    );
    let err = refused(&source, "gguf", &["-q", "--to", "gguf"]);
    assert!(err.contains("--gguf-type"), "{err}");
    let err = refused(&source, "recipe", &["--quant-predicate", "mixed_3_6"]);
    assert!(err.contains("--quantize"), "{err}");
    std::fs::create_dir_all(dir.join("taken")).unwrap();
    std::fs::write(dir.join("taken/notes.txt"), "mine").unwrap();
    let err = refused(&source, "taken", &[]);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn an_mlx_folder_dequantizes_and_converts_to_gguf() {
    let dir = common::temp_dir("convert-other");
    let mlx = common::fixture("models/mlx-q4-g64");
    let float = dir.join("float");
    convert(&mlx, &float, &["-d"]);
    let config = common::read_json(&float.join("config.json"));
    assert!(config.get("quantization").is_none(), "{config}");
    let (_, t) = tensors(&float.join("model.safetensors"));
    assert!(t.keys().all(|k| !k.ends_with(".scales")));
    assert_eq!(greedy_ids(&float), greedy_ids(&mlx));
    let gguf = dir.join("gguf");
    convert(&float, &gguf, &["--to", "gguf", "--gguf-type", "f32"]);
    let file = loraforge::export::model_path(&gguf);
    assert!(
        file.extension().is_some_and(|e| e == "gguf"),
        "{}",
        file.display()
    );
    let inspect = common::loraforge(&["inspect", file.to_str().unwrap()]);
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
}
