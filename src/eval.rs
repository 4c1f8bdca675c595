//! `loraforge eval`: generations on the recipe's held-out prompts from the base model and from
//! the fine-tuned one, side by side, with `expected_contains` scores; written to `eval.md` and
//! `eval.json` in the run folder.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::chat::{ChatTemplate, Message};
use crate::generate::{GenerationLimits, SamplingConfig, generate};
use crate::io::atomic;
use crate::model::FrozenLinearBackend;
use crate::model::load::load_model_quantized;
use crate::recipe::Recipe;

#[derive(Debug, Clone, Deserialize)]
struct HeldOut {
    prompt: String,
    #[serde(default)]
    expected_contains: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalRow {
    pub prompt: String,
    pub base: String,
    pub tuned: String,
    pub expected_contains: Vec<String>,
    pub base_contains: bool,
    pub tuned_contains: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub adapters: PathBuf,
    pub rows: Vec<EvalRow>,
    pub base_contains_rate: f64,
    pub tuned_contains_rate: f64,
}

/// Runs the comparison and writes `eval.md` / `eval.json` into `out_dir`.
pub fn run<B: FrozenLinearBackend>(
    recipe: &Recipe,
    adapters: &Path,
    out_dir: &Path,
    device: &B::Device,
) -> Result<EvalReport> {
    let prompts_path = recipe
        .eval
        .prompts
        .as_ref()
        .context("the recipe has no [eval] prompts file")?;
    let text = std::fs::read_to_string(prompts_path)
        .with_context(|| format!("reading {}", prompts_path.display()))?;
    let prompts: Vec<HeldOut> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", prompts_path.display(), i + 1))
        })
        .collect::<Result<_>>()?;
    crate::backend::check_compute_dtype(recipe.model.dtype)?;
    // The same base the adapters were trained on (quantized on load for QLoRA recipes).
    let quantize = recipe.model.quantize.map(|q| (q.bits, q.group_size));
    let loaded = load_model_quantized::<B>(&recipe.model.path, device, quantize)?;
    let tokenizer = crate::tokenizer::for_model(&loaded.files)?;
    let template = ChatTemplate::from_tokenizer(&tokenizer)?;
    let base = loaded.decoder;
    let mut tuned = base.clone();
    crate::lora::files::attach(&mut tuned, adapters, device)?;
    let sampling = SamplingConfig {
        temperature: recipe.eval.temperature,
        top_p: recipe.eval.top_p,
        seed: recipe.eval.seed,
        ..Default::default()
    };
    let limits = GenerationLimits {
        max_tokens: recipe.eval.max_tokens,
        stop_at_eos: true,
    };
    let mut rows = Vec::new();
    for p in &prompts {
        let text = template.render(&[Message::new("user", &p.prompt)], true, None)?;
        let ids = tokenizer.encode(&text, false)?;
        let answer = |model| -> Result<String> {
            Ok(generate(
                model,
                &tokenizer,
                &ids,
                limits.clone(),
                sampling.clone(),
                device,
                |_| {},
            )?
            .text)
        };
        let (base_text, tuned_text) = (answer(&base)?, answer(&tuned)?);
        let contains = |t: &str| {
            !p.expected_contains.is_empty()
                && p.expected_contains.iter().all(|e| t.contains(e.as_str()))
        };
        rows.push(EvalRow {
            prompt: p.prompt.clone(),
            base_contains: contains(&base_text),
            tuned_contains: contains(&tuned_text),
            base: base_text,
            tuned: tuned_text,
            expected_contains: p.expected_contains.clone(),
        });
    }
    let rate = |f: fn(&EvalRow) -> bool| {
        rows.iter().filter(|r| f(r)).count() as f64 / rows.len().max(1) as f64
    };
    let report = EvalReport {
        adapters: adapters.to_path_buf(),
        base_contains_rate: rate(|r| r.base_contains),
        tuned_contains_rate: rate(|r| r.tuned_contains),
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

pub fn markdown(report: &EvalReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Held-out generations: base vs fine-tuned\n");
    let _ = writeln!(out, "Adapters: `{}`\n", report.adapters.display());
    let _ = writeln!(
        out,
        "Expected text present: base {:.0}%, fine-tuned {:.0}%\n",
        report.base_contains_rate * 100.0,
        report.tuned_contains_rate * 100.0
    );
    let _ = writeln!(out, "| prompt | base | fine-tuned |\n|---|---|---|");
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', "<br>");
    for r in &report.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            cell(&r.prompt),
            cell(&r.base),
            cell(&r.tuned)
        );
    }
    out
}
