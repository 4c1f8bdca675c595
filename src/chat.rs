//! Chat templates rendered the way transformers' `apply_chat_template` renders them: Jinja with
//! `trim_blocks` and `lstrip_blocks`, Python string methods, `raise_exception`, `strftime_now`,
//! and a `tojson` that writes what Python's `json.dumps(ensure_ascii=False)` writes.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

/// One chat message. Extra keys (tool calls, names) pass through to the template.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    /// Who speaks, such as `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The message text.
    pub content: String,
    /// Any other keys of the message, passed to the template as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Message {
    /// A message with no extra keys.
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
            extra: Default::default(),
        }
    }
}

/// Why a chat template could not turn messages into prompt text.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The model ships no chat template.
    #[error(
        "the model has no chat template; pass a plain prompt (without --chat) or use a model that ships one"
    )]
    NoTemplate,
    /// The template stopped itself, usually through `raise_exception`; holds its message.
    #[error("the chat template raised an error: {0}")]
    Raised(String),
    /// Any other rendering failure (a syntax error, an unknown filter), described.
    #[error("the chat template could not be rendered: {0}")]
    Render(String),
    /// The template ran past a limit (steps, output size, memory or time): it came from a model
    /// file, so it is untrusted code and is stopped.
    #[error(
        "the chat template of {origin} was stopped: {why}; it is untrusted code from the model's files, so fix or replace that template"
    )]
    Limit {
        /// Where the template came from.
        origin: String,
        /// Which limit it ran past.
        why: String,
    },
}

/// How much one rendering may do: a chat template comes from a model file, so it is untrusted
/// code. Each limit is a base plus an allowance per byte of input (messages and tools).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Template instructions (minijinja fuel); real templates take a few thousand a conversation.
    pub fuel: u64,
    /// Extra instructions per byte of input.
    pub fuel_per_byte: u64,
    /// Bytes of rendered text, and of any string a `replace` would build (other string
    /// growth, such as `join`, is bounded by `memory`).
    pub output: usize,
    /// Extra bytes per byte of input (a template wraps each message in a few markers; none
    /// writes sixteen times its input).
    pub output_per_byte: usize,
    /// Bytes the rendering thread may allocate.
    pub memory: usize,
    /// Extra bytes of memory per byte of input.
    pub memory_per_byte: usize,
    /// Wall-clock time.
    pub time: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: 1_000_000,
            fuel_per_byte: 16,
            output: 1 << 20,
            output_per_byte: 16,
            memory: 256 << 20,
            memory_per_byte: 64,
            time: std::time::Duration::from_secs(20),
        }
    }
}

/// A model's Jinja chat template, with the BOS and EOS token text it may insert.
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    origin: String,
    limits: Limits,
}

impl ChatTemplate {
    /// A template from its Jinja source; a missing BOS or EOS token renders as empty text.
    /// `origin` names where the source came from, for errors.
    pub fn new(
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
        origin: &str,
    ) -> Self {
        ChatTemplate {
            source: source.to_string(),
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
            origin: origin.to_string(),
            limits: Limits::default(),
        }
    }

    /// The same template rendered under other limits.
    pub fn with_limits(self, limits: Limits) -> Self {
        ChatTemplate { limits, ..self }
    }

    /// The chat template a tokenizer ships, with its BOS and EOS tokens; `NoTemplate` without one.
    pub fn from_tokenizer(tok: &crate::tokenizer::Tokenizer) -> Result<Self, ChatError> {
        let source = tok.chat_template.as_deref().ok_or(ChatError::NoTemplate)?;
        Ok(Self::new(
            source,
            tok.bos.as_deref(),
            tok.eos.as_deref(),
            &tok.chat_template_origin,
        ))
    }

    /// Renders `messages` (and `tools`, when given) to the prompt text, within limits on the
    /// template's steps, output, memory and time that grow with the input's size.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String, ChatError> {
        let input: usize = messages
            .iter()
            .map(|m| m.role.len() + m.content.len() + 16)
            .sum::<usize>()
            + tools.map_or(0, |t| t.to_string().len());
        let (source, bos, eos) = (
            self.source.clone(),
            self.bos_token.clone(),
            self.eos_token.clone(),
        );
        let (messages, tools) = (messages.to_vec(), tools.cloned());
        let l = self.limits;
        let max_output = l
            .output
            .saturating_add(input.saturating_mul(l.output_per_byte));
        let fuel = l
            .fuel
            .saturating_add((input as u64).saturating_mul(l.fuel_per_byte));
        let memory = l
            .memory
            .saturating_add(input.saturating_mul(l.memory_per_byte));
        let limit = |why: String| ChatError::Limit {
            origin: self.origin.clone(),
            why,
        };
        let rendered = crate::memory_budget::run_bounded(memory, l.time, move || {
            let mut env = environment(max_output);
            env.set_fuel(Some(fuel));
            let ctx = minijinja::context! {
                messages => Value::from_serialize(&messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => bos,
                eos_token => eos,
                tools => tools.as_ref().map(Value::from_serialize),
            };
            let template = env.template_from_str(&source)?;
            let mut out = Capped::new(max_output);
            let result = template.render_captured_to(ctx, &mut out);
            match (result, out.over) {
                (_, true) => Err(Error::new(
                    ErrorKind::WriteFailure,
                    format!("it wrote more than {max_output} bytes"),
                )),
                (Ok(_), false) => String::from_utf8(out.bytes).map_err(|e| {
                    Error::new(ErrorKind::BadSerialization, format!("rendered text: {e}"))
                }),
                (Err(e), false) => Err(e),
            }
        })
        .map_err(|e| limit(e.to_string()))?;
        rendered.map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => {
                ChatError::Raised(e.detail().unwrap_or_default().to_string())
            }
            ErrorKind::OutOfFuel => limit(format!(
                "it ran more than {fuel} steps for {input} bytes of messages"
            )),
            ErrorKind::WriteFailure => limit(format!(
                "{} for {input} bytes of messages",
                e.detail().unwrap_or("it wrote too much")
            )),
            _ => ChatError::Render(format!("{e:#}")),
        })
    }
}

