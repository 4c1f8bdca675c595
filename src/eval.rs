//! `loraforge eval`: generations on the recipe's held-out prompts from the base model, the
//! fine-tuned one (base + adapters) and, when the run exported one, the fused export, side by
//! side, with `expected` (exact match) and `expected_contains` scores and the run's test loss;
//! written to `eval.md` and `eval.json` in the run folder.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::generate::held_out::Responder;
use crate::io::atomic;
use crate::model::load::load_model_quantized;
use crate::ops::ModelBackend;
use crate::recipe::Recipe;

/// One model's answer and its scores.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// The generated answer.
    pub text: String,
    /// Every `expected_contains` string appears in the answer (false when there are none).
    pub contains: bool,
    /// The answer equals `expected`, surrounding whitespace aside (false without `expected`).
    pub exact: bool,
}

/// One held-out prompt, what it expects, and each model's answer.
#[derive(Debug, Clone, Serialize)]
pub struct EvalRow {
    /// The held-out prompt.
    pub prompt: String,
    /// The exact answer expected, when the prompt gives one.
    pub expected: Option<String>,
    /// Strings the answer should contain.
    pub expected_contains: Vec<String>,
    /// The base model's answer.
    pub base: Answer,
    /// The answer of the base with the adapters attached.
    pub tuned: Answer,
    /// The fused export's answer, when one was compared.
    pub fused: Option<Answer>,
}

/// The share of rows whose answer passes, per model.
#[derive(Debug, Clone, Serialize)]
pub struct Rates {
    /// Share of rows the base model passes, from 0 to 1.
    pub base: f64,
    /// Share of rows the fine-tuned model passes.
    pub tuned: f64,
    /// Share of rows the fused export passes; none when there was no export.
    pub fused: Option<f64>,
}

/// What `loraforge eval` found, as written to `eval.json`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The adapter folder evaluated.
    pub adapters: PathBuf,
    /// The fused export compared, when there was one.
    pub fused: Option<PathBuf>,
    /// One row per held-out prompt.
    pub rows: Vec<EvalRow>,
    /// Pass rates for `expected_contains` over all rows (a row without any counts as a miss).
    pub contains_rate: Rates,
    /// Only over rows with an `expected` answer; `None` when none has one.
    pub exact_match_rate: Option<Rates>,
    /// The fine-tuned model's loss on the test split, from the run's metrics.jsonl.
    pub test_loss: Option<f64>,
    /// `exp(test_loss)`.
    pub test_perplexity: Option<f64>,
}

