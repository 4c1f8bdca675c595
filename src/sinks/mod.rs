//! Consumers of training events: plain log lines (`plain`), `metrics.jsonl` (every event, for
//! scripts), TensorBoard event files, the live dashboard and the loss plot. Each gets every event
//! in order and never feeds anything back to the trainer.

pub mod dashboard;
pub mod plain;
pub mod plot;
pub mod tensorboard;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::events::Event;
use tensorboard::EventFileWriter;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `metrics.jsonl`: one JSON object per event with its wall time, appended across resumes.
pub struct MetricsFile {
    path: PathBuf,
    file: File,
}

impl MetricsFile {
    /// Opens `run_dir/metrics.jsonl` for appending, creating the folder and the file if needed.
    pub fn open(run_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let path = run_dir.join("metrics.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsFile { path, file })
    }

    /// Appends the event as one JSON line, with a `time` field (Unix seconds).
    pub fn write(&mut self, event: &Event) -> Result<()> {
        let mut value = serde_json::to_value(event)?;
        value["time"] = now().into();
        writeln!(self.file, "{value}").with_context(|| format!("writing {}", self.path.display()))
    }
}

/// `{split}/loss`, and `{split}/router_aux_loss` (the part of it that is the routers' term) where
/// training balances a mixture of experts' routers.
fn write_loss(
    w: &mut EventFileWriter,
    split: &str,
    step: i64,
    (loss, router_aux): (f64, Option<f64>),
    t: f64,
) -> Result<()> {
    w.scalar(&format!("{split}/loss"), step, loss as f32, t)?;
    if let Some(aux) = router_aux {
        w.scalar(&format!("{split}/router_aux_loss"), step, aux as f32, t)?;
    }
    Ok(())
}

/// Scalars `train/loss`, `val/loss`, `test/loss`, `test/perplexity`, `learning_rate`,
/// `grad_norm`, `tokens_per_sec`, `it_per_sec`, `memory/peak_gb` (and `*/router_aux_loss` where
/// training balances a mixture of experts' routers); the resolved recipe as text.
pub struct TensorBoard {
    writer: EventFileWriter,
}

impl TensorBoard {
    /// Event files go to `run_dir/tensorboard/`.
    pub fn create(run_dir: &Path, resolved_recipe: &str) -> Result<Self> {
        let t = now();
        let mut writer = EventFileWriter::create(&run_dir.join("tensorboard"), t)?;
        writer.text("recipe", 0, &format!("```toml\n{resolved_recipe}\n```"), t)?;
        Ok(TensorBoard { writer })
    }

    /// Records an event's scalars or text; `Started` and `Saved` events write nothing.
    pub fn write(&mut self, event: &Event) -> Result<()> {
        let t = now();
        let w = &mut self.writer;
        match event {
            Event::Train(r) => {
                let step = r.step as i64;
                write_loss(w, "train", step, (r.loss, r.router_aux_loss), t)?;
                w.scalar("learning_rate", step, r.learning_rate as f32, t)?;
                w.scalar("grad_norm", step, r.grad_norm as f32, t)?;
                w.scalar("tokens_per_sec", step, r.tokens_per_sec as f32, t)?;
                w.scalar("it_per_sec", step, r.it_per_sec as f32, t)?;
                if let Some(bytes) = r.peak_memory_bytes {
                    w.scalar("memory/peak_gb", step, (bytes as f64 / 1e9) as f32, t)?;
                }
            }
            Event::Validation {
                step,
                loss,
                router_aux_loss,
                ..
            } => write_loss(w, "val", *step as i64, (*loss, *router_aux_loss), t)?,
            Event::Test {
                step,
                loss,
                router_aux_loss,
                perplexity,
            } => {
                write_loss(w, "test", *step as i64, (*loss, *router_aux_loss), t)?;
                w.scalar("test/perplexity", *step as i64, *perplexity as f32, t)?;
            }
            Event::Warning { message } => w.text("warnings", 0, message, t)?,
            Event::Generations { step, rows } => w.text(
                "eval/generations",
                *step as i64,
                &crate::events::GenerationRow::markdown(rows),
                t,
            )?,
            Event::Started { .. } | Event::Saved { .. } => {}
        }
        Ok(())
    }
}
