//! The real model: SmolLM2-135M-Instruct, Q4_1 GGUF, fetched once by scripts/fetch-assets.sh.
//! References come from transformers' GGUF loader (scripts/fixtures/make_smollm2_reference.py).

use crate::common;

use burn::backend::NdArray;
use loraforge::chat::{ChatTemplate, Message};
use loraforge::generate::sampler::argmax;
use loraforge::model::{KvCache, load_model};
use loraforge::tokenizer;
use serde_json::Value;

type B = NdArray<f32>;

fn reference() -> Value {
    common::read_json(&common::fixture("smollm2/reference.json"))
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn greedy_tokens_and_logits_match_transformers() {
    let path = common::asset("smollm2");
    let reference = reference();
    let device = Default::default();
    let model = load_model::<B>(&path, &device).unwrap();
    let tok = tokenizer::for_model(&model.files).unwrap();

    // The prompt, through our chat template and tokenizer.
    let greedy = &reference["greedy"];
    let template = ChatTemplate::from_tokenizer(&tok).unwrap();
    let text = template
        .render(&messages(&greedy["messages"]), true, None)
        .unwrap();
    assert_eq!(text, greedy["prompt_text"].as_str().unwrap());
    let prompt = tok.encode(&text, false).unwrap();
    assert_eq!(prompt, common::ids(&greedy["prompt_ids"]));

    // First-step logits: the top 20 agree in order and value.
    let mut cache = KvCache::new(&model.decoder.config, None);
    let mut logits = model.decoder.next_logits(&prompt, &mut cache, &device);
    let first = &reference["logits_first_step"];
    for (id, value) in common::ids(&first["top_ids"])
        .iter()
        .zip(first["top_values"].as_array().unwrap())
    {
        let diff = (logits[*id as usize] - value.as_f64().unwrap() as f32).abs();
        assert!(diff < 1e-3, "logit of token {id} differs by {diff}");
    }

    // 32 greedy steps through the KV cache, past the end-of-turn token as the reference did.
    let mut generated = Vec::new();
    for _ in 0..32 {
        let next = argmax(&logits);
        generated.push(next);
        logits = model.decoder.next_logits(&[next], &mut cache, &device);
    }
    assert_eq!(generated, common::ids(&greedy["ids_ignoring_eos"]));
}

/// The CPU's decode session (`backends/cpu/decode.rs`) continues the prompt's cache: its greedy
/// tokens are transformers', and each step's logits the op-by-op path's.
#[test]
fn the_cpu_decode_session_decodes_as_transformers_and_the_op_path_do() {
    use loraforge::ops::ModelBackend;
    let path = common::asset("smollm2");
    let reference = reference();
    let device = Default::default();
    let model = load_model::<B>(&path, &device).unwrap();
    let prompt = common::ids(&reference["greedy"]["prompt_ids"]);
    let config = &model.decoder.config;
    let mut ops = KvCache::new(config, None);
    model.decoder.next_logits(&prompt, &mut ops, &device);
    let mut cache = KvCache::new(config, None);
    let mut logits = model.decoder.next_logits(&prompt, &mut cache, &device);
    let decoder = model
        .decoder
        .decode_model()
        .expect("SmolLM2 is Llama-shaped");
    // Room for 8: the cache grows on the way.
    let mut session = B::decode_session(decoder, cache.kv_primitives().unwrap(), 8)
        .expect("the CPU opens a session for the packed model");
    let mut generated = Vec::new();
    for _ in 0..32 {
        let next = argmax(&logits);
        generated.push(next);
        logits = session.run(&[next]);
        let want = model.decoder.next_logits(&[next], &mut ops, &device);
        let worst = common::max_abs_diff(&logits, &want);
        assert!(
            worst < 1e-3,
            "step {}: logits differ by {worst}",
            generated.len()
        );
    }
    assert_eq!(
        generated,
        common::ids(&reference["greedy"]["ids_ignoring_eos"])
    );
    // The keys and values handed back continue op by op as the op path's own.
    let mut handed = cache.refilled(session.into_kv());
    let last = argmax(&logits);
    let after = model.decoder.next_logits(&[last], &mut handed, &device);
    let want = model.decoder.next_logits(&[last], &mut ops, &device);
    let worst = common::max_abs_diff(&after, &want);
    assert!(worst < 1e-3, "after the session: logits differ by {worst}");
}

#[test]
fn cli_answers_paris() {
    let path = common::asset("smollm2");
    let out = common::loraforge(&[
        "generate",
        "--model",
        path.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--temp",
        "0",
        "--max-tokens",
        "32",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Paris"), "{stdout}");
    assert!(
        stdout.contains("Generation:") && stdout.contains("tokens-per-sec"),
        "{stdout}"
    );
    assert!(stdout.contains("Peak memory:"), "{stdout}");
}

#[test]
fn chat_template_renders_like_transformers() {
    let path = common::asset("smollm2");
    let gguf = loraforge::io::gguf::GgufFile::open(&path).unwrap();
    let tok = tokenizer::from_gguf(&gguf).unwrap();
    let template = ChatTemplate::from_tokenizer(&tok).unwrap();
    for case in reference()["chat_templates"].as_array().unwrap() {
        let rendered = template
            .render(
                &messages(&case["messages"]),
                case["add_generation_prompt"].as_bool().unwrap(),
                None,
            )
            .unwrap();
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "case {}",
            case["name"]
        );
        assert_eq!(
            tok.encode(&rendered, false).unwrap(),
            common::ids(&case["rendered_ids"]),
            "case {}",
            case["name"]
        );
    }
}

#[test]
fn gguf_tokenizer_splits_like_llama_cpp() {
    let path = common::asset("smollm2");
    let gguf = loraforge::io::gguf::GgufFile::open(&path).unwrap();
    let tok = tokenizer::from_gguf(&gguf).unwrap();
    for case in reference()["tokenizer_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        // llama.cpp's SMOLLM pre-tokenizer splits digits one by one, as SmolLM2's own
        // tokenizer.json does; transformers' GGUF converter does not (ids differ only there).
        assert_eq!(
            tok.encode(text, false).unwrap(),
            common::ids(&case["ids_smollm_pre"]),
            "case {}",
            case["name"]
        );
        assert_eq!(
            tok.decode(&common::ids(&case["ids_smollm_pre"])).unwrap(),
            text,
            "decode {}",
            case["name"]
        );
    }
}
