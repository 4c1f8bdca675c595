//! Chat templates come from model files: untrusted code. One that raises names the record; one
//! that loops, floods its output or doubles a string until memory runs out is stopped, naming
//! where the template came from.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::tiny_run::tiny_run;

/// A copy of the tiny model in `dir/model` whose tokenizer_config.json carries `template`.
fn model_with_template(dir: &Path, template: &str) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(common::fixture("models/llama-linearrope-untied")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    let config_path = model.join("tokenizer_config.json");
    let mut config = common::read_json(&config_path);
    config["chat_template"] = template.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    model
}

#[test]
fn chat_template_that_raises_names_the_record() {
    let run = tiny_run("raises", "");
    let model = model_with_template(
        &run.dir,
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user message') }}{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    );
    std::fs::write(
        run.dir.join("train.jsonl"),
        "{\"messages\": [{\"role\": \"assistant\", \"content\": \"hello\"}, {\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .unwrap();
    let out = common::loraforge(&[
        "train",
        run.recipe.to_str().unwrap(),
        "--set",
        &format!("model.path=\"{}\"", model.display()),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("train.jsonl: record 1")
            && err.contains("Conversations must start with a user message"),
        "{err}"
    );
}

/// Nested loops hung `generate --chat`; string doubling took gigabytes. Each is now stopped by
/// a limit (steps, output size, memory) with an error naming the template's file, in seconds.
#[test]
fn runaway_templates_are_stopped_naming_the_file() {
    let cases = [
        (
            "loops",
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            "steps",
        ),
        (
            "flood",
            "{% for a in range(100000) %}{{ messages[0]['content'] * 1000 }}{% endfor %}",
            "wrote more than",
        ),
        (
            "doubling",
            "{% set ns = namespace(s='0123456789abcdef') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
            "needed more than 256 MiB of memory",
        ),
    ];
    for (tag, template, want) in cases {
        let dir = common::temp_dir(&format!("template-{tag}"));
        let model = model_with_template(&dir, template);
        let started = Instant::now();
        let out = common::loraforge(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--chat",
            "--prompt",
            "hello",
            "--max-tokens",
            "2",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains(&format!(
                    "the chat template of {} was stopped",
                    model.join("tokenizer_config.json").display()
                ))
                && err.contains(want),
            "{tag}: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{tag}: took {:?}",
            started.elapsed()
        );
    }
}
