//! `recycle status SUITE`: how many jobs are done, failed, stale, missing, running or
//! stale-running (a marker left by a killed run).

use super::rank::results_dir;
use crate::results::ResultStore;
use crate::runner::{job_states, marker_liveness, records_by_job, JobState};
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
    let jobs = crate::plan::plan(&suite)?;
    let states = job_states(
        &jobs,
        &records_by_job(&store, &suite)?,
        &marker_liveness(&store, &suite)?,
    );
    let count = |s: JobState| states.iter().filter(|x| **x == s).count();
    println!(
        "{}: {} jobs: {} done, {} failed, {} stale, {} missing, {} running, {} stale-running",
        suite.name,
        jobs.len(),
        count(JobState::Done),
        count(JobState::Failed),
        count(JobState::Stale),
        count(JobState::Missing),
        count(JobState::Running),
        count(JobState::StaleRunning)
    );
    Ok(ExitCode::SUCCESS)
}
