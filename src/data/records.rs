//! Reading a split: JSON Lines with one record per line, of one of three kinds detected from the
//! first record (as mlx-lm does): `{"messages": [...], "tools"?}`, `{"prompt", "completion"}` or
//! `{"text"}`. Field names come from the recipe's `[data.fields]`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::chat::Message;
use crate::recipe::{DataSection, FieldNames};

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Text(String),
    Chat {
        messages: Vec<Message>,
        tools: Option<Value>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Messages,
    PromptCompletion,
    Text,
}

struct Fields<'a> {
    text: &'a str,
    prompt: &'a str,
    completion: &'a str,
    messages: &'a str,
    tools: &'a str,
}

impl<'a> Fields<'a> {
    fn new(f: &'a FieldNames) -> Self {
        Fields {
            text: f.text.as_deref().unwrap_or("text"),
            prompt: f.prompt.as_deref().unwrap_or("prompt"),
            completion: f.completion.as_deref().unwrap_or("completion"),
            messages: f.messages.as_deref().unwrap_or("messages"),
            tools: f.tools.as_deref().unwrap_or("tools"),
        }
    }
}

/// The file of split `name` (`train`, `valid`, `test`): an explicit path, or `<path>/<name>.jsonl`.
pub fn split_path(data: &DataSection, name: &str) -> Option<PathBuf> {
    let explicit = match name {
        "train" => &data.train,
        "valid" => &data.valid,
        "test" => &data.test,
        _ => &None,
    };
    explicit.clone().or_else(|| {
        let dir = data.path.as_ref()?;
        ["jsonl", "parquet", "csv"]
            .iter()
            .map(|ext| dir.join(format!("{name}.{ext}")))
            .find(|p| p.exists())
    })
}

/// Reads every record of a split file; errors name the file and line.
pub fn load_split(path: &Path, fields: &FieldNames) -> Result<Vec<Record>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("json") => {}
        Some(other) => bail!(
            "{}: .{other} datasets are not supported yet; convert it to JSON Lines (.jsonl)",
            path.display()
        ),
        None => bail!("{}: dataset files need a .jsonl extension", path.display()),
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let fields = Fields::new(fields);
    let mut kind = None;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("{}: invalid JSON", at()))?;
        let k = *kind.get_or_insert_with(|| detect(&value, &fields));
        records.push(parse(&value, k, &fields).with_context(at)?);
    }
    if records.is_empty() {
        bail!(
            "{} has no records; a split needs at least one line",
            path.display()
        );
    }
    Ok(records)
}

fn detect(v: &Value, f: &Fields) -> Kind {
    if v.get(f.messages).is_some() {
        Kind::Messages
    } else if v.get(f.prompt).is_some() || v.get(f.completion).is_some() {
        Kind::PromptCompletion
    } else {
        Kind::Text
    }
}

fn string_field(v: &Value, key: &str, kind: &str) -> Result<String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => bail!("field `{key}` must be a string, found {other}"),
        None => bail!(
            "record has no `{key}` field (this file holds {kind} records, detected from its first line)"
        ),
    }
}

fn parse(v: &Value, kind: Kind, f: &Fields) -> Result<Record> {
    Ok(match kind {
        Kind::Text => Record::Text(string_field(v, f.text, "text")?),
        Kind::PromptCompletion => Record::Chat {
            messages: vec![
                Message::new("user", &string_field(v, f.prompt, "prompt/completion")?),
                Message::new(
                    "assistant",
                    &string_field(v, f.completion, "prompt/completion")?,
                ),
            ],
            tools: None,
        },
        Kind::Messages => {
            let raw = v.get(f.messages).ok_or_else(|| {
                anyhow::anyhow!("record has no `{}` field (this file holds chat records, detected from its first line)", f.messages)
            })?;
            let messages: Vec<Message> =
                serde_json::from_value(raw.clone()).with_context(|| {
                    format!(
                        "`{}` must be a list of {{role, content}} objects",
                        f.messages
                    )
                })?;
            if messages.is_empty() {
                bail!("`{}` is empty", f.messages);
            }
            Record::Chat {
                messages,
                tools: v.get(f.tools).cloned(),
            }
        }
    })
}
