//! The dashboard driven for real under tmux (`send-keys`, `capture-pane`): the screen shows the
//! progress bar, the chart and a train loss equal to `metrics.jsonl`'s for the step shown;
//! `s` writes a checkpoint; `q` stops with the checkpoint saved and the terminal restored.

use crate::common::{self, tmux, tmux_session, wait_for};

use std::path::Path;

fn events(run_dir: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == kind)
        .collect()
}

#[test]
fn dashboard_under_tmux_shows_progress_saves_on_s_and_stops_on_q() {
    let run = common::tiny_run::tiny_run("tui", "");
    let run_dir = common::tiny_run::run_dir(&run);
    // Held-out prompts for `e`, on a fixture model with a chat template.
    let held_out = run.dir.join("heldout.jsonl");
    std::fs::write(
        &held_out,
        "{\"prompt\": \"forge\"}\n{\"prompt\": \"anvil\"}\n",
    )
    .unwrap();
    let mut recipe = std::fs::read_to_string(&run.recipe).unwrap();
    recipe += &format!(
        "\n[eval]\nprompts = \"{}\"\nmax_tokens = 6\n",
        held_out.display()
    );
    recipe = recipe.replace(
        &common::fixture("models/llama-linearrope-untied")
            .display()
            .to_string(),
        &common::fixture("mlx-lora-parity/model")
            .display()
            .to_string(),
    );
    std::fs::write(&run.recipe, recipe).unwrap();
    let session = format!("lf-tui-{}", std::process::id());
    // CI=true would select plain lines; the dashboard needs a terminal, which tmux provides.
    let command = format!(
        "env -u CI {} train {} --set train.iters=100000 --set train.save_every=100000 \
         --set train.steps_per_eval=100000; echo EXIT=$?; sleep 60",
        env!("CARGO_BIN_EXE_loraforge"),
        run.recipe.display()
    );
    tmux_session(&session, [100, 30], &command);
    let screen = || tmux(&["capture-pane", "-p", "-t", &session]);

    // A frame with a train loss shown next to the step it belongs to.
    let (text, step, loss) = wait_for(60, "a train loss on the dashboard", || {
        let text = screen();
        let step: usize = text
            .split("step ")
            .nth(1)?
            .split('/')
            .next()?
            .trim()
            .parse()
            .ok()?;
        let loss = text
            .split("train loss")
            .nth(1)?
            .split_whitespace()
            .next()?
            .to_string();
        (loss != "-" && step > 0).then_some((text, step, loss))
    });
    println!("{text}");
    assert!(
        text.contains("loraforge · tiny-tui"),
        "the title bar:\n{text}"
    );
    assert!(text.contains("ETA"), "the progress bar:\n{text}");
    assert!(text.contains("loss (linear"), "the chart:\n{text}");
    let logged = events(&run_dir, "train")
        .into_iter()
        .find(|e| e["step"] == step)
        .unwrap_or_else(|| panic!("no train event for step {step} in metrics.jsonl"));
    assert_eq!(
        loss,
        format!("{:.3}", logged["loss"].as_f64().unwrap()),
        "step {step}"
    );

    tmux(&["send-keys", "-t", &session, "s"]);
    let saved = wait_for(30, "the checkpoint that `s` asks for", || {
        events(&run_dir, "saved").into_iter().next()
    });
    assert!(run_dir.join("checkpoint/state.json").exists(), "{saved}");

    tmux(&["send-keys", "-t", &session, "e"]);
    let generations = wait_for(60, "the generations that `e` asks for", || {
        events(&run_dir, "generations").into_iter().next()
    });
    assert_eq!(generations["rows"].as_array().unwrap().len(), 2);
    let text = wait_for(30, "the generations panel", || {
        let text = screen();
        text.contains("held-out generations").then_some(text)
    });
    println!("{text}");
    assert!(text.contains("fine-tuned"), "{text}");

    tmux(&["send-keys", "-t", &session, "q"]);
    let text = wait_for(60, "the run to stop after `q`", || {
        let text = screen();
        text.contains("EXIT=").then_some(text)
    });
    tmux(&["kill-session", "-t", &session]);
    println!("{text}");
    // Back on the normal screen: the plain lines printed after the dashboard closed.
    assert!(text.contains("EXIT=0"), "{text}");
    assert!(text.contains("Interrupted at step"), "{text}");
    assert!(
        !text.contains("q stop · s save"),
        "the dashboard is still on screen:\n{text}"
    );
    assert_eq!(
        events(&run_dir, "saved").len(),
        2,
        "saved by `s`, then by `q`"
    );
}
