//! Fuzz entry points: each takes arbitrary bytes, feeds them to one reader of untrusted input
//! the way the program does, and returns. Any panic, abort, hang or runaway allocation is a bug.
//! `fuzz/` runs them under libFuzzer (`just fuzz TARGET`); the test suite replays their
//! committed corpora (`fuzz/corpus/TARGET/`) on every run.

use std::path::{Path, PathBuf};

use crate::chat::{ChatTemplate, Message};
use crate::io::gguf::GgufFile;
use crate::model::ModelFiles;

/// A fuzz target: arbitrary bytes in, nothing out; it must never panic or hang.
pub type Target = fn(&[u8]);

/// The fuzz targets by name, as `fuzz/fuzz_targets/` and `fuzz/corpus/` name them.
pub const TARGETS: [(&str, Target); 5] = [
    ("gguf", gguf),
    ("model_folder", model_folder),
    ("recipe", recipe),
    ("dataset", dataset),
    ("chat_template", chat_template),
];

/// A GGUF file: header, metadata, tensor table, then every tensor's bytes, the configuration
/// and the tokenizer, as loading a model reads them (all but compiling the pre-tokenizer's
/// fixed regexes, which reads nothing from the file and would take 80% of the time).
pub fn gguf(bytes: &[u8]) {
    let path = scratch("model.gguf", bytes);
    let Ok(file) = GgufFile::open(&path) else {
        return;
    };
    for info in &file.tensors {
        let _ = file.data(info).len();
    }
    let tokenizer = crate::tokenizer::from_gguf_without_regexes(&file);
    if let (Ok((tokenizer, _)), Ok(files)) = (tokenizer, ModelFiles::open(&path)) {
        let _ = crate::tokenizer::fits_embedding(&tokenizer, &files);
    }
}

/// A model folder: the input is `config.json`, a NUL byte, then `model.safetensors`. The folder
/// is opened as loading does (configuration, mlx quantization settings, safetensors headers)
/// and every tensor's bytes are decoded.
pub fn model_folder(bytes: &[u8]) {
    let (config, weights) = split_at_nul(bytes);
    let dir = scratch_dir("folder");
    if std::fs::write(dir.join("config.json"), config).is_err()
        || std::fs::write(dir.join("model.safetensors"), weights).is_err()
    {
        return;
    }
    let Ok(files) = ModelFiles::open(&dir) else {
        return;
    };
    if let crate::model::weights::WeightSource::Safetensors { store, .. } = &files.weights {
        for tensor in store.tensors() {
            let _ = tensor.to_f32();
        }
    }
}

/// A recipe: TOML text, then NUL-separated `--set` assignments.
pub fn recipe(bytes: &[u8]) {
    let (text, rest) = split_at_nul(bytes);
    let path = scratch("recipe.toml", text);
    let overrides: Vec<String> = rest
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    let _ = crate::recipe::load(&path, &overrides);
}

/// A JSON Lines dataset, read as a split with the default field names.
pub fn dataset(bytes: &[u8]) {
    let path = scratch("train.jsonl", bytes);
    let _ = crate::data::records::load_split(&path, &Default::default());
}

/// A chat template: Jinja source, a NUL byte, then the messages as a JSON array.
pub fn chat_template(bytes: &[u8]) {
    let (source, messages) = split_at_nul(bytes);
    let source = String::from_utf8_lossy(source);
    let messages: Vec<Message> = serde_json::from_slice(messages).unwrap_or_else(|_| {
        vec![
            Message::new("user", "Hello"),
            Message::new("assistant", "Hi"),
        ]
    });
    let template = ChatTemplate::new(&source, Some("<s>"), Some("</s>"), "fuzz input")
        .with_limits(FUZZ_LIMITS);
    let _ = template.render(&messages, true, None);
}

/// The chat template limits for fuzzing: the same checks as the defaults with smaller numbers.
/// A render stopped for memory leaves its thread parked, holding its budget, until the process
/// ends (`memory_budget`); the program ends after such an error, but a fuzzer renders millions
/// of templates in one process, and 256 MiB each would pass libFuzzer's memory limit after 32.
const FUZZ_LIMITS: crate::chat::Limits = crate::chat::Limits {
    fuel: 100_000,
    fuel_per_byte: 16,
    output: 64 << 10,
    output_per_byte: 16,
    memory: 4 << 20,
    memory_per_byte: 64,
    time: std::time::Duration::from_secs(5),
};

/// Bytes before the first NUL, and after it (empty when there is none).
fn split_at_nul(bytes: &[u8]) -> (&[u8], &[u8]) {
    match bytes.iter().position(|&b| b == 0) {
        Some(at) => (&bytes[..at], &bytes[at + 1..]),
        None => (bytes, &[]),
    }
}

/// This process's scratch folder (in memory where `/dev/shm` exists), made once.
fn scratch_dir(name: &str) -> PathBuf {
    static BASE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let base = BASE.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let root = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        root.join(format!("loraforge-fuzz-{}", std::process::id()))
    });
    let dir = base.join(name);
    if !dir.is_dir() {
        let _ = std::fs::create_dir_all(&dir);
    }
    dir
}

/// `bytes` written to `name` in its scratch folder; returns its path.
fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir(name).join(name);
    let _ = std::fs::write(&path, bytes);
    path
}
