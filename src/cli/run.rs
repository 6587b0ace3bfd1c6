//! `recycle run SUITE`: run a suite's pending jobs (all, one shard, or named jobs), then print the
//! leaderboard of its architecture and write the HTML report next to the results.

use super::rank::{build_board, results_dir};
use crate::device::DeviceRequest;
use crate::executor::{
    check_dataset_use, check_model_paths, fetch_embedded_assets, FinetuneExecutor,
};
use crate::export::{exporter, Exporter, Format};
use crate::hub::HubOptions;
use crate::plan::Selection;
use crate::plan::Shard;
use crate::results::ResultStore;
use crate::runner::{self, RunSettings};
use crate::suite::{recycle_home, Suite};
use anyhow::{Context, Result};
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
    /// f32 or bf16 (mixed precision) for every job, overriding the suite's protocol; bf16 jobs
    /// are distinct jobs with their own results. On a GPU bf16 trains about 2.4x faster (H200,
    /// roberta-base; docs/cuda.md) [default: the suite's, f32].
    #[arg(long)]
    pub precision: Option<crate::model::Precision>,
    /// Do not print the leaderboard or write the report at the end (e.g. in a shard).
    #[arg(long)]
    pub no_report: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let mut suite = Suite::load(&args.suite, args.profile.as_deref())?;
    if let Some(p) = args.precision {
        suite.set_precision(p);
    }
    let home = recycle_home()?;
    fetch_embedded_assets(&suite, &home)?;
    check_model_paths(&suite)?;
    suite.check_datasets(&check_dataset_use)?;
    let store = ResultStore::new(results_dir(args.results)?);
    let settings = RunSettings {
        donor_dir: home.join("donors"),
        selection: selection(args.shard, args.job),
    };
    let device = args.device.open()?;
    eprintln!(
        "{}: running on {}",
        suite.name,
        crate::device::describe(&device)
    );
    let executor = FinetuneExecutor::new(device, HubOptions::from_env());
    let mut progress = crate::progress::for_stderr();
    let summary = runner::run(&suite, &store, &executor, &settings, progress.as_mut())?;
    eprintln!(
        "{}: {} done, {} skipped (already done), {} failed; results in {}",
        suite.name,
        summary.done.len(),
        summary.skipped.len(),
        summary.failed.len(),
        store.dir().display()
    );
    if !args.no_report {
        report(&suite, &args.suite, &store)?;
    }
    if summary.failed.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for (id, err) in &summary.failed {
        eprintln!("failed: {id}: {err}");
    }
    Ok(ExitCode::from(1))
}

/// Prints the suite's leaderboard (Markdown) and writes `<results>/<suite>/report.html`.
fn report(suite: &Suite, file: &std::path::Path, store: &ResultStore) -> Result<()> {
    let board = build_board(&suite.arch, store.dir(), &[file.to_path_buf()])?;
    let md = exporter(Format::Markdown).render(&board)?;
    println!("{}", String::from_utf8_lossy(&md));
    let html = crate::export::html::HtmlExporter.render(&board)?;
    let path = store.dir().join(&suite.name).join("report.html");
    super::report::write_atomically(&path, &html)
        .with_context(|| format!("writing the report {}", path.display()))?;
    eprintln!("report: {}", path.display());
    Ok(())
}

/// `--shard` / `--job` as a selection.
pub fn selection(shard: Option<Shard>, jobs: Vec<String>) -> Selection {
    match shard {
        Some(s) => Selection::Shard(s),
        None if !jobs.is_empty() => Selection::Jobs(jobs),
        None => Selection::All,
    }
}
