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
