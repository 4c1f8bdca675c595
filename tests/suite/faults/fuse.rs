//! `fuse --out`: what `--force` may replace, and exports that a full disk or a kill interrupted.

use crate::common;

use std::path::Path;

const BASE: &str = "models/llama-llama3rope-tied";
const ADAPTERS: &str = "adapter-interop/llama-llama3rope-tied/mlx";

fn fuse(out: &Path, flags: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let flags = [&["--format", "hf"][..], flags].concat();
    let (base, adapters) = (common::fixture(BASE), common::fixture(ADAPTERS));
    common::fuse_with_env(&base, &adapters, out, &flags, env)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Names in `dir` that start with a dot (staging and set-aside folders).
fn hidden(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

#[test]
fn an_existing_export_is_refused_unless_forced_and_replaced_whole() {
    let tmp = common::temp_dir("fault-fuse-exists");
    let out = tmp.join("out");
    assert!(fuse(&out, &[], &[]).status.success());
    std::fs::write(out.join("marker"), "old export").unwrap();
    let refused = fuse(&out, &[], &[]);
    assert!(
        stderr(&refused).contains("already exists") && stderr(&refused).contains("--force"),
        "{}",
        stderr(&refused)
    );
    assert!(
        out.join("marker").exists(),
        "a refused export touched the old one"
    );
    let forced = fuse(&out, &["--force"], &[]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    assert!(out.join("model.safetensors").exists() && !out.join("marker").exists());
    assert_eq!(hidden(&tmp), Vec::<String>::new());
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `--force` deleted whatever `--out` named; now it replaces only an earlier export.
#[test]
fn force_never_replaces_a_folder_that_is_not_an_export() {
    let tmp = common::temp_dir("fault-fuse-foreign");
    let out = tmp.join("photos");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let refused = fuse(&out, &["--force"], &[]);
    assert!(
        stderr(&refused).contains("is not an export (no config.json or .gguf file in it)"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// `--out` naming a file failed only after the whole export was written.
#[test]
fn an_out_that_is_a_file_is_refused_before_any_work() {
    let tmp = common::temp_dir("fault-fuse-file");
    let out = tmp.join("model.txt");
    std::fs::write(&out, "notes").unwrap();
    for flags in [&[][..], &["--force"][..]] {
        let refused = fuse(&out, flags, &[]);
        assert!(
            stderr(&refused).contains("exists and is not a folder"),
            "{flags:?}: {}",
            stderr(&refused)
        );
    }
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "notes");
    assert_eq!(hidden(&tmp), Vec::<String>::new());
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A kill at each rename of `fuse --force` (an injected crash, not timing luck): before the old
/// export is set aside, and between setting it aside and moving the new one in. Either way the
/// next `fuse` finds the old export whole, and the leftovers are cleaned.
#[test]
fn a_kill_while_force_replaces_an_export_keeps_the_old_one() {
    for rename in ["1", "2"] {
        let tmp = common::temp_dir(&format!("fault-fuse-kill{rename}"));
        let out = tmp.join("out");
        assert!(fuse(&out, &[], &[]).status.success());
        std::fs::write(out.join("marker"), "old export").unwrap();
        let killed = fuse(&out, &["--force"], &[("LORAFORGE_CRASH_AT_RENAME", rename)]);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(killed.status.signal(), Some(9), "{}", stderr(&killed));
        assert!(!hidden(&tmp).is_empty(), "the kill left nothing to clean");
        // The next export puts the old one back (it was set aside at rename 2) and refuses to
        // overwrite it without --force; no staging or set-aside folder is left.
        let again = fuse(&out, &[], &[]);
        assert!(
            stderr(&again).contains("already exists"),
            "{}",
            stderr(&again)
        );
        assert_eq!(
            std::fs::read_to_string(out.join("marker")).unwrap(),
            "old export"
        );
        assert_eq!(hidden(&tmp), Vec::<String>::new(), "rename {rename}");
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}

#[test]
fn a_write_that_fails_midway_leaves_no_folder_behind() {
    let tmp = common::temp_dir("fault-fuse-full");
    let out = tmp.join("out");
    // A file-size limit of 64 KiB (`ulimit -f` counts 1 KiB blocks) makes the 360 KB weights
    // file fail part-way with EFBIG, as a full disk fails with ENOSPC.
    let script = format!(
        "ulimit -f 64; exec '{}' fuse --model '{}' --adapters '{}' --out '{}' --format hf --dtype f32",
        env!("CARGO_BIN_EXE_loraforge"),
        common::fixture(BASE).display(),
        common::fixture(ADAPTERS).display(),
        out.display()
    );
    let result = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(!result.status.success(), "the export should have failed");
    assert!(
        stderr(&result).contains("model.safetensors")
            && stderr(&result).contains("nothing was left there"),
        "{}",
        stderr(&result)
    );
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
