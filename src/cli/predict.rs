//! `recycle predict`: one JSON line of logits and predicted label per example of a dataset split.

use crate::device::DeviceRequest;
use crate::tokenize::TextTokenizer;
use crate::train::checkpoint::{load_trainable, task_of_checkpoint, Head};
use crate::train::local_data::load_dataset;
use crate::train::session::predict_examples;
use anyhow::{ensure, Context, Result};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A fine-tuned checkpoint directory (its config.json's id2label names the classes).
    #[arg(long)]
    pub model: PathBuf,
    /// A JSONL file or a directory of train/validation/test.jsonl.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Which split to predict (a single JSONL file is the split "train").
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Output file, one JSON object per line.
    #[arg(long)]
    pub out: PathBuf,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Tokens per example after truncation.
    #[arg(long, default_value_t = 128)]
    pub max_length: usize,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: DeviceRequest,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let device = args.device.open()?;
    ensure!(
        args.model.is_dir(),
        "--model {}: no such directory",
        args.model.display()
    );
    let task = task_of_checkpoint(&args.model)?;
    let data = load_dataset(&args.dataset)?;
    let examples = data.split(&args.split).with_context(|| {
        format!(
            "--split {}: {} has the splits {:?}",
            args.split,
            args.dataset.display(),
            data.split_names()
        )
    })?;
    let tokenizer = TextTokenizer::for_checkpoint(&args.model, args.max_length)
        .with_context(|| format!("--model {}", args.model.display()))?;
    let model = load_trainable(
        &args.model,
        &Head::for_task(&task),
        0,
        crate::model::Precision::F32,
        &device,
    )?;
    let inference = model.inference_model()?;
    let predictions = predict_examples(
        inference.as_ref(),
        &tokenizer,
        &task,
        examples,
        args.batch_size,
        &device,
    )?;
    let mut bytes = Vec::new();
    for p in &predictions {
        serde_json::to_writer(&mut bytes, p)?;
        bytes.write_all(b"\n")?;
    }
    std::fs::write(&args.out, bytes)
        .with_context(|| format!("--out {}: cannot write", args.out.display()))?;
    eprintln!(
        "{} predictions written to {}",
        predictions.len(),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
