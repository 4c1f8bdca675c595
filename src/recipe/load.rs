//! Reading a recipe: `extends` chains, `--set key=value` overrides, and errors that name the
//! file, line, column and key, with the closest valid key when one was misspelt.

use std::path::{Path, PathBuf};

use toml::Table;

use super::schema::{Layers, Recipe, Targets};
use crate::quant::affine::SUPPORTED_BITS;

/// Why a recipe could not be loaded; every message names the file, the line and column, or the
/// key at fault.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// A recipe file could not be read.
    #[error("cannot read recipe {path}: {source}")]
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A syntax error, unknown key or wrong type at a place in one file.
    #[error("{path}:{line}:{column}: {message}")]
    At {
        /// The file holding the mistake.
        path: PathBuf,
        /// Line of the mistake, counted from 1.
        line: usize,
        /// Column of the mistake, counted from 1.
        column: usize,
        /// What is wrong, with the closest valid key when a key was misspelt.
        message: String,
    },
    /// A mistake in a file as a whole: a bad or cyclic `extends`, or an error (a missing key,
    /// say) in the recipe merged from its `extends` chain and overrides.
    #[error("{path}: {message}")]
    File {
        /// The file at fault; for the merged recipe, the file that was loaded.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A `--set` assignment that is malformed or names an unknown key.
    #[error("--set {assignment}: {message}")]
    Override {
        /// The assignment as given, `section.key=value`.
        assignment: String,
        /// What is wrong with it.
        message: String,
    },
    /// A recipe that parses but is refused: a value out of range, keys in conflict, or no data.
    #[error("recipe key `{key}`: {message}")]
    Invalid {
        /// The key at fault, as `section.key`.
        key: String,
        /// Why the value is refused.
        message: String,
    },
}

/// Loads `path`, following `extends`, then applies `overrides` (`section.key=value`).
pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe, RecipeError> {
    let mut table = load_table(path, &mut Vec::new())?;
    for assignment in overrides {
        apply_override(&mut table, assignment)?;
    }
    let mut recipe: Recipe = Table::try_into(table).map_err(|e| RecipeError::File {
        path: path.to_path_buf(),
        message: describe_merged_error(&e, !overrides.is_empty()),
    })?;
    if recipe.name.is_empty() {
        recipe.name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
    }
    recipe.model.path = expand_home(&recipe.model.path);
    validate(&recipe)?;
    Ok(recipe)
}

/// Parses recipe text that extends nothing (for tests and embedded recipes).
pub fn load_str(text: &str, shown_path: &Path) -> Result<Recipe, RecipeError> {
    let table = parse_checked(text, shown_path)?;
    let recipe: Recipe = Table::try_into(table).map_err(|e| RecipeError::File {
        path: shown_path.to_path_buf(),
        message: describe_merged_error(&e, false),
    })?;
    validate(&recipe)?;
    Ok(recipe)
}

fn load_table(path: &Path, chain: &mut Vec<PathBuf>) -> Result<Table, RecipeError> {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if chain.contains(&canonical) {
        return Err(RecipeError::File {
            path: path.to_path_buf(),
            message: "`extends` forms a cycle".into(),
        });
    }
    chain.push(canonical);
    let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut table = parse_checked(&text, path)?;
    let Some(parent) = table.remove("extends") else {
        return Ok(table);
    };
    let parent = parent.as_str().ok_or_else(|| RecipeError::File {
        path: path.to_path_buf(),
        message: "`extends` must be a path string".into(),
    })?;
    let parent_path = path.parent().unwrap_or(Path::new(".")).join(parent);
    let mut base = load_table(&parent_path, chain)?;
    merge(&mut base, table);
    Ok(base)
}

/// Parses one file and checks its keys and value types against the schema, so that mistakes are
/// reported with this file's line and column. Missing keys are not errors here: a parent or a
/// `--set` may supply them.
fn parse_checked(text: &str, path: &Path) -> Result<Table, RecipeError> {
    let at = |e: &toml::de::Error| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        let section = section_at(text, line);
        RecipeError::At {
            path: path.to_path_buf(),
            line,
            column,
            message: describe(e.message(), section.as_deref()),
        }
    };
    let table: Table = toml::from_str(text).map_err(|e| at(&e))?;
    if let Err(e) = toml::from_str::<Recipe>(text)
        && !e.message().starts_with("missing field")
    {
        return Err(at(&e));
    }
    Ok(table)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// The `[section]` header in force at `line`, if any.
fn section_at(text: &str, line: usize) -> Option<String> {
    text.lines()
        .take(line)
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .map(|s| s.trim_matches('[').trim().to_string())
        })
        .last()
}

