//! Data-parallel training on the CPU (issue 22's first acceptance item): 2, 3 and 4 worker
//! threads joined by the in-process communicator train the tiny Llama of the peft parity
//! fixture with the same global batch (6 micro-batches a step) as one worker does alone, and
//! give its losses and final adapters; a run stopped after 2 steps and resumed from rank 0's
//! checkpoint on another number of workers ends where the uninterrupted run does. The training
//! loop on workers (`train_data_parallel`) writes what the one-worker loop writes, and a worker
//! that dies stops the others with an error naming it.

use crate::common;

use std::path::Path;

use burn::backend::{Autodiff, NdArray};
use loraforge::data::Batch;
use loraforge::distributed::{Communicator, InProcess};
use loraforge::train::run_state::{self, TrainState};
use loraforge::train::trainer::{StepSettings, Trainer, parameters};

type B = Autodiff<NdArray<f32>>;

const MICRO_PER_STEP: usize = 6;
const STEPS: usize = 3;

/// The fixture's model with its initial peft adapter (or a checkpoint's adapters and moments).
fn trainer(checkpoint: Option<&Path>) -> Trainer<B> {
    let dir = common::fixture("peft-parity");
    let device = Default::default();
    let adapters = match checkpoint {
        Some(dir) => dir.join("adapters.safetensors"),
        None => dir.join("adapter_init/adapter_model.safetensors"),
    };
    let targets = loraforge::recipe::Targets::Named("all-linear".into());
    let model = crate::peft_parity::model_with_adapters(&dir, &adapters, targets);
    let settings = StepSettings {
        grad_checkpoint: None,
        max_grad_norm: Some(1.0),
    };
    let mut trainer = Trainer::new(model, crate::peft_parity::ADAMW, settings, &device);
    if let Some(dir) = checkpoint {
        run_state::load_optimizer(dir, &mut trainer.optimizer, &device).unwrap();
    }
    trainer
}

fn batches() -> Vec<Batch> {
    crate::peft_parity::batches(&common::fixture("peft-parity/batches.json"))
}

fn flat(trainer: &Trainer<B>) -> Vec<f32> {
    parameters(&trainer.model)
        .into_iter()
        .flat_map(|p| p.into_data().into_vec::<f32>().unwrap())
        .collect()
}

