//! The training loop, readable on one screen:
//!
//! ```text
//! for step in start..total:
//!     grads = Σ_k ∇(loss(batch_k) / accumulation)      k over `grad_accumulation` micro-batches
//!     norm  = ‖grads‖ ; clip to max_grad_norm
//!     optimizer.update(params, grads, schedule.lr(step))
//!     report / validate / checkpoint / stop on Ctrl-C
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::ElementConversion;

use super::checkpoint::{self, TrainState};
use super::held_out::HeldOutGenerations;
use super::optimizer::{Optimizer, OptimizerConfig, clip_global_norm, global_norm};
use super::schedule::Schedule;
use super::step::{Batch, batch_loss, loss_and_gradients, parameters, set_parameters};
use crate::data::{BatchPlan, Encoder, encode_split, plan_batches};
use crate::events::{Event, TrainReport};
use crate::lora::{AdapterSpec, files, inject};
use crate::model::load::load_model_quantized;
use crate::model::valid::TrainBackend;
use crate::model::{Decoder, FrozenLinearBackend};
use crate::recipe::Recipe;

pub struct TrainOutcome {
    pub run_dir: PathBuf,
    pub step: usize,
    pub interrupted: bool,
}

/// Where a recipe's run writes (`[output] dir`, or `runs/<name>`).
pub fn run_dir(recipe: &Recipe) -> PathBuf {
    recipe
        .output
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&recipe.name))
}

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