/// Rewrites serde's messages into ones that say where and what to do.
fn describe(message: &str, section: Option<&str>) -> String {
    let place = section.map(|s| format!(" in [{s}]")).unwrap_or_default();
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let (key, expected) = rest.split_once('`').unwrap_or((rest, ""));
    let valid: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let suggestion = valid
        .iter()
        .map(|v| (strsim::damerau_levenshtein(key, v), *v))
        .filter(|(d, v)| *d <= 3.max(v.len() / 3))
        .min()
        .map(|(_, v)| format!("; did you mean `{v}`?"))
        .unwrap_or_default();
    format!(
        "unknown key `{key}`{place}{suggestion} (valid keys: {})",
        valid.join(", ")
    )
}

fn describe_merged_error(e: &toml::de::Error, with_overrides: bool) -> String {
    let msg = e.message();
    let msg = match msg.strip_prefix("missing field `") {
        Some(rest) => format!(
            "required key `{}` is missing; add it to the recipe",
            rest.trim_end_matches('`')
        ),
        None => describe(msg, None),
    };
    if with_overrides {
        format!("{msg} (after applying --set overrides)")
    } else {
        msg
    }
}

/// Deep merge: tables merge key by key, anything else in `over` replaces `base`.
fn merge(base: &mut Table, over: Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Parts a `--set` key may have; recipes nest three deep, one spare.
const MAX_KEY_PARTS: usize = 4;

fn apply_override(table: &mut Table, assignment: &str) -> Result<(), RecipeError> {
    let err = |message: String| RecipeError::Override {
        assignment: assignment.to_string(),
        message,
    };
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| err("expected KEY=VALUE, e.g. train.learning_rate=2e-4".into()))?;
    let parsed = toml::from_str::<Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    // A bare word (`model.path=/x/y`) is taken as a string; something that starts like a TOML
    // string, array or table but does not parse is a mistake, not a string.
    let value = match parsed {
        Some(value) => value,
        None if raw.trim_start().starts_with(['"', '\'', '[', '{']) => {
            return Err(err(format!(
                "`{raw}` is not a TOML value (an unterminated quote or bracket?)"
            )));
        }
        None => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    // The deepest recipe key has three parts (`model.quantize.bits`); a key of thousands
    // would nest as many tables, and dropping or printing them recurses once a level
    // (found by fuzzing: a stack overflow).
    if parts.len() > MAX_KEY_PARTS {
        return Err(err(format!(
            "a recipe key has at most {MAX_KEY_PARTS} dot-separated parts (section.key or section.table.key); this one has {}",
            parts.len()
        )));
    }
    let (last, parents) = parts.split_last().ok_or_else(|| err("empty key".into()))?;
    let mut current = &mut *table;
    for part in parents {
        current = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(Table::new()))
            .as_table_mut()
            .ok_or_else(|| err(format!("`{part}` is not a section")))?;
    }
    // A table merges into the one there (`--set 'train={iters=1}'` sets one key, it does not
    // reset the rest of [train]).
    merge(current, Table::from_iter([(last.to_string(), value)]));
    // Check the key exists, so a typo in --set is caught like one in a file.
    let probe = toml::to_string(&*table).unwrap_or_default();
    if let Err(e) = toml::from_str::<Recipe>(&probe)
        && e.message().starts_with("unknown field")
    {
        return Err(err(describe(e.message(), None)));
    }
    Ok(())
}

fn expand_home(path: &Path) -> PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => path.to_path_buf(),
    }
}

