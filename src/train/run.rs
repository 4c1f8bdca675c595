//! The training loop, readable on one screen:
//!
//! ```text
//! for step in start..total:
//!     trainer.step(next K micro-batches, schedule.lr(step))     (trainer.rs)
//!     hooks: report, generations on request, validate, save, stop on Ctrl-C
//! ```
//!
//! Set-up (loading, injection, data, resume) is [`Run::prepare`]; each hook is a method of
//! [`Run`] that emits its event. Data-parallel runs ([`train_data_parallel`]) run this loop on
//! every worker: the step's micro-batches split among them, the leader (rank 0) alone emits
//! events and writes, and what it reads from the controls (stop, save, evaluate, pause) is
//! agreed by every worker before it acts.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use burn::tensor::ElementConversion;

use super::generations::HeldOutGenerations;
use super::optimizer::OptimizerConfig;
use super::recompute::Checkpointing;
use super::run_state::{self, TrainState};
use super::schedule::Schedule;
use super::trainer::{NonFiniteLoss, StepError, StepSettings, StepStats, Trainer, batch_loss};
use crate::data::{Batch, BatchPlan, Encoder, encode_split, plan_batches};
use crate::distributed::{CollectiveError, Communicator, Group};
use crate::events::{Controls, Event, TrainReport};
use crate::lora::{AdapterSpec, files, inject};
use crate::model::Decoder;
use crate::model::load::{BaseStorage, load_model_quantized};
use crate::ops::{ModelBackend, TrainBackend};
use crate::recipe::Recipe;
use crate::tokenizer::Tokenizer;

