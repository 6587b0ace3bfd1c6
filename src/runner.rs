//! Runs a suite: plans it, skips the jobs whose result already exists with the same config hash,
//! runs the rest in order through a `JobExecutor`, and writes each result (or failure) as soon as
//! it exists. A failed job is recorded and the run goes on, unless it lost the CUDA context (a
//! kernel fault), after which every job would fail: the run stops and a re-run resumes.

use crate::plan::{self, Job, JobSpec, Selection};
use crate::progress::{JobEnd, Progress, StepInfo};
use crate::results::{
    git_revision, rfc3339_utc, DatasetRecord, ModelRecord, RecordKind, ResultRecord, ResultStore,
    RunningMarker, RECYCLE_VERSION, RESULT_SCHEMA_VERSION,
};
use crate::suite::{ModelRef, Suite};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

/// What an executed job reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobOutput {
    /// Best dev score (fraction), if the dataset has a dev split.
    pub dev_score: Option<f64>,
    /// Test score (fraction) of the selected checkpoint; required for an evaluation.
    pub test_score: Option<f64>,
    pub n_train: usize,
    pub n_dev: usize,
    pub n_test: usize,
    pub steps: usize,
    pub epochs: f64,
    /// sha256 of the starting weights as loaded.
    pub weights_sha256: Option<String>,
    /// The revision the model resolved to (a hub commit).
    pub model_revision: Option<String>,
    pub dataset_fingerprint: Option<String>,
    /// The revision the dataset resolved to (a hub commit).
    pub dataset_revision: Option<String>,
    /// e.g. `cpu`, `cuda:0`.
    pub device: String,
    /// A donor job's saved checkpoint.
    pub checkpoint: Option<PathBuf>,
}

/// Runs one job: fine-tunes and scores (evaluation) or fine-tunes and saves (donor).
pub trait JobExecutor {
    fn execute(&self, job: &Job, on_step: &mut dyn FnMut(&StepInfo)) -> Result<JobOutput>;
}

/// Settings of a run besides the suite.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Where donor checkpoints are saved: `<donor_dir>/<suite>/<donor>-<hash prefix>`.
    pub donor_dir: PathBuf,
    pub selection: Selection,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSummary {
    pub done: Vec<String>,
    pub skipped: Vec<String>,
    /// Job id and error.
    pub failed: Vec<(String, String)>,
}

/// The state of one job against the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Done,
    Failed,
    /// A result exists but for another configuration: it will be re-run.
    Stale,
    Missing,
    /// No current result, and a live process (or one on another host) is running it.
    Running,
    /// No current result, and a marker whose process on this host is gone: a killed run.
    /// Pending, like a missing job.
    StaleRunning,
}

impl JobState {
    pub fn label(self) -> &'static str {
        match self {
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Stale => "stale",
            JobState::Missing => "missing",
            JobState::Running => "running",
            JobState::StaleRunning => "stale-running",
        }
    }

    /// Whether `recycle run` would (re)run this job now.
    pub fn is_pending(self) -> bool {
        !matches!(self, JobState::Done | JobState::Running)
    }
}

/// What a running marker says about its process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// On this host and alive, or on another host (where it cannot be checked).
    Alive,
    /// On this host and gone.
    Dead,
}

/// The state of each job of `jobs` given the suite's existing records and the liveness of its
/// running markers (by job id; a marker for another configuration of the job counts too, since
/// its process still writes the job's result file).
pub fn job_states(
    jobs: &[Job],
    records: &BTreeMap<String, ResultRecord>,
    running: &BTreeMap<String, Liveness>,
) -> Vec<JobState> {
    jobs.iter()
        .map(|j| job_state(&j.id, &j.config_hash, records, running))
        .collect()
}

/// The state of the job `id` whose current configuration hashes to `config_hash` (a job of a
/// plan, or a step that is not a runner job, such as a fusion merge).
pub fn job_state(
    id: &str,
    config_hash: &str,
    records: &BTreeMap<String, ResultRecord>,
    running: &BTreeMap<String, Liveness>,
) -> JobState {
    let recorded = match records.get(id) {
        None => JobState::Missing,
        Some(r) if r.config_hash != config_hash => JobState::Stale,
        Some(r) if r.kind == RecordKind::Failure => JobState::Failed,
        Some(_) => JobState::Done,
    };
    match (recorded, running.get(id)) {
        (JobState::Done, _) | (_, None) => recorded,
        (_, Some(Liveness::Alive)) => JobState::Running,
        (_, Some(Liveness::Dead)) => JobState::StaleRunning,
    }
}

/// The liveness of every running marker of `suite`, by job id, as seen from this process.
pub fn marker_liveness(store: &ResultStore, suite: &Suite) -> Result<BTreeMap<String, Liveness>> {
    let host = this_host();
    Ok(store
        .load_markers(&suite.name)?
        .into_iter()
        .map(|m| {
            let live = if m.host != host || pid_alive(m.pid) {
                Liveness::Alive
            } else {
                Liveness::Dead
            };
            (m.job_id, live)
        })
        .collect())
}

