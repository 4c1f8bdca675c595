//! JSON as Python's `json.dump(value, f, indent=N)` writes it, byte for byte: what mlx-lm writes
//! for `config.json` and `model.safetensors.index.json`. It differs from serde_json's pretty
//! printer in three ways: floats are `repr`'d (`1e-05`, `500000.0`, `1e+16`), everything outside
//! printable ASCII is escaped as `\uXXXX` (`ensure_ascii`), and there is no final newline.

use std::fmt::Write;

use serde_json::Value;

/// `value` as `json.dump(value, indent=indent)` writes it (keys in the map's order).
pub fn dump(value: &Value, indent: usize) -> String {
    let mut out = String::new();
    write_value(&mut out, value, indent, 0);
    out
}

fn write_value(out: &mut String, value: &Value, indent: usize, depth: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => write!(out, "{i}").expect("a String takes any write"),
            (_, Some(u), _) => write!(out, "{u}").expect("a String takes any write"),
            (_, _, Some(f)) => out.push_str(&float_repr(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            let items = items.iter().map(|v| (None, v));
            write_container(out, ('[', ']'), items, indent, depth);
        }
        Value::Object(map) => {
            let items = map.iter().map(|(k, v)| (Some(k.as_str()), v));
            write_container(out, ('{', '}'), items, indent, depth);
        }
    }
}

/// `[`/`{`, then each item on its own line one level deeper, then the closer on the parent's
/// level; empty containers as `[]` and `{}`.
fn write_container<'a>(
    out: &mut String,
    (open, close): (char, char),
    items: impl ExactSizeIterator<Item = (Option<&'a str>, &'a Value)>,
    indent: usize,
    depth: usize,
) {
    out.push(open);
    let empty = items.len() == 0;
    for (i, (key, value)) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('\n');
        out.push_str(&" ".repeat(indent * (depth + 1)));
        if let Some(key) = key {
            write_string(out, key);
            out.push_str(": ");
        }
        write_value(out, value, indent, depth + 1);
    }
    if !empty {
        out.push('\n');
        out.push_str(&" ".repeat(indent * depth));
    }
    out.push(close);
}

/// A string with `ensure_ascii`: `"` and `\` escaped, the usual control letters as `\n` and the
/// like, everything else outside `' '..='~'` as `\uXXXX` (lower-case hex; UTF-16 surrogate pairs
/// past U+FFFF).
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(out, "\\u{unit:04x}").expect("a String takes any write");
                }
            }
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest digits that read back to `f`, positional when the
/// decimal exponent is in `-4..16` (always with a fractional part: `8.0`), else scientific with
/// a signed exponent of two digits at least (`1e-05`, `1.5e+16`).
fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the same shortest round-trip digits: `d[.ddd]e<exp>`.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} always has an exponent");
    let exp: i32 = exp.parse().expect("{:e}'s exponent is an integer");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if !(-4..16).contains(&exp) {
        let exp_sign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{mantissa}e{exp_sign}{:02}", exp.abs());
    }
    let point = exp + 1; // digits before the decimal point
    let body = if point <= 0 {
        format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
    } else {
        let (int, frac) = digits.split_at(point as usize);
        format!("{int}.{frac}")
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn floats_read_as_python_repr_writes_them() {
        // Each pair checked against CPython 3.12's repr().
        for (f, want) in [
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (500000.0, "500000.0"),
            (8.0, "8.0"),
            (0.02, "0.02"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e16, "1.5e+16"),
            (-2.5e-7, "-2.5e-07"),
            (0.0, "0.0"),
            (123.456, "123.456"),
            (1e100, "1e+100"),
            (0.1 + 0.2, "0.30000000000000004"),
        ] {
            assert_eq!(float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn layout_and_escapes_match_json_dump() {
        let v = json!({"b": [1, 2.5, {"x": null}], "a": {}, "e": [], "s": "é\"\u{1F600}\n"});
        let want = "{\n    \"b\": [\n        1,\n        2.5,\n        {\n            \"x\": null\n        }\n    ],\n    \"a\": {},\n    \"e\": [],\n    \"s\": \"\\u00e9\\\"\\ud83d\\ude00\\n\"\n}";
        assert_eq!(dump(&v, 4), want);
    }
}
