//! A run stopped by a real SIGINT and resumed ends where an uninterrupted run ends.

use crate::common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::tensors;
use common::tiny_run::{run_dir, tiny_run};

/// Fewer threads means less run-to-run noise; `sigint_then_resume_equals_uninterrupted` says
/// why some remains.
const SINGLE_THREADED: [(&str, &str); 2] =
    [("RAYON_NUM_THREADS", "1"), ("MATMUL_NUM_THREADS", "1")];

fn loraforge() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loraforge"));
    cmd.envs(SINGLE_THREADED);
    cmd
}

fn train(recipe: &std::path::Path, extra: &[&str]) -> std::process::Output {
    loraforge()
        .arg("train")
        .arg(recipe)
        .args(extra)
        .output()
        .unwrap()
}

/// Largest difference between two runs' final adapters and AdamW moments.
fn max_diff(a: &std::path::Path, b: &std::path::Path) -> f32 {
    let mut worst = 0f32;
    for file in [
        "checkpoint/adapters.safetensors",
        "checkpoint/optimizer.safetensors",
    ] {
        let (x, y) = (tensors(&a.join(file)), tensors(&b.join(file)));
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
        for (name, values) in &x {
            worst = worst.max(common::max_abs_diff(values, &y[name]));
        }
    }
    worst
}

/// Runs `train RECIPE`, sends `signal` once a stdout line starts with `at`, and returns the exit
/// status and every stdout line.
fn interrupt_at(
    recipe: &std::path::Path,
    at: &str,
    signal: libc::c_int,
) -> (std::process::ExitStatus, Vec<String>) {
    let mut child = loraforge()
        .args(["train", recipe.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let interrupt = line.starts_with(at);
        seen.push(line);
        if interrupt {
            // SAFETY: kill(2) with the pid of our own running child.
            let sent = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
            assert_eq!(sent, 0, "signal {signal} to the training process");
            break;
        }
    }
    seen.extend(lines.map(|l| l.unwrap()));
    (child.wait().unwrap(), seen)
}

#[test]
fn sigint_then_resume_equals_uninterrupted() {
    // The reference: 30 steps in one go, twice. Burn 0.21's autodiff adds the gradient
    // contributions that meet at one tensor in hash-map order, so no two runs are bit-identical
    // (measured 3.5e-7 to 4.6e-7 apart after 30 steps); a resumed run must stay in that band.
    let straight = tiny_run("straight", "");
    let again = tiny_run("again", "");
    for run in [&straight, &again] {
        let out = train(&run.recipe, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let noise = max_diff(&run_dir(&straight), &run_dir(&again));

    // The same recipe, interrupted for real once a few steps are done.
    let split = tiny_run("split", "");
    let (status, seen) = interrupt_at(&split.recipe, "Iter 4:", libc::SIGINT);
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

    let diff = max_diff(&run_dir(&straight), &run_dir(&split));
    println!("resumed vs uninterrupted: {diff:.2e}; uninterrupted vs uninterrupted: {noise:.2e}");
    // Run-to-run noise is 3.5-4.6e-7 (autodiff sums in hash-map order); a resume that lost or
    // repeated a step would move the weights by about the learning rate, 1e-3.
    assert!(
        diff <= 1e-5_f32.max(4.0 * noise),
        "resumed run differs by {diff:.2e}, beyond run-to-run noise {noise:.2e}"
    );
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

/// A kill between the two renames of a checkpoint save leaves `.checkpoint-old` and
/// `.checkpoint-new`, both complete, and no `checkpoint/` (the state after the first rename, set up
/// here by hand rather than by timing luck): `--resume` finishes the swap and continues from the
/// new one.
#[test]
fn resume_finishes_a_checkpoint_swap_that_a_kill_interrupted() {
    let run = tiny_run("swap", "");
    let out = train(&run.recipe, &["--set", "train.iters=10"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = run_dir(&run);
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    };
    copy(&dir.join("checkpoint"), &dir.join(".checkpoint-new"));
    std::fs::rename(dir.join("checkpoint"), dir.join(".checkpoint-old")).unwrap();

    let out = train(&run.recipe, &["--resume", "--set", "train.iters=12"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("a checkpoint save was interrupted; resuming from"),
        "{stdout}{stderr}"
    );
    assert!(stdout.contains("steps 11..12"), "{stdout}");
    let state = common::read_json(&dir.join("checkpoint/state.json"));
    assert_eq!(state["step"].as_u64(), Some(12));
    assert!(!dir.join(".checkpoint-new").exists() && !dir.join(".checkpoint-old").exists());
}

/// Schedulers stop jobs with SIGTERM: it saves a checkpoint and exits 0 as Ctrl-C does.
#[test]
fn sigterm_saves_a_checkpoint_like_ctrl_c() {
    let run = tiny_run("sigterm", "");
    let (status, seen) = interrupt_at(&run.recipe, "Iter 2:", libc::SIGTERM);
    let text = seen.join("\n");
    assert!(
        status.success(),
        "SIGTERM must exit 0 after saving:\n{text}"
    );
    let stopped = seen
        .iter()
        .find(|l| l.starts_with("Interrupted at step"))
        .unwrap_or_else(|| panic!("{text}"));
    let state = common::read_json(&run_dir(&run).join("checkpoint/state.json"));
    let step = state["step"].as_u64().unwrap();
    assert!(
        stopped.contains(&format!("step {step};")),
        "{stopped} vs state step {step}"
    );
}