/// This machine's host name (empty if it cannot be read).
pub fn this_host() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Whether a process with this pid exists on this host (signal 0 checks without signalling).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks whether the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The marker this process writes when it starts `job`.
fn marker_for(job: &Job) -> RunningMarker {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let slurm_job = match (var("SLURM_ARRAY_JOB_ID"), var("SLURM_ARRAY_TASK_ID")) {
        (Some(a), Some(t)) => Some(format!("{a}_{t}")),
        _ => var("SLURM_JOB_ID"),
    };
    RunningMarker {
        job_id: job.id.clone(),
        config_hash: job.config_hash.clone(),
        host: this_host(),
        pid: std::process::id(),
        started_at: rfc3339_utc(SystemTime::now()),
        slurm_job,
    }
}

/// The suite's existing records by job id.
pub fn records_by_job(
    store: &ResultStore,
    suite: &Suite,
) -> Result<BTreeMap<String, ResultRecord>> {
    Ok(store
        .load_suite(&suite.name)?
        .into_iter()
        .map(|r| (r.job_id.clone(), r))
        .collect())
}

/// Runs the selected jobs of `suite`. Errors only when the store itself fails (a job's error is
/// recorded as a failure record and reported in the summary).
pub fn run(
    suite: &Suite,
    store: &ResultStore,
    executor: &dyn JobExecutor,
    settings: &RunSettings,
    progress: &mut dyn Progress,
) -> Result<RunSummary> {
    let all = plan::plan(suite)?;
    let selected = plan::select(&all, &settings.selection)?;
    run_jobs(suite, store, executor, settings, &all, selected, progress)
}

/// Runs `selected`, jobs of the plan `all` (which gives the donor jobs that evaluations of donor
/// models depend on), in order: the loop behind `run`, also driven stage by stage by `fuse`.
/// `settings.selection` is not consulted here.
pub fn run_jobs(
    suite: &Suite,
    store: &ResultStore,
    executor: &dyn JobExecutor,
    settings: &RunSettings,
    all: &[Job],
    selected: Vec<Job>,
    progress: &mut dyn Progress,
) -> Result<RunSummary> {
    store.clean_stale_temps()?;
    let mut records = records_by_job(store, suite)?;
    let donor_hashes: BTreeMap<String, String> = all
        .iter()
        .filter_map(|j| match &j.spec {
            JobSpec::Donor { donor, .. } => Some((donor.clone(), j.config_hash.clone())),
            _ => None,
        })
        .collect();

    let mut summary = RunSummary::default();
    progress.run_started(selected.len());
    for (i, job) in selected.into_iter().enumerate() {
        if let Some(r) = records.get(&job.id) {
            if r.config_hash == job.config_hash && r.kind != RecordKind::Failure {
                progress.job_skipped(i, &job.id);
                summary.skipped.push(job.id);
                continue;
            }
        }
        progress.job_started(i, &job.id);
        let mut job = job;
        store
            .write_marker(&suite.name, &marker_for(&job))
            .with_context(|| format!("job {}: cannot write its running marker", job.id))?;
        let started = Instant::now();
        let outcome = prepare(&mut job, suite, settings, &records, &donor_hashes)
            .and_then(|()| executor.execute(&job, &mut |s| progress.step(s)))
            .and_then(|out| check_output(&job, out));
        let wall = started.elapsed().as_secs_f64();
        let record = match outcome {
            Ok(out) => success_record(suite, &job, &out, wall, SystemTime::now())?,
            Err(err) => failure_record(suite, &job, &format!("{err:#}"), wall, SystemTime::now())?,
        };
        store
            .write(&record)
            .with_context(|| format!("job {}: cannot write its result", job.id))?;
        store.remove_marker(&suite.name, &job.id)?;
        match &record.error {
            Some(e) if crate::device::context_lost(e) => {
                // A kernel fault: every later job on this device would fail the same way, and
                // be recorded as failed for nothing. The failure is kept (a re-run retries it).
                progress.job_finished(&job.id, &JobEnd::Failed(e.clone()));
                progress.run_finished();
                bail!(
                    "job {}: the CUDA context is lost ({e}); the run stops here, since every job \
                     after it would fail the same way. {} job(s) finished in this run are kept; \
                     run the same command again to resume",
                    job.id,
                    summary.done.len()
                );
            }
            Some(e) => {
                progress.job_finished(&job.id, &JobEnd::Failed(e.clone()));
                summary.failed.push((job.id.clone(), e.clone()));
            }
            None => {
                progress.job_finished(&job.id, &JobEnd::Done);
                summary.done.push(job.id.clone());
            }
        }
        records.insert(job.id.clone(), record);
    }
    progress.run_finished();
    Ok(summary)
}

