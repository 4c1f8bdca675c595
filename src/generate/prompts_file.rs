//! `generate --prompts FILE.jsonl`: one prompt per line, `{"prompt": "..."}` (plain text, or a
//! user turn with `--chat`) or `{"messages": [{"role": ..., "content": ...}, ...]}` (always
//! through the chat template). A bad line is named by number.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::chat::Message;

/// One line of a prompts file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptLine {
    /// The prompt text.
    #[serde(default)]
    pub prompt: Option<String>,
    /// A conversation to continue, through the chat template.
    #[serde(default)]
    pub messages: Option<Vec<Message>>,
}

/// Reads a prompts file: every non-blank line one prompt.
pub fn read(path: &Path) -> Result<Vec<PromptLine>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the prompts file {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let row: PromptLine = serde_json::from_str(line).with_context(|| {
            format!(
                "{}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [...]}} on one line",
                at()
            )
        })?;
        match (&row.prompt, &row.messages) {
            (Some(_), Some(_)) => bail!("{}: give \"prompt\" or \"messages\", not both", at()),
            (None, None) => bail!("{}: the line has neither \"prompt\" nor \"messages\"", at()),
            (Some(p), None) if p.is_empty() => bail!("{}: the prompt is empty", at()),
            (None, Some(m)) if m.is_empty() => bail!("{}: \"messages\" is empty", at()),
            _ => out.push(row),
        }
    }
    if out.is_empty() {
        bail!("{} holds no prompt", path.display());
    }
    Ok(out)
}
