//! Training refuses bad input with a message that names the file, line or key.

use crate::common;

use common::tiny_run::tiny_run;

fn train_err(recipe: &std::path::Path, extra: &[&str]) -> String {
    let mut args = vec!["train", recipe.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = common::loraforge(&args);
    assert!(
        !out.status.success(),
        "expected failure, got:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn dataset_row_missing_its_field_names_file_and_line() {
    let run = tiny_run("missing-field", "");
    let train = run.dir.join("train.jsonl");
    let mut text = std::fs::read_to_string(&train).unwrap();
    text.push_str("{\"txet\": \"typo in the field name\"}\n");
    std::fs::write(&train, text).unwrap();
    let err = train_err(&run.recipe, &[]);
    assert!(
        err.contains("train.jsonl:25") && err.contains("no `text` field"),
        "{err}"
    );
}

#[test]
fn empty_split() {
    let run = tiny_run("empty", "");
    std::fs::write(run.dir.join("valid.jsonl"), "\n").unwrap();
    let err = train_err(&run.recipe, &[]);
    assert!(err.contains("valid.jsonl has no records"), "{err}");
}

#[test]
fn batch_larger_than_the_dataset() {
    let run = tiny_run("big-batch", "");
    let err = train_err(&run.recipe, &["--set", "train.batch_size=100"]);
    assert!(
        err.contains("batch_size 100 is larger than the 24 examples"),
        "{err}"
    );
}

#[test]
fn rank_zero() {
    let run = tiny_run("rank0", "");
    let err = train_err(&run.recipe, &["--set", "lora.rank=0"]);
    assert!(
        err.contains("lora.rank") && err.contains("at least 1"),
        "{err}"
    );
}

#[test]
fn unknown_target_key_lists_the_valid_ones() {
    let run = tiny_run("target", "");
    let err = train_err(
        &run.recipe,
        &["--set", "lora.targets=[\"self_attn.qproj\"]"],
    );
    assert!(err.contains("unknown key `self_attn.qproj`"), "{err}");
    assert!(err.contains("self_attn.q_proj, self_attn.k_proj"), "{err}");
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let run = tiny_run("nan", "");
    // A learning rate this large overflows the adapters within a few steps.
    let err = train_err(
        &run.recipe,
        &[
            "--set",
            "train.learning_rate=1e30",
            "--set",
            "train.max_grad_norm=1e30",
            "--set",
            "train.save_every=1",
        ],
    );
    assert!(err.contains("the training loss became"), "{err}");
    assert!(err.contains("the last good checkpoint (step"), "{err}");
    let state = common::read_json(&common::tiny_run::run_dir(&run).join("checkpoint/state.json"));
    assert!(state["step"].as_u64().unwrap() >= 1);
}

#[test]
fn a_load_balancing_loss_without_experts_is_refused() {
    let run = tiny_run("balance", "");
    let err = train_err(&run.recipe, &["--set", "train.router_aux_loss_coef=0.01"]);
    assert!(
        err.contains("train.router_aux_loss_coef = 0.01") && err.contains("has no experts"),
        "{err}"
    );
}

#[test]
fn a_compute_dtype_we_cannot_run_is_refused() {
    let run = tiny_run("dtype", "");
    let err = train_err(&run.recipe, &["--set", "model.dtype=\"bf16\""]);
    assert!(
        err.contains("model.dtype = Bf16") && err.contains("f32"),
        "{err}"
    );
}

#[test]
fn an_update_that_overflows_is_not_saved() {
    // The step's loss is finite (it is computed before the update); a learning rate past f32's
    // range then turns the adapters into inf and NaN. With one step, that update would have been
    // written as the final adapters.
    let run = tiny_run("overflow", "");
    let err = train_err(
        &run.recipe,
        &[
            "--set",
            "train.iters=1",
            "--set",
            "train.learning_rate=1e39",
        ],
    );
    assert!(
        err.contains("the update of step 1 left non-finite values")
            && err.contains("no checkpoint was written yet"),
        "{err}"
    );
    let dir = common::tiny_run::run_dir(&run);
    assert!(!dir.join("checkpoint").exists() && !dir.join("adapters").exists());
}

#[test]
fn a_rank_above_a_matrix_side_is_refused() {
    let run = tiny_run("rank-big", "");
    let err = train_err(&run.recipe, &["--set", "lora.rank=100000"]);
    assert!(
        err.contains("lora.rank = 100000 is larger than `self_attn.q_proj`'s smaller side")
            && err.contains("use at most"),
        "{err}"
    );
}
