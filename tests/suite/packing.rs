//! Packed rows: several examples in one row give each example exactly the logits it gets alone
//! (positions restart, attention stays inside the example), and a training run with packing and
//! activation checkpointing learns.

use crate::common;

use burn::backend::NdArray;
use loraforge::model::load_model;

type B = NdArray<f32>;

#[test]
fn a_packed_row_gives_each_example_its_own_logits() {
    let device = Default::default();
    let model = load_model::<B>(&common::fixture("models/qwen3"), &device)
        .unwrap()
        .decoder;
    let a: Vec<u32> = vec![5, 77, 12, 200, 31];
    let b: Vec<u32> = vec![9, 140, 66, 3];
    let alone = |ids: &[u32]| -> Vec<f32> {
        model
            .forward(ids, 1, &device)
            .into_data()
            .into_vec()
            .unwrap()
    };
    let row: Vec<u32> = a.iter().chain(&b).copied().collect();
    let segments: Vec<u32> = [0u32; 5].into_iter().chain([1; 4]).collect();
    let packed: Vec<f32> = model
        .forward_with_segments(&row, Some(&segments), 1, &device)
        .into_data()
        .into_vec()
        .unwrap();
    let vocab = packed.len() / row.len();
    let diff_a = common::max_abs_diff(&packed[..5 * vocab], &alone(&a));
    let diff_b = common::max_abs_diff(&packed[5 * vocab..], &alone(&b));
    println!("packed vs alone: {diff_a:.2e}, {diff_b:.2e}");
    assert!(diff_a < 1e-5 && diff_b < 1e-5, "{diff_a} {diff_b}");
    // Without the segments the second example would see the first: the check can fail.
    let unpacked: Vec<f32> = model
        .forward(&row, 1, &device)
        .into_data()
        .into_vec()
        .unwrap();
    assert!(common::max_abs_diff(&unpacked[5 * vocab..], &alone(&b)) > 1e-3);
}

#[test]
fn training_with_packing_and_activation_checkpointing_learns() {
    let run = common::tiny_run::tiny_run("packed", "grad_checkpoint = true");
    let out = common::loraforge(&[
        "train",
        run.recipe.to_str().unwrap(),
        "--set",
        "data.packing=true",
        "--set",
        "data.max_seq_len=24",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let val = common::tiny_run::val_losses(&stdout);
    assert!(val.len() >= 2, "{stdout}");
    assert!(
        val.last().unwrap() < &(val[0] * 0.8),
        "validation loss {val:?}"
    );
}

#[test]
fn bench_on_real_chat_data_packs_rows_without_changing_the_loss() {
    // LLaMA-Factory's demo sets through SmolLM2's real tokenizer and chat template.
    let rows = common::asset("chat-mix");
    let smollm2 = common::asset("smollm2");
    let examples = common::temp_dir("bench-data").join("examples.jsonl");
    let out = common::loraforge(&[
        "bench",
        "train",
        "--shape",
        "smollm2-135m",
        "--data",
        rows.to_str().unwrap(),
        "--tokenizer",
        smollm2.to_str().unwrap(),
        "--pack",
        "--seq",
        "128",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup-steps",
        "0",
        "--loss-check-examples",
        "12",
        "--examples-out",
        examples.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let data = &result["data"];
    let check = &data["loss_check"];
    println!("{check}");
    let relative = check["relative_difference"].as_f64().unwrap();
    assert!(
        relative < 1e-5 && check["padded"].as_f64().unwrap() > 1.0,
        "{check}"
    );
    // Examples cut to 128 tokens; those left with no assistant token are dropped (2,105 of the
    // 2,599 rows remain).
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&examples)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2105);
    assert_eq!(data["examples"], 2105);
    for e in &lines {
        let (ids, trained) = (
            e["ids"].as_array().unwrap(),
            e["trained"].as_array().unwrap(),
        );
        assert!(ids.len() == trained.len() && ids.len() <= 128, "{e}");
    }
    // Packed rows of 128 leave little padding; a step's tokens are the rows' real positions.
    assert!(
        data["padding_fraction_of_epoch"].as_f64().unwrap() < 0.05,
        "{data}"
    );
    let tokens = data["timed_tokens"].as_u64().unwrap();
    assert!(tokens > 200 && tokens <= 256, "{data}");
}
