//! `decode_session`: a backend's whole-step decode session (`ops/decode.rs`; CUDA's
//! `backends/cuda/decode.rs`) against the same backend's op-by-op path, on the tiny shape with
//! grouped keys and values and q/k/v biases (Qwen2's), its weights dense (f32, the device's
//! 16-bit float) and packed at 4 bits. Both continue one prompt's cache for 8 tokens; the
//! logits of every step are compared (the session's cache, opened with room for 2, grows on
//! the way), then the keys and values the session hands back are continued op by op for one
//! more token. A second session, opened over an empty cache, runs a prompt of 300 tokens itself
//! (on CUDA, the prompt pass: GEMMs over its tokens, two passes of up to 256), then two steps,
//! against the op-by-op path's logits of the same tokens (`prompt_pass_diff`, judged by the fused
//! attention's tolerance where the reference's prompt runs it). Backends without
//! a session print nothing.

use burn::tensor::FloatDType;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::super::random::{Shape, random_model_files};
use super::attention::attention_tolerance;
use super::{HALF_TOLERANCE, KERNEL_TOLERANCE, Weight, scaled_error};
use crate::model::load::BaseStorage;
use crate::model::{Decoder, KvCache};
use crate::model::{Family, ModelConfig};
use crate::ops::ModelBackend;

const PROMPT: usize = 5;
const STEPS: usize = 8;
/// The second session's prompt: more than a CUDA prompt pass's rows.
const LONG_PROMPT: usize = 300;

/// The session's logits against the op-by-op path's, `None` where `B` has no session.
pub fn decode_session<B: ModelBackend>(
    device: &B::Device,
    weight: Weight,
    vocab: usize,
) -> anyhow::Result<Option<serde_json::Value>> {
    let config = ModelConfig {
        family: Family::Qwen2,
        num_kv_heads: 2,
        attention_bias: true,
        vocab_size: vocab,
        ..Shape::Tiny.config()
    };
    let storage = BaseStorage {
        half: weight.half(),
        quantize: weight.quantized(),
    };
    let model = random_model_files(config.clone(), 7).build_quantized::<B>(device, storage)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let ids: Vec<u32> = (0..LONG_PROMPT + 2)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let mut ops = KvCache::new(&model.config, None);
    model.cached_logits(&ids[..PROMPT], 1, 1, &mut ops, device);
    let (Some(decoder), Some(kv)) = (model.decode_model(), ops.kv_primitives()) else {
        return Ok(None);
    };
    // Room for 2 more positions: the cache doubles during the steps.
    let Some(mut session) = B::decode_session(decoder, kv, 2) else {
        return Ok(None);
    };
    let mut worst: f64 = 0.0;
    for &id in &ids[PROMPT..PROMPT + STEPS] {
        let reference = model.next_logits(&[id], &mut ops, device);
        worst = worst.max(error(&session.run(&[id]), &reference));
    }
    // The session's cache, handed back, continued op by op.
    let mut handed = ops.refilled(session.into_kv());
    let last = ids[PROMPT + STEPS];
    let after = model.next_logits(&[last], &mut handed, device);
    let reference = model.next_logits(&[last], &mut ops, device);
    let handed_back = error(&after, &reference);
    let prompt_worst = prompt_pass(&model, &ids, device);
    let tolerance = match weight.half() {
        Some(FloatDType::F32) | None => KERNEL_TOLERANCE,
        Some(_) => HALF_TOLERANCE,
    };
    // The op-by-op reference runs the long prompt's attention through the backend's fused
    // kernels where they serve the head, bf16 inside: that comparison carries their error
    // (session 28: the f32 row at 2.02e-3 with its products in full f32).
    let prompt_tolerance = tolerance.max(attention_tolerance::<B>(config.head_dim, device));
    let name = weight.check().replace("linear", "decode_session");
    Ok(Some(json!({
        "check": name, "shape": "tiny", "family": "qwen2", "prompt": PROMPT, "steps": STEPS,
        "long_prompt": LONG_PROMPT,
        "max_relative_diff": worst, "handed_back_diff": handed_back,
        "prompt_pass_diff": prompt_worst, "tolerance": tolerance,
        "prompt_tolerance": prompt_tolerance,
        "pass": worst.max(handed_back) <= tolerance && prompt_worst <= prompt_tolerance,
    })))
}

/// The largest error of a session opened over an empty cache that runs `ids` but the last two
/// as one prompt, then those two as steps, against the op-by-op path; infinite where no such
/// session opens.
fn prompt_pass<B: ModelBackend>(model: &Decoder<B>, ids: &[u32], device: &B::Device) -> f64 {
    let Some(mut session) = model
        .decode_model()
        .and_then(|m| B::decode_session(m, Vec::new(), 2))
    else {
        return f64::INFINITY;
    };
    let (prompt, steps) = ids.split_at(ids.len() - 2);
    let mut ops = KvCache::new(&model.config, None);
    let reference = model.cached_logits(prompt, 1, 1, &mut ops, device);
    let mut worst = error(&session.run(prompt), &reference[0]);
    for &id in steps {
        let reference = model.next_logits(&[id], &mut ops, device);
        worst = worst.max(error(&session.run(&[id]), &reference));
    }
    worst
}

/// `max |got − want| / max |want|`.
fn error(got: &[f32], want: &[f32]) -> f64 {
    let want: Vec<f64> = want.iter().map(|&v| f64::from(v)).collect();
    scaled_error(got, &want)
}
