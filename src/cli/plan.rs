//! `recycle plan SUITE`: the ordered job list and each job's state (done, failed, stale, missing,
//! running, stale-running): the jobs of `recycle run`, then, for a suite with a `fusion` section,
//! the steps `recycle fuse` adds (contributors, merge and evaluations, iteration by iteration).

use super::rank::results_dir;
use crate::fuse::{legacy_results, plan_fusion, step_states};
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

/// One job (or fusion step) of a suite and its state against the results.
pub(super) struct Entry {
    pub state: JobState,
    /// `stage0`, `stage1`, or `iter<k>` for a step of fusion iteration `k`.
    pub stage: String,
    pub id: String,
    pub config_hash: String,
}

/// Everything `plan` and `status` show of a suite.
pub(super) struct Listing {
    /// The jobs of `recycle run`, in plan order.
    pub jobs: Vec<Entry>,
    /// The steps `recycle fuse` runs besides those (its reference evaluations are jobs of the
    /// suite's plan, listed once, above); `None` without a `fusion` section.
    pub fusion: Option<Vec<Entry>>,
}

/// The suite's jobs and fusion steps with their states, from the plans `run` and `fuse` execute.
pub(super) fn listing(suite: &Suite, store: &ResultStore) -> Result<Listing> {
    let records = records_by_job(store, suite)?;
    let running = marker_liveness(store, suite)?;
    let jobs = crate::plan::plan(suite)?;
    let states = job_states(&jobs, &records, &running);
    let jobs = jobs
        .into_iter()
        .zip(states)
        .map(|(job, state)| Entry {
            state,
            stage: format!("stage{}", job.stage),
            id: job.id,
            config_hash: job.config_hash,
        })
        .collect();
    let fusion = match &suite.fusion {
        None => None,
        Some(_) => {
            let legacy = legacy_results(suite, &records)?;
            if !legacy.is_empty() {
                eprintln!(
                    "note: {}: {} fusion results were written under earlier builds' unscoped names \
                     (fusion-iter<k>); `recycle fuse` renames them to this suite's before it runs \
                     anything, and until then those whose id or hash changed show as missing or \
                     stale",
                    suite.name,
                    legacy.len()
                );
            }
            super::fuse::warn_unscoped_leftovers(suite, store, &records, &legacy);
            let plan = plan_fusion(suite)?;
            let steps = step_states(&plan, &records, &running)
                .into_iter()
                .map(|(k, step, state)| Entry {
                    state,
                    stage: format!("iter{k}"),
                    id: step.id().to_string(),
                    config_hash: step.config_hash().to_string(),
                })
                .collect();
            Some(steps)
        }
    };
    Ok(Listing { jobs, fusion })
}

pub fn run(args: Args) -> Result<ExitCode> {
    let suite = Suite::load(&args.suite, args.profile.as_deref())?;
    let store = ResultStore::new(results_dir(args.results)?);
    let listing = listing(&suite, &store)?;
    let fusion = listing.fusion.iter().flatten();
    for e in listing.jobs.iter().chain(fusion) {
        println!(
            "{:<13} {:<6} {}  {}",
            e.state.label(),
            e.stage,
            e.id,
            &e.config_hash[..12.min(e.config_hash.len())]
        );
    }
    Ok(ExitCode::SUCCESS)
}
