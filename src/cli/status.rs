//! `recycle status SUITE`: how many jobs are done, failed, stale, missing, running or
//! stale-running (a marker left by a killed run); for a suite with a `fusion` section, the same
//! counts for the steps `recycle fuse` adds, on a second line.

use super::plan::{listing, Entry};
use super::rank::results_dir;
use crate::results::ResultStore;
use crate::runner::JobState;
use crate::suite::Suite;
use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The suite file.
    pub suite: PathBuf,
    /// Results directory [default: $RECYCLE_HOME/results].
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// A profile of the suite.
    #[arg(long)]
    pub profile: Option<String>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let suite = Suite::load(&args.suite, args.profile.as_deref())?;
    let store = ResultStore::new(results_dir(args.results)?);
    let listing = listing(&suite, &store)?;
    println!("{}: {}", suite.name, counts(&listing.jobs, "jobs"));
    if let Some(steps) = &listing.fusion {
        println!("{} fusion: {}", suite.name, counts(steps, "jobs"));
    }
    Ok(ExitCode::SUCCESS)
}

/// `N <what>: a done, b failed, …` over the entries' states.
fn counts(entries: &[Entry], what: &str) -> String {
    let count = |s: JobState| entries.iter().filter(|e| e.state == s).count();
    format!(
        "{} {what}: {} done, {} failed, {} stale, {} missing, {} running, {} stale-running",
        entries.len(),
        count(JobState::Done),
        count(JobState::Failed),
        count(JobState::Stale),
        count(JobState::Missing),
        count(JobState::Running),
        count(JobState::StaleRunning)
    )
}
