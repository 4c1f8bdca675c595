//! Bad input gets a clear error that names the file, key or tensor and says what to do.

use crate::common;

use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use loraforge::model::load_model;

/// A scratch copy of a fixture model folder.
fn scratch_copy(fixture: &str, tag: &str) -> PathBuf {
    let src = common::fixture(&format!("models/{fixture}"));
    let dir = std::env::temp_dir().join(format!("lf-bad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

fn load_error(path: &Path) -> String {
    match load_model::<NdArray<f32>>(path, &Default::default()) {
        Ok(_) => panic!("{} loaded but should not have", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut json = common::read_json(&path);
    edit(&mut json);
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

#[test]
fn missing_config_json() {
    let dir = scratch_copy("qwen2", "noconfig");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load_error(&dir);
    assert!(err.contains("has no config.json"), "{err}");
}

#[test]
fn malformed_config_json() {
    let dir = scratch_copy("qwen2", "badjson");
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"qwen2\",").unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("config.json") && err.contains("invalid JSON"),
        "{err}"
    );
}

#[test]
fn config_missing_a_dimension() {
    let dir = scratch_copy("qwen2", "nohidden");
    edit_config(&dir, |c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    let err = load_error(&dir);
    assert!(err.contains("missing or invalid `hidden_size`"), "{err}");
}

#[test]
fn unsupported_model_type_lists_the_supported_ones() {
    let dir = scratch_copy("qwen2", "neox");
    edit_config(&dir, |c| c["model_type"] = "gpt_neox".into());
    let err = load_error(&dir);
    assert!(err.contains("\"gpt_neox\""), "{err}");
    assert!(
        err.contains("supported: llama, mistral, qwen2, qwen3"),
        "{err}"
    );
}

/// A change to a `config.json`.
type ConfigEdit = fn(&mut serde_json::Value);

/// Gemma's own keys: a soft-cap or query scale that is not positive, an activation it does not
/// have, a layer list of another length, and the vision-language checkpoint's `model_type`.
#[test]
fn bad_gemma_keys_are_named() {
    let cases: [(&str, ConfigEdit, &str); 5] = [
        (
            "cap0",
            |c| c["attn_logit_softcapping"] = 0.0.into(),
            "attn_logit_softcapping is 0",
        ),
        (
            "scalar",
            |c| c["query_pre_attn_scalar"] = (-4.0).into(),
            "query_pre_attn_scalar is -4",
        ),
        (
            "act",
            |c| c["hidden_activation"] = "relu".into(),
            "hidden activation \"relu\" is not supported for gemma2",
        ),
        (
            "types",
            |c| c["layer_types"] = serde_json::json!(["full_attention"]),
            "layer_types lists 1 layers but num_hidden_layers is 3",
        ),
        (
            "vlm",
            |c| c["model_type"] = "gemma3".into(),
            "vision-language checkpoint",
        ),
    ];
    refused_with("gemma2", &cases);
}

#[test]
fn bad_phi3_keys_are_named() {
    let cases: [(&str, ConfigEdit, &str); 4] = [
        (
            "partial",
            |c| c["rope_parameters"]["partial_rotary_factor"] = 1.5.into(),
            "partial_rotary_factor is 1.5; it must be a number in (0, 1]",
        ),
        (
            "short",
            |c| c["rope_parameters"]["long_factor"] = serde_json::json!([1.0, 2.0]),
            "rope_scaling.long_factor must hold 8 positive numbers (rotated dimensions 16 / 2); it holds [1.0,2.0]",
        ),
        (
            "negative",
            |c| c["rope_parameters"]["short_factor"][3] = (-1.0).into(),
            "rope_scaling.short_factor must hold 8 positive numbers",
        ),
        (
            "original",
            |c| {
                c["rope_parameters"]
                    .as_object_mut()
                    .unwrap()
                    .remove("original_max_position_embeddings");
                c.as_object_mut()
                    .unwrap()
                    .remove("original_max_position_embeddings");
            },
            "missing or invalid `original_max_position_embeddings` (LongRoPE's pretrained context length",
        ),
    ];
    refused_with("phi3", &cases);
}

#[test]
fn bad_mixture_of_experts_keys_are_named() {
    let cases: [(&str, ConfigEdit, &str); 4] = [
        (
            "top-k",
            |c| c["num_experts_per_tok"] = 9.into(),
            "num_experts_per_tok (GGUF: expert_used_count) is 9; it must be between 1 and 8",
        ),
        (
            "experts",
            |c| c["num_local_experts"] = (1u64 << 40).into(),
            "num_local_experts (num_experts; GGUF: expert_count) is 1099511627776; it must be between 1 and 4096",
        ),
        (
            "width",
            |c| {
                c.as_object_mut().unwrap().remove("moe_intermediate_size");
            },
            "missing or invalid `moe_intermediate_size` (qwen3_moe needs it)",
        ),
        (
            "dense",
            |c| c["mlp_only_layers"] = "1".into(),
            "mlp_only_layers is \"1\"; it must be a list of layer indices",
        ),
    ];
    refused_with("qwen3_moe", &cases);
}

/// Each edit of the fixture's `config.json` makes loading fail with a message holding its text.
fn refused_with(fixture: &str, cases: &[(&str, ConfigEdit, &str)]) {
    for (tag, edit, want) in cases {
        let dir = scratch_copy(fixture, &format!("{fixture}-{tag}"));
        edit_config(&dir, *edit);
        let err = load_error(&dir);
        assert!(
            err.contains("config.json") && err.contains(want),
            "{tag}: {err}"
        );
    }
}

#[test]
fn truncated_safetensors() {
    let dir = scratch_copy("mistral", "trunc");
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 1000]).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated or corrupt"),
        "{err}"
    );
}

#[test]
fn corrupt_safetensors_header() {
    let dir = scratch_copy("mistral", "corrupt");
    let file = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[8..24].copy_from_slice(b"not json at all!");
    std::fs::write(&file, bytes).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let dir = scratch_copy("llama-linearrope-untied", "shape");
    edit_config(&dir, |c| c["intermediate_size"] = 96.into());
    let err = load_error(&dir);
    assert!(err.contains("model.layers.0.mlp.gate_proj.weight"), "{err}");
    assert!(
        err.contains("[128, 64]") && err.contains("[96, 64]"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = scratch_copy("qwen3", "missing");
    // A config that claims a layer more than the weights hold.
    edit_config(&dir, |c| c["num_hidden_layers"] = 3.into());
    let err = load_error(&dir);
    assert!(
        err.contains("model.layers.2.") && err.contains("is missing"),
        "{err}"
    );
}

/// A minimal GGUF v3 file: llama metadata and one tensor of the given ggml type.
fn tiny_gguf(path: &Path, tensor: &str, ggml_type: u32, block_bytes: usize) {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(1u64.to_le_bytes()); // tensors
    out.extend(1u64.to_le_bytes()); // metadata
    string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes());
    string(&mut out, "llama");
    string(&mut out, tensor);
    out.extend(2u32.to_le_bytes());
    out.extend(256u64.to_le_bytes());
    out.extend(2u64.to_le_bytes());
    out.extend(ggml_type.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend(vec![0u8; 2 * block_bytes]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn gguf_with_unsupported_tensor_type_names_type_and_tensor() {
    // IQ2_XXS (type 16, 66 bytes a block of 256): an i-quant we do not read (IQ4_NL and
    // IQ4_XS we do).
    let path = std::env::temp_dir().join(format!("lf-bad-iq2xxs-{}.gguf", std::process::id()));
    tiny_gguf(&path, "blk.0.attn_q.weight", 16, 66);
    let err = load_error(&path);
    assert!(
        err.contains("IQ2_XXS") && err.contains("blk.0.attn_q.weight"),
        "{err}"
    );
}

#[test]
fn not_a_gguf_file() {
    let path = std::env::temp_dir().join(format!("lf-bad-magic-{}.gguf", std::process::id()));
    std::fs::write(&path, b"PK\x03\x04 this is a zip").unwrap();
    let err = load_error(&path);
    assert!(err.contains("is not a GGUF file"), "{err}");
}

#[test]
fn truncated_gguf() {
    let path = std::env::temp_dir().join(format!("lf-bad-trunc-{}.gguf", std::process::id()));
    tiny_gguf(&path, "blk.0.attn_q.weight", 3, 20);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let err = load_error(&path);
    assert!(
        err.contains("truncated or corrupt") && err.contains("blk.0.attn_q.weight"),
        "{err}"
    );
}

#[test]
fn missing_model_path() {
    let err = load_error(Path::new("/nonexistent/model"));
    assert!(err.contains("/nonexistent/model does not exist"), "{err}");
}

/// An added token past the embedding used to panic inside burn-ndarray at the first batch that
/// held it; now the model refuses to load with that tokenizer, naming the token.
#[test]
fn a_tokenizer_with_ids_past_the_embedding_is_refused() {
    let dir = scratch_copy("llama-linearrope-untied", "added-token");
    let path = dir.join("tokenizer.json");
    let mut tokenizer = common::read_json(&path);
    tokenizer["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "id": 256, "content": "<|tool|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    let out = common::loraforge(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-tokens",
        "1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("the tokenizer can produce id 256 (\"<|tool|>\")")
            && err.contains("embedding has 256 rows"),
        "{err}"
    );
}

#[test]
fn a_dtype_the_device_cannot_compute_is_refused_by_its_flag() {
    let model = common::fixture("models/llama-linearrope-untied");
    let out = common::loraforge(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--device",
        "cpu",
        "--dtype",
        "bf16",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--dtype bf16 on --device cpu") && err.contains("leave --dtype at auto"),
        "{err}"
    );
}

/// GGUF bytes: `metadata` as (key, type, value bytes), then tensor infos as (name, dims, ggml
/// type, offset), aligned data of `data` zero bytes.
fn gguf_bytes(
    metadata: &[(&str, u32, Vec<u8>)],
    tensors: &[(&str, Vec<u64>, u32, u64)],
    data: usize,
) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, ty, value) in metadata {
        string(&mut out, key);
        out.extend(ty.to_le_bytes());
        out.extend(value);
    }
    for (name, dims, ty, offset) in tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend(vec![0u8; data]);
    out
}

/// `GgufFile::open`'s error for these bytes.
fn gguf_error(tag: &str, bytes: Vec<u8>) -> String {
    let path = std::env::temp_dir().join(format!("lf-gguf-{tag}-{}.gguf", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let err = match loraforge::io::gguf::GgufFile::open(&path) {
        Ok(_) => panic!("{tag}: a hostile GGUF opened"),
        Err(e) => e.to_string(),
    };
    std::fs::remove_file(&path).unwrap();
    assert!(
        err.contains(&format!("lf-gguf-{tag}")),
        "{tag}: the error names no file: {err}"
    );
    err
}

/// Each of these crashed, aborted or over-allocated the reader (issue 18's list); each is now an
/// error that names the file and what is wrong.
#[test]
fn hostile_gguf_headers_are_errors_not_crashes() {
    let f32_tensor = |name, offset| (name, vec![32u64], 0u32, offset);
    let u32_value = |v: u32| v.to_le_bytes().to_vec();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "align0",
            gguf_bytes(
                &[("general.alignment", 4, u32_value(0))],
                &[f32_tensor("w", 0)],
                128,
            ),
            "general.alignment is U32(0); it must be a power of two",
        ),
        (
            "offset",
            gguf_bytes(&[], &[f32_tensor("w", u64::MAX - 8)], 128),
            "tensor `w`: shape [32] at offset 18446744073709551607 overflows 64 bits",
        ),
        (
            "dims",
            gguf_bytes(&[], &[("w", vec![1u64 << 62, 8], 0, 0)], 128),
            "overflows 64 bits",
        ),
        (
            "ndims",
            {
                let mut b = gguf_bytes(&[], &[f32_tensor("w", 0)], 128);
                // n_dims of the only tensor: after magic, version, counts and its name.
                let at = 4 + 4 + 8 + 8 + 8 + 1;
                b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
                b
            },
            "tensor `w` has 4294967295 dimensions",
        ),
        (
            "nested",
            {
                // An array of arrays of arrays ... 64 deep.
                let mut value = Vec::new();
                for _ in 0..64 {
                    value.extend(9u32.to_le_bytes());
                    value.extend(1u64.to_le_bytes());
                }
                value.extend(4u32.to_le_bytes());
                value.extend(0u64.to_le_bytes());
                gguf_bytes(&[("x", 9, value)], &[], 0)
            },
            "metadata `x`: arrays nested more than 4 deep",
        ),
        (
            "arraylen",
            {
                let mut value = 10u32.to_le_bytes().to_vec(); // u64 items
                value.extend((1u64 << 40).to_le_bytes());
                gguf_bytes(&[("tokenizer.ggml.scores", 9, value)], &[], 64)
            },
            "array length 1099511627776 needs more than the",
        ),
        (
            "duplicate",
            gguf_bytes(
                &[
                    ("general.architecture", 4, u32_value(1)),
                    ("general.architecture", 4, u32_value(2)),
                ],
                &[],
                0,
            ),
            "metadata `general.architecture` appears twice",
        ),
        (
            "overlap",
            gguf_bytes(&[], &[f32_tensor("a", 0), f32_tensor("b", 64)], 256),
            "the data of tensors `a` and `b` overlap",
        ),
    ];
    for (tag, bytes, want) in cases {
        let err = gguf_error(tag, bytes);
        assert!(err.contains(want), "{tag}: {err}");
    }
}

/// mlx `quantization` settings no matrix can have: 0 bits divided by zero, 7 bits met a shape
/// mismatch, 2³² + 4 bits was read as 4, and a negative group size turned quantization off.
#[test]
fn impossible_mlx_quantization_settings_name_the_key() {
    for (tag, key, value, want) in [
        ("bits0", "bits", serde_json::json!(0), "has bits = 0"),
        ("bits7", "bits", serde_json::json!(7), "has bits = 7"),
        (
            "bitsbig",
            "bits",
            serde_json::json!(4_294_967_300u64),
            "has bits = 0",
        ),
        (
            "groupneg",
            "group_size",
            serde_json::json!(-64),
            "has group_size = 0",
        ),
    ] {
        let dir = scratch_copy("mlx-q4-g64", tag);
        edit_config(&dir, |json| {
            json["quantization"][key] = value.clone();
            json["quantization_config"][key] = value.clone();
        });
        let err = load_error(&dir);
        assert!(
            err.contains("config.json: `quantization`") && err.contains(want),
            "{tag}: {err}"
        );
    }
}

/// Model shapes no file can have: zero or 2⁴⁰ blocks (a loop or an allocation that size), head
/// counts that do not divide the width. In config.json and in GGUF metadata, each is an error
/// naming the file and the key.
#[test]
fn impossible_model_shapes_name_the_key() {
    for (tag, edit, want) in [
        (
            "layers0",
            serde_json::json!({"num_hidden_layers": 0}),
            "num_hidden_layers (GGUF: block_count) is 0; it must be between 1 and 1024",
        ),
        (
            "layers2e40",
            serde_json::json!({"num_hidden_layers": 1u64 << 40}),
            "num_hidden_layers (GGUF: block_count) is 1099511627776",
        ),
        (
            "vocab0",
            serde_json::json!({"vocab_size": 0}),
            "vocab_size is 0",
        ),
        (
            "heads7",
            serde_json::json!({"num_attention_heads": 7, "num_key_value_heads": 7, "head_dim": null}),
            "the attention heads (7) do not divide the hidden size (64)",
        ),
    ] {
        let dir = scratch_copy("llama-linearrope-untied", tag);
        edit_config(&dir, |json| {
            for (k, v) in edit.as_object().unwrap() {
                match v.is_null() {
                    true => json.as_object_mut().unwrap().remove(k),
                    false => json.as_object_mut().unwrap().insert(k.clone(), v.clone()),
                };
            }
        });
        let err = load_error(&dir);
        assert!(
            err.contains("config.json") && err.contains(want),
            "{tag}: {err}"
        );
    }

    let text = |s: &str| {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend(s.as_bytes());
        v
    };
    let u64_value = |v: u64| v.to_le_bytes().to_vec();
    let gguf = |blocks: u64, heads: u64| {
        gguf_bytes(
            &[
                ("general.architecture", 8, text("llama")),
                ("llama.embedding_length", 10, u64_value(64)),
                ("llama.attention.head_count", 10, u64_value(heads)),
                ("llama.block_count", 10, u64_value(blocks)),
                ("llama.feed_forward_length", 10, u64_value(128)),
                ("llama.vocab_size", 10, u64_value(256)),
            ],
            &[],
            0,
        )
    };
    for (tag, bytes, want) in [
        ("blocks0", gguf(0, 4), "block_count) is 0"),
        (
            "blocks2e40",
            gguf(1 << 40, 4),
            "block_count) is 1099511627776",
        ),
        (
            "heads7",
            gguf(2, 7),
            "the attention heads (7) do not divide the hidden size (64)",
        ),
    ] {
        let path = std::env::temp_dir().join(format!("lf-shape-{tag}-{}.gguf", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let err = match loraforge::model::ModelFiles::open(&path) {
            Ok(_) => panic!("{tag}: opened"),
            Err(e) => format!("{e:#}"),
        };
        std::fs::remove_file(&path).unwrap();
        assert!(
            err.contains(&format!("lf-shape-{tag}")) && err.contains(want),
            "{tag}: {err}"
        );
    }
}
