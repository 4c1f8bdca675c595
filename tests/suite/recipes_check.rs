//! Recipes: the shipped ones resolve; mistakes are reported with file, line, column and key.

use crate::common;

use std::path::{Path, PathBuf};

use loraforge::recipe;

fn write_recipe(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lf-recipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn error(path: &Path, overrides: &[&str]) -> String {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    match recipe::load(path, &overrides) {
        Ok(_) => panic!("{} should not load", path.display()),
        Err(e) => e.to_string(),
    }
}

const MINIMAL: &str = "[model]\npath = \"m.gguf\"\n\n[data]\npath = \"datasets/demo\"\n";

#[test]
fn shipped_recipes_resolve() {
    for name in ["recipes/smollm2-demo.toml", "recipes/mistral-lora.toml"] {
        let r =
            recipe::load(&common::root().join(name), &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            r.train.iters.is_some() || r.train.epochs.is_some(),
            "{name}"
        );
    }
}

#[test]
fn typo_in_a_key_names_line_column_and_suggests() {
    let path = write_recipe(
        "typo.toml",
        &format!("{MINIMAL}\n[train]\nbatch_size = 2\nlerning_rate = 1e-4\n"),
    );
    let err = error(&path, &[]);
    assert!(err.contains("typo.toml:9:1:"), "{err}");
    assert!(
        err.contains("unknown key `lerning_rate` in [train]; did you mean `learning_rate`?"),
        "{err}"
    );
}

#[test]
fn wrong_type_names_line_and_column() {
    let path = write_recipe(
        "type.toml",
        &format!("{MINIMAL}\n[lora]\nrank = \"eight\"\n"),
    );
    let err = error(&path, &[]);
    assert!(err.contains("type.toml:8:8:"), "{err}");
    assert!(err.contains("invalid type: string \"eight\""), "{err}");
}

#[test]
fn missing_required_field() {
    let path = write_recipe(
        "missing.toml",
        "[model]\ndtype = \"f32\"\n\n[data]\npath = \"d\"\n",
    );
    let err = error(&path, &[]);
    assert!(err.contains("required key `path` is missing"), "{err}");
}

#[test]
fn extends_and_set_override_in_order() {
    let base = write_recipe(
        "base.toml",
        &format!("{MINIMAL}\n[train]\nbatch_size = 2\nlearning_rate = 1e-4\n"),
    );
    let child = write_recipe(
        "child.toml",
        &format!(
            "extends = \"{}\"\n\n[train]\nbatch_size = 8\n",
            base.file_name().unwrap().to_string_lossy()
        ),
    );
    let r = recipe::load(&child, &["train.learning_rate=3e-4".into()]).unwrap();
    assert_eq!(r.train.batch_size, 8);
    assert_eq!(r.train.learning_rate, 3e-4);
    assert_eq!(r.data.path.as_deref(), Some(Path::new("datasets/demo")));
    assert_eq!(r.name, "child");
}

#[test]
fn typo_in_set_is_caught() {
    let path = write_recipe("ok.toml", MINIMAL);
    let err = error(&path, &["train.lerning_rate=1e-4"]);
    assert!(err.contains("--set train.lerning_rate=1e-4"), "{err}");
    assert!(err.contains("did you mean `learning_rate`?"), "{err}");
}

#[test]
fn rank_zero_and_unknown_target_set_are_refused() {
    let path = write_recipe("rank.toml", &format!("{MINIMAL}\n[lora]\nrank = 0\n"));
    assert!(error(&path, &[]).contains("lora.rank"));
    let path = write_recipe(
        "targets.toml",
        &format!("{MINIMAL}\n[lora]\ntargets = \"all-linears\"\n"),
    );
    assert!(error(&path, &[]).contains("\"all-linears\" is not a target set"));
}

#[test]
fn cli_prints_the_resolved_recipe() {
    let out = common::loraforge(&[
        "recipe",
        "check",
        common::root()
            .join("recipes/smollm2-demo.toml")
            .to_str()
            .unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // Defaults are filled in, e.g. the optimizer's betas.
    assert!(
        text.contains("betas = [") && text.contains("[lora]"),
        "{text}"
    );
}

#[test]
fn settings_that_would_turn_the_adapters_into_nan_are_refused() {
    let path = write_recipe("optim.toml", MINIMAL);
    for (set, key) in [
        ("train.eps=0", "train.eps"),
        ("train.eps=nan", "train.eps"),
        ("train.weight_decay=nan", "train.weight_decay"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.warmup_init=inf", "train.warmup_init"),
        ("train.min_learning_rate=nan", "train.min_learning_rate"),
        ("train.betas=[1.0, 0.999]", "train.betas"),
        ("train.max_grad_norm=nan", "train.max_grad_norm"),
        (
            "train.router_aux_loss_coef=-0.01",
            "train.router_aux_loss_coef",
        ),
        (
            "train.router_aux_loss_coef=nan",
            "train.router_aux_loss_coef",
        ),
        ("lora.alpha=inf", "lora.alpha"),
        ("train.val_batches=0", "train.val_batches"),
    ] {
        let err = error(&path, &[set]);
        assert!(err.contains(key), "--set {set}: {err}");
    }
}

#[test]
fn a_run_name_that_is_a_path_is_refused() {
    let path = write_recipe("name.toml", MINIMAL);
    for name in ["../../x", "a/b", ".."] {
        let err = error(&path, &[&format!("name=\"{name}\"")]);
        assert!(err.contains("is not a plain name"), "name {name:?}: {err}");
    }
}

#[test]
fn a_table_in_set_merges_and_a_broken_value_is_an_error() {
    let base = write_recipe(
        "merge.toml",
        &format!("{MINIMAL}\n[train]\nbatch_size = 8\nlearning_rate = 3e-4\n"),
    );
    let r = recipe::load(&base, &["train={iters=7}".into()]).unwrap();
    assert_eq!(
        (r.train.iters, r.train.batch_size, r.train.learning_rate),
        (Some(7), 8, 3e-4)
    );
    let err = error(&base, &["model.path=\"unterminated"]);
    assert!(err.contains("is not a TOML value"), "{err}");
    // A key of thousands of parts would nest as many tables (a stack overflow, found by
    // fuzzing); the deepest real key, three parts, still works.
    let deep = format!("a{}=1", ".a".repeat(3000));
    let err = error(&base, &[&deep]);
    assert!(err.contains("at most 4 dot-separated parts"), "{err}");
    let r = recipe::load(&base, &["model.quantize.bits=8".into()]).unwrap();
    assert_eq!(r.model.quantize.map(|q| q.bits), Some(8));
    // A bare word is still a string.
    let r = recipe::load(&base, &["model.path=/models/x".into()]).unwrap();
    assert_eq!(r.model.path, Path::new("/models/x"));
    for set in ["train.iters=0", "train.epochs=0", "train.epochs=nan"] {
        assert!(error(&base, &[set]).contains("train.iters"), "{set}");
    }
}
