//! `decode_session`: a backend's whole-step decode session (`ops/decode.rs`; CUDA's
//! `backends/cuda/decode.rs`) against the same backend's op-by-op path, on the tiny shape with
//! grouped keys and values and q/k/v biases (Qwen2's), its weights dense (f32, the device's
//! 16-bit float) and packed at 4 bits. Both continue one prompt's cache for 8 tokens; the
//! logits of every step are compared (the session's cache, opened with room for 2, grows on
//! the way), then the keys and values the session hands back are continued op by op for one
//! more token. Backends without a session print nothing.

use burn::tensor::FloatDType;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::super::random::{Shape, random_model_files};
use super::{HALF_TOLERANCE, KERNEL_TOLERANCE, Weight, scaled_error};
use crate::model::KvCache;
use crate::model::load::BaseStorage;
use crate::model::{Family, ModelConfig};
use crate::ops::ModelBackend;

const PROMPT: usize = 5;
const STEPS: usize = 8;

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
        quantize: matches!(weight, Weight::Q4 | Weight::Q4Half(_)).then_some((4, 64)),
    };
    let model = random_model_files(config.clone(), 7).build_quantized::<B>(device, storage)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let ids: Vec<u32> = (0..PROMPT + STEPS + 1)
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
        worst = worst.max(error(&session.step(id), &reference));
    }
    // The session's cache, handed back, continued op by op.
    let mut handed = ops.refilled(session.into_kv());
    let last = ids[PROMPT + STEPS];
    let after = model.next_logits(&[last], &mut handed, device);
    let reference = model.next_logits(&[last], &mut ops, device);
    let handed_back = error(&after, &reference);
    let tolerance = match weight.half() {
        Some(FloatDType::F32) | None => KERNEL_TOLERANCE,
        Some(_) => HALF_TOLERANCE,
    };
    let name = weight.check().replace("linear", "decode_session");
    Ok(Some(json!({
        "check": name, "shape": "tiny", "family": "qwen2", "prompt": PROMPT, "steps": STEPS,
        "max_relative_diff": worst, "handed_back_diff": handed_back, "tolerance": tolerance,
        "pass": worst <= tolerance && handed_back <= tolerance,
    })))
}

/// `max |got − want| / max |want|`.
fn error(got: &[f32], want: &[f32]) -> f64 {
    let want: Vec<f64> = want.iter().map(|&v| f64::from(v)).collect();
    scaled_error(got, &want)
}
