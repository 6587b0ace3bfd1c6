//! The training loop, nanoGPT-sized: batches → micro-batches → forward → loss → backward →
//! accumulate → clip → AdamW at the scheduled learning rate → report; evaluate on dev, stop early,
//! keep and restore the best weights.

use super::config::{EvalEvery, TrainConfig};
use super::evaluate::evaluate;
use super::optim::{AdamW, AdamWParams, Clip, Kernel};
use super::schedule::{lr_at, warmup_steps};
use crate::data::{Label, Task};
use crate::model::grad_sink::GradSink;
use crate::model::{Mode, SequenceClassifier};
use crate::tokenize::{epoch_batches, make_batch, Encoded, PadTo};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::SeedableRng;
use std::time::Instant;

/// Tokenized examples with their gold labels.
#[derive(Debug, Clone, Default)]
pub struct LabeledSet {
    pub encoded: Encoded,
    pub labels: Vec<Label>,
}

impl LabeledSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// What the loop trains: a model over the `Var`s of a `VarMap`, and a way to get a model over
/// detached copies of the current weights for evaluation without an autograd graph.
pub struct Trainee<'a> {
    pub model: &'a dyn SequenceClassifier,
    pub varmap: &'a VarMap,
    /// A model sharing the current weights but not tracking gradients (e.g. the architectures'
    /// `inference_model()`); called at each evaluation.
    pub inference: &'a dyn Fn() -> Result<Box<dyn SequenceClassifier>>,
    /// Which parameters (by name) get weight decay.
    pub decay: &'a dyn Fn(&str) -> bool,
}

/// One optimiser step's progress, handed to the caller's reporter.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// 1-based optimiser step just taken.
    pub step: usize,
    /// Planned steps (the schedule's length; early stopping may end sooner).
    pub total_steps: usize,
    /// 0-based epoch the step belongs to.
    pub epoch: usize,
    /// Mean training loss over the step's examples.
    pub loss: f64,
    /// Learning rate the step used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Training throughput of this step (forward, backward and update).
    pub examples_per_sec: f64,
    /// The dev score when this step ended with an evaluation.
    pub dev_score: Option<f64>,
}

/// A step taken whose loss and gradient norm may still be on the device (`finetune` reads them
/// one step later: waiting for them at once would leave a GPU idle while the host prepares the
/// next step).
struct Pending {
    step: usize,
    epoch: usize,
    lr: f64,
    examples: usize,
    /// The micro-batches' weighted losses (f32 scalars, detached).
    losses: Vec<Tensor>,
    clip: Clip,
    started: Instant,
}

impl Pending {
    /// The step's loss (the micro-batches' added in f64) and gradient norm, read back (on a
    /// device, waiting for the step); a loss that is not finite ends the run.
    fn resolve(&self) -> Result<(f64, f64)> {
        let mut loss = 0f64;
        for l in &self.losses {
            loss += l.to_scalar::<f32>()? as f64;
        }
        ensure!(
            loss.is_finite(),
            "step {}: the training loss is {loss}",
            self.step
        );
        Ok((loss, self.clip.norm()?))
    }

    fn report(
        &self,
        total_steps: usize,
        loss: f64,
        grad_norm: f64,
        secs: f64,
        dev_score: Option<f64>,
    ) -> StepReport {
        StepReport {
            step: self.step,
            total_steps,
            epoch: self.epoch,
            loss,
            lr: self.lr,
            grad_norm,
            examples_per_sec: self.examples as f64 / secs.max(1e-9),
            dev_score,
        }
    }
}

/// How a fine-tuning run ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Outcome {
    /// Optimiser steps taken.
    pub steps: usize,
    /// Passes over the training split (fractional when stopped mid-epoch).
    pub epochs: f64,
    /// Training examples processed.
    pub examples_seen: usize,
    /// Best dev score and the step it was reached at (None without a dev split).
    pub best_dev_score: Option<f64>,
    pub best_step: Option<usize>,
    /// Every evaluation: (step, dev score).
    pub evals: Vec<(usize, f64)>,
    /// Mean training loss of each step.
    pub train_loss: Vec<f64>,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
}

