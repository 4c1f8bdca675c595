//! The two channels between the trainer and everything watching it: [`Event`]s out (the trainer
//! only emits them; sinks consume them and never drive training) and [`Controls`] in (requests
//! the trainer honours between steps).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

/// Requests from outside the trainer (Ctrl-C, the dashboard's keys), honoured between steps.
#[derive(Debug, Default)]
pub struct Controls {
    /// Save a checkpoint after the current step and return.
    pub stop: AtomicBool,
    /// Save a checkpoint after the current step and go on.
    pub save_now: AtomicBool,
    /// Run validation and the held-out generations after the current step.
    pub evaluate_now: AtomicBool,
    /// Wait before the next step until cleared (time paused is not counted in throughput).
    pub paused: AtomicBool,
}

/// In `metrics.jsonl` each event is an object with `"event": "<variant in snake_case>"`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The run is ready for its first step, fresh or resumed; sent once.
    Started {
        /// The run's name.
        name: String,
        /// Optimizer steps in the whole run, counting those done before a resume.
        total_steps: usize,
        /// Steps already done: 0 for a fresh run, the checkpoint's step when resuming.
        start_step: usize,
        /// Elements of the trainable adapter tensors.
        trainable_parameters: usize,
        /// Examples in the training split.
        train_examples: usize,
    },
    /// Loss and throughput since the last report (every `steps_per_report` steps and at the end).
    Train(TrainReport),
    /// The validation split's loss: before a fresh run's first step, every `steps_per_eval`
    /// steps, at the end and on request.
    Validation {
        /// Optimizer steps done when it was measured.
        step: usize,
        /// Mean loss per trained token over the evaluated batches (`val_batches`), with the
        /// routers' load-balancing term where training adds one (as transformers' is).
        loss: f64,
        /// The part of `loss` that is the routers' load-balancing term
        /// (`train.router_aux_loss_coef` · aux), when training adds one.
        #[serde(skip_serializing_if = "Option::is_none")]
        router_aux_loss: Option<f64>,
        /// Wall time the evaluation took, in seconds.
        seconds: f64,
    },
    /// The adapters and the resume checkpoint were written.
    Saved {
        /// Optimizer steps done when they were saved.
        step: usize,
        /// The `adapters/` folder written (mlx-lm layout).
        dir: PathBuf,
    },
    /// Something worth knowing that does not stop the run.
    Warning {
        /// What happened.
        message: String,
    },
    /// The test split's loss once the last step is done (when the data has a test split).
    Test {
        /// Optimizer steps done when it was measured.
        step: usize,
        /// Mean loss per trained token over the whole test split (with the routers' term, as
        /// `Validation`'s).
        loss: f64,
        /// The part of `loss` that is the routers' load-balancing term, when training adds one.
        #[serde(skip_serializing_if = "Option::is_none")]
        router_aux_loss: Option<f64>,
        /// `exp` of the cross-entropy (`loss` without the routers' term).
        perplexity: f64,
    },
    /// Answers to the recipe's held-out prompts, base vs fine-tuned (on request during training,
    /// and by the evaluation at its end).
    Generations {
        /// Optimizer steps done when the answers were generated.
        step: usize,
        /// One row per prompt answered.
        rows: Vec<GenerationRow>,
    },
}

/// One held-out prompt with the base model's and the fine-tuned model's answers.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GenerationRow {
    /// The prompt, sent as a single user turn.
    pub prompt: String,
    /// The base model's answer, without adapters.
    pub base: String,
    /// The answer with the adapters applied.
    pub tuned: String,
}

impl GenerationRow {
    /// The rows as a Markdown table (TensorBoard renders text summaries as Markdown).
    pub fn markdown(rows: &[GenerationRow]) -> String {
        let cell = |s: &str| s.replace('|', "\\|").replace('\n', "<br>");
        let mut out = String::from("| prompt | base | fine-tuned |\n|---|---|---|\n");
        for r in rows {
            out += &format!(
                "| {} | {} | {} |\n",
                cell(&r.prompt),
                cell(&r.base),
                cell(&r.tuned)
            );
        }
        out
    }
}

/// Training loss and throughput over the steps since the previous report.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainReport {
    /// Optimizer steps done.
    pub step: usize,
    /// Mean training loss over the steps since the previous report (with the routers'
    /// load-balancing term where `train.router_aux_loss_coef` adds one, as transformers' is).
    pub loss: f64,
    /// The part of `loss` that is the routers' load-balancing term (coef · aux), when training
    /// adds one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_aux_loss: Option<f64>,
    /// The learning rate of the latest step.
    pub learning_rate: f64,
    /// Mean global gradient norm, before clipping, over the steps since the previous report.
    pub grad_norm: f64,
    /// Optimizer steps per second, not counting pauses, validation or generations.
    pub it_per_sec: f64,
    /// Trained tokens (positions whose loss counts) per second, over the same time.
    pub tokens_per_sec: f64,
    /// Trained tokens so far in the run, across resumes.
    pub trained_tokens: usize,
    /// Peak resident memory of the process in bytes (Linux `VmHWM`); none where unavailable.
    pub peak_memory_bytes: Option<u64>,
}