/// Rendered bytes, refusing to grow past a limit.
struct Capped {
    bytes: Vec<u8>,
    limit: usize,
    over: bool,
}

impl Capped {
    fn new(limit: usize) -> Self {
        Capped {
            bytes: Vec::new(),
            limit,
            over: false,
        }
    }
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            self.over = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The environment transformers renders with, where no string the template builds through
/// `replace` may pass `max_string` bytes.
fn environment(max_string: usize) -> Environment<'static> {
    let mut env = Environment::new();
    // Off in every build: minijinja 2.24's source excerpt for an error (on by default where
    // debug assertions are) underflows on some malformed templates (found by fuzzing;
    // docs/traps.md). Errors still name the line.
    env.set_debug(false);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(move |state, value, method, args| {
        if let ("replace", Some(s)) = (method, value.as_str()) {
            let (old, new, count): (&str, &str, Option<i32>) = minijinja::value::from_args(args)?;
            check_replace(s, old, new, count, max_string)?;
        }
        minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
    });
    env.add_filter(
        "replace",
        move |state: &minijinja::State,
              value: minijinja::value::StringInput,
              old: minijinja::value::StringInput,
              new: minijinja::value::StringInput| {
            check_replace(value.as_str(), old.as_str(), new.as_str(), None, max_string)?;
            minijinja::filters::replace(state, value, old, new)
        },
    );
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |format: String| strftime_now(&format));
    env.add_filter("tojson", tojson);
    env
}

/// Refuses a `replace` whose result would pass `max` bytes, before building it: with an empty
/// `old` (which matches between every character), one call multiplies a string's length.
fn check_replace(
    s: &str,
    old: &str,
    new: &str,
    count: Option<i32>,
    max: usize,
) -> Result<(), Error> {
    let matches = if old.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(old).count()
    };
    let matches = match count {
        Some(n) if n >= 0 => matches.min(usize::try_from(n).unwrap_or(usize::MAX)),
        _ => matches,
    };
    let grows = new.len().saturating_sub(old.len());
    let len = s.len().saturating_add(matches.saturating_mul(grows));
    if grows > 0 && len > max {
        return Err(Error::new(
            ErrorKind::WriteFailure,
            format!("a replace() would build a string of {len} bytes, past the limit of {max}"),
        ));
    }
    Ok(())
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)`, the filter transformers installs.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_python_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(": ");
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}

/// `strftime_now(fmt)` for the codes chat templates use (`%d %b %Y`, `%B`, `%m`, `%Y-%m-%d`).
fn strftime_now(format: &str) -> Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported code %{}", other.unwrap_or(' ')),
                ));
            }
        }
    }
    Ok(out)
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_exception_surfaces_the_templates_message() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}",
            None,
            None,
            "test",
        );
        let err = t
            .render(&[Message::new("assistant", "hi")], false, None)
            .unwrap_err();
        assert!(
            matches!(err, ChatError::Raised(ref m) if m == "Conversation must start with user"),
            "{err}"
        );
    }

    /// Templates are untrusted: a loop that never ends and output that doubles are stopped
    /// with an error naming where the template came from.
    #[test]
    fn runaway_templates_are_stopped_naming_their_origin() {
        let hang = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            None,
            None,
            "models/evil/tokenizer_config.json",
        );
        let err = hang
            .render(&[Message::new("user", "hi")], false, None)
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("models/evil/tokenizer_config.json") && text.contains("steps"),
            "{text}"
        );
        let wide = ChatTemplate::new(
            "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{{ ns.s }}{% endfor %}",
            None,
            None,
            "evil.gguf (tokenizer.chat_template)",
        );
        let text = wide.render(&[], false, None).unwrap_err().to_string();
        assert!(
            text.contains("evil.gguf") && text.contains("wrote more than"),
            "{text}"
        );
        // An empty pattern matches between every character: one call multiplies the length.
        for source in [
            "{{ ('x' * 1000).replace('', 'y' * 2000) }}",
            "{{ ('x' * 1000) | replace('', 'y' * 2000) }}",
        ] {
            let grow = ChatTemplate::new(source, None, None, "grow.jinja");
            let text = grow.render(&[], false, None).unwrap_err().to_string();
            assert!(
                text.contains("grow.jinja")
                    && text.contains("would build a string of 2003000 bytes"),
                "{source}: {text}"
            );
        }
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ tools | tojson }}|{{ tools | tojson(indent=2) }}",
            None,
            None,
            "test",
        );
        let tools = serde_json::json!([{"name": "f", "args": {"x": "é<"}}]);
        let out = t.render(&[], false, Some(&tools)).unwrap();
        assert_eq!(
            out,
            "[{\"name\": \"f\", \"args\": {\"x\": \"é<\"}}]|[\n  {\n    \"name\": \"f\",\n    \"args\": {\n      \"x\": \"é<\"\n    }\n  }\n]"
        );
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
