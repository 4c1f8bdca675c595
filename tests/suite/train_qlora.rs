//! QLoRA on a float base: `[model] quantize` quantizes it to 4 bits on load and training still
//! lowers the validation loss.

use crate::common;

use common::tiny_run::{tiny_run, val_losses};

#[test]
fn four_bit_base_quantized_on_load_trains() {
    let run = tiny_run("qlora", "");
    let out = common::loraforge(&[
        "train",
        run.recipe.to_str().unwrap(),
        "--set",
        "model.quantize={ bits = 4, group_size = 64 }",
        "--set",
        "train.learning_rate=1e-2",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let losses = val_losses(&stdout);
    assert!(losses.len() >= 3, "{stdout}");
    assert!(
        losses.last().unwrap() < &(losses[0] * 0.9),
        "validation loss did not fall: {losses:?}"
    );
}
