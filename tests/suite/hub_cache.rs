//! Hugging Face names where a model path is taken, resolved through a hub cache this test builds
//! in the layout `huggingface_hub` writes (`models--org--name/refs/main` naming a snapshot whose
//! files link into `blobs/`), as mlx-lm and `huggingface-cli` leave it.

use crate::common;

use std::path::Path;

/// A cache at `root` holding the tiny Llama fixture as `test-org/tiny-llama`, its files linked
/// from the snapshot into `blobs/` the way the hub library stores them.
fn build_cache(root: &Path, commit: &str) {
    let repo = root.join("models--test-org--tiny-llama");
    let (blobs, snapshot) = (repo.join("blobs"), repo.join("snapshots").join(commit));
    for dir in [&blobs, &snapshot, &repo.join("refs")] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let fixture = common::fixture("models/llama-llama3rope-tied");
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let entry = entry.unwrap();
        let blob = blobs.join(entry.file_name());
        std::fs::copy(entry.path(), &blob).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&blob, snapshot.join(entry.file_name())).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, snapshot.join(entry.file_name())).unwrap();
    }
}

#[test]
fn a_hub_name_opens_its_cached_snapshot_and_a_missing_one_names_the_cache() {
    let root = common::temp_dir("hub-cache");
    let _ = std::fs::remove_dir_all(&root);
    let commit = "0123456789abcdef0123456789abcdef01234567";
    build_cache(&root, commit);
    let cache = root.to_str().unwrap();
    let env = [("HF_HUB_CACHE", cache)];

    let out = common::loraforge_with_env(&["inspect", "test-org/tiny-llama"], &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("llama") && stdout.contains(commit),
        "{stdout}"
    );
    // The same through HF_HOME (its `hub` folder), and by commit.
    let home = root.join("home");
    build_cache(&home.join("hub"), commit);
    let by_commit = format!("test-org/tiny-llama@{commit}");
    let out = common::loraforge_with_env(
        &["inspect", &by_commit],
        &[("HF_HOME", home.to_str().unwrap()), ("HF_HUB_CACHE", "")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = common::loraforge_with_env(&["inspect", "test-org/absent-model"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("models--test-org--absent-model")
            && stderr.contains(cache)
            && stderr.contains("huggingface-cli download test-org/absent-model"),
        "{stderr}"
    );
    let out = common::loraforge_with_env(&["inspect", "test-org/tiny-llama@v2"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("not at revision `v2`"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&root);
}
