//! Progress of long work outside the training loop (loading and quantizing a model, fusing and
//! writing an export, generating an evaluation): an `indicatif` bar in a terminal, and one plain
//! line on stderr when it ends otherwise (pipes, CI). While the training dashboard owns the
//! terminal, bars are off.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

static BARS_OFF: AtomicBool = AtomicBool::new(false);

/// Turns bars off for the rest of the process (the dashboard draws the screen).
pub fn disable_bars() {
    BARS_OFF.store(true, Ordering::SeqCst);
}

/// Progress of one long task: a bar in a terminal, one summary line on stderr otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    unit: String,
    started: Instant,
}

impl Progress {
    /// `label` says what is done to `total` `unit`s, e.g. ("loading model.gguf", 272, "tensors").
    pub fn new(label: impl Into<String>, total: u64, unit: &str) -> Self {
        let label = label.into();
        let interactive = std::io::stderr().is_terminal()
            && std::env::var_os("CI").is_none()
            && !BARS_OFF.load(Ordering::SeqCst);
        let bar = interactive.then(|| {
            let bar = ProgressBar::new(total);
            let template = format!("{{msg}} {{bar:40.cyan/blue}} {{pos}}/{{len}} {unit} ({{eta}})");
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style);
            }
            bar.set_message(label.clone());
            bar
        });
        Progress {
            bar,
            label,
            total,
            unit: unit.to_string(),
            started: Instant::now(),
        }
    }

    /// Counts one more unit done.
    pub fn inc(&self) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    /// Clears the bar, or prints the plain line.
    pub fn finish(self) {
        let seconds = self.started.elapsed().as_secs_f64();
        match self.bar {
            Some(bar) => bar.finish_and_clear(),
            None if !BARS_OFF.load(Ordering::SeqCst) => {
                eprintln!(
                    "{}: {} {} in {seconds:.1} s",
                    self.label, self.total, self.unit
                )
            }
            None => {}
        }
    }
}
