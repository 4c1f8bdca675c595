//! The portable backend (`--features vulkan`) on a CPU's Vulkan driver, Mesa's lavapipe (which
//! `.ci/run` installs): `bench check --device vulkan` passes, and a few training steps of the tiny
//! shape give the CPU's losses. Attention is checked up to 64-wide heads and a 512-token long
//! row: lavapipe's LLVM takes many minutes over the 128-wide kernels (docs/traps.md); the
//! experts' checks are skipped (a kernel compiled per expert's row count); the GPU machine runs
//! the whole check.

use std::path::PathBuf;

use super::device_check_cpu::assert_checks_pass;
use crate::common;

/// Mesa's lavapipe manifest, when installed.
fn lavapipe() -> Option<PathBuf> {
    let dir = std::fs::read_dir("/usr/share/vulkan/icd.d").ok()?;
    dir.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("lvp_icd"))
    })
}

/// `loraforge ARGS` on lavapipe, or `None` (and a note) where it is not installed; in CI its
/// absence fails the test.
fn on_lavapipe(args: &[&str]) -> Option<std::process::Output> {
    let Some(icd) = lavapipe() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "lavapipe is missing: install mesa-vulkan-drivers (.ci/run does)"
        );
        eprintln!("skipped: no lavapipe (apt install mesa-vulkan-drivers)");
        return None;
    };
    let icd = icd.to_string_lossy().into_owned();
    let env = [
        ("VK_DRIVER_FILES", icd.as_str()),
        ("XDG_RUNTIME_DIR", "/tmp"),
    ];
    Some(common::loraforge_with_env(args, &env))
}

#[test]
fn every_device_check_passes_on_lavapipe() {
    let mut args = vec![
        "bench",
        "check",
        "--device",
        "vulkan",
        "--long-row",
        "512",
        "--max-head-dim",
        "64",
        // lavapipe compiles kernels for each expert's row count: many minutes (the CPU's run of
        // the same checks, device_check_cpu.rs, keeps their code working).
        "--skip",
        "trajectory_experts",
        "--skip",
        "experts_grad",
        // The trajectories' 32,000-wide head and loss were most of their time there (about ten
        // minutes each on CI's two cores); a vocabulary of 2,048 checks the same kernels.
        "--vocab",
        "2048",
    ];
    if common::in_ci() {
        // Each trajectory compiles its kernels anew on lavapipe; these two differ from
        // `trajectory` in the training loop's host-side paths (checkpointing, offload, fused
        // projections), which device_check_cpu runs in CI and the GPU machine runs on its card.
        args.extend(["--skip", "trajectory_chunked_offloaded"]);
        args.extend(["--skip", "trajectory_fused_projections"]);
        // A step there takes about 10 s, and the two trajectories left were 82% of the check
        // (session 25: 226 and 216 s of 532); 8 steps still see the loss fall by more than
        // the check's 0.5 and any wrong gradient.
        args.extend(["--steps", "8"]);
    }
    let Some(out) = on_lavapipe(&args) else {
        return;
    };
    assert_checks_pass(
        &out,
        &[
            "trajectory",
            "trajectory_half",
            "linear_q4",
            "linear_q4_f16",
            "attention_grad",
            "attention_long_row",
            "rope_grad",
            "rms_norm_grad",
            "swiglu_grad",
            "cross_entropy_grad",
        ],
    );
}

/// The per-step losses `bench train` prints on stderr (`step N [..] ... loss X`).
fn losses(out: &std::process::Output) -> Vec<f64> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("step "))
        .filter_map(|l| l.rsplit("loss ").next()?.trim().parse().ok())
        .collect()
}

/// By hand only: in CI the check's `trajectory` and `trajectory_half` (f16, scaled loss) train
/// the tiny shape on lavapipe against the CPU already, and this test's own kernel compilations
/// took 9 minutes of CI's two cores.
#[test]
fn tiny_training_steps_on_lavapipe_give_the_cpus_losses() {
    if common::in_ci() {
        eprintln!("skipped in CI: the lavapipe check's trajectories cover it");
        return;
    }
    let args = |device, dtype| {
        [
            "bench",
            "train",
            "--device",
            device,
            "--dtype",
            dtype,
            "--shape",
            "tiny",
            "--batch",
            "2",
            "--seq",
            "200",
            "--steps",
            "3",
            "--targets",
            "all-linear",
            "--vocab",
            "2048",
        ]
    };
    let cpu = losses(&common::loraforge(&args("cpu", "f32")));
    assert_eq!(cpu.len(), 6, "three warm-up and three timed steps");
    // The f16 base's steps too: its activations are rounded to f16 at every GEMM, and its loss
    // is scaled (train/trainer.rs); measured within 4e-5 of the CPU's f32 losses.
    for dtype in ["f32", "f16"] {
        let Some(out) = on_lavapipe(&args("vulkan", dtype)) else {
            return;
        };
        let vulkan = losses(&out);
        assert_eq!(vulkan.len(), cpu.len(), "{dtype}");
        for (v, c) in vulkan.iter().zip(&cpu) {
            assert!(
                ((v - c) / c).abs() < 1e-3,
                "{dtype}: vulkan {vulkan:?}, cpu {cpu:?}"
            );
        }
    }
}
