//! Our TensorBoard event files, read by TensorBoard's own reader (EventAccumulator, fetched by
//! `scripts/fetch-assets.sh tensorboard`): the exact number of scalars per tag, and each value
//! equal to the one `metrics.jsonl` holds for that step (a corrupt record would be dropped
//! silently by the reader, so the counts are what proves the file sound).

use crate::common;

use std::collections::BTreeMap;
use std::process::Command;

#[test]
fn event_files_read_back_in_tensorboard_equal_metrics_jsonl() {
    let run = common::tiny_run::tiny_run("tensorboard", "");
    let (want, _) = train_and_read_back(&run);
    assert!(!want.contains_key("train/router_aux_loss"));
}

/// A mixture of experts trained with the routers' load-balancing loss reports that term apart
/// (`router_aux_loss` in training, validation and the progress lines), part of each loss.
#[test]
fn the_routers_term_is_reported_apart() {
    let run = common::tiny_run::tiny_run_on(
        "tensorboard-moe",
        "models/mixtral",
        "router_aux_loss_coef = 0.01",
    );
    let (want, stdout) = train_and_read_back(&run);
    assert_eq!(want["train/router_aux_loss"].len(), 12);
    assert_eq!(want["val/router_aux_loss"].len(), 3);
    for (tag, whole) in [("train", "train/loss"), ("val", "val/loss")] {
        let parts = want[&format!("{tag}/router_aux_loss")]
            .iter()
            .zip(&want[whole]);
        for (&(step, aux), &(_, loss)) in parts {
            assert!(
                aux > 0.0 && aux < loss,
                "{tag} step {step}: {aux} of {loss}"
            );
        }
    }
    assert_eq!(stdout.matches("(router aux ").count(), 12 + 3, "{stdout}");
}

/// Trains `run` 12 steps, then checks its TensorBoard files against its `metrics.jsonl`: the
/// scalars per tag (as `metrics.jsonl` has them) and the run's standard output.
fn train_and_read_back(
    run: &common::tiny_run::TinyRun,
) -> (BTreeMap<String, Vec<(i64, f32)>>, String) {
    let out = common::loraforge(&[
        "train",
        run.recipe.to_str().unwrap(),
        "--set",
        "train.iters=12",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run_dir = common::tiny_run::run_dir(run);

    // What metrics.jsonl says, per TensorBoard tag.
    let mut want: BTreeMap<String, Vec<(i64, f32)>> = BTreeMap::new();
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = e["step"].as_i64().unwrap_or(0);
        let mut add = |tag: &str, key: &str| {
            if let Some(v) = e[key].as_f64() {
                want.entry(tag.into()).or_default().push((step, v as f32));
            }
        };
        match e["event"].as_str().unwrap() {
            "train" => {
                add("train/loss", "loss");
                add("train/router_aux_loss", "router_aux_loss");
                add("learning_rate", "learning_rate");
                add("grad_norm", "grad_norm");
                add("tokens_per_sec", "tokens_per_sec");
                add("it_per_sec", "it_per_sec");
                let gb = e["peak_memory_bytes"].as_f64().unwrap() / 1e9;
                want.entry("memory/peak_gb".into())
                    .or_default()
                    .push((step, gb as f32));
            }
            "validation" => {
                add("val/loss", "loss");
                add("val/router_aux_loss", "router_aux_loss");
            }
            _ => {}
        }
    }
    assert_eq!(want["train/loss"].len(), 12, "one train report per step");
    assert_eq!(
        want["val/loss"].len(),
        3,
        "validation at steps 0, 10 and the last, 12"
    );

    let python = common::asset("tensorboard");
    let read = Command::new(python)
        .arg(common::root().join("scripts/read_tensorboard.py"))
        .arg(run_dir.join("tensorboard"))
        .output()
        .unwrap();
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    for (tag, points) in &want {
        let found: Vec<(i64, f32)> = got["scalars"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("TensorBoard found no `{tag}`: {got}"))
            .iter()
            .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap() as f32))
            .collect();
        assert_eq!(&found, points, "{tag}");
    }
    let recipe = got["text"]["recipe"][0][1].as_str().unwrap();
    assert!(recipe.contains("name = \"tiny-tensorboard"), "{recipe}");
    (want, String::from_utf8_lossy(&out.stdout).into_owned())
}