/// Trains the adapters a recipe describes. `resume` continues from a checkpoint folder's run.
pub fn train<B: TrainBackend>(
    recipe: &Recipe,
    resume: Option<&Path>,
    controls: &Controls,
    emit: &mut dyn FnMut(Event),
    device: &B::Device,
) -> Result<TrainOutcome> {
    let storage = crate::backend::base_storage(
        recipe.model.dtype,
        recipe.model.quantize.map(|q| (q.bits, q.group_size)),
        recipe.device,
    )?;
    let resolved = toml::to_string(recipe)?;
    let run_dir = run_dir(recipe);
    let loaded = load_model_quantized::<B>(&recipe.model.path, device, storage)?;
    let tokenizer = crate::tokenizer::for_model(&loaded.files)?;
    let mut model = loaded.decoder;
    // The weights live in the model now; unmapping the file keeps its pages out of the peak.
    drop(loaded.files);
    let spec = AdapterSpec::from_recipe(&recipe.lora, model.config.num_layers)?;
    B::seed(device, recipe.seed);
    inject(&mut model, &spec, device);

    let encoder = Encoder::new(&tokenizer, recipe.data.mask_prompt);
    let plan = |split: &str, batch_size: usize| -> Result<Option<BatchPlan>> {
        let Some((path, examples)) = encode_split(&recipe.data, &encoder, split)? else {
            return Ok(None);
        };
        let plan = plan_batches(&recipe.data, examples, batch_size, &tokenizer, split)
            .with_context(|| path.display().to_string())?;
        Ok(Some(plan))
    };
    let train_plan =
        plan("train", recipe.train.batch_size)?.context("the recipe's data has no train split")?;
    let valid_plan = plan("valid", recipe.train.batch_size)?;
    if train_plan.truncated > 0 {
        emit(Event::Warning {
            message: format!(
                "{} training examples were longer than data.max_seq_len = {} and were truncated",
                train_plan.truncated, recipe.data.max_seq_len
            ),
        });
    }

    let accumulation = recipe.train.grad_accumulation;
    let total_steps = match (recipe.train.iters, recipe.train.epochs) {
        (Some(iters), _) => iters,
        (None, Some(epochs)) => {
            ((epochs * train_plan.len() as f64) / accumulation as f64).ceil() as usize
        }
        (None, None) => train_plan.len().div_ceil(accumulation),
    };
    let schedule = Schedule::from_recipe(&recipe.train, total_steps);
    let mut params = parameters(&model);
    let mut optimizer = Optimizer::new(OptimizerConfig::from_recipe(&recipe.train), &params);
    let mut state = TrainState {
        step: 0,
        consumed: 0,
        trained_tokens: 0,
        recipe: resolved.clone(),
    };
    if let Some(dir) = resume {
        let ckpt = if dir.join("state.json").exists() {
            dir.to_path_buf()
        } else {
            checkpoint::checkpoint_dir(dir)
        };
        state = checkpoint::load_state(&ckpt)?;
        if let Some(diff) = checkpoint::recipe_difference(&state.recipe, &resolved) {
            bail!(
                "cannot resume from {}: it was trained with a different recipe ({diff})",
                ckpt.display()
            );
        }
        files::load_into(&mut model, &ckpt.join("adapters.safetensors"), device)?;
        params = parameters(&model);
        checkpoint::load_optimizer(&ckpt, &mut optimizer, device)?;
        state.recipe = resolved.clone();
    }
    set_parameters(&mut model, &params);
    emit(Event::Started {
        name: recipe.name.clone(),
        total_steps,
        start_step: state.step,
        trainable_parameters: params.iter().map(|p| p.dims()[0]).sum(),
        train_examples: train_plan.examples().len(),
    });

    let base_model = recipe.model.path.display().to_string();
    let save = |model: &Decoder<B>,
                optimizer: &Optimizer<B::InnerBackend>,
                state: &TrainState|
     -> Result<PathBuf> {
        files::save_mlx(
            &run_dir.join("adapters"),
            model,
            &spec,
            &base_model,
            Some(state.step),
        )?;
        files::save_peft(&run_dir.join("peft"), model, &spec, &base_model)?;
        checkpoint::save(&run_dir, model, optimizer, state)
    };
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    crate::io::atomic::write(&run_dir.join("recipe.toml"), resolved.as_bytes())?;

    if let (Some(valid), 0) = (&valid_plan, state.step) {
        // The starting point, so the curve shows how far training moved it.
        let started = Instant::now();
        let loss = evaluate_loss(&model.valid(), valid, recipe.train.val_batches, device);
        emit(Event::Validation {
            step: 0,
            loss,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let mut held_out = recipe
        .eval
        .prompts
        .as_deref()
        .map(HeldOutGenerations::read)
        .transpose()?;
    let mut window = Window::start();
    let mut last_saved: Option<usize> = resume.map(|_| state.step);
    while state.step < total_steps {
        let paused = Instant::now();
        while controls.paused.load(Ordering::SeqCst) && !controls.stop.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        window.exclude(paused.elapsed());
        B::seed(device, recipe.seed.wrapping_add(state.step as u64 + 1));
        let mut accumulated: Option<Vec<_>> = None;
        let mut loss_sum = 0.0;
        for _ in 0..accumulation {
            let batch = next_batch(&train_plan, recipe.seed, state.consumed);
            state.consumed += 1;
            let (loss, grads) = loss_and_gradients(
                &model,
                &batch,
                1.0 / accumulation as f64,
                recipe.train.grad_checkpoint,
                device,
            );
            loss_sum += loss;
            window.tokens += batch.inputs.len() - batch.mask.iter().filter(|&&m| m == 0.0).count();
            state.trained_tokens += batch.trained_tokens();
            accumulated = Some(match accumulated {
                None => grads,
                Some(acc) => acc.into_iter().zip(grads).map(|(a, g)| a + g).collect(),
            });
        }
        let loss = loss_sum / accumulation as f64;
        if !loss.is_finite() {
            let kept = last_saved.map_or("no checkpoint was written yet".to_string(), |s| {
                format!(
                    "the last good checkpoint (step {s}) is in {}",
                    checkpoint::checkpoint_dir(&run_dir).display()
                )
            });
            bail!(
                "the training loss became {loss} at step {}; stopped without saving this step, and {kept}. Lower train.learning_rate or check the data, then resume with --resume",
                state.step + 1
            );
        }
        let mut grads = accumulated.expect("at least one micro-batch");
        let norm = global_norm(&grads);
        if let Some(max) = recipe.train.max_grad_norm {
            clip_global_norm(&mut grads, norm, max);
        }
        let lr = schedule.lr(state.step);
        optimizer.update(&mut params, &grads, lr);
        set_parameters(&mut model, &params);
        state.step += 1;
        window.add(loss, norm);

        if state.step.is_multiple_of(recipe.train.steps_per_report) || state.step == total_steps {
            emit(Event::Train(window.report(
                state.step,
                lr,
                state.trained_tokens,
            )));
            window = Window::start();
        }
        let asked = controls.evaluate_now.swap(false, Ordering::SeqCst);
        let evaluate = state.step.is_multiple_of(recipe.train.steps_per_eval)
            || state.step == total_steps
            || asked;
        if let (Some(held_out), true) = (&mut held_out, asked) {
            let started = Instant::now();
            // A prompt the template cannot render must not end the run: it becomes a warning.
            emit(
                match held_out.generate(&model.valid(), &tokenizer, &recipe.eval, device) {
                    Ok(rows) => Event::Generations {
                        step: state.step,
                        rows,
                    },
                    Err(e) => Event::Warning {
                        message: format!("held-out generations failed: {e:#}"),
                    },
                },
            );
            window.exclude(started.elapsed());
        }
        if let (Some(valid), true) = (&valid_plan, evaluate) {
            let started = Instant::now();
            let loss = evaluate_loss(&model.valid(), valid, recipe.train.val_batches, device);
            emit(Event::Validation {
                step: state.step,
                loss,
                seconds: started.elapsed().as_secs_f64(),
            });
            window.exclude(started.elapsed());
        }
        let interrupted = controls.stop.load(Ordering::SeqCst);
        if state.step.is_multiple_of(recipe.train.save_every)
            || state.step == total_steps
            || interrupted
            || controls.save_now.swap(false, Ordering::SeqCst)
        {
            save(&model, &optimizer, &state)?;
            last_saved = Some(state.step);
            emit(Event::Saved {
                step: state.step,
                dir: run_dir.join("adapters"),
            });
        }
        if interrupted {
            return Ok(TrainOutcome {
                run_dir,
                step: state.step,
                interrupted: true,
            });
        }
    }
    if let Some(test) = plan("test", recipe.train.batch_size)? {
        let loss = evaluate_loss(&model.valid(), &test, -1, device);
        emit(Event::Test {
            step: state.step,
            loss,
            perplexity: loss.exp(),
        });
    }
    Ok(TrainOutcome {
        run_dir,
        step: state.step,
        interrupted: false,
    })
}

/// The micro-batch at cursor `consumed`: epoch `consumed / n`, position `consumed % n`.
fn next_batch(plan: &BatchPlan, seed: u64, consumed: usize) -> Batch {
    let (epoch, position) = (consumed / plan.len(), consumed % plan.len());
    plan.batch(plan.epoch_order(seed, epoch)[position])
}

/// Token-weighted mean loss over the first `max_batches` batches (all when negative): a fixed
/// subset, the same at every evaluation.
pub fn evaluate_loss<B: FrozenLinearBackend>(
    model: &Decoder<B>,
    plan: &BatchPlan,
    max_batches: i64,
    device: &B::Device,
) -> f64 {
    let n = if max_batches < 0 {
        plan.len()
    } else {
        (max_batches as usize).min(plan.len())
    };
    let (mut sum, mut count) = (0.0, 0usize);
    for i in 0..n {
        let batch = plan.batch(i);
        let tokens = batch.trained_tokens();
        let loss = batch_loss(model, &batch, device)
            .into_scalar()
            .elem::<f64>();
        sum += loss * tokens as f64;
        count += tokens;
    }
    sum / count.max(1) as f64
}

/// Throughput and loss averaged over the steps since the last report.
struct Window {
    started: Instant,
    excluded: std::time::Duration,
    steps: usize,
    loss: f64,
    norm: f64,
    tokens: usize,
}

impl Window {
    fn start() -> Self {
        Window {
            started: Instant::now(),
            excluded: Default::default(),
            steps: 0,
            loss: 0.0,
            norm: 0.0,
            tokens: 0,
        }
    }

    fn add(&mut self, loss: f64, norm: f64) {
        self.steps += 1;
        self.loss += loss;
        self.norm += norm;
    }

    fn exclude(&mut self, d: std::time::Duration) {
        self.excluded += d;
    }

    fn report(&self, step: usize, lr: f64, trained_tokens: usize) -> TrainReport {
        let secs = (self.started.elapsed() - self.excluded)
            .as_secs_f64()
            .max(1e-9);
        let steps = self.steps.max(1) as f64;
        TrainReport {
            step,
            loss: self.loss / steps,
            learning_rate: lr,
            grad_norm: self.norm / steps,
            it_per_sec: self.steps as f64 / secs,
            tokens_per_sec: self.tokens as f64 / secs,
            trained_tokens,
            peak_memory_bytes: crate::backend::peak_rss_bytes(),
        }
    }
}