/// Steps `first..last` on every worker of a `world`-sized group; rank 0's checkpoint after
/// `save_after` steps goes to `save` when given. Returns each worker's losses and adapters.
fn run_workers(
    world: usize,
    steps: std::ops::Range<usize>,
    resume: Option<&Path>,
    save: Option<(&Path, usize)>,
) -> Vec<(Vec<f64>, Vec<f32>)> {
    let batches = batches();
    std::thread::scope(|s| {
        let handles: Vec<_> = InProcess::group(world)
            .into_iter()
            .map(|comm| {
                let (batches, steps) = (&batches, steps.clone());
                s.spawn(move || {
                    let mut trainer = trainer(resume);
                    let mut losses = Vec::new();
                    for step in steps {
                        let micro = &batches[step * MICRO_PER_STEP..(step + 1) * MICRO_PER_STEP];
                        let stats = trainer.step_distributed(micro, 1e-2, &comm).unwrap();
                        losses.push(stats.loss);
                        if let Some((dir, after)) = save
                            && comm.rank() == 0
                            && step + 1 == after
                        {
                            let state = TrainState {
                                step: after,
                                consumed: after * MICRO_PER_STEP,
                                trained_tokens: 0,
                                recipe: String::new(),
                            };
                            let optimizer = &trainer.optimizer;
                            run_state::save(dir, &trainer.model, optimizer, &state).unwrap();
                        }
                    }
                    (losses, flat(&trainer))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = common::max_abs_diff(got, want);
    assert!(
        diff <= 1e-5 * scale,
        "{what}: adapters differ by {diff} (largest value {scale})"
    );
}

#[test]
fn workers_train_as_one_worker_with_the_same_global_batch_and_resume_on_another_count() {
    let batches = batches();
    let mut single = trainer(None);
    let mut want_losses = Vec::new();
    for step in 0..STEPS {
        let micro = &batches[step * MICRO_PER_STEP..(step + 1) * MICRO_PER_STEP];
        want_losses.push(single.step(micro, 1e-2).unwrap().loss);
    }
    let want = flat(&single);
    for world in [2, 3, 4] {
        let results = run_workers(world, 0..STEPS, None, None);
        for (rank, (losses, adapters)) in results.iter().enumerate() {
            for (step, (got, want)) in losses.iter().zip(&want_losses).enumerate() {
                let rel = (got - want).abs() / want;
                assert!(
                    rel < 1e-5,
                    "{world} workers, rank {rank}, step {step}: loss {got} vs {want}"
                );
            }
            // Every worker applies the same update to the same sums: the same bits.
            assert_eq!(
                adapters, &results[0].1,
                "rank {rank} of {world} drifted from rank 0"
            );
        }
        assert_close(&format!("{world} workers"), &results[0].1, &want);
        println!("{world} workers: losses {:?}", results[0].0);
    }

    // 3 workers for 2 steps, checkpoint, then 2 workers from it for the last.
    let run = common::temp_dir("data-parallel-resume");
    run_workers(3, 0..2, None, Some((&run, 2)));
    let checkpoint = run_state::checkpoint_dir(&run);
    let resumed = run_workers(2, 2..STEPS, Some(&checkpoint), None);
    let rel = (resumed[0].0[0] - want_losses[2]).abs() / want_losses[2];
    assert!(
        rel < 1e-5,
        "resumed step 2: loss {} vs {}",
        resumed[0].0[0],
        want_losses[2]
    );
    assert_close("resumed on 2 workers", &resumed[0].1, &want);
    std::fs::remove_dir_all(&run).unwrap();
}

/// The training loop itself (`train --gpus`'s, here with worker threads on the CPU): 2 and 3
/// workers over 4 steps of 3 micro-batches (shards of 2 and 1, and of 1 each) write the adapters
/// and report the losses of the one-worker run; only rank 0 writes the run folder.
#[test]
fn the_training_loop_on_workers_writes_the_single_worker_run() {
    let (losses, adapters) = loop_run("dp-loop-1", 1, None);
    for world in [2, 3] {
        let (got, got_adapters) = loop_run(&format!("dp-loop-{world}"), world, None);
        assert_eq!(got.len(), losses.len());
        for (step, (g, w)) in got.iter().zip(&losses).enumerate() {
            assert!(
                ((g - w) / w).abs() < 1e-5,
                "{world} workers, step {step}: loss {g} vs {w}"
            );
        }
        assert_same_adapters(&format!("{world} workers"), &got_adapters, &adapters);
    }
}

/// A worker that dies mid-run (its collective fails at step 3, as a killed rank's peers see it)
/// stops rank 0 with an error naming it and the checkpoint kept (step 2's), which a resume on one
/// worker continues to the single-worker run's end.
#[test]
fn a_dying_worker_stops_the_run_and_the_checkpoint_resumes_on_one_worker() {
    let (want_losses, want) = loop_run("dp-die-ref", 1, None);
    let run = common::tiny_run::tiny_run("dp-die", "");
    let recipe = tiny_recipe(&run);
    // Rank 1 calls three collectives a step (pause, gradients, controls): its 8th is step 3's
    // gradient sum.
    let err = train_on_workers(&recipe, None, 2, Some(8)).unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("worker 1 of 2 stopped")
            && message.contains("the last good checkpoint (step 2)"),
        "{message}"
    );
    let dir = common::tiny_run::run_dir(&run);
    let (losses, adapters) = train_on_workers(&recipe, Some(&dir), 1, None).unwrap();
    assert_eq!(losses.len(), 2, "steps 3 and 4 after the resume");
    for (g, w) in losses.iter().zip(&want_losses[2..]) {
        assert!(((g - w) / w).abs() < 1e-5, "resumed loss {g} vs {w}");
    }
    assert_same_adapters("resumed", &adapters, &want);
}

type Adapters = std::collections::BTreeMap<String, Vec<f32>>;

/// Every adapter tensor within 1e-5 of the other run's, relative to its L2 norm (a few AdamW
/// steps leave the B tensors small, largest values ~4e-3, and summing the gradients in another
/// order moves their 8th digit).
fn assert_same_adapters(what: &str, got: &Adapters, want: &Adapters) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, w) in want {
        let norm = w.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let diff = got[name]
            .iter()
            .zip(w)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(
            diff <= 1e-5 * norm,
            "{what}: {name} differs by {diff:e} (norm {norm:e})"
        );
    }
}

/// The tiny recipe at 4 steps of 3 micro-batches, saving every 2.
fn tiny_recipe(run: &common::tiny_run::TinyRun) -> loraforge::recipe::Recipe {
    let overrides = [
        "train.iters=4",
        "train.grad_accumulation=3",
        "train.save_every=2",
        "train.steps_per_eval=2",
    ]
    .map(String::from);
    loraforge::recipe::load(&run.recipe, &overrides).unwrap()
}

/// Trains the tiny recipe on `world` workers; its losses and final adapters.
fn loop_run(tag: &str, world: usize, resume: Option<&Path>) -> (Vec<f64>, Adapters) {
    let run = common::tiny_run::tiny_run(tag, "");
    let recipe = tiny_recipe(&run);
    let result = train_on_workers(&recipe, resume, world, None).unwrap();
    let dir = common::tiny_run::run_dir(&run);
    assert!(dir.join("recipe.toml").exists() && dir.join("checkpoint/state.json").exists());
    result
}

/// `train_data_parallel` on `world` in-process workers (rank 1's communicator failing on its
/// `fail_at`-th call when given), or the plain loop for one; the reported losses and the saved
/// adapters.
fn train_on_workers(
    recipe: &loraforge::recipe::Recipe,
    resume: Option<&Path>,
    world: usize,
    fail_at: Option<usize>,
) -> anyhow::Result<(Vec<f64>, Adapters)> {
    let device = Default::default();
    let workers: Vec<(_, Box<dyn Communicator>)> = InProcess::group(world)
        .into_iter()
        .map(|comm| {
            let comm: Box<dyn Communicator> = match fail_at {
                Some(calls) if comm.rank() == 1 => Box::new(FailsAt {
                    inner: comm,
                    calls_left: std::cell::Cell::new(calls),
                }),
                _ => Box::new(comm),
            };
            (device, comm)
        })
        .collect();
    let controls = loraforge::events::Controls::default();
    let mut losses = Vec::new();
    let mut emit = |event: loraforge::events::Event| {
        if let loraforge::events::Event::Train(report) = event {
            losses.push(report.loss);
        }
    };
    let outcome = match world {
        1 => loraforge::train::run::train::<B>(recipe, resume, &controls, &mut emit, &device)?,
        _ => loraforge::train::run::train_data_parallel::<B>(
            recipe, resume, &controls, &mut emit, workers,
        )?,
    };
    let adapters = common::tensors(&outcome.run_dir.join("checkpoint/adapters.safetensors"));
    Ok((losses, adapters.into_iter().collect()))
}

/// A worker's communicator that fails on its `calls_left`-th call, as a killed rank's would.
struct FailsAt {
    inner: InProcess,
    calls_left: std::cell::Cell<usize>,
}

impl Communicator for FailsAt {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world(&self) -> usize {
        self.inner.world()
    }

    fn all_reduce_sum(
        &self,
        values: &mut [f32],
    ) -> Result<(), loraforge::distributed::CollectiveError> {
        let left = self.calls_left.get();
        if left <= 1 {
            return Err(loraforge::distributed::CollectiveError::Failed {
                rank: self.rank(),
                reason: "killed".into(),
            });
        }
        self.calls_left.set(left - 1);
        self.inner.all_reduce_sum(values)
    }
}
