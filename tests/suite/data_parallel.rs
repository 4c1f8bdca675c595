//! Data-parallel training on the CPU (issue 22's first acceptance item): 2, 3 and 4 worker
//! threads joined by the in-process communicator train the tiny Llama of the peft parity
//! fixture with the same global batch (6 micro-batches a step) as one worker does alone, and
//! give its losses and final adapters; a run stopped after 2 steps and resumed from rank 0's
//! checkpoint on another number of workers ends where the uninterrupted run does.

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
    let model = crate::peft_parity::model_with_adapters(&dir, &adapters);
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
