//! `generate --logprobs`: each generated token's log-probability and its likeliest alternatives
//! against mlx-lm's (`scripts/fixtures/make_logprobs.py`: `generate_step` on the tiny Llama,
//! greedy, and with repetition penalty 1.3, on its 4-bit tiny Llama).

use crate::common;

use burn::backend::NdArray;
use loraforge::generate::{GenerationLimits, Prompt, SamplingConfig, generate};
use loraforge::model::load_model;

type B = NdArray<f32>;

#[test]
fn token_logprobs_match_mlx_lm() {
    let device = Default::default();
    let model = load_model::<B>(&common::fixture("models/mlx-q4-g64"), &device).unwrap();
    let tokenizer = loraforge::tokenizer::for_model(&model.files).unwrap();
    let reference = common::read_json(&common::fixture("generate-logprobs/reference.json"));
    for case in reference["cases"].as_array().unwrap() {
        let prompt = common::ids(&case["prompt"]);
        let want = common::ids(&case["tokens"]);
        let penalty = case["repetition_penalty"].as_f64().unwrap() as f32;
        let limits = GenerationLimits {
            max_tokens: want.len(),
            stop_at_eos: false,
            top_logprobs: Some(5),
            interrupt: None,
        };
        let sampling = SamplingConfig {
            repetition_penalty: penalty,
            ..Default::default()
        };
        let out = generate(
            &model.decoder,
            &tokenizer,
            Prompt::new(&prompt),
            limits,
            sampling,
            &device,
            |_| {},
        )
        .unwrap();
        assert_eq!(out.ids, want, "penalty {penalty}: greedy ids");
        let mut worst = 0f32;
        for (step, (got, (lp, top))) in out
            .logprobs
            .iter()
            .zip(
                case["logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(case["top"].as_array().unwrap()),
            )
            .enumerate()
        {
            worst = worst.max((got.logprob - lp.as_f64().unwrap() as f32).abs());
            let top: Vec<(u32, f32)> = top
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
                .collect();
            assert_eq!(
                got.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                top.iter().map(|t| t.0).collect::<Vec<_>>(),
                "penalty {penalty}, step {step}: the 5 likeliest tokens"
            );
            for ((_, a), (_, b)) in got.top.iter().zip(&top) {
                worst = worst.max((a - b).abs());
            }
        }
        println!("penalty {penalty}: logprobs within {worst:.2e} of mlx-lm's");
        assert!(
            worst < 1e-4,
            "penalty {penalty}: a logprob differs by {worst}"
        );
    }
}
