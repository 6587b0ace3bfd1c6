//! Fine-tuning: the protocol's settings, the learning-rate schedule, the optimiser, the metrics and
//! the explicit training loop that ties them to a `SequenceClassifier`.

pub mod checkpoint;
pub mod config;
pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod session;

pub use config::{Batching, EvalEvery, TrainConfig};
pub mod evaluate;
pub mod finetune;
pub mod local_data;

pub use evaluate::{evaluate, predict, score};
pub use finetune::{finetune, LabeledSet, Outcome, StepReport, Trainee};

#[cfg(test)]
pub(crate) mod toy;