fn validate(r: &Recipe) -> Result<(), RecipeError> {
    let invalid = |key: &str, message: String| {
        Err(RecipeError::Invalid {
            key: key.to_string(),
            message,
        })
    };
    if r.lora.rank == 0 {
        return invalid(
            "lora.rank",
            "must be at least 1 (typical values: 8, 16, 64)".into(),
        );
    }
    if r.lora.scale.is_some() && r.lora.alpha.is_some() {
        return invalid(
            "lora.scale",
            "give either `scale` or `alpha`, not both".into(),
        );
    }
    if !(0.0..1.0).contains(&r.lora.dropout) {
        return invalid(
            "lora.dropout",
            format!("{} is outside [0, 1)", r.lora.dropout),
        );
    }
    if let Targets::Named(name) = &r.lora.targets
        && name != "all-linear"
    {
        return invalid(
            "lora.targets",
            format!(
                "\"{name}\" is not a target set; use \"all-linear\" or a list of keys such as [\"self_attn.q_proj\", \"mlp.down_proj\"]"
            ),
        );
    }
    if let Some(distributed) = &r.distributed
        && let Err(e) = distributed.gpus.check()
    {
        return invalid("distributed.gpus", e);
    }
    if let Layers::Last(n) = r.lora.layers
        && (n == 0 || n < -1)
    {
        return invalid(
            "lora.layers",
            format!("{n}: use -1 for every block, N > 0 for the last N, or a list"),
        );
    }
    if let Some(q) = &r.model.quantize {
        if !SUPPORTED_BITS.contains(&q.bits) {
            return invalid(
                "model.quantize.bits",
                format!("{} is not one of {SUPPORTED_BITS:?}", q.bits),
            );
        }
        if ![32, 64, 128].contains(&q.group_size) {
            return invalid(
                "model.quantize.group_size",
                format!("{} is not one of 32, 64, 128", q.group_size),
            );
        }
    }
    if r.data.path.is_none() && r.data.train.is_none() {
        return invalid(
            "data.path",
            "give a dataset folder (`path`) or a `train` file".into(),
        );
    }
    if r.data.max_seq_len == 0 {
        return invalid("data.max_seq_len", "must be positive".into());
    }
    let t = &r.train;
    if t.batch_size == 0 || t.grad_accumulation == 0 {
        return invalid(
            "train.batch_size",
            "batch_size and grad_accumulation must be at least 1".into(),
        );
    }
    if t.learning_rate <= 0.0 || !t.learning_rate.is_finite() {
        return invalid(
            "train.learning_rate",
            format!("{} must be a positive number", t.learning_rate),
        );
    }
    if t.iters == Some(0) || t.epochs.is_some_and(|e| !(e > 0.0 && e.is_finite())) {
        return invalid(
            "train.iters",
            "iters must be at least 1 and epochs a positive number".into(),
        );
    }
    if t.iters.is_some() && t.epochs.is_some() {
        return invalid(
            "train.iters",
            "give either `iters` or `epochs`, not both".into(),
        );
    }
    if t.steps_per_report == 0 || t.steps_per_eval == 0 || t.save_every == 0 {
        return invalid(
            "train.steps_per_report",
            "steps_per_report, steps_per_eval and save_every must be at least 1".into(),
        );
    }
    if t.offload_checkpoints && !t.grad_checkpoint {
        return invalid(
            "train.offload_checkpoints",
            "offloads the checkpoints of `grad_checkpoint`: set `grad_checkpoint = true` too"
                .into(),
        );
    }
    if t.router_aux_loss_coef
        .is_some_and(|c| !(c >= 0.0 && c.is_finite()))
    {
        return invalid(
            "train.router_aux_loss_coef",
            "must be a number ≥ 0 (Mixtral's and Qwen3-MoE's configs say 0.001; leave it out for none)"
                .into(),
        );
    }
    if t.max_grad_norm.is_some_and(|n| !(n > 0.0 && n.is_finite())) {
        return invalid(
            "train.max_grad_norm",
            "must be a positive number (leave it out to disable clipping)".into(),
        );
    }
    // Each of these reaches every parameter through the update: a NaN or an eps of 0 (which
    // divides by zero wherever a gradient is zero) would turn the adapters into NaN.
    if !(t.eps > 0.0 && t.eps.is_finite()) {
        return invalid(
            "train.eps",
            format!(
                "{} must be a positive number (AdamW's default is 1e-8)",
                t.eps
            ),
        );
    }
    for (key, value) in [
        ("train.weight_decay", t.weight_decay),
        ("train.warmup_init", t.warmup_init),
        ("train.min_learning_rate", t.min_learning_rate),
    ] {
        if !(value >= 0.0 && value.is_finite()) {
            return invalid(key, format!("{value} must be a finite number, 0 or more"));
        }
    }
    if let Some(b) = t.betas.iter().find(|b| !(0.0..1.0).contains(*b)) {
        return invalid(
            "train.betas",
            format!("{b} is outside [0, 1) (AdamW's defaults are [0.9, 0.999])"),
        );
    }
    if t.val_batches == 0 || t.val_batches < -1 {
        return invalid(
            "train.val_batches",
            format!(
                "{}: use -1 for the whole split or N > 0 for the first N batches",
                t.val_batches
            ),
        );
    }
    for (key, value) in [("lora.scale", r.lora.scale), ("lora.alpha", r.lora.alpha)] {
        if value.is_some_and(|v| !v.is_finite()) {
            return invalid(key, "must be a finite number".into());
        }
    }
    if r.name.is_empty() || r.name == "." || r.name == ".." || r.name.contains(['/', '\\']) {
        return invalid(
            "name",
            format!(
                "\"{}\" is not a plain name: the run is written to runs/<name>; use letters, digits, '-', '_' or '.' (set [output] dir for another folder)",
                r.name
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_from_one() {
        assert_eq!(line_col("a\nbc\nd", 3), (2, 2));
        assert_eq!(line_col("abc", 0), (1, 1));
    }

    #[test]
    fn merge_is_deep() {
        let mut base: Table =
            toml::from_str("[train]\nbatch_size = 4\nlearning_rate = 1e-5").unwrap();
        merge(
            &mut base,
            toml::from_str("[train]\nbatch_size = 8").unwrap(),
        );
        assert_eq!(base["train"]["batch_size"].as_integer(), Some(8));
        assert_eq!(base["train"]["learning_rate"].as_float(), Some(1e-5));
    }
}
