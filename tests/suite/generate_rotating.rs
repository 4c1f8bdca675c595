//! `generate --max-kv-size`: greedy generation through a bounded KV cache against mlx-lm's
//! RotatingKVCache (`scripts/fixtures/make_rotating_cache.py`): a prompt longer than the bound, a
//! generation running past it, and Gemma 3's sliding layers, whose caches are bounded by their
//! window without being asked.

use crate::common;

use burn::backend::NdArray;
use loraforge::generate::{GenerationLimits, Prompt, SamplingConfig, generate};
use loraforge::model::{Bound, KvCache, load_model};

type B = NdArray<f32>;

#[test]
fn bounded_caches_generate_what_mlx_lm_generates() {
    let device = Default::default();
    let reference = common::read_json(&common::fixture("generate-rotating/reference.json"));
    for case in reference["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let dir = common::fixture(&format!("models/{}", case["model"].as_str().unwrap()));
        let model = load_model::<B>(&dir, &device).unwrap();
        let tokenizer = loraforge::tokenizer::for_model(&model.files).unwrap();
        let prompt = common::ids(&case["prompt"]);
        let want = common::ids(&case["tokens"]);
        let bound = case["max_kv_size"]
            .as_u64()
            .map(|max| Bound::new(max as usize, case["keep"].as_u64().unwrap() as usize).unwrap());
        let mut cache = KvCache::new(&model.decoder.config, bound);
        let limits = GenerationLimits {
            max_tokens: want.len(),
            stop_at_eos: false,
            top_logprobs: Some(0),
            interrupt: None,
        };
        let prompt = Prompt {
            cache: Some(&mut cache),
            ..Prompt::new(&prompt)
        };
        let out = generate(
            &model.decoder,
            &tokenizer,
            prompt,
            limits,
            SamplingConfig::default(),
            &device,
            |_| {},
        )
        .unwrap();
        assert_eq!(out.ids, want, "{name}: greedy ids");
        let worst = out
            .logprobs
            .iter()
            .zip(case["logprobs"].as_array().unwrap())
            .map(|(got, want)| (got.logprob - want.as_f64().unwrap() as f32).abs())
            .fold(0f32, f32::max);
        println!("{name}: logprobs within {worst:.2e} of mlx-lm's");
        assert!(worst < 1e-4, "{name}: a logprob differs by {worst}");
    }
}

#[test]
fn a_bound_must_leave_room_past_its_sinks() {
    let err = Bound::new(4, 4).unwrap_err().to_string();
    assert!(
        err.contains("--max-kv-size 4 is not larger than --keep 4"),
        "{err}"
    );
    assert!(Bound::new(5, 4).is_ok());
}
