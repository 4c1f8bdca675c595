//! Learning-rate schedules: linear warmup from `warmup_init`, then constant, linear or cosine
//! decay to the floor over the remaining steps.

use crate::recipe::{ScheduleKind, TrainSection};

/// A learning-rate schedule: warmup, then decay to a floor.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// What follows warmup: constant, linear or cosine decay.
    pub kind: ScheduleKind,
    /// The rate after warmup (`learning_rate`).
    pub peak: f64,
    /// Steps of linear warmup from `warmup_init` to `peak`.
    pub warmup_steps: usize,
    /// The rate warmup starts from at step 0.
    pub warmup_init: f64,
    /// The rate decay ends at (`min_learning_rate`); constant schedules never reach it.
    pub floor: f64,
    /// Optimizer steps in the whole run; decay ends at the last.
    pub total_steps: usize,
}

impl Schedule {
    /// The recipe's schedule for a run of `total_steps` optimizer steps.
    pub fn from_recipe(train: &TrainSection, total_steps: usize) -> Self {
        Schedule {
            kind: train.schedule,
            peak: train.learning_rate,
            warmup_steps: train.warmup_steps,
            warmup_init: train.warmup_init,
            floor: train.min_learning_rate,
            total_steps,
        }
    }

    /// The learning rate for optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            let t = step as f64 / self.warmup_steps as f64;
            return self.warmup_init + (self.peak - self.warmup_init) * t;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let t = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        match self.kind {
            ScheduleKind::Constant => self.peak,
            ScheduleKind::Linear => self.peak + (self.floor - self.peak) * t,
            ScheduleKind::Cosine => {
                self.floor
                    + (self.peak - self.floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            peak: 1.0,
            warmup_steps: 10,
            warmup_init: 0.0,
            floor: 0.1,
            total_steps: 110,
        }
    }

    #[test]
    fn warmup_then_decay_to_the_floor() {
        let s = schedule(ScheduleKind::Cosine);
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
        assert_eq!(s.lr(10), 1.0);
        assert!((s.lr(60) - 0.55).abs() < 1e-12);
        assert!((s.lr(110) - 0.1).abs() < 1e-12);
        let l = schedule(ScheduleKind::Linear);
        assert!((l.lr(60) - 0.55).abs() < 1e-12);
        assert_eq!(schedule(ScheduleKind::Constant).lr(100), 1.0);
    }
}