/// How a training run ended.
pub struct TrainOutcome {
    /// Where it wrote its adapters, checkpoint and logs.
    pub run_dir: PathBuf,
    /// Optimizer steps taken, counting those before a resume.
    pub step: usize,
    /// Stopped on request (Ctrl-C, the dashboard's `q`) before the last step.
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

/// Trains the adapters a recipe describes. `resume` continues from a checkpoint folder's run.
pub fn train<B: TrainBackend>(
    recipe: &Recipe,
    resume: Option<&Path>,
    controls: &Controls,
    emit: &mut dyn FnMut(Event),
    device: &B::Device,
) -> Result<TrainOutcome> {
    recover_interrupted_save(resume, emit)?;
    train_worker::<B>(recipe, resume, controls, emit, device, None)
}

/// Finishes a checkpoint swap that a crash interrupted in the run folder `resume` names (not a
/// checkpoint folder itself), saying so: once, before any worker reads the folder.
fn recover_interrupted_save(resume: Option<&Path>, emit: &mut dyn FnMut(Event)) -> Result<()> {
    if let Some(dir) = resume.filter(|d| !d.join("state.json").exists())
        && let Some(from) = run_state::recover(dir)?
    {
        emit(Event::Warning {
            message: format!(
                "a checkpoint save was interrupted; resuming from {}, moved into place",
                from.display()
            ),
        });
    }
    Ok(())
}

/// [`train`] data-parallel: one worker thread per device of `workers` (rank `r` on
/// `workers[r]`), the global batch of every step the same as one worker's, so the losses and
/// adapters are the single-device run's. Rank 0 runs on this thread and alone emits events and
/// writes the run folder; a worker that fails makes the others stop with an error naming it.
pub fn train_data_parallel<B: TrainBackend>(
    recipe: &Recipe,
    resume: Option<&Path>,
    controls: &Controls,
    emit: &mut dyn FnMut(Event),
    workers: Group<B::Device>,
) -> Result<TrainOutcome> {
    recover_interrupted_save(resume, emit)?;
    let mut workers = workers.into_iter();
    let (device, leader) = workers.next().context("no worker to train on")?;
    std::thread::scope(|s| {
        let others: Vec<_> = workers
            .map(|(device, comm)| {
                s.spawn(move || {
                    train_worker::<B>(recipe, resume, controls, &mut |_| {}, &device, Some(&*comm))
                })
            })
            .collect();
        let outcome = train_worker::<B>(recipe, resume, controls, emit, &device, Some(&*leader));
        // Its end closed, a worker still waiting on rank 0 stops instead of waiting on.
        drop(leader);
        for (rank, worker) in others.into_iter().enumerate() {
            match worker.join() {
                Ok(Err(e)) if outcome.is_ok() => {
                    return Err(e.context(format!("worker {} failed", rank + 1)));
                }
                Err(_) => bail!("worker {} panicked", rank + 1),
                _ => {}
            }
        }
        outcome
    })
}

/// The loop on one worker: alone (`comm` `None`), or as one rank of a data-parallel group.
fn train_worker<B: TrainBackend>(
    recipe: &Recipe,
    resume: Option<&Path>,
    controls: &Controls,
    emit: &mut dyn FnMut(Event),
    device: &B::Device,
    comm: Option<&dyn Communicator>,
) -> Result<TrainOutcome> {
    let leader = comm.is_none_or(|c| c.rank() == 0);
    let mut run = Run::<B>::prepare(recipe, resume, leader, emit, device)?;
    if leader {
        run.validate_at_start(emit);
    }
    let mut window = Window::start();
    while run.state.step < run.total_steps {
        window.exclude(wait_while_paused(controls, comm).map_err(|e| run.lost_peer(e))?);
        B::seed(device, recipe.seed.wrapping_add(run.state.step as u64 + 1));
        let batches = run.next_micro_batches();
        let lr = run.schedule.lr(run.state.step);
        let stats = match comm {
            None => run
                .trainer
                .step(&batches, lr)
                .map_err(|e| run.stopped_on(e))?,
            Some(comm) => {
                run.trainer
                    .step_distributed(&batches, lr, comm)
                    .map_err(|e| match e {
                        StepError::NonFinite(e) => run.stopped_on(e),
                        StepError::Collective(e) => run.lost_peer(e),
                    })?
            }
        };
        run.state.step += 1;
        let tokens: usize = batches.iter().map(Batch::trained_tokens).sum();
        run.state.trained_tokens += tokens;
        window.add(&stats, tokens);

        let step = run.state.step;
        let last = step == run.total_steps;
        if step.is_multiple_of(recipe.train.steps_per_report) || last {
            emit(Event::Train(window.report(
                step,
                lr,
                run.state.trained_tokens,
            )));
            window = Window::start();
        }
        let [asked, interrupted, save_now] = agree(
            comm,
            [
                controls.evaluate_now.swap(false, Ordering::SeqCst),
                controls.stop.load(Ordering::SeqCst),
                controls.save_now.swap(false, Ordering::SeqCst),
            ],
        )
        .map_err(|e| run.lost_peer(e))?;
        if leader {
            if asked {
                window.exclude(run.generations(emit));
            }
            if step.is_multiple_of(recipe.train.steps_per_eval) || last || asked {
                window.exclude(run.validate(emit));
            }
        }
        if step.is_multiple_of(recipe.train.save_every) || last || interrupted || save_now {
            match leader {
                true => run.save(emit)?,
                // What the leader wrote, for this worker's messages.
                false => run.last_saved = Some(step),
            }
        }
        if interrupted {
            return Ok(run.outcome(true));
        }
    }
    if leader {
        run.test(emit)?;
    }
    Ok(run.outcome(false))
}

/// Waits while the dashboard has paused training (every worker, as the leader's controls say);
/// returns the time waited.
fn wait_while_paused(
    controls: &Controls,
    comm: Option<&dyn Communicator>,
) -> Result<Duration, CollectiveError> {
    let started = Instant::now();
    loop {
        let paused =
            controls.paused.load(Ordering::SeqCst) && !controls.stop.load(Ordering::SeqCst);
        if !agree(comm, [paused])?[0] {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The leader's `flags` on every worker (one small all-reduce: the leader's ones, the others'
/// zeros); a lone worker's as they are.
fn agree<const N: usize>(
    comm: Option<&dyn Communicator>,
    flags: [bool; N],
) -> Result<[bool; N], CollectiveError> {
    let Some(comm) = comm else {
        return Ok(flags);
    };
    let mut values = flags.map(|f| if f && comm.rank() == 0 { 1.0 } else { 0.0 });
    comm.all_reduce_sum(&mut values)?;
    Ok(values.map(|v| v > 0.0))
}

/// A run in progress: the trainer, its data and where it saves.
struct Run<'r, B: TrainBackend> {
    recipe: &'r Recipe,
    run_dir: PathBuf,
    trainer: Trainer<B>,
    tokenizer: Tokenizer,
    spec: AdapterSpec,
    train_plan: BatchPlan,
    valid_plan: Option<BatchPlan>,
    total_steps: usize,
    schedule: Schedule,
    state: TrainState,
    held_out: Option<HeldOutGenerations>,
    last_saved: Option<usize>,
    device: B::Device,
}

impl<'r, B: TrainBackend> Run<'r, B> {
    /// Loads the base, injects the adapters, plans the data and, with `resume`, restores the
    /// adapters, optimizer and data cursor of a checkpoint. Emits `Started`.
    /// Only the `leader` writes to the run folder.
    fn prepare(
        recipe: &'r Recipe,
        resume: Option<&Path>,
        leader: bool,
        emit: &mut dyn FnMut(Event),
        device: &B::Device,
    ) -> Result<Self> {
        let storage = BaseStorage::for_device(
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
        let spec = AdapterSpec::from_recipe(&recipe.lora, &model.config)?;
        inject(&mut model, &spec, recipe.seed, device);
        if let Some(coef) = recipe.train.router_aux_loss_coef.filter(|&c| c > 0.0)
            && !model.balance_routers(coef)
        {
            bail!(
                "train.router_aux_loss_coef = {coef}: {} has no experts to balance (it is a `{}` model); remove the key",
                recipe.model.path.display(),
                model.config.family.name()
            );
        }

        let train_plan = plan_split(recipe, &tokenizer, "train")?
            .context("the recipe's data has no train split")?;
        let valid_plan = plan_split(recipe, &tokenizer, "valid")?;
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

        let mut state = TrainState {
            step: 0,
            consumed: 0,
            trained_tokens: 0,
            recipe: resolved.clone(),
        };
        // A checkpoint folder, or a run folder (whose interrupted save the caller finished).
        let checkpoint = resume.map(|dir| match dir.join("state.json").exists() {
            true => dir.to_path_buf(),
            false => run_state::checkpoint_dir(dir),
        });
        if let Some(ckpt) = &checkpoint {
            state = run_state::load_state(ckpt)?;
            if let Some(diff) = run_state::recipe_difference(&state.recipe, &resolved) {
                bail!(
                    "cannot resume from {}: it was trained with a different recipe ({diff})",
                    ckpt.display()
                );
            }
            files::load_into(&mut model, &ckpt.join("adapters.safetensors"), device)?;
            state.recipe = resolved.clone();
        }
        let settings = StepSettings {
            grad_checkpoint: recipe.train.grad_checkpoint.then_some(Checkpointing {
                mlp_chunk_tokens: recipe.train.mlp_chunk_tokens,
                offload: recipe.train.offload_checkpoints,
            }),
            max_grad_norm: recipe.train.max_grad_norm,
        };
        let optimizer = OptimizerConfig::from_recipe(&recipe.train);
        let mut trainer = Trainer::new(model, optimizer, settings, device);
        if let Some(ckpt) = &checkpoint {
            run_state::load_optimizer(ckpt, &mut trainer.optimizer, device)?;
        }
        emit(Event::Started {
            name: recipe.name.clone(),
            total_steps,
            start_step: state.step,
            trainable_parameters: trainer.parameter_count(),
            train_examples: train_plan.examples().len(),
        });
        if leader {
            std::fs::create_dir_all(&run_dir)
                .with_context(|| format!("creating {}", run_dir.display()))?;
            crate::io::atomic::write(&run_dir.join("recipe.toml"), resolved.as_bytes())?;
        }
        let held_out = recipe
            .eval
            .prompts
            .as_deref()
            .map(HeldOutGenerations::read)
            .transpose()?;
        Ok(Run {
            recipe,
            run_dir,
            trainer,
            tokenizer,
            spec,
            train_plan,
            valid_plan,
            total_steps,
            schedule: Schedule::from_recipe(&recipe.train, total_steps),
            last_saved: resume.map(|_| state.step),
            state,
            held_out,
            device: device.clone(),
        })
    }

    /// The next step's micro-batches, advancing the data cursor.
    fn next_micro_batches(&mut self) -> Vec<Batch> {
        (0..self.recipe.train.grad_accumulation)
            .map(|_| {
                let batch = next_batch(&self.train_plan, self.recipe.seed, self.state.consumed);
                self.state.consumed += 1;
                batch
            })
            .collect()
    }

    /// The error for a step whose loss was not finite, saying what was kept.
    fn stopped_on(&self, e: NonFiniteLoss) -> anyhow::Error {
        anyhow::anyhow!(
            "{e} at step {}; stopped without saving this step, and {}. Lower train.learning_rate or check the data, then resume with --resume",
            self.state.step + 1,
            self.kept()
        )
    }

    /// The error for a worker whose collective failed (another worker stopped), saying what was
    /// kept.
    fn lost_peer(&self, e: CollectiveError) -> anyhow::Error {
        anyhow::anyhow!(
            "{e}: stopped at step {}, and {}; resume with --resume (on this or another number of GPUs)",
            self.state.step + 1,
            self.kept()
        )
    }

    /// What a run that stops now keeps: its last checkpoint, if any.
    fn kept(&self) -> String {
        self.last_saved
            .map_or("no checkpoint was written yet".to_string(), |s| {
                format!(
                    "the last good checkpoint (step {s}) is in {}",
                    run_state::checkpoint_dir(&self.run_dir).display()
                )
            })
    }

    /// The starting point's validation loss, so the curve shows how far training moved it.
    fn validate_at_start(&self, emit: &mut dyn FnMut(Event)) {
        if self.state.step == 0 {
            self.validate(emit);
        }
    }

    /// The validation loss now (when the data has a valid split); returns the time it took.
    fn validate(&self, emit: &mut dyn FnMut(Event)) -> Duration {
        let started = Instant::now();
        if let Some(valid) = &self.valid_plan {
            let model = self.trainer.model.valid();
            let batches = first_batches(valid, self.recipe.train.val_batches);
            let eval = evaluate_loss(&model, batches, &self.device);
            emit(Event::Validation {
                step: self.state.step,
                loss: eval.loss,
                router_aux_loss: eval.router_aux,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        started.elapsed()
    }

    /// Held-out answers, base vs now (the dashboard's `e`); returns the time it took. A prompt
    /// the template cannot render must not end the run: it becomes a warning.
    fn generations(&mut self, emit: &mut dyn FnMut(Event)) -> Duration {
        let started = Instant::now();
        if let Some(held_out) = &mut self.held_out {
            let model = self.trainer.model.valid();
            emit(
                match held_out.generate(&model, &self.tokenizer, &self.recipe.eval, &self.device) {
                    Ok(rows) => Event::Generations {
                        step: self.state.step,
                        rows,
                    },
                    Err(e) => Event::Warning {
                        message: format!("held-out generations failed: {e:#}"),
                    },
                },
            );
        }
        started.elapsed()
    }

    /// Writes the adapters (mlx-lm and peft layouts) and the checkpoint for resuming; refuses
    /// (keeping the last checkpoint) when the update left a non-finite value.
    fn save(&mut self, emit: &mut dyn FnMut(Event)) -> Result<()> {
        if !self.trainer.state_is_finite() {
            bail!(
                "the update of step {} left non-finite values in the adapters or AdamW's moments; stopped without saving, and {}. Lower train.learning_rate (check train.eps and train.weight_decay too), then resume with --resume",
                self.state.step,
                self.kept()
            );
        }
        let base_model = self.recipe.model.path.display().to_string();
        let model = &self.trainer.model;
        let step = self.state.step;
        files::save_mlx(
            &self.run_dir.join("adapters"),
            model,
            &self.spec,
            &base_model,
            Some(step),
        )?;
        files::save_peft(&self.run_dir.join("peft"), model, &self.spec, &base_model)?;
        run_state::save(&self.run_dir, model, &self.trainer.optimizer, &self.state)?;
        self.last_saved = Some(step);
        emit(Event::Saved {
            step,
            dir: self.run_dir.join("adapters"),
        });
        Ok(())
    }

    /// The test split's loss, when the data has one.
    fn test(&self, emit: &mut dyn FnMut(Event)) -> Result<()> {
        if let Some(test) = plan_split(self.recipe, &self.tokenizer, "test")? {
            let batches = first_batches(&test, -1);
            let eval = evaluate_loss(&self.trainer.model.valid(), batches, &self.device);
            emit(Event::Test {
                step: self.state.step,
                loss: eval.loss,
                router_aux_loss: eval.router_aux,
                perplexity: (eval.loss - eval.router_aux.unwrap_or(0.0)).exp(),
            });
        }
        Ok(())
    }

    fn outcome(self, interrupted: bool) -> TrainOutcome {
        TrainOutcome {
            run_dir: self.run_dir,
            step: self.state.step,
            interrupted,
        }
    }
}

/// A split of the recipe's data, encoded and planned into batches (`None` when absent).
fn plan_split(recipe: &Recipe, tokenizer: &Tokenizer, split: &str) -> Result<Option<BatchPlan>> {
    let encoder = Encoder::new(tokenizer, recipe.data.mask_prompt).keeping(recipe.data.max_seq_len);
    let Some((path, examples)) = encode_split(&recipe.data, &encoder, split)? else {
        return Ok(None);
    };
    let plan = plan_batches(
        &recipe.data,
        examples,
        recipe.train.batch_size,
        tokenizer,
        split,
    )
    .with_context(|| path.display().to_string())?;
    Ok(Some(plan))
}

/// The micro-batch at cursor `consumed`: epoch `consumed / n`, position `consumed % n`.
fn next_batch(plan: &BatchPlan, seed: u64, consumed: usize) -> Batch {
    let (epoch, position) = (consumed / plan.len(), consumed % plan.len());
    plan.batch(plan.epoch_order(seed, epoch)[position])
}

/// A split's loss, measured as training measures it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Token-weighted mean of the batches' losses: the cross-entropy plus, where training adds
    /// it, the routers' load-balancing term (each batch's, as transformers' evaluation loss).
    pub loss: f64,
    /// The part of `loss` that is the routers' term, when training adds one.
    pub router_aux: Option<f64>,
}

/// The first `max_batches` batches of `plan` (all when negative): a fixed subset, the same at
/// every evaluation.
pub fn first_batches(plan: &BatchPlan, max_batches: i64) -> impl Iterator<Item = Batch> + '_ {
    let n = usize::try_from(max_batches).map_or(plan.len(), |n| n.min(plan.len()));
    (0..n).map(|i| plan.batch(i))
}

/// The loss over `batches`, measured as training measures it.
pub fn evaluate_loss<B: ModelBackend>(
    model: &Decoder<B>,
    batches: impl IntoIterator<Item = Batch>,
    device: &B::Device,
) -> Evaluation {
    let balance = model.router_balance();
    let (mut sum, mut aux_sum, mut count) = (0.0, 0.0, 0.0);
    for batch in batches {
        let tokens = batch.trained_tokens() as f64;
        if let Some(balance) = &balance {
            balance.start(batch.tokens(), 1.0);
        }
        let loss = batch_loss(model, &batch, device)
            .into_scalar()
            .elem::<f64>();
        // The routers counted this batch's choices as they ran; no gradient follows.
        let aux = balance.as_ref().map_or(0.0, |b| b.end());
        sum += (loss + aux) * tokens;
        aux_sum += aux * tokens;
        count += tokens;
    }
    let count = f64::max(count, 1.0);
    Evaluation {
        loss: sum / count,
        router_aux: balance.map(|_| aux_sum / count),
    }
}

/// Throughput and loss averaged over the steps since the last report.
struct Window {
    started: Instant,
    excluded: Duration,
    steps: usize,
    loss: f64,
    router_aux: Option<f64>,
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
            router_aux: None,
            norm: 0.0,
            tokens: 0,
        }
    }

    fn add(&mut self, stats: &StepStats, tokens: usize) {
        self.steps += 1;
        self.loss += stats.loss;
        if let Some(aux) = stats.router_aux {
            *self.router_aux.get_or_insert(0.0) += aux;
        }
        self.norm += stats.grad_norm;
        self.tokens += tokens;
    }

    fn exclude(&mut self, d: Duration) {
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
            router_aux_loss: self.router_aux.map(|aux| aux / steps),
            learning_rate: lr,
            grad_norm: self.norm / steps,
            it_per_sec: self.steps as f64 / secs,
            tokens_per_sec: self.tokens as f64 / secs,
            trained_tokens,
            peak_memory_bytes: crate::backends::peak_rss_bytes(),
        }
    }
}
