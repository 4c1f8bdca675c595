//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod tiny_run;

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether the tests run in CI (`CI` set), where the longest checks run a shorter form: CI has
/// two cores and a time budget (README, "Tests").
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// A fresh folder under the system temp dir, unique to this test process and `tag`. The first
/// call of a process removes the folders of earlier test processes that have ended (a failed
/// test's folder stays for a look until the next run; 1,533 had gathered here, 1.7 GB).
pub fn temp_dir(tag: &str) -> PathBuf {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(sweep_ended_runs);
    let dir = std::env::temp_dir().join(format!("lf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes `lf-<tag>-<pid>` folders of the temp dir whose process has ended; only where
/// `/proc` tells (elsewhere a live process's folder could not be told from an ended one's).
fn sweep_ended_runs() {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("lf-")
            .and_then(|rest| rest.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Fetches an asset with the project's own script (cached) and returns its path.
pub fn asset(name: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(root().join("scripts/fetch-assets.sh"))
        .arg(name)
        .output()
        .expect("running scripts/fetch-assets.sh");
    assert!(
        out.status.success(),
        "fetch-assets.sh {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("fetch-assets.sh prints a path")
            .trim(),
    )
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Runs `tmux` with these arguments and returns its stdout.
pub fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux is needed for this test (.ci/run installs it: apt-get install tmux)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `command` in a detached tmux session of `width` × `height` cells.
pub fn tmux_session(session: &str, [width, height]: [u16; 2], command: &str) {
    let (width, height) = (width.to_string(), height.to_string());
    tmux(&[
        "new-session",
        "-d",
        "-s",
        session,
        "-x",
        &width,
        "-y",
        &height,
        command,
    ]);
}

/// Polls `check` every 200 ms for up to `secs` seconds.
pub fn wait_for<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Runs the loraforge binary built for these tests.
pub fn loraforge(args: &[&str]) -> std::process::Output {
    loraforge_with_env(args, &[])
}

/// [`loraforge`] with these environment variables set.
pub fn loraforge_with_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loraforge"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("running loraforge")
}

/// Every tensor of a safetensors file, as f32.
pub fn tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let store =
        loraforge::io::safetensors::SafetensorsStore::open_files(&[path.to_path_buf()]).unwrap();
    store
        .tensors()
        .map(|t| (t.name.to_string(), t.to_f32().unwrap()))
        .collect()
}

/// Token ids from a JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A reference file's `input_ids` and its `logits` (one row per position) flattened.
pub fn reference_logits(path: &Path) -> (Vec<u32>, Vec<f32>) {
    let reference = read_json(path);
    (ids(&reference["input_ids"]), flatten(&reference["logits"]))
}

/// The numbers of nested JSON arrays, in order, as f32.
pub fn flatten(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(items) => items.iter().flat_map(flatten).collect(),
        other => vec![other.as_f64().expect("a number") as f32],
    }
}

/// Runs `loraforge fuse --model MODEL --adapters ADAPTERS --out OUT FLAGS...`.
pub fn fuse(model: &Path, adapters: &Path, out: &Path, flags: &[&str]) -> std::process::Output {
    fuse_with_env(model, adapters, out, flags, &[])
}

/// [`fuse`] with these environment variables set.
pub fn fuse_with_env(
    model: &Path,
    adapters: &Path,
    out: &Path,
    flags: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut args = vec![
        "fuse",
        "--model",
        model.to_str().unwrap(),
        "--adapters",
        adapters.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    loraforge_with_env(&args, env)
}

/// The Phi-3 fixtures' adapter targets on parts of the fused linears (q and v of `qkv_proj`,
/// gate of `gate_up_proj`), with the unfused o and down.
pub const PHI3_PART_KEYS: [&str; 5] = [
    "self_attn.q_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.down_proj",
];
