//! `generate --draft-model`: speculative greedy decoding gives plain greedy's tokens on SmolLM2,
//! with the model as its own draft (nearly every draft kept) and with a draft of its first 8
//! blocks (many rejected, so both caches are rewound often); a draft with another vocabulary is
//! refused.

use crate::common;

use burn::backend::NdArray;
use loraforge::generate::speculative::generate_speculative;
use loraforge::generate::{GenerationLimits, Prompt, SamplingConfig, generate};
use loraforge::model::{KvCache, load_model};

type B = NdArray<f32>;

#[test]
fn speculative_greedy_is_plain_greedy() {
    let device = Default::default();
    let model = load_model::<B>(&common::asset("smollm2"), &device).unwrap();
    let tokenizer = loraforge::tokenizer::for_model(&model.files).unwrap();
    let decoder = &model.decoder;
    let prompt = tokenizer
        .encode("The three most important inventions in history are", true)
        .unwrap();
    let limits = GenerationLimits {
        max_tokens: 40,
        stop_at_eos: false,
        top_logprobs: None,
        interrupt: None,
    };
    let sampling = SamplingConfig::default();
    let plain = generate(
        decoder,
        &tokenizer,
        Prompt::new(&prompt),
        limits.clone(),
        sampling.clone(),
        &device,
        |_| {},
    )
    .unwrap();
    let mut shallow = decoder.clone();
    shallow.layers.truncate(8);
    shallow.config.num_layers = 8;
    for (name, draft, k) in [("itself", decoder, 4), ("8 blocks", &shallow, 3)] {
        let caches = [
            KvCache::new(&decoder.config, None),
            KvCache::new(&draft.config, None),
        ];
        let (out, acceptance) = generate_speculative(
            decoder,
            draft,
            &tokenizer,
            &prompt,
            caches,
            k,
            &limits,
            &sampling,
            &device,
            |_| {},
        )
        .unwrap();
        println!(
            "draft {name}: {} of {} drafts kept",
            acceptance.accepted, acceptance.drafted
        );
        assert_eq!(out.ids, plain.ids, "draft {name}: the greedy tokens");
        assert_eq!(out.text, plain.text);
        match name {
            "itself" => assert!(acceptance.rate() > 0.9, "{acceptance:?}"),
            _ => assert!(acceptance.accepted < acceptance.drafted, "{acceptance:?}"),
        }
    }
}

#[test]
fn a_draft_with_another_vocabulary_is_refused() {
    let model = common::asset("smollm2");
    let draft = common::fixture("models/mlx-q4-g64");
    let out = common::loraforge(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--draft-model",
        draft.to_str().unwrap(),
        "--prompt",
        "hi",
        "--device",
        "cpu",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("draft model"), "{err}");
    assert!(err.contains("vocabulary differs"), "{err}");
}
