//! `recycle finetune`: fine-tune one checkpoint on one dataset and save a transformers-loadable
//! checkpoint (plus `training.json`: the resolved config and how the run went).

use crate::device::DeviceRequest;
use crate::tokenize::TextTokenizer;
use crate::train::checkpoint::{load_trainable, Head};
use crate::train::local_data::load_dataset;
use crate::train::session::finetune_on_dataset;
use crate::train::{Batching, EvalEvery, StepReport, TrainConfig};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A JSONL file (text, text_pair, label) or a directory of train/validation/test.jsonl.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Where the fine-tuned checkpoint is written.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub protocol: ProtocolArgs,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: DeviceRequest,
}

/// The protocol's flags; an absent flag keeps `TrainConfig`'s default.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ProtocolArgs {
    /// Peak learning rate [default: 5e-5].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Maximum epochs [default: 10].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Stop after this many optimiser steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Examples per optimiser step [default: 256].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Examples per forward pass (gradient accumulation) [default: 32].
    #[arg(long)]
    pub micro_batch_size: Option<usize>,
    /// Fraction of steps spent warming up [default: 0.006].
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// AdamW weight decay [default: 0.01].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Seed of head initialisation, shuffling and dropout [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Tokens per example after truncation [default: 128].
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Evaluations without dev improvement before stopping [default: 2]; 0 never stops early.
    #[arg(long)]
    pub patience: Option<usize>,
    /// Evaluate on dev every N steps instead of every epoch.
    #[arg(long)]
    pub eval_steps: Option<usize>,
    /// Batch examples of similar length together (less padding).
    #[arg(long)]
    pub length_bucketing: bool,
}

impl ProtocolArgs {
    /// The typed config: defaults from `TrainConfig::default`, overridden by the given flags.
    pub fn to_config(&self) -> Result<TrainConfig> {
        let mut c = TrainConfig::default();
        if let Some(v) = self.lr {
            c.lr = v;
        }
        if let Some(v) = self.epochs {
            c.max_epochs = v;
        }
        c.max_steps = self.max_steps.or(c.max_steps);
        if let Some(v) = self.batch_size {
            c.batch_size = v;
            c.micro_batch_size = c.micro_batch_size.min(v);
        }
        if let Some(v) = self.micro_batch_size {
            c.micro_batch_size = v;
        }
        if let Some(v) = self.warmup_ratio {
            c.warmup_ratio = v;
        }
        if let Some(v) = self.weight_decay {
            c.weight_decay = v;
        }
        if let Some(v) = self.seed {
            c.seed = v;
        }
        if let Some(v) = self.max_length {
            c.max_length = v;
        }
        if let Some(v) = self.patience {
            c.patience = (v > 0).then_some(v);
        }
        if let Some(n) = self.eval_steps {
            c.eval_every = EvalEvery::Steps { n };
        }
        if self.length_bucketing {
            c.batching = Batching::LengthBucketed;
        }
        c.validate().context("invalid protocol flags")?;
        Ok(c)
    }
}

/// Prints a progress line every 10 steps and at every evaluation (stderr).
fn print_progress(r: &StepReport) {
    if r.step % 10 == 0 || r.step == r.total_steps || r.dev_score.is_some() {
        let dev = r
            .dev_score
            .map(|s| format!("  dev {s:.4}"))
            .unwrap_or_default();
        eprintln!(
            "step {}/{}  epoch {}  loss {:.4}  lr {:.2e}  |g| {:.3}  {:.1} ex/s{dev}",
            r.step,
            r.total_steps,
            r.epoch + 1,
            r.loss,
            r.lr,
            r.grad_norm,
            r.examples_per_sec
        );
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    let cfg = args.protocol.to_config()?;
    let device = args.device.open()?;
    let data = load_dataset(&args.dataset)?;
    let tokenizer = TextTokenizer::from_file(&args.model.join("tokenizer.json"), cfg.max_length)
        .with_context(|| format!("--model {}", args.model.display()))?;
    let model = load_trainable(&args.model, &Head::for_task(&data.task), cfg.seed, &device)?;
    let outcome = finetune_on_dataset(
        model.as_ref(),
        &tokenizer,
        &data,
        &cfg,
        &device,
        &mut print_progress,
    )
    .with_context(|| {
        format!(
            "fine-tuning {} on {}",
            args.model.display(),
            args.dataset.display()
        )
    })?;
    let label_names = match &data.task {
        crate::data::Task::Classification { labels } => labels.clone(),
        crate::data::Task::Regression => Vec::new(),
    };
    model
        .save(&args.out, &label_names)
        .with_context(|| format!("--out {}", args.out.display()))?;
    let summary = serde_json::json!({ "config": cfg, "outcome": outcome });
    let path = args.out.join("training.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!(
        "{} steps, {:.2} epochs, best dev {}; saved to {}",
        outcome.steps,
        outcome.epochs,
        outcome
            .best_dev_score
            .map_or("n/a".to_string(), |s| format!("{s:.4}")),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_flags_keep_the_defaults_and_given_ones_override() {
        assert_eq!(
            ProtocolArgs::default().to_config().unwrap(),
            TrainConfig::default()
        );
        let a = ProtocolArgs {
            lr: Some(1e-4),
            batch_size: Some(16),
            patience: Some(0),
            eval_steps: Some(50),
            ..Default::default()
        };
        let c = a.to_config().unwrap();
        assert_eq!(
            (c.lr, c.batch_size, c.micro_batch_size, c.patience),
            (1e-4, 16, 16, None)
        );
        assert_eq!(c.eval_every, EvalEvery::Steps { n: 50 });
        let bad = ProtocolArgs {
            batch_size: Some(8),
            micro_batch_size: Some(16),
            ..Default::default()
        };
        assert!(bad.to_config().is_err());
    }
}
