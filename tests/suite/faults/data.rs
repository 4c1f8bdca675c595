//! Dataset files that hung, ate memory or gave errors naming no line.

use crate::common;

use std::path::Path;

use common::tiny_run::{run_dir, tiny_run};

fn train(recipe: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", recipe.to_str().unwrap()];
    args.extend_from_slice(extra);
    common::loraforge(&args)
}

/// Each of these is refused before training, with an error naming the file (and the line where
/// there is one). A FIFO hung the reader, `/dev/zero` filled memory, invalid UTF-8 named no line.
#[test]
fn hostile_dataset_files_are_refused_naming_file_and_line() {
    let run = tiny_run("data-files", "");
    let dir = &run.dir;
    let fifo = dir.join("pipe.jsonl");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    std::fs::create_dir_all(dir.join("folder.jsonl")).unwrap();
    let mut bad_utf8 = b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"".to_vec();
    bad_utf8.extend([0xff, 0xfe]);
    bad_utf8.extend(b"\"}\n");
    std::fs::write(dir.join("latin1.jsonl"), bad_utf8).unwrap();
    std::fs::write(dir.join("data.txt"), "{\"text\": \"a\"}\n").unwrap();
    std::fs::write(dir.join("broken.jsonl"), "{\"text\": \"a\"}\n{\"text\": \n").unwrap();
    std::fs::write(dir.join("blank.jsonl"), "\n\n").unwrap();
    let shown = |name: &str| dir.join(name).display().to_string();
    let cases = [
        (
            "/dev/zero".to_string(),
            "/dev/zero is not a regular file".to_string(),
        ),
        (
            shown("pipe.jsonl"),
            format!("{} is not a regular file", shown("pipe.jsonl")),
        ),
        (
            shown("folder.jsonl"),
            format!("{} is not a regular file", shown("folder.jsonl")),
        ),
        (
            shown("latin1.jsonl"),
            format!("{}:3: not valid UTF-8", shown("latin1.jsonl")),
        ),
        (shown("data.txt"), "unknown dataset format".to_string()),
        (
            shown("broken.jsonl"),
            format!("{}:2: invalid JSON", shown("broken.jsonl")),
        ),
        (shown("blank.jsonl"), "has no records".to_string()),
        (shown("missing.jsonl"), shown("missing.jsonl")),
    ];
    for (file, want) in cases {
        let out = train(&run.recipe, &["--set", &format!("data.train=\"{file}\"")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(&want),
            "{file}: {err}"
        );
        assert!(!err.contains("panicked"), "{file}: {err}");
    }
}

/// A 50 MB line was tokenised whole before truncation (3.4 GB of memory); it is cut before
/// tokenising now, so the run's peak stays near a normal run's.
#[test]
fn a_50_mb_line_is_cut_before_it_is_tokenised() {
    let run = tiny_run("data-huge-line", "");
    let words = "forge anvil hammer tongs ".repeat(50_000_000 / 25);
    let mut lines = std::fs::read_to_string(run.dir.join("train.jsonl")).unwrap();
    lines.push_str(&serde_json::json!({ "text": words }).to_string());
    lines.push('\n');
    std::fs::write(run.dir.join("train.jsonl"), lines).unwrap();
    let out = train(&run.recipe, &["--set", "train.iters=1"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("training examples were longer than data.max_seq_len = 64"),
        "{stdout}"
    );
    let metrics = std::fs::read_to_string(run_dir(&run).join("metrics.jsonl")).unwrap();
    let peak = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| v["peak_memory_bytes"].as_u64())
        .max()
        .expect("a train report with peak memory");
    // The file (50 MB), its string and its parsed record stay; the tokeniser's working set no
    // longer scales with the line (it was 3.4 GB).
    assert!(peak < 600 << 20, "peak RSS {} MiB", peak >> 20);
}

/// A prompt longer than the model's context ran on without a word.
#[test]
fn a_prompt_past_the_context_is_warned_about() {
    let model = common::fixture("models/llama-linearrope-untied");
    let prompt = "forge anvil hammer tongs ".repeat(40);
    let out = common::loraforge(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &prompt,
        "--max-tokens",
        "200",
        "--ignore-eos",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("past the model's context of 256 tokens (max_position_embeddings)"),
        "{err}"
    );
}