/// Runs the comparison and writes `eval.md` / `eval.json` into `out_dir`. `fused` is an export
/// folder (or `.gguf` file) to compare as well.
pub fn run<B: ModelBackend>(
    recipe: &Recipe,
    adapters: &Path,
    fused: Option<&Path>,
    out_dir: &Path,
    device: &B::Device,
) -> Result<EvalReport> {
    let prompts_path = recipe
        .eval
        .prompts
        .as_ref()
        .context("the recipe has no [eval] prompts file")?;
    let prompts = crate::generate::held_out::read(prompts_path)?;
    let storage = crate::model::load::BaseStorage::for_device(
        recipe.model.dtype,
        recipe.model.quantize.map(|q| (q.bits, q.group_size)),
        recipe.device,
    )?;
    // The same base the adapters were trained on (quantized on load for QLoRA recipes).
    let loaded = load_model_quantized::<B>(&recipe.model.path, device, storage)?;
    let tokenizer = crate::tokenizer::for_model(&loaded.files)?;
    let responder = Responder::new(&tokenizer, &recipe.eval)?;
    let base = loaded.decoder;
    let mut tuned = base.clone();
    crate::lora::files::attach(&mut tuned, adapters, device)?;
    // The fused export in the dtype the base ran in (it is not quantized again).
    let fused_storage = crate::model::load::BaseStorage {
        quantize: None,
        ..storage
    };
    let fused_model = fused
        .map(|path| load_model_quantized::<B>(path, device, fused_storage).map(|m| m.decoder))
        .transpose()
        .context("loading the fused export")?;
    let progress = crate::progress::Progress::new(
        "generating on held-out prompts",
        2 + u64::from(fused_model.is_some()),
        "models",
    );
    let questions: Vec<&str> = prompts.iter().map(|p| p.prompt.as_str()).collect();
    let mut answers = |model| -> Result<Vec<String>> {
        let texts = responder.answer_all(model, &questions, device)?;
        progress.inc();
        Ok(texts)
    };
    let base_texts = answers(&base)?;
    let tuned_texts = answers(&tuned)?;
    let fused_texts = fused_model.as_ref().map(&mut answers).transpose()?;
    let rows: Vec<EvalRow> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let answer = |text: &String| Answer {
                contains: !p.expected_contains.is_empty()
                    && p.expected_contains
                        .iter()
                        .all(|e| text.contains(e.as_str())),
                exact: p.expected.as_ref().is_some_and(|e| e.trim() == text.trim()),
                text: text.clone(),
            };
            EvalRow {
                prompt: p.prompt.clone(),
                expected: p.expected.clone(),
                expected_contains: p.expected_contains.clone(),
                base: answer(&base_texts[i]),
                tuned: answer(&tuned_texts[i]),
                fused: fused_texts.as_ref().map(|t| answer(&t[i])),
            }
        })
        .collect();
    progress.finish();
    let rates = |rows: &[&EvalRow], pass: fn(&Answer) -> bool| {
        let share = |n: usize| n as f64 / rows.len().max(1) as f64;
        Rates {
            base: share(rows.iter().filter(|r| pass(&r.base)).count()),
            tuned: share(rows.iter().filter(|r| pass(&r.tuned)).count()),
            fused: fused.map(|_| {
                share(
                    rows.iter()
                        .filter(|r| r.fused.as_ref().is_some_and(pass))
                        .count(),
                )
            }),
        }
    };
    let all: Vec<&EvalRow> = rows.iter().collect();
    let with_expected: Vec<&EvalRow> = rows.iter().filter(|r| r.expected.is_some()).collect();
    let test_loss = last_test_loss(&out_dir.join("metrics.jsonl"));
    let report = EvalReport {
        adapters: adapters.to_path_buf(),
        fused: fused.map(Path::to_path_buf),
        contains_rate: rates(&all, |a| a.contains),
        exact_match_rate: (!with_expected.is_empty()).then(|| rates(&with_expected, |a| a.exact)),
        test_loss,
        test_perplexity: test_loss.map(f64::exp),
        rows,
    };
    std::fs::create_dir_all(out_dir)?;
    atomic::write(
        &out_dir.join("eval.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    atomic::write(&out_dir.join("eval.md"), markdown(&report).as_bytes())?;
    Ok(report)
}

impl EvalReport {
    /// The base and fine-tuned answers, as the trainer's events carry them.
    pub fn generation_rows(&self) -> Vec<crate::events::GenerationRow> {
        self.rows
            .iter()
            .map(|r| crate::events::GenerationRow {
                prompt: r.prompt.clone(),
                base: r.base.text.clone(),
                tuned: r.tuned.text.clone(),
            })
            .collect()
    }
}

/// The last `test` event's loss in a run's metrics.jsonl.
fn last_test_loss(metrics: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(metrics).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "test")
        .find_map(|e| e["loss"].as_f64())
}

/// The report as Markdown (`eval.md`): pass rates, the test loss and a table of the answers.
pub fn markdown(report: &EvalReport) -> String {
    let mut out = String::new();
    let fused = report.fused.is_some();
    let _ = writeln!(out, "# Held-out generations: base vs fine-tuned\n");
    let _ = writeln!(out, "Adapters: `{}`", report.adapters.display());
    if let Some(path) = &report.fused {
        let _ = writeln!(out, "Fused export: `{}`", path.display());
    }
    let _ = writeln!(out);
    let percent = |v: f64| format!("{:.0}%", v * 100.0);
    let line = |name: &str, r: &Rates| {
        let fused = r.fused.map(|f| format!(", fused {}", percent(f)));
        format!(
            "{name}: base {}, fine-tuned {}{}\n",
            percent(r.base),
            percent(r.tuned),
            fused.unwrap_or_default()
        )
    };
    out += &line("Expected text present", &report.contains_rate);
    if let Some(exact) = &report.exact_match_rate {
        out += &line("Exact match", exact);
    }
    if let (Some(loss), Some(ppl)) = (report.test_loss, report.test_perplexity) {
        let _ = writeln!(
            out,
            "Test loss (fine-tuned): {loss:.3}, perplexity {ppl:.3}\n"
        );
    }
    let _ = writeln!(
        out,
        "| prompt | base | fine-tuned |{}\n|---|---|---|{}",
        if fused { " fused export |" } else { "" },
        if fused { "---|" } else { "" }
    );
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', "<br>");
    for r in &report.rows {
        let fused_cell = r
            .fused
            .as_ref()
            .map(|a| format!(" {} |", cell(&a.text)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "| {} | {} | {} |{fused_cell}",
            cell(&r.prompt),
            cell(&r.base.text),
            cell(&r.tuned.text),
        );
    }
    out
}
