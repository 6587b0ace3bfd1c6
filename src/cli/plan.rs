//! `recycle plan SUITE`: the ordered job list and each job's state (done, failed, stale, missing,
//! running, stale-running).

use super::rank::results_dir;
use crate::results::ResultStore;
use crate::runner::{job_states, marker_liveness, records_by_job};
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
    for (job, state) in jobs.iter().zip(states) {
        println!(
            "{:<13} stage{} {}  {}",
            state.label(),
            job.stage,
            job.id,
            &job.config_hash[..12.min(job.config_hash.len())]
        );
    }
    Ok(ExitCode::SUCCESS)
}
