//! Run folders under crashes and contention: a kill at every rename of the run's saves, two
//! runs in one folder, a rerun over finished work.

use crate::common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::tiny_run::{run_dir, tiny_run};

/// Six steps, a save every three: two saves, each several renames.
const SHORT: [&str; 4] = ["--set", "train.iters=6", "--set", "train.save_every=3"];

fn train(recipe: &Path, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut args = vec!["train", recipe.to_str().unwrap()];
    args.extend_from_slice(&SHORT);
    args.extend_from_slice(extra);
    common::loraforge_with_env(
        &args,
        &[
            &[("RAYON_NUM_THREADS", "1"), ("MATMUL_NUM_THREADS", "1")],
            env,
        ]
        .concat(),
    )
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The first step a `--resume` trained ("steps A..B" in its start line), or 1 for a fresh run.
fn first_step(out: &std::process::Output) -> usize {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .split("steps ")
        .nth(1)
        .and_then(|rest| rest.split("..").next())
        .and_then(|a| a.parse().ok())
        .unwrap_or(1)
}

/// Largest difference between the final adapters of two runs.
fn adapter_diff(a: &Path, b: &Path) -> f32 {
    let file = "checkpoint/adapters.safetensors";
    let (x, y) = (
        common::tensors(&a.join(file)),
        common::tensors(&b.join(file)),
    );
    x.iter()
        .map(|(name, v)| common::max_abs_diff(v, &y[name]))
        .fold(0.0, f32::max)
}

/// `kill -9` just before each rename a run makes (the injected crash point
/// `LORAFORGE_CRASH_AT_RENAME=N`: the recipe copy, the adapters in both layouts, each checkpoint
/// file and both swaps, for two saves), then the command a user would run next: `--resume` when
/// a checkpoint (or a copy a swap left) exists, else the same `train` again. Every one finishes
/// with the adapters of an uninterrupted run, and no resume starts before a save that had
/// completed: finished work is never lost.
#[test]
fn a_kill_at_every_rename_then_resume_loses_no_finished_work() {
    let straight = tiny_run("crash-straight", "");
    let out = train(&straight.recipe, &[], &[]);
    assert!(out.status.success(), "{}", text(&out));

    let mut first_save_done_at = None;
    let mut crashes = 0;
    for n in 1.. {
        let run = tiny_run(&format!("crash-{n}"), "");
        let crashed = train(
            &run.recipe,
            &[],
            &[("LORAFORGE_CRASH_AT_RENAME", &n.to_string())],
        );
        if crashed.status.success() {
            // Past the last rename: nothing left to interrupt.
            assert!(n > 10, "only {n} renames in two saves?\n{}", text(&crashed));
            break;
        }
        assert_eq!(crashed.status.signal(), Some(9), "{}", text(&crashed));
        crashes += 1;
        let dir = run_dir(&run);
        let said = text(&crashed);
        let target = said
            .lines()
            .find(|l| l.contains("killing the process before renaming"))
            .unwrap_or_else(|| panic!("no crash line:\n{said}"))
            .to_string();
        let has_checkpoint = ["checkpoint", ".checkpoint-new", ".checkpoint-old"]
            .iter()
            .any(|d| dir.join(d).join("state.json").exists());
        let next = match has_checkpoint {
            true => train(&run.recipe, &["--resume"], &[]),
            false => train(&run.recipe, &[], &[]),
        };
        assert!(next.status.success(), "after {target}:\n{}", text(&next));
        let resumed_from = first_step(&next) - 1;
        if let Some(at) = first_save_done_at
            && n > at
        {
            assert!(
                resumed_from >= 3,
                "after {target}: resumed from step {resumed_from}, but the step-3 checkpoint had been saved"
            );
        }
        if first_save_done_at.is_none()
            && target.ends_with(&format!("{}", dir.join("checkpoint").display()))
        {
            // This rename moves the first checkpoint in; every later crash must keep it.
            first_save_done_at = Some(n);
        }
        let state = common::read_json(&dir.join("checkpoint/state.json"));
        assert_eq!(state["step"].as_u64(), Some(6), "after {target}");
        let diff = adapter_diff(&run_dir(&straight), &dir);
        assert!(
            diff <= 1e-5,
            "after {target}: adapters differ by {diff:.2e}"
        );
        for d in [".checkpoint-new", ".checkpoint-old"] {
            assert!(!dir.join(d).exists(), "after {target}: {d} left behind");
        }
        std::fs::remove_dir_all(&run.dir).unwrap();
    }
    assert!(
        first_save_done_at.is_some(),
        "no rename put a checkpoint in place"
    );
    println!("{crashes} injected kills, each resumed to the uninterrupted result");
}

/// Runs `train` until a stdout line starts with `at`; returns the child and its lines so far.
fn start_until(recipe: &Path, extra: &[&str], at: &str) -> (std::process::Child, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_loraforge"))
        .args(["train", recipe.to_str().unwrap()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.as_mut().unwrap()).lines() {
        let line = line.unwrap();
        let found = line.starts_with(at);
        lines.push(line);
        if found {
            break;
        }
    }
    (child, lines)
}

/// Two runs in one folder deleted each other's files and interleaved their logs; now the
/// second is refused at once, naming the first's pid, and the first finishes untouched.
#[test]
fn a_second_run_in_the_same_folder_is_refused_while_the_first_trains() {
    let run = tiny_run("concurrent", "");
    let (mut first, seen) = start_until(&run.recipe, &["--set", "train.iters=300"], "Iter 1:");
    assert!(
        seen.last().is_some_and(|l| l.starts_with("Iter 1:")),
        "{seen:?}"
    );
    let second = common::loraforge(&["train", run.recipe.to_str().unwrap(), "--force"]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success()
            && err.contains("is in use by another run")
            && err.contains(&format!("loraforge pid {}", first.id())),
        "{err}"
    );
    // SAFETY: kill(2) with the pid of our own running child.
    unsafe { libc::kill(first.id() as libc::pid_t, libc::SIGINT) };
    assert!(first.wait().unwrap().success());
    let dir = run_dir(&run);
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    for (i, line) in metrics.lines().enumerate() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("metrics.jsonl:{}: {e}: {line}", i + 1));
    }
    assert!(dir.join("checkpoint/state.json").exists());
}

