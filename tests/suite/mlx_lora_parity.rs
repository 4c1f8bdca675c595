//! Our first-batch loss equals `mlx_lm.lora`'s on a 4-bit mlx base with a chat dataset and
//! `mask_prompt`, once mlx-lm's one-padding-token bug is fixed on its side
//! (scripts/fixtures/make_mlx_lora_parity.py). The batch itself must match too: the same token
//! rows from the chat template, and the same trained positions as mlx's corrected mask.

use crate::common;

use burn::backend::NdArray;
use loraforge::data::{BatchPlan, Encoder, load_split};
use loraforge::lora::files;
use loraforge::model::load_model;
use loraforge::recipe::{FieldNames, Overflow};
use loraforge::tokenizer;
use loraforge::train::trainer::batch_loss;

type B = NdArray<f32>;

#[test]
fn first_batch_loss_matches_mlx_lm_with_mask_prompt() {
    let device = Default::default();
    let dir = common::fixture("mlx-lora-parity");
    let reference = common::read_json(&dir.join("reference.json"));
    let rows: Vec<Vec<u32>> = serde_json::from_value(reference["rows"].clone()).unwrap();
    let offsets: Vec<usize> = serde_json::from_value(reference["offsets"].clone()).unwrap();

    let loaded = load_model::<B>(&dir.join("model"), &device).unwrap();
    let tokenizer = tokenizer::for_model(&loaded.files).unwrap();
    let mut model = loaded.decoder;
    files::attach(
        &mut model,
        &common::fixture("adapter-interop/mlx-q4-g64/mlx"),
        &device,
    )
    .unwrap();

    let records = load_split(&dir.join("data/train.jsonl"), &FieldNames::default()).unwrap();
    let encoder = Encoder::new(&tokenizer, true);
    let examples: Vec<_> = records.iter().map(|r| encoder.encode(r).unwrap()).collect();

    // mlx-lm sorts by a length that is constant (a bug of its own), so its rows keep file order.
    for ((example, row), &offset) in examples.iter().zip(&rows).zip(&offsets) {
        assert_eq!(
            &example.ids, row,
            "token ids of a chat differ from mlx-lm's"
        );
        let trained: Vec<usize> = (0..row.len()).filter(|&t| example.trained[t]).collect();
        assert_eq!(
            trained,
            (offset..row.len()).collect::<Vec<_>>(),
            "trained positions differ from mlx-lm's prompt mask"
        );
    }

    let plan = BatchPlan::new(
        examples.clone(),
        examples.len(),
        2048,
        Overflow::Truncate,
        0,
        false,
        "train",
    )
    .unwrap();
    let batch = plan.batch(0);
    assert_eq!(
        batch.trained_tokens() as u64,
        reference["ntoks_fixed"].as_u64().unwrap()
    );
    let ours = batch_loss(&model, &batch, &device).into_scalar();
    let fixed = reference["loss_fixed"].as_f64().unwrap() as f32;
    let buggy = reference["loss_mlx"].as_f64().unwrap() as f32;
    println!(
        "ours {ours:.6}, mlx_lm fixed {fixed:.6}, mlx_lm as shipped {buggy:.6} ({} targets, one pad each)",
        reference["ntoks_mlx"]
    );
    assert!((ours - fixed).abs() <= 1e-3, "ours {ours} vs mlx {fixed}");
}
