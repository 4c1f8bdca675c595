//! A run stopped by a real SIGINT and resumed ends where an uninterrupted run ends.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::tiny_run::{run_dir, tensors, tiny_run};

fn train(recipe: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", recipe.to_str().unwrap()];
    args.extend_from_slice(extra);
    common::loraforge(&args)
}

#[test]
fn sigint_then_resume_equals_uninterrupted() {
    // The reference: 30 steps in one go.
    let straight = tiny_run("straight", "");
    let out = train(&straight.recipe, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same recipe, interrupted for real once a few steps are done.
    let split = tiny_run("split", "");
    let mut child = Command::new(env!("CARGO_BIN_EXE_loraforge"))
        .args(["train", split.recipe.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let interrupt = line.starts_with("Iter 4:");
        seen.push(line);
        if interrupt {
            let status = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            break;
        }
    }
    seen.extend(lines.map(|l| l.unwrap()));
    let status = child.wait().unwrap();
    let text = seen.join("\n");
    assert!(status.success(), "Ctrl-C must exit 0 after saving:\n{text}");
    let stopped_line = seen
        .iter()
        .find(|l| l.starts_with("Interrupted at step"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(stopped_line.contains("--resume"), "{stopped_line}");
    let stopped: usize = stopped_line
        .split_whitespace()
        .nth(3)
        .unwrap()
        .trim_end_matches(';')
        .parse()
        .unwrap();
    assert!(
        stopped < 30,
        "the run finished before the signal arrived:\n{text}"
    );

    let out = train(&split.recipe, &["--resume"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resumed = String::from_utf8_lossy(&out.stdout);
    assert!(
        resumed.contains(&format!("steps {}..30", stopped + 1)),
        "{resumed}"
    );

    for file in [
        "checkpoint/adapters.safetensors",
        "checkpoint/optimizer.safetensors",
    ] {
        let a = tensors(&run_dir(&straight).join(file));
        let b = tensors(&run_dir(&split).join(file));
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (name, values) in &a {
            let diff = common::max_abs_diff(values, &b[name]);
            assert!(
                diff <= 1e-6,
                "{file} {name}: differs by {diff} after resume"
            );
        }
    }
}

#[test]
fn resume_refuses_a_checkpoint_from_another_recipe() {
    let run = tiny_run("other", "");
    let out = train(&run.recipe, &["--set", "train.iters=10"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = train(
        &run.recipe,
        &[
            "--resume",
            "--set",
            "train.iters=20",
            "--set",
            "lora.rank=8",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("different recipe") && err.contains("`lora.rank` was 4 and is now 8"),
        "{err}"
    );
}
