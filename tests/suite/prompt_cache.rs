//! Prompt caches (`loraforge cache-prompt`, `generate --prompt-cache-file`): a saved prompt's
//! keys and values continue generation with the same tokens as running the whole prompt, and a
//! cache is refused by a model it was not made with.

use crate::common;

use burn::backend::NdArray;
use loraforge::generate::prompt_cache::{PromptCache, fingerprint};
use loraforge::generate::{GenerationLimits, Prompt, SamplingConfig, generate};
use loraforge::model::{KvCache, load_model};

type B = NdArray<f32>;

#[test]
fn a_saved_prompt_continues_as_the_whole_prompt_would() {
    let device = Default::default();
    let model = load_model::<B>(&common::fixture("models/mlx-q4-g64"), &device).unwrap();
    let (decoder, tokenizer) = (
        &model.decoder,
        loraforge::tokenizer::for_model(&model.files).unwrap(),
    );
    let first: Vec<u32> = vec![1, 17, 203, 45, 99, 128, 7, 250, 33, 64];
    let then: Vec<u32> = vec![181, 12, 77, 140];
    let limits = || GenerationLimits {
        max_tokens: 12,
        stop_at_eos: false,
        top_logprobs: Some(2),
        interrupt: None,
    };
    let sampling = || SamplingConfig {
        repetition_penalty: 1.2,
        ..Default::default()
    };
    let whole = [first.clone(), then.clone()].concat();
    let want = generate(
        decoder,
        &tokenizer,
        Prompt::new(&whole),
        limits(),
        sampling(),
        &device,
        |_| {},
    )
    .unwrap();

    let dir = common::temp_dir("prompt-cache");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cache.safetensors");
    let mut cache = KvCache::new(&decoder.config, None);
    decoder.next_logits(&first, &mut cache, &device);
    PromptCache::capture(&cache, &first, "mlx-q4-g64", fingerprint(decoder, &device))
        .unwrap()
        .save(&file)
        .unwrap();
    let saved = PromptCache::load(&file, decoder, &fingerprint(decoder, &device)).unwrap();
    assert_eq!(
        (saved.ids.as_slice(), saved.fingerprint.clone()),
        (first.as_slice(), fingerprint(decoder, &device))
    );
    let mut cache = saved.to_device(&decoder.config, None, &device);
    let prompt = Prompt {
        cache: Some(&mut cache),
        cached: &saved.ids,
        ids: &then,
    };
    let got = generate(
        decoder,
        &tokenizer,
        prompt,
        limits(),
        sampling(),
        &device,
        |_| {},
    )
    .unwrap();
    assert_eq!(got.ids, want.ids, "the same tokens as without the cache");
    for (a, b) in got.logprobs.iter().zip(&want.logprobs) {
        assert!(
            (a.logprob - b.logprob).abs() < 1e-5,
            "{} vs {}",
            a.logprob,
            b.logprob
        );
    }
    assert_eq!(
        got.stats.prompt_tokens,
        then.len(),
        "only the new tokens are computed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cache_from_another_model_or_not_a_cache_is_refused() {
    let dir = common::temp_dir("prompt-cache-refused");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cache.safetensors");
    let (made_by, other) = (
        common::fixture("models/mlx-q4-g64"),
        common::fixture("models/llama-llama3rope-tied"),
    );
    let (made_by, other, file_arg) = (
        made_by.to_str().unwrap(),
        other.to_str().unwrap(),
        file.to_str().unwrap(),
    );
    let out = common::loraforge(&[
        "cache-prompt",
        "--model",
        made_by,
        "--prompt",
        "hello there",
        "--out",
        file_arg,
        "--device",
        "cpu",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("prompt tokens"));
    let run = |model: &str, cache: &str| {
        let out = common::loraforge(&[
            "generate",
            "--model",
            model,
            "--prompt-cache-file",
            cache,
            "--prompt",
            " again",
            "--max-tokens",
            "4",
            "--device",
            "cpu",
            "--json",
        ]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (ok, stderr, stdout) = run(made_by, file_arg);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("\"prompt_tokens\":"), "{stdout}");
    let (ok, stderr, _) = run(other, file_arg);
    assert!(!ok && stderr.contains("another model"), "{stderr}");
    // Any other safetensors file is not a cache.
    let weights = common::fixture("models/llama-llama3rope-tied/model.safetensors");
    let (ok, stderr, _) = run(made_by, weights.to_str().unwrap());
    assert!(
        !ok && stderr.contains("is not a loraforge prompt cache"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
