//! `recycle finetune`: fine-tune one checkpoint on one dataset and save a transformers-loadable
//! checkpoint (plus `training.json`: the resolved config and how the run went).

use crate::device::DeviceRequest;
use crate::tokenize::TextTokenizer;
use crate::train::checkpoint::{load_trainable, Head, TrainableModel};
use crate::train::local_data::load_dataset;
use crate::train::session::finetune_on_dataset;
use crate::train::{Batching, EvalEvery, StepReport, TrainConfig};
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// A JSONL file (text, text_pair, label) or a directory of train/validation/test.jsonl.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Where the fine-tuned checkpoint is written: a new or empty directory (never the --model one),
    /// checked before training.
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
    /// Arithmetic: f32, or bf16 mixed precision (f32 master weights; on a GPU about 2.4x faster
    /// to train, docs/cuda.md) [default: f32].
    #[arg(long)]
    pub precision: Option<crate::model::Precision>,
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
        if let Some(p) = self.precision {
            c.precision = p;
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

/// Refuses an `--out` that holds anything (the `--model` directory above all) before any training:
/// a fine-tune never overwrites a checkpoint.
fn check_out(out: &Path, model: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let same = matches!(
        (out.canonicalize(), model.canonicalize()),
        (Ok(a), Ok(b)) if a == b
    );
    ensure!(
        !same,
        "--out {} is the --model directory: the fine-tuned weights would overwrite the input \
         checkpoint; choose a new directory",
        out.display()
    );
    let empty = out.is_dir()
        && std::fs::read_dir(out)
            .with_context(|| format!("--out {}", out.display()))?
            .next()
            .is_none();
    ensure!(
        empty,
        "--out {} already exists and is not empty; choose a new directory (finetune does not \
         overwrite)",
        out.display()
    );
    Ok(())
}

/// Writes the checkpoint and `training.json` into a temporary directory beside `out`, then renames
/// it into place, so `out` is complete or absent.
fn save_atomically(
    model: &dyn TrainableModel,
    label_names: &[String],
    summary: &serde_json::Value,
    out: &Path,
) -> Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("creating the parent of --out {}", out.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".recycle-finetune-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
    model.save(tmp.path(), label_names)?;
    let path = tmp.path().join("training.json");
    std::fs::write(&path, serde_json::to_string_pretty(summary)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    crate::atomic::replace_dir(tmp, out)
}

pub fn run(args: Args) -> Result<ExitCode> {
    let cfg = args.protocol.to_config()?;
    ensure!(
        args.model.is_dir(),
        "--model {}: no such directory",
        args.model.display()
    );
    check_out(&args.out, &args.model)?;
    let device = args.device.open()?;
    eprintln!(
        "finetune: running on {} in {}",
        crate::device::describe(&device),
        cfg.precision.as_str()
    );
    let data = load_dataset(&args.dataset)?;
    let empty = data.classes_without_examples();
    if !empty.is_empty() {
        let ids: Vec<String> = empty.iter().map(u32::to_string).collect();
        eprintln!(
            "warning: --dataset {}: class ids {} have no examples; the head still gets an output \
             for each (bare JSONL labels are ids 0..=max; `recycle data import` maps names)",
            args.dataset.display(),
            ids.join(", ")
        );
    }
    let tokenizer = TextTokenizer::for_checkpoint(&args.model, cfg.max_length)
        .with_context(|| format!("--model {}", args.model.display()))?;
    let model = load_trainable(
        &args.model,
        &Head::for_task(&data.task),
        cfg.seed,
        cfg.precision,
        &device,
    )?;
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
    let summary = serde_json::json!({ "config": cfg, "outcome": outcome });
    save_atomically(model.as_ref(), &label_names, &summary, &args.out)
        .with_context(|| format!("--out {}", args.out.display()))?;
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

#[cfg(test)]
mod end_to_end {
    use super::*;
    use crate::tokenize::tests::toy_tokenizer;
    use candle_core::{DType, Device, Tensor};
    use std::collections::HashMap;
    use std::path::Path;

    const WORDS: [&str; 8] = [
        "the", "movie", "was", "good", "great", "bad", "awful", "plot",
    ];

    /// A 2-layer BERT (hidden 16) with random weights and the toy word-level tokenizer.
    fn tiny_bert(dir: &Path) {
        let (v, h, i, p) = (4 + WORDS.len(), 16usize, 32usize, 64usize);
        let config = serde_json::json!({"model_type": "bert", "vocab_size": v, "hidden_size": h,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": i,
            "max_position_embeddings": p, "type_vocab_size": 2, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0});
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("bert.embeddings.word_embeddings.weight".into(), vec![v, h]),
            (
                "bert.embeddings.position_embeddings.weight".into(),
                vec![p, h],
            ),
            (
                "bert.embeddings.token_type_embeddings.weight".into(),
                vec![2, h],
            ),
            ("bert.embeddings.LayerNorm.weight".into(), vec![h]),
            ("bert.embeddings.LayerNorm.bias".into(), vec![h]),
            ("bert.pooler.dense.weight".into(), vec![h, h]),
            ("bert.pooler.dense.bias".into(), vec![h]),
        ];
        for l in 0..2 {
            let at = format!("bert.encoder.layer.{l}");
            for (n, o, i) in [
                ("attention.self.query", h, h),
                ("attention.self.key", h, h),
                ("attention.self.value", h, h),
                ("attention.output.dense", h, h),
                ("intermediate.dense", i, h),
                ("output.dense", h, i),
            ] {
                shapes.push((format!("{at}.{n}.weight"), vec![o, i]));
                shapes.push((format!("{at}.{n}.bias"), vec![o]));
            }
            for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
                shapes.push((format!("{at}.{n}.weight"), vec![h]));
                shapes.push((format!("{at}.{n}.bias"), vec![h]));
            }
        }
        let mut k = 0u32;
        let tensors: HashMap<String, Tensor> = shapes
            .into_iter()
            .map(|(n, s)| {
                let numel: usize = s.iter().product();
                let vals: Vec<f32> = if n.ends_with("LayerNorm.weight") {
                    vec![1.0; numel]
                } else {
                    (0..numel)
                        .map(|_| {
                            k = k.wrapping_mul(1664525).wrapping_add(1013904223);
                            (k >> 8) as f32 / (1u32 << 24) as f32 * 0.2 - 0.1
                        })
                        .collect()
                };
                (
                    n,
                    Tensor::from_vec(vals, s, &Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap(),
                )
            })
            .collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        toy_tokenizer(&WORDS)
            .save(dir.join("tokenizer.json"), false)
            .unwrap();
    }

    fn split(n: usize, offset: usize) -> String {
        (0..n)
            .map(|j| {
                let k = j + offset;
                let pos = k % 2 == 0;
                let w = if pos {
                    ["good", "great"][k % 4 / 2]
                } else {
                    ["bad", "awful"][k % 4 / 2]
                };
                format!(
                    "{{\"text\":\"the movie was {w}\",\"label\":{}}}\n",
                    pos as u32
                )
            })
            .collect()
    }

    #[test]
    fn finetune_then_predict_from_files() {
        let tmp = tempfile::tempdir().unwrap();
        let (model, data, out) = (
            tmp.path().join("base"),
            tmp.path().join("data"),
            tmp.path().join("tuned"),
        );
        std::fs::create_dir_all(&model).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        tiny_bert(&model);
        std::fs::write(data.join("train.jsonl"), split(64, 0)).unwrap();
        std::fs::write(data.join("validation.jsonl"), split(16, 1)).unwrap();
        std::fs::write(data.join("test.jsonl"), split(8, 2)).unwrap();
        let protocol = ProtocolArgs {
            lr: Some(3e-3),
            epochs: Some(8),
            batch_size: Some(16),
            micro_batch_size: Some(8),
            warmup_ratio: Some(0.1),
            patience: Some(0),
            ..Default::default()
        };
        run(Args {
            model: model.clone(),
            dataset: data.clone(),
            out: out.clone(),
            protocol,
            device: DeviceRequest::Cpu,
        })
        .unwrap();
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap())
                .unwrap();
        assert_eq!(summary["outcome"]["steps"], 32);
        assert_eq!(summary["outcome"]["best_dev_score"], 1.0, "{summary:#}");

        let preds = tmp.path().join("preds.jsonl");
        crate::cli::predict::run(crate::cli::predict::Args {
            model: out,
            dataset: data,
            split: "test".into(),
            out: preds.clone(),
            batch_size: 3,
            max_length: 128,
            device: DeviceRequest::Cpu,
        })
        .unwrap();
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&preds)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 8);
        for (j, l) in lines.iter().enumerate() {
            assert_eq!(l["index"], j);
            assert_eq!(l["label"], ((j + 2) % 2 == 0) as u32, "{l}");
            assert_eq!(l["logits"].as_array().unwrap().len(), 2);
        }
    }

    #[test]
    fn out_must_be_new_or_empty_and_never_the_model() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("m");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        check_out(&tmp.path().join("new"), &model).unwrap();
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        check_out(&empty, &model).unwrap();
        for same in [model.clone(), model.join(".")] {
            let err = format!("{:#}", check_out(&same, &model).unwrap_err());
            assert!(err.contains("is the --model directory"), "{err}");
        }
        let full = tmp.path().join("full");
        std::fs::create_dir_all(&full).unwrap();
        std::fs::write(full.join("notes.txt"), "keep me").unwrap();
        let err = format!("{:#}", check_out(&full, &model).unwrap_err());
        assert!(err.contains("not empty") && err.contains("full"), "{err}");
    }

    #[test]
    fn a_checkpoint_with_only_vocab_txt_fine_tunes_and_predicts() {
        // The tiny fixture has vocab.txt and no tokenizer.json, as the donors `recycle run` writes.
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/bert");
        assert!(!model.join("tokenizer.json").exists());
        let tmp = tempfile::tempdir().unwrap();
        let (data, out) = (tmp.path().join("data"), tmp.path().join("tuned"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("train.jsonl"), split(16, 0)).unwrap();
        std::fs::write(data.join("validation.jsonl"), split(4, 1)).unwrap();
        std::fs::write(data.join("test.jsonl"), split(4, 2)).unwrap();
        let args = || Args {
            model: model.clone(),
            dataset: data.clone(),
            out: out.clone(),
            protocol: ProtocolArgs {
                epochs: Some(1),
                batch_size: Some(8),
                micro_batch_size: Some(8),
                ..Default::default()
            },
            device: DeviceRequest::Cpu,
        };
        run(args()).unwrap();
        assert!(out.join("vocab.txt").is_file() && out.join("training.json").is_file());
        // A second run into the same --out is refused before training, and loses nothing.
        let before = std::fs::read(out.join("model.safetensors")).unwrap();
        let err = format!("{:#}", run(args()).unwrap_err());
        assert!(err.contains("not empty"), "{err}");
        assert_eq!(
            std::fs::read(out.join("model.safetensors")).unwrap(),
            before
        );
        let preds = tmp.path().join("preds.jsonl");
        crate::cli::predict::run(crate::cli::predict::Args {
            model: out,
            dataset: data,
            split: "test".into(),
            out: preds.clone(),
            batch_size: 2,
            max_length: 32,
            device: DeviceRequest::Cpu,
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(&preds).unwrap().lines().count(), 4);
    }
}
