//! `recycle fuse SUITE`: run the suite's ColD Fusion loop (contributors, merge, evaluations per
//! iteration), then print the leaderboard of its held-out targets with the fusion iterations as
//! candidates.

use super::rank::results_dir;
use crate::device::DeviceRequest;
use crate::executor::{check_dataset_use, fetch_embedded_assets, FinetuneExecutor};
use crate::export::{exporter, Format};
use crate::fuse::{iteration_model, run_fusion, unscoped_leftovers, LegacyResult};
use crate::hub::HubOptions;
use crate::leaderboard::{build, Layout};
use crate::results::{rfc3339_utc, ResultRecord, ResultStore};
use crate::runner::records_by_job;
use crate::suite::{recycle_home, ModelRef, Suite};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The suite file (JSON with a `fusion` section, see docs/suite-format.md).
    pub suite: PathBuf,
    /// A profile of the suite (named overrides, e.g. `quick`).
    #[arg(long)]
    pub profile: Option<String>,
    /// Results directory [default: $RECYCLE_HOME/results].
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: DeviceRequest,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let suite = Suite::load(&args.suite, args.profile.as_deref())?;
    let fusion = suite.fusion.as_ref().with_context(|| {
        format!(
            "{}: no `fusion` section (see docs/suite-format.md)",
            args.suite.display()
        )
    })?;
    let home = recycle_home()?;
    fetch_embedded_assets(&suite, &home)?;
    suite.check_datasets(&check_dataset_use)?;
    let store = ResultStore::new(results_dir(args.results)?);
    let device = args.device.open()?;
    eprintln!(
        "{}: ColD Fusion, {} iterations × {} contributors on {}",
        suite.name,
        fusion.iterations,
        fusion.contributors,
        crate::device::describe(&device)
    );
    let hub = HubOptions::from_env();
    let executor = FinetuneExecutor::new(device, hub.clone());
    let model_dir = |m: &ModelRef| -> Result<PathBuf> {
        match m {
            ModelRef::Path { resolved, .. } => Ok(resolved.clone()),
            ModelRef::Hub { id, revision } => {
                let r = crate::hub::ModelRef {
                    repo: id.clone(),
                    revision: revision.clone(),
                };
                Ok(crate::hub::resolve_model(&r, &hub)
                    .with_context(|| format!("model {}", m.display_id()))?
                    .dir)
            }
            ModelRef::Donor { name } => {
                anyhow::bail!("donor:{name} cannot be a fusion base")
            }
        }
    };
    let mut progress = crate::progress::for_stderr();
    let summary = run_fusion(&suite, &store, &executor, &model_dir, progress.as_mut())?;
    if !summary.adopted.is_empty() {
        eprintln!(
            "{}: renamed {} results of earlier builds' unscoped fusion ids (fusion-iter<k>) to \
             this suite's (fusion-{}-iter<k>); they were not re-run",
            suite.name,
            summary.adopted.len(),
            suite.name
        );
    }
    warn_unscoped_leftovers(&suite, &store, &records_by_job(&store, &suite)?, &[]);
    eprintln!(
        "{}: {} done, {} skipped (already done), {} failed; results in {}",
        suite.name,
        summary.jobs.done.len(),
        summary.jobs.skipped.len(),
        summary.jobs.failed.len(),
        store.dir().display()
    );
    print_board(&suite, &store)?;
    if let Some(k) = summary.stopped_at {
        eprintln!("fusion stopped at iteration {k}: later iterations need it");
    }
    if summary.jobs.failed.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for (id, err) in &summary.jobs.failed {
        eprintln!("failed: {id}: {err}");
    }
    Ok(ExitCode::from(1))
}

/// Prints (Markdown) the board of the held-out targets: the baseline, the suite's other models
/// and the fusion iterations as candidates.
fn print_board(suite: &Suite, store: &ResultStore) -> Result<()> {
    let Some(fusion) = &suite.fusion else {
        return Ok(());
    };
    let mut layout = Layout::from_suites(&suite.arch, std::slice::from_ref(suite))?;
    let held: Vec<&str> = fusion
        .held_out(&suite.targets)
        .into_iter()
        .map(|t| t.name.as_str())
        .collect();
    layout.targets.retain(|t| held.contains(&t.name.as_str()));
    layout
        .candidates
        .extend((1..=fusion.iterations).map(|k| iteration_model(fusion, k).name));
    let board = build(
        &suite.arch,
        &layout,
        &store.load_all()?,
        &rfc3339_utc(std::time::SystemTime::now()),
    );
    let md = exporter(Format::Markdown).render(&board)?;
    println!("{}", String::from_utf8_lossy(&md));
    Ok(())
}

/// Warns about evaluations of fused bases left under earlier builds' unscoped ids that no step
/// of the plan claims (results of an earlier configuration): they stay where they are, and a
/// leaderboard built without `--suite` shows them as rows `fusion:iter<k>`.
pub(super) fn warn_unscoped_leftovers(
    suite: &Suite,
    store: &ResultStore,
    records: &BTreeMap<String, ResultRecord>,
    adoptable: &[LegacyResult],
) {
    let left = unscoped_leftovers(records, adoptable);
    if let Some(first) = left.first() {
        eprintln!(
            "warning: {}: {} results under the unscoped fusion ids of earlier builds match no step of \
             this suite's plan and are left as they are (e.g. {}); `recycle rank` without --suite \
             shows them as rows fusion:iter<k>: delete {}/eval/fusion-iter* to drop them",
            suite.name,
            left.len(),
            store.path_for(&suite.name, first).display(),
            store.dir().join(&suite.name).display()
        );
    }
}
