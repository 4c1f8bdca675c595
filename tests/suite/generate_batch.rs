//! `generate --prompts`: a batch of left-padded prompts generates, row by row, what each prompt
//! generates alone (itself checked against transformers and mlx-lm): on SmolLM2 greedy and
//! sampled, and on the tiny Gemma 3 whose sliding layers' bounded caches drop the padding first.

use crate::common;

use burn::backend::NdArray;
use loraforge::generate::batch::generate_batch;
use loraforge::generate::{Generation, GenerationLimits, Prompt, SamplingConfig, generate};
use loraforge::model::{Decoder, load_model};
use loraforge::tokenizer::Tokenizer;

type B = NdArray<f32>;

fn alone(
    model: &Decoder<B>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    limits: &GenerationLimits,
    sampling: &SamplingConfig,
) -> Generation {
    let device = Default::default();
    let (limits, sampling) = (limits.clone(), sampling.clone());
    generate(
        model,
        tokenizer,
        Prompt::new(prompt),
        limits,
        sampling,
        &device,
        |_| {},
    )
    .unwrap()
}

fn check(
    model: &Decoder<B>,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    sampling: SamplingConfig,
) {
    let device = Default::default();
    let limits = GenerationLimits {
        max_tokens: 20,
        stop_at_eos: true,
        top_logprobs: Some(0),
        interrupt: None,
    };
    let batch =
        generate_batch(model, tokenizer, prompts, &limits, &sampling, None, &device).unwrap();
    let mut worst = 0f32;
    for (i, (prompt, row)) in prompts.iter().zip(&batch.rows).enumerate() {
        let want = alone(model, tokenizer, prompt, &limits, &sampling);
        assert_eq!(row.ids, want.ids, "prompt {i}: ids");
        assert_eq!(row.finish, want.finish, "prompt {i}: finish");
        for (a, b) in row.logprobs.iter().zip(&want.logprobs) {
            worst = worst.max((a.logprob - b.logprob).abs());
        }
    }
    println!(
        "temperature {}: batch within {worst:.2e} of one at a time",
        sampling.temperature
    );
    assert!(worst < 1e-4, "a logprob differs by {worst}");
}

#[test]
fn a_batch_generates_what_each_prompt_generates_alone() {
    let device = Default::default();
    let model = load_model::<B>(&common::asset("smollm2"), &device).unwrap();
    let tokenizer = loraforge::tokenizer::for_model(&model.files).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "Here is a list of three colours: red,",
        "def fibonacci(n):",
        "Once upon a time, in a small village at the edge of a great forest, there lived",
    ]
    .iter()
    .map(|p| tokenizer.encode(p, true).unwrap())
    .collect();
    check(
        &model.decoder,
        &tokenizer,
        &prompts,
        SamplingConfig::default(),
    );
    let sampled = SamplingConfig {
        temperature: 0.8,
        top_p: 0.95,
        seed: 7,
        ..Default::default()
    };
    check(&model.decoder, &tokenizer, &prompts, sampled);
}

#[test]
fn sliding_layers_serve_a_padded_batch() {
    let device = Default::default();
    let dir = common::fixture("models/mlx-gemma3-q4");
    let model = load_model::<B>(&dir, &device).unwrap();
    let tokenizer = loraforge::tokenizer::for_model(&model.files).unwrap();
    let ids = common::ids(&common::read_json(&dir.join("reference.json"))["input_ids"]);
    // Window 4: the longest row's padding and first keys are dropped while others still pad.
    let prompts: Vec<Vec<u32>> = [16, 3, 9, 1].iter().map(|&n| ids[..n].to_vec()).collect();
    check(
        &model.decoder,
        &tokenizer,
        &prompts,
        SamplingConfig::default(),
    );
}

#[test]
fn a_bad_prompts_line_is_named() {
    let dir = common::temp_dir("prompts-file");
    let file = dir.join("prompts.jsonl");
    std::fs::write(&file, "{\"prompt\": \"hi\"}\n{\"promt\": \"typo\"}\n").unwrap();
    let model = common::fixture("models/mlx-q4-g64");
    let out = common::loraforge(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        file.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("prompts.jsonl:2"), "{err}");
    assert!(err.contains("unknown field `promt`"), "{err}");
}