/// Checks every label against the task, naming the first bad example.
pub fn check_labels(task: &Task, labels: &[Label], split: &str) -> Result<()> {
    for (i, l) in labels.iter().enumerate() {
        match (task, l) {
            (Task::Classification { labels: names }, Label::Class(c)) => ensure!(
                (*c as usize) < names.len(),
                "{split} example {i}: class {c} but the task has {} labels",
                names.len()
            ),
            (Task::Classification { .. }, Label::Score(s)) => {
                bail!("{split} example {i}: score {s} in a classification task")
            }
            (Task::Regression, _) => {}
        }
    }
    Ok(())
}

/// The loss of one micro-batch (f32), already scaled by `weight` (its share of the step's examples).
fn micro_loss(
    task: &Task,
    logits: &Tensor,
    labels: &[Label],
    weight: f64,
    device: &Device,
) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let loss = match task {
        Task::Classification { .. } => {
            let ids: Vec<u32> = labels
                .iter()
                .map(|l| if let Label::Class(c) = l { *c } else { 0 })
                .collect();
            let target = Tensor::from_vec(ids, labels.len(), device)?;
            candle_nn::loss::cross_entropy(&logits, &target)?
        }
        Task::Regression => {
            let scores: Vec<f32> = labels
                .iter()
                .map(|l| match l {
                    Label::Score(s) => *s,
                    Label::Class(c) => *c as f32,
                })
                .collect();
            let target = Tensor::from_vec(scores, labels.len(), device)?;
            candle_nn::loss::mse(&logits.flatten_all()?, &target)?
        }
    };
    Ok((loss * weight)?)
}