/// The lock is the OS's: a run killed with `kill -9` leaves its lock file, which blocks nobody.
#[test]
fn a_killed_run_leaves_no_lock_that_blocks_the_resume() {
    let run = tiny_run("stale-lock", "");
    let (mut first, _) = start_until(&run.recipe, &["--set", "train.iters=300"], "Iter 12:");
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(run_dir(&run).join(".lock").exists());
    let resumed = train(&run.recipe, &["--resume", "--set", "train.iters=12"], &[]);
    assert!(resumed.status.success(), "{}", text(&resumed));
}

/// Re-running `train` silently overwrote the earlier run's checkpoint; now it is refused, and
/// `--force` starts over (saying what it removed).
#[test]
fn a_rerun_over_a_finished_run_needs_resume_or_force() {
    let run = tiny_run("rerun", "");
    assert!(train(&run.recipe, &[], &[]).status.success());
    let dir = run_dir(&run);
    let before = std::fs::read(dir.join("checkpoint/adapters.safetensors")).unwrap();
    let refused = train(&run.recipe, &[], &[]);
    assert!(
        !refused.status.success()
            && text(&refused).contains("already holds a run")
            && text(&refused).contains("--resume")
            && text(&refused).contains("--force"),
        "{}",
        text(&refused)
    );
    assert_eq!(
        std::fs::read(dir.join("checkpoint/adapters.safetensors")).unwrap(),
        before
    );
    let forced = train(&run.recipe, &["--force"], &[]);
    assert!(forced.status.success(), "{}", text(&forced));
    assert!(
        text(&forced).contains("--force: removed the earlier run's checkpoint"),
        "{}",
        text(&forced)
    );
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.matches("\"event\":\"started\"").count(),
        1,
        "the earlier run's log was kept: {metrics}"
    );
}

/// A save that fails (here a file-size limit, EFBIG, as a full disk fails with ENOSPC) used to
/// say "No such file or directory" naming nothing; now the error names the file it was writing.
#[test]
fn a_save_that_fails_names_the_file() {
    let run = tiny_run("save-fails", "");
    let script = format!(
        "ulimit -f 32; exec '{}' train '{}'",
        env!("CARGO_BIN_EXE_loraforge"),
        run.recipe.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let adapters = run_dir(&run).join("adapters");
    assert!(
        !out.status.success()
            && err.contains(&format!("writing {}", adapters.display()))
            && err.contains("File too large"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(&adapters)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "a failed save left {left:?}");
}
