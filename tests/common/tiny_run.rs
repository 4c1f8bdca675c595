//! A tiny training setup for end-to-end tests: a fixture model, a generated text dataset and a
//! recipe, in a fresh temporary folder.
#![allow(dead_code)]

use std::path::PathBuf;

pub struct TinyRun {
    pub dir: PathBuf,
    pub recipe: PathBuf,
}

/// `extra` is appended to the recipe (later keys win within a table only if not repeated, so
/// pass whole tables that the base recipe lacks, e.g. `[export]`).
pub fn tiny_run(tag: &str, train_overrides: &str) -> TinyRun {
    tiny_run_on(tag, "models/llama-linearrope-untied", train_overrides)
}

/// [`tiny_run`] on another fixture model (`models/mixtral`, ...).
pub fn tiny_run_on(tag: &str, model: &str, train_overrides: &str) -> TinyRun {
    let dir = super::temp_dir(&format!("tiny-{tag}"));
    let line = |i: usize| {
        let words = [
            "forge", "anvil", "hammer", "tongs", "quench", "temper", "billet", "scale",
        ];
        let n = 3 + (i * 7) % 11;
        let text: Vec<&str> = (0..n).map(|k| words[(i + k * 3) % words.len()]).collect();
        serde_json::json!({ "text": text.join(" ") }).to_string()
    };
    let write = |name: &str, range: std::ops::Range<usize>| {
        let lines: Vec<String> = range.map(line).collect();
        std::fs::write(dir.join(name), lines.join("\n") + "\n").unwrap();
    };
    write("train.jsonl", 0..24);
    write("valid.jsonl", 100..106);
    let model = super::fixture(model);
    let recipe = format!(
        r#"name = "tiny-{tag}"
seed = 3

[model]
path = "{model}"

[lora]
rank = 4
targets = "all-linear"
layers = -1

[data]
train = "{dir}/train.jsonl"
valid = "{dir}/valid.jsonl"
max_seq_len = 64

[train]
iters = 30
batch_size = 2
learning_rate = 1e-3
steps_per_report = 1
steps_per_eval = 10
val_batches = 2
save_every = 10
max_grad_norm = 1.0
{train_overrides}

[output]
dir = "{dir}/run"
"#,
        model = model.display(),
        dir = dir.display(),
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, recipe).unwrap();
    TinyRun { dir, recipe: path }
}

pub fn run_dir(run: &TinyRun) -> PathBuf {
    run.dir.join("run")
}

/// The `Val loss` values of a run's plain-line output, in order.
pub fn val_losses(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter_map(|l| l.split("Val loss ").nth(1))
        .map(|rest| rest.split([',', ' ']).next().unwrap().parse().unwrap())
        .collect()
}