/// Fine-tunes `trainee` on `train`, evaluating on `dev` when given (early stopping and best-weights
/// restore need it). `pad_id` pads the batches; `report` sees every step once, in order: a step
/// ending with an evaluation at once, any other when the next one has been queued (or the loop
/// ends), so that a GPU never waits for the host to read a loss back.
#[allow(clippy::too_many_arguments)]
pub fn finetune(
    trainee: &Trainee,
    task: &Task,
    train: &LabeledSet,
    dev: Option<&LabeledSet>,
    pad_id: u32,
    cfg: &TrainConfig,
    device: &Device,
    report: &mut dyn FnMut(&StepReport),
) -> Result<Outcome> {
    cfg.validate()?;
    ensure!(!train.is_empty(), "the training split is empty");
    ensure!(
        train.encoded.len() == train.len(),
        "train: {} encodings for {} labels",
        train.encoded.len(),
        train.len()
    );
    check_labels(task, &train.labels, "train")?;
    if let Some(dev) = dev {
        ensure!(
            dev.encoded.len() == dev.len(),
            "dev: {} encodings for {} labels",
            dev.encoded.len(),
            dev.len()
        );
        check_labels(task, &dev.labels, "dev")?;
    }
    if device.is_cuda() {
        // Dropout on CUDA draws from the device's generator (on CPU, candle cannot seed it).
        device
            .set_seed(cfg.seed)
            .context("seeding the GPU's random generator")?;
    }

    let hp = AdamWParams {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = AdamW::new(trainee.varmap, hp, trainee.decay, Kernel::Auto)?;
    ensure!(
        opt.vars().next().is_some(),
        "the model has no trainable parameters"
    );
    let vars: Vec<_> = opt.vars().cloned().collect();
    // Block nodes hand their weights' gradients to the sink (model::grad_sink), past the graph.
    let sink = GradSink::for_masters(vars.iter().map(|v| v.as_tensor()))?;
    // CUDA's attention paths take sequences padded to a multiple of 16 tokens (one-pass
    // attention) or 8 (the heads in place), `ops::train_pad_multiple`, within the truncation
    // length (the model's positions hold it).
    let pad = PadTo {
        multiple: crate::model::ops::train_pad_multiple(device),
        limit: cfg.max_length,
    };

    let steps_per_epoch = train.len().div_ceil(cfg.batch_size);
    let total = match cfg.max_steps {
        Some(m) => m.min(steps_per_epoch * cfg.max_epochs),
        None => steps_per_epoch * cfg.max_epochs,
    };
    let warmup = warmup_steps(total, cfg.warmup_ratio);
    let lengths = train.encoded.lengths();
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);

    let mut out = Outcome {
        steps: 0,
        epochs: 0.0,
        examples_seen: 0,
        best_dev_score: None,
        best_step: None,
        evals: Vec::new(),
        train_loss: Vec::with_capacity(total),
        stopped_early: false,
    };
    let mut best_weights: Option<Vec<Tensor>> = None;
    let mut bad_evals = 0usize;

    // A step's loss and gradient norm are read back one step later (or at once where the step
    // ends with an evaluation, which waits for the device anyway), so that on a GPU the host
    // queues the next step before it waits for this one (`Pending`).
    let mut pending: Option<Pending> = None;
    'epochs: for epoch in 0..cfg.max_epochs {
        let batches = epoch_batches(&lengths, cfg.batch_size, cfg.batching, &mut rng);
        let last_batch = batches.len().saturating_sub(1);
        for (b, batch) in batches.iter().enumerate() {
            if out.steps >= total {
                break 'epochs;
            }
            let started = Instant::now();
            let lr = lr_at(out.steps, total, warmup, cfg.lr);
            let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
            let mut losses = Vec::with_capacity(cfg.accumulation_steps());
            for micro in batch.chunks(cfg.micro_batch_size) {
                let inputs = make_batch(&train.encoded, micro, pad_id, pad, device)?;
                let labels: Vec<Label> = micro.iter().map(|&i| train.labels[i]).collect();
                let logits = sink
                    .scope(|| trainee.model.forward(&inputs, Mode::Train))
                    .context("forward pass in train mode")?;
                let weight = micro.len() as f64 / batch.len() as f64;
                let loss = micro_loss(task, &logits, &labels, weight, device)?;
                let store = sink.backward(&loss).context("backward pass")?;
                // Kept without its graph, which the step frees as before.
                losses.push(loss.detach());
                for (acc, var) in grads.iter_mut().zip(&vars) {
                    if let Some(g) = store.get(var.as_tensor()) {
                        *acc = Some(match acc.take() {
                            Some(a) => (a + g)?,
                            None => g.clone(),
                        });
                    }
                }
            }
            let clip = Clip::of(&grads, cfg.max_grad_norm)?;
            opt.step_clipped(&grads, lr, &clip)?;
            drop(grads);
            out.steps += 1;
            out.examples_seen += batch.len();
            // The previous step, now that this one is queued behind it; its time ends where this
            // step's began.
            if let Some(p) = pending.take() {
                let secs = started.duration_since(p.started).as_secs_f64();
                let (loss, grad_norm) = p.resolve()?;
                out.train_loss.push(loss);
                report(&p.report(total, loss, grad_norm, secs, None));
            }
            let this = Pending {
                step: out.steps,
                epoch,
                lr,
                examples: batch.len(),
                losses,
                clip,
                started,
            };

            let due = match cfg.eval_every {
                EvalEvery::Epoch => b == last_batch,
                EvalEvery::Steps { n } => out.steps.is_multiple_of(n),
            } || out.steps == total;
            let Some(dev) = dev.filter(|_| due) else {
                pending = Some(this);
                continue;
            };
            let (loss, grad_norm) = this.resolve()?;
            let secs = started.elapsed().as_secs_f64();
            out.train_loss.push(loss);
            let eval_model = (trainee.inference)().context("building the evaluation model")?;
            let s = evaluate(
                eval_model.as_ref(),
                task,
                &dev.encoded,
                &dev.labels,
                pad_id,
                cfg.micro_batch_size,
                device,
            )
            .with_context(|| format!("evaluating on dev after step {}", out.steps))?;
            out.evals.push((out.steps, s));
            if out.best_dev_score.is_none_or(|best| s > best) {
                out.best_dev_score = Some(s);
                out.best_step = Some(out.steps);
                best_weights = Some(
                    vars.iter()
                        .map(|v| v.as_tensor().copy())
                        .collect::<candle_core::Result<_>>()?,
                );
                bad_evals = 0;
            } else {
                bad_evals += 1;
            }
            report(&this.report(total, loss, grad_norm, secs, Some(s)));
            if cfg.patience.is_some_and(|p| bad_evals >= p) {
                out.stopped_early = true;
                break 'epochs;
            }
        }
    }
    if let Some(p) = pending.take() {
        let (loss, grad_norm) = p.resolve()?;
        let secs = p.started.elapsed().as_secs_f64();
        out.train_loss.push(loss);
        report(&p.report(total, loss, grad_norm, secs, None));
    }
    out.epochs = out.steps as f64 / steps_per_epoch as f64;
    if let Some(best) = best_weights {
        for (var, w) in vars.iter().zip(&best) {
            var.set(w).context("restoring the best weights")?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::decays;
    use crate::train::toy::{toy_varmap, BagOfEmbeddings};
    use crate::train::Batching;

    const VOCAB: usize = 24;

    /// Sequences over tokens 4..24: class 1 iff most tokens are ≥ 14 (linearly separable by a bag
    /// of embeddings). Lengths vary from 3 to 9.
    fn toy_set(n: usize, seed: u64, flip: bool) -> LabeledSet {
        use rand::Rng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut set = LabeledSet::default();
        for _ in 0..n {
            let class = rng.random_range(0..2u32);
            let len = rng.random_range(1..8usize);
            let mut ids = vec![2u32];
            for _ in 0..len {
                let high = rng.random_bool(0.85) == (class == 1);
                ids.push(if high {
                    rng.random_range(14..VOCAB as u32)
                } else {
                    rng.random_range(4..14)
                });
            }
            ids.push(3);
            set.encoded.type_ids.push(vec![0; ids.len()]);
            set.encoded.input_ids.push(ids);
            set.labels
                .push(Label::Class(if flip { 1 - class } else { class }));
        }
        set
    }

    fn task() -> Task {
        Task::Classification {
            labels: vec!["low".into(), "high".into()],
        }
    }

    fn cfg() -> TrainConfig {
        TrainConfig {
            lr: 0.05,
            weight_decay: 0.01,
            warmup_ratio: 0.1,
            batch_size: 16,
            micro_batch_size: 4,
            max_epochs: 6,
            patience: None,
            ..TrainConfig::default()
        }
    }

    fn run(
        vm: &VarMap,
        train: &LabeledSet,
        dev: Option<&LabeledSet>,
        cfg: &TrainConfig,
        report: &mut dyn FnMut(&StepReport),
    ) -> Outcome {
        try_run(vm, &task(), train, dev, cfg, report).unwrap()
    }

    /// `finetune` on the bag-of-embeddings model over `vm`, on the CPU.
    fn try_run(
        vm: &VarMap,
        task: &Task,
        train: &LabeledSet,
        dev: Option<&LabeledSet>,
        cfg: &TrainConfig,
        report: &mut dyn FnMut(&StepReport),
    ) -> Result<Outcome> {
        let model = BagOfEmbeddings::new(vm, false);
        let inference = || -> Result<Box<dyn SequenceClassifier>> {
            Ok(Box::new(BagOfEmbeddings::new(vm, true)))
        };
        let trainee = Trainee {
            model: &model,
            varmap: vm,
            inference: &inference,
            decay: &decays,
        };
        finetune(&trainee, task, train, dev, 0, cfg, &Device::Cpu, report)
    }

    #[test]
    fn loss_falls_on_separable_data_and_runs_are_bit_identical() {
        let (train, dev) = (toy_set(200, 1, false), toy_set(100, 2, false));
        let mut weights = vec![];
        let mut outcomes = vec![];
        for _ in 0..2 {
            let vm = toy_varmap(VOCAB, 8, 2, 42);
            let mut reports = vec![];
            let out = run(&vm, &train, Some(&dev), &cfg(), &mut |r| {
                reports.push(r.clone())
            });
            assert_eq!(reports.len(), out.steps);
            assert_eq!(out.steps, 6 * 13);
            weights.push(BagOfEmbeddings::snapshot(&vm));
            outcomes.push(out);
        }
        let out = &outcomes[0];
        let first: f64 = out.train_loss[..5].iter().sum::<f64>() / 5.0;
        let last: f64 = out.train_loss[out.train_loss.len() - 5..]
            .iter()
            .sum::<f64>()
            / 5.0;
        assert!(last < 0.6 * first, "loss should fall: {first} → {last}");
        assert!(
            out.best_dev_score.unwrap() > 0.85,
            "dev accuracy {:?}",
            out.best_dev_score
        );
        assert_eq!(out.evals.len(), 6);
        assert_eq!(weights[0], weights[1]);
        assert_eq!(outcomes[0], outcomes[1]);
    }

    #[test]
    fn length_bucketing_also_learns() {
        let (train, dev) = (toy_set(200, 1, false), toy_set(100, 2, false));
        let vm = toy_varmap(VOCAB, 8, 2, 42);
        let out = run(
            &vm,
            &train,
            Some(&dev),
            &TrainConfig {
                batching: Batching::LengthBucketed,
                ..cfg()
            },
            &mut |_| {},
        );
        assert!(
            out.best_dev_score.unwrap() > 0.85,
            "dev accuracy {:?}",
            out.best_dev_score
        );
    }

    #[test]
    fn early_stopping_stops_after_patience_and_restores_the_best_weights() {
        // Dev labels are the opposite of train's: dev accuracy peaks at the first evaluation and
        // falls as the model learns, so every later evaluation is a bad one.
        let (train, dev) = (toy_set(200, 1, false), toy_set(100, 2, true));
        let vm = toy_varmap(VOCAB, 8, 2, 42);
        let mut at_eval: Vec<(usize, Vec<Vec<f32>>)> = vec![];
        let cfg = TrainConfig {
            patience: Some(2),
            eval_every: EvalEvery::Steps { n: 5 },
            ..cfg()
        };
        let out = run(&vm, &train, Some(&dev), &cfg, &mut |r| {
            if r.dev_score.is_some() {
                at_eval.push((r.step, BagOfEmbeddings::snapshot(&vm)));
            }
        });
        assert!(out.stopped_early);
        let best = out.best_step.unwrap();
        let best_score = out.best_dev_score.unwrap();
        // Stopped exactly `patience` evaluations after the best one.
        let best_idx = out.evals.iter().position(|&(s, _)| s == best).unwrap();
        assert_eq!(out.evals.len(), best_idx + 1 + 2, "{:?}", out.evals);
        assert!(out.evals[best_idx + 1..]
            .iter()
            .all(|&(_, s)| s <= best_score));
        assert_eq!(out.steps, out.evals.last().unwrap().0);
        // The final weights are the ones seen at the best evaluation, not the last.
        let final_weights = BagOfEmbeddings::snapshot(&vm);
        let best_weights = &at_eval.iter().find(|(s, _)| *s == best).unwrap().1;
        assert_eq!(&final_weights, best_weights);
        assert_ne!(&final_weights, &at_eval.last().unwrap().1);
    }

    #[test]
    fn regression_learns_a_score_with_mse() {
        // The score is the fraction of "high" tokens; dev is scored by Spearman correlation.
        let to_scores = |mut set: LabeledSet| {
            set.labels = set
                .encoded
                .input_ids
                .iter()
                .map(|ids| {
                    let words = &ids[1..ids.len() - 1];
                    Label::Score(
                        words.iter().filter(|&&t| t >= 14).count() as f32 / words.len() as f32,
                    )
                })
                .collect();
            set
        };
        let (train, dev) = (
            to_scores(toy_set(200, 1, false)),
            to_scores(toy_set(100, 2, false)),
        );
        let vm = toy_varmap(VOCAB, 8, 1, 42);
        let out = try_run(
            &vm,
            &Task::Regression,
            &train,
            Some(&dev),
            &cfg(),
            &mut |_| {},
        )
        .unwrap();
        let first = out.train_loss[0];
        let last = *out.train_loss.last().unwrap();
        assert!(last < 0.5 * first, "MSE should fall: {first} → {last}");
        assert!(
            out.best_dev_score.unwrap() > 0.8,
            "dev Spearman {:?}",
            out.best_dev_score
        );
    }

    #[test]
    fn accumulating_4_micro_batches_of_2_equals_one_batch_of_8() {
        let train = toy_set(8, 3, false);
        let mut weights = vec![];
        for micro in [8, 2, 3] {
            let vm = toy_varmap(VOCAB, 8, 2, 42);
            // eps = 1 and no clipping: Adam's first update is then not invariant to the gradient's
            // scale, so a wrongly weighted accumulation would show.
            let cfg = TrainConfig {
                batch_size: 8,
                micro_batch_size: micro,
                max_steps: Some(1),
                warmup_ratio: 0.0,
                eps: 1.0,
                max_grad_norm: None,
                ..cfg()
            };
            run(&vm, &train, None, &cfg, &mut |_| {});
            weights.push(BagOfEmbeddings::snapshot(&vm).concat());
        }
        let before = toy_varmap(VOCAB, 8, 2, 42);
        assert_ne!(
            weights[0],
            BagOfEmbeddings::snapshot(&before).concat(),
            "the step must move the weights"
        );
        for w in &weights[1..] {
            let diff = weights[0]
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "accumulated update differs by {diff}");
        }
    }

    /// A step's report comes one step late (its loss and norm are read once the next step is
    /// queued) or at once where it ends with an evaluation, and the last step's after the loop:
    /// every step is reported once, in order, with the loss the outcome keeps.
    #[test]
    fn every_step_is_reported_once_in_order_with_the_outcomes_loss() {
        let (train, dev) = (toy_set(64, 1, false), toy_set(32, 2, false));
        for (dev, eval_every) in [
            (None, EvalEvery::Epoch),
            (Some(&dev), EvalEvery::Steps { n: 3 }),
        ] {
            let vm = toy_varmap(VOCAB, 8, 2, 42);
            let cfg = TrainConfig {
                max_steps: Some(10),
                eval_every,
                ..cfg()
            };
            let mut reports = vec![];
            let out = run(&vm, &train, dev, &cfg, &mut |r| reports.push(r.clone()));
            assert_eq!(out.steps, 10);
            let steps: Vec<usize> = reports.iter().map(|r| r.step).collect();
            assert_eq!(steps, (1..=10).collect::<Vec<_>>());
            let losses: Vec<f64> = reports.iter().map(|r| r.loss).collect();
            assert_eq!(losses, out.train_loss);
            assert!(reports
                .iter()
                .all(|r| r.grad_norm > 0.0 && r.examples_per_sec > 0.0));
            let evaluated: Vec<usize> = reports
                .iter()
                .filter(|r| r.dev_score.is_some())
                .map(|r| r.step)
                .collect();
            let want: Vec<usize> = if dev.is_some() {
                vec![3, 6, 9, 10]
            } else {
                vec![]
            };
            assert_eq!(evaluated, want);
        }
    }

    /// A loss that is not finite ends the run naming its step, even read a step late, and that
    /// step is never reported.
    #[test]
    fn a_loss_that_is_not_finite_ends_the_run_naming_its_step() {
        let mut train = toy_set(32, 1, false);
        train.labels = vec![Label::Score(f32::NAN); train.labels.len()];
        let vm = toy_varmap(VOCAB, 8, 1, 42);
        for steps in [1, 3] {
            let cfg = TrainConfig {
                max_steps: Some(steps),
                ..cfg()
            };
            let mut reported = 0;
            let err = try_run(&vm, &Task::Regression, &train, None, &cfg, &mut |_| {
                reported += 1
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains("step 1: the training loss is NaN"), "{err}");
            assert_eq!(reported, 0);
        }
    }
}
