//! What the trainer reports. The trainer only emits these; sinks (plain log lines, later the
//! dashboard and TensorBoard) consume them and never drive training.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Started {
        name: String,
        total_steps: usize,
        start_step: usize,
        trainable_parameters: usize,
        train_examples: usize,
    },
    Train(TrainReport),
    Validation {
        step: usize,
        loss: f64,
        seconds: f64,
    },
    Saved {
        step: usize,
        dir: PathBuf,
    },
    Warning(String),
    Test {
        loss: f64,
        perplexity: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    pub step: usize,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub it_per_sec: f64,
    pub tokens_per_sec: f64,
    pub trained_tokens: usize,
    pub peak_memory_bytes: Option<u64>,
}

/// mlx-lm-style progress lines, for pipes and CI logs.
pub fn plain_line(event: &Event) -> String {
    match event {
        Event::Started {
            name,
            total_steps,
            start_step,
            trainable_parameters,
            train_examples,
        } => format!(
            "Training {name}: {trainable_parameters} trainable parameters, {train_examples} examples, steps {}..{total_steps}",
            start_step + 1
        ),
        Event::Train(r) => format!(
            "Iter {}: Train loss {:.3}, Learning Rate {:.3e}, Grad norm {:.3}, It/sec {:.3}, Tokens/sec {:.1}, Trained Tokens {}, Peak mem {:.3} GB",
            r.step,
            r.loss,
            r.learning_rate,
            r.grad_norm,
            r.it_per_sec,
            r.tokens_per_sec,
            r.trained_tokens,
            r.peak_memory_bytes.unwrap_or(0) as f64 / 1e9
        ),
        Event::Validation {
            step,
            loss,
            seconds,
        } => {
            format!("Iter {step}: Val loss {loss:.3}, Val took {seconds:.3}s")
        }
        Event::Saved { step, dir } => {
            format!("Iter {step}: Saved adapter weights to {}", dir.display())
        }
        Event::Warning(w) => format!("warning: {w}"),
        Event::Test { loss, perplexity } => {
            format!("Test loss {loss:.3}, Test ppl {perplexity:.3}")
        }
    }
}