/// Fills in what the job needs from the run: a donor job's output directory, a donor model's
/// checkpoint (from the donor's current result).
fn prepare(
    job: &mut Job,
    suite: &Suite,
    settings: &RunSettings,
    records: &BTreeMap<String, ResultRecord>,
    donor_hashes: &BTreeMap<String, String>,
) -> Result<()> {
    match &job.spec {
        JobSpec::Donor { donor, .. } => {
            let short = job.config_hash.get(..12).unwrap_or(&job.config_hash);
            job.output_dir = Some(
                settings
                    .donor_dir
                    .join(&suite.name)
                    .join(format!("{donor}-{short}")),
            );
        }
        JobSpec::Eval {
            model: ModelRef::Donor { name },
            ..
        } => {
            let donor_id = format!("donor/{name}");
            let want = donor_hashes
                .get(name)
                .ok_or_else(|| anyhow!("donor {name:?} is not in the suite"))?;
            let record = records
                .get(&donor_id)
                .filter(|r| &r.config_hash == want && r.kind == RecordKind::Donor)
                .ok_or_else(|| anyhow!("donor {name:?} has no checkpoint for its current configuration: run job {donor_id} first"))?;
            let ckpt = record
                .checkpoint
                .as_ref()
                .ok_or_else(|| anyhow!("the result of job {donor_id} names no checkpoint"))?;
            job.donor_checkpoint = Some(PathBuf::from(ckpt));
        }
        JobSpec::Eval { .. } => {}
    }
    Ok(())
}

fn check_output(job: &Job, out: JobOutput) -> Result<JobOutput> {
    let finite = |v: Option<f64>| v.is_none_or(f64::is_finite);
    if !finite(out.test_score) || !finite(out.dev_score) {
        bail!("the executor reported a non-finite score");
    }
    match job.spec {
        JobSpec::Eval { .. } if out.test_score.is_none() => {
            bail!("the executor reported no test score")
        }
        JobSpec::Donor { .. } if out.checkpoint.is_none() => {
            bail!("the executor reported no saved checkpoint")
        }
        _ => Ok(out),
    }
}

fn base_record(
    suite: &Suite,
    job: &Job,
    kind: RecordKind,
    wall: f64,
    at: SystemTime,
) -> Result<ResultRecord> {
    let protocol = job.spec.protocol().clone();
    let protocol_hash = plan::protocol_hash(&protocol)?;
    let (role, name, model, dataset, target, metric) = match &job.spec {
        JobSpec::Donor {
            base_name,
            base,
            source,
            ..
        } => (None, base_name, base, source, None, None),
        JobSpec::Eval {
            model_name,
            role,
            model,
            dataset,
            target,
            metric,
            ..
        } => (
            Some(*role),
            model_name,
            model,
            dataset,
            Some(target.clone()),
            Some(*metric),
        ),
    };
    let revision = match model {
        ModelRef::Hub { revision, .. } => revision.clone(),
        _ => None,
    };
    Ok(ResultRecord {
        schema_version: RESULT_SCHEMA_VERSION,
        kind,
        recycle_version: RECYCLE_VERSION.to_string(),
        git_revision: git_revision().map(str::to_string),
        job_id: job.id.clone(),
        config_hash: job.config_hash.clone(),
        suite: suite.name.clone(),
        arch: suite.arch.clone(),
        role,
        model: ModelRecord {
            name: name.clone(),
            id: model.display_id(),
            revision,
            weights_sha256: None,
        },
        dataset: DatasetRecord {
            id: dataset.display_id(),
            revision: None,
            fingerprint: None,
        },
        target,
        protocol,
        protocol_hash,
        seed: job.spec.seed(),
        metric,
        dev_score: None,
        test_score: None,
        n_train: None,
        n_dev: None,
        n_test: None,
        steps: None,
        epochs: None,
        wall_time_s: wall,
        device: None,
        finished_at: rfc3339_utc(at),
        checkpoint: None,
        error: None,
        probe: None,
    })
}

/// The record of a job that succeeded.
pub fn success_record(
    suite: &Suite,
    job: &Job,
    out: &JobOutput,
    wall: f64,
    at: SystemTime,
) -> Result<ResultRecord> {
    let kind = match job.spec {
        JobSpec::Donor { .. } => RecordKind::Donor,
        JobSpec::Eval { .. } => RecordKind::Finetune,
    };
    let mut r = base_record(suite, job, kind, wall, at)?;
    if out.model_revision.is_some() {
        r.model.revision = out.model_revision.clone();
    }
    r.model.weights_sha256 = out.weights_sha256.clone();
    r.dataset.fingerprint = out.dataset_fingerprint.clone();
    r.dataset.revision = out.dataset_revision.clone();
    r.dev_score = out.dev_score;
    r.test_score = out.test_score;
    r.n_train = Some(out.n_train);
    r.n_dev = Some(out.n_dev);
    r.n_test = Some(out.n_test);
    r.steps = Some(out.steps);
    r.epochs = Some(out.epochs);
    r.device = Some(out.device.clone());
    r.checkpoint = out.checkpoint.as_ref().map(|p| p.display().to_string());
    Ok(r)
}

/// The record of a job that failed.
pub fn failure_record(
    suite: &Suite,
    job: &Job,
    error: &str,
    wall: f64,
    at: SystemTime,
) -> Result<ResultRecord> {
    let mut r = base_record(suite, job, RecordKind::Failure, wall, at)?;
    r.error = Some(error.to_string());
    Ok(r)
}
