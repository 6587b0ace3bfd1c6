//! `recycle run SUITE`: run a suite's pending jobs (all, one shard, or named jobs).

use super::rank::results_dir;
use crate::device::DeviceRequest;
use crate::plan::Selection;
use crate::plan::Shard;
use crate::results::ResultStore;
use crate::runner::{self, RunSettings};
use crate::suite::{recycle_home, Suite};
use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The suite file (JSON, see docs/suite-format.md).
    pub suite: PathBuf,
    /// Results directory [default: $RECYCLE_HOME/results].
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// A profile of the suite (named overrides, e.g. `quick`).
    #[arg(long)]
    pub profile: Option<String>,
    /// Run only slice I of N (0-based, round-robin), e.g. `--shard 0/4`.
    #[arg(long, conflicts_with = "job")]
    pub shard: Option<Shard>,
    /// Run only this job id (repeatable).
    #[arg(long)]
    pub job: Vec<String>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: DeviceRequest,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let suite = Suite::load(&args.suite, args.profile.as_deref())?;
    let store = ResultStore::new(results_dir(args.results)?);
    let settings = RunSettings {
        donor_dir: recycle_home()?.join("donors"),
        selection: selection(args.shard, args.job),
    };
    let executor = runner::default_executor(args.device)?;
    let mut progress = crate::progress::for_stderr();
    let summary = runner::run(
        &suite,
        &store,
        executor.as_ref(),
        &settings,
        progress.as_mut(),
    )?;
    eprintln!(
        "{}: {} done, {} skipped (already done), {} failed; results in {}",
        suite.name,
        summary.done.len(),
        summary.skipped.len(),
        summary.failed.len(),
        store.dir().display()
    );
    if summary.failed.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for (id, err) in &summary.failed {
        eprintln!("failed: {id}: {err}");
    }
    Ok(ExitCode::from(1))
}

/// `--shard` / `--job` as a selection.
pub fn selection(shard: Option<Shard>, jobs: Vec<String>) -> Selection {
    match shard {
        Some(s) => Selection::Shard(s),
        None if !jobs.is_empty() => Selection::Jobs(jobs),
        None => Selection::All,
    }
}
