//! Reading a split: JSON Lines with one record per line, or a Parquet or CSV table with one
//! record per row (read through polars, then seen row by row as JSON objects so that every
//! format goes through the same checks). Records are of one of three kinds detected from the
//! first one (as mlx-lm does): `{"messages": [...], "tools"?}`, `{"prompt", "completion"}` or
//! `{"text"}`. Field names come from the recipe's `[data.fields]`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::chat::Message;
use crate::recipe::{DataSection, FieldNames};

/// One record of a split, whatever its file format.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A `{"text"}` record, trained on whole.
    Text(String),
    /// A conversation: a `messages` record, or a prompt/completion pair as a user turn and an
    /// assistant turn.
    Chat {
        /// The conversation's turns.
        messages: Vec<Message>,
        /// The `tools` field, passed to the chat template as it is.
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

/// Reads every record of a split file; errors name the file and line (or row).
pub fn load_split(path: &Path, fields: &FieldNames) -> Result<Vec<Record>> {
    // `file:line` for text files (editors jump there), `file: row N` for tables.
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "{} is not a regular file (a folder, FIFO or device); point the split at a .jsonl, .parquet or .csv file",
            path.display()
        );
    }
    let (lines, unit) = match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") | Some("json") => (read_utf8(path)?, ":"),
        Some("parquet") | Some("csv") => (table_as_json_lines(path)?, ": row "),
        _ => bail!(
            "{}: unknown dataset format; use .jsonl (JSON Lines), .parquet or .csv",
            path.display()
        ),
    };
    let fields = Fields::new(fields);
    let mut kind = None;
    let mut records = Vec::new();
    for (i, line) in lines.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}{unit}{}", path.display(), i + 1);
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("{}: invalid JSON", at()))?;
        let k = *kind.get_or_insert_with(|| detect(&value, &fields));
        records.push(parse(&value, k, &fields).with_context(at)?);
    }
    if records.is_empty() {
        bail!(
            "{} has no records; a split needs at least one",
            path.display()
        );
    }
    Ok(records)
}

/// A text file's contents; invalid UTF-8 is an error naming the line it is on.
fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        anyhow::anyhow!(
            "{}:{line}: not valid UTF-8 (byte {at} of the file); save the file as UTF-8",
            path.display()
        )
    })
}

/// Without the `tables` feature, tables are refused.
#[cfg(not(feature = "tables"))]
fn table_as_json_lines(path: &Path) -> Result<String> {
    bail!(
        "{}: this build reads no Parquet or CSV (built without the `tables` feature); convert the file to .jsonl or use a default build",
        path.display()
    )
}

/// A Parquet or CSV table as JSON Lines, one object per row (nested Parquet columns, such as a
/// list of `{role, content}` structs, become nested JSON).
#[cfg(feature = "tables")]
fn table_as_json_lines(path: &Path) -> Result<String> {
    use polars::prelude::{
        CsvReadOptions, DataFrame, JsonFormat, JsonWriter, ParquetReader, PolarsResult, SerReader,
        SerWriter,
    };
    let read = || -> PolarsResult<DataFrame> {
        if path.extension().is_some_and(|e| e == "csv") {
            CsvReadOptions::default()
                .with_has_header(true)
                .try_into_reader_with_file_path(Some(path.to_path_buf()))?
                .finish()
        } else {
            ParquetReader::new(std::fs::File::open(path)?).finish()
        }
    };
    let mut frame = read().with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    JsonWriter::new(&mut out)
        .with_json_format(JsonFormat::JsonLines)
        .finish(&mut frame)
        .with_context(|| format!("{}: converting rows to records", path.display()))?;
    String::from_utf8(out).with_context(|| format!("{}: rows are not UTF-8", path.display()))
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
