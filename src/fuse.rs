//! ColD Fusion (`recycle fuse`): each iteration, contributors fine-tune the current base on their
//! own datasets and the bodies are averaged into the next base, which is evaluated on the suite's
//! held-out targets so that every iteration appears on the leaderboard as `fusion:<suite>/iter<k>`.
//!
//! The plan is pure and static (`plan_fusion`): contributors are sampled from the seed up front,
//! so every job has a stable id and a config hash chained from the previous iteration's merge.
//! Contributor and evaluation jobs are ordinary runner jobs (a contributor is a donor job); the
//! merge is the one step the runner does not know, done here by `merge::merge_checkpoints` and
//! recorded in the result store like a donor, so a re-run skips whatever exists with its hash.

use crate::merge::{merge_checkpoints, MergeRequest, MergeSpec, Method};
use crate::plan::{self, canonical_json, sha256_hex, Job, JobSpec, Role};
use crate::progress::Progress;
use crate::results::{
    git_revision, rfc3339_utc, DatasetRecord, ModelRecord, RecordKind, ResultRecord, ResultStore,
    RECYCLE_VERSION, RESULT_SCHEMA_VERSION,
};
use crate::runner::{self, JobExecutor, JobState, Liveness, RunSettings, RunSummary};
use crate::select::rng::SplitMix64;
use crate::suite::{Fusion, ModelEntry, ModelRef, Suite};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

/// The whole fusion of a suite, in the order it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct FusionPlan {
    /// The baseline's (and a candidate fusion base's) evaluations on the held-out targets: the
    /// yardstick of every fusion gain (same ids and hashes as in `recycle run`).
    pub reference_evals: Vec<Job>,
    pub iterations: Vec<IterationPlan>,
}

/// One iteration: its contributors, the merge of their bodies, and the evaluations of the result.
#[derive(Debug, Clone, PartialEq)]
pub struct IterationPlan {
    /// 1-based.
    pub k: usize,
    /// The sampled source names, in suite order.
    pub sources: Vec<String>,
    /// The model the contributors start from (the fusion base, or the previous iteration's).
    pub base: ModelEntry,
    /// Donor jobs `fuse/iter<k>/contrib/<source>`.
    pub contributors: Vec<Job>,
    pub merge: MergeStep,
    /// `eval/fusion-iter<k>/<target>/seed<s>` on the held-out targets.
    pub evals: Vec<Job>,
}

/// Averaging the contributors' bodies into the next base.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeStep {
    /// `fuse/iter<k>/merge`.
    pub id: String,
    /// Hash of the iteration number, the method and the contributors' ids and hashes.
    pub config_hash: String,
    /// The fused base as a model of the suite (`fusion-iter<k>`, shown as `fusion:iter<k>`).
    pub model: ModelEntry,
    /// Where it is saved: `<home>/fusion/<suite>/iter<k>`.
    pub out: PathBuf,
}

/// The suite model of iteration `k`'s fused base: `fusion-<suite>-iter<k>`, shown as
/// `fusion:<suite>/iter<k>`. The suite's name is part of both, so two fusion suites of one
/// architecture sharing a results directory have rows of their own on the leaderboard (which keys
/// rows by model name). Its `raw` is that id rather than a path as written: it is what the
/// leaderboard shows, and it keeps the hash independent of where the recycle home lies (the chain
/// of hashes is carried by `donor_hash`/`base_hash`).
pub fn iteration_model(fusion: &Fusion, k: usize) -> ModelEntry {
    model_named(fusion, k, Naming::Scoped)
}

/// How the fused bases are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Naming {
    /// `fusion-<suite>-iter<k>` (`iteration_model`).
    Scoped,
    /// `fusion-iter<k>`, shown as `fusion:iter<k>`, in every suite: earlier builds, before the
    /// names were scoped. Only used to recognise results written then (`legacy_results`).
    Unscoped,
}

fn model_named(fusion: &Fusion, k: usize, naming: Naming) -> ModelEntry {
    let (name, raw) = match naming {
        Naming::Scoped => (
            format!("fusion-{}-iter{k}", fusion.suite),
            format!("fusion:{}/iter{k}", fusion.suite),
        ),
        Naming::Unscoped => (format!("fusion-iter{k}"), format!("fusion:iter{k}")),
    };
    ModelEntry {
        name,
        source: ModelRef::Path {
            raw,
            resolved: fusion.dir.join(format!("iter{k}")),
        },
    }
}

/// The indices (into `n` sources) of iteration `k`'s `count` contributors: a seeded partial
/// Fisher–Yates shuffle (so without replacement), returned in ascending order.
pub fn sample_sources(n: usize, count: usize, seed: u32, k: usize) -> Vec<usize> {
    let mut rng =
        SplitMix64::new((u64::from(seed) << 32) ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut idx: Vec<usize> = (0..n).collect();
    let count = count.min(n);
    for i in 0..count {
        let j = i + rng.below(n - i);
        idx.swap(i, j);
    }
    let mut picked = idx[..count].to_vec();
    picked.sort_unstable();
    picked
}

/// The fusion plan of a suite that has a `fusion` section.
pub fn plan_fusion(suite: &Suite) -> Result<FusionPlan> {
    plan_named(suite, Naming::Scoped)
}

fn plan_named(suite: &Suite, naming: Naming) -> Result<FusionPlan> {
    let fusion = suite.fusion.as_ref().ok_or_else(|| {
        anyhow!(
            "{}: no `fusion` section (see docs/suite-format.md)",
            suite.file.display()
        )
    })?;
    let held_out = fusion.held_out(&suite.targets);
    let reference_names = [suite.baseline.name.as_str(), fusion.base.name.as_str()];
    let reference_evals: Vec<Job> = plan::plan(suite)?
        .into_iter()
        .filter(|j| match &j.spec {
            JobSpec::Eval {
                model_name, target, ..
            } => {
                reference_names.contains(&model_name.as_str())
                    && held_out.iter().any(|t| &t.name == target)
            }
            JobSpec::Donor { .. } => false,
        })
        .collect();

    let mut iterations = Vec::new();
    let mut base = fusion.base.clone();
    let mut base_hash: Option<String> = None;
    for k in 1..=fusion.iterations {
        let picked = sample_sources(fusion.sources.len(), fusion.contributors, fusion.seed, k);
        let mut contributors = Vec::new();
        for &i in &picked {
            let s = &fusion.sources[i];
            let spec = JobSpec::Donor {
                donor: format!("fusion-iter{k}-{}", s.name),
                base_name: base.name.clone(),
                base: base.source.clone(),
                base_hash: base_hash.clone(),
                source: s.dataset.clone(),
                protocol: fusion.protocol.clone(),
                seed: fusion.seed,
                max_train: fusion.max_train,
                max_eval: fusion.max_eval,
            };
            contributors.push(Job::new(
                format!("fuse/iter{k}/contrib/{}", s.name),
                0,
                spec,
            )?);
        }
        let model = model_named(fusion, k, naming);
        let merge_hash = merge_hash(k, &contributors)?;
        let mut evals = Vec::new();
        for t in &held_out {
            for seed in 0..suite.seeds.candidates {
                let spec = JobSpec::Eval {
                    model_name: model.name.clone(),
                    role: Role::Candidate,
                    model: model.source.clone(),
                    donor_hash: Some(merge_hash.clone()),
                    target: t.name.clone(),
                    dataset: t.dataset.clone(),
                    metric: t.metric,
                    protocol: t.protocol.clone(),
                    seed,
                    max_train: t.max_train,
                    max_eval: t.max_eval,
                };
                evals.push(Job::new(
                    format!("eval/{}/{}/seed{seed}", model.name, t.name),
                    1,
                    spec,
                )?);
            }
        }
        let out = fusion.dir.join(format!("iter{k}"));
        iterations.push(IterationPlan {
            k,
            sources: picked
                .iter()
                .map(|&i| fusion.sources[i].name.clone())
                .collect(),
            base: base.clone(),
            contributors,
            merge: MergeStep {
                id: format!("fuse/iter{k}/merge"),
                config_hash: merge_hash.clone(),
                model: model.clone(),
                out,
            },
            evals,
        });
        base = model;
        base_hash = Some(merge_hash);
    }
    Ok(FusionPlan {
        reference_evals,
        iterations,
    })
}

/// One step of a fusion iteration: a runner job (a contributor or an evaluation) or the merge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step<'a> {
    Job(&'a Job),
    Merge(&'a MergeStep),
}

impl<'a> Step<'a> {
    pub fn id(&self) -> &'a str {
        match self {
            Step::Job(j) => &j.id,
            Step::Merge(m) => &m.id,
        }
    }
    pub fn config_hash(&self) -> &'a str {
        match self {
            Step::Job(j) => &j.config_hash,
            Step::Merge(m) => &m.config_hash,
        }
    }
}

impl IterationPlan {
    /// The iteration's steps in the order `run_fusion` takes them: the contributors, the merge,
    /// the evaluations of the fused base.
    pub fn steps(&self) -> impl Iterator<Item = Step<'_>> {
        self.contributors
            .iter()
            .map(Step::Job)
            .chain(std::iter::once(Step::Merge(&self.merge)))
            .chain(self.evals.iter().map(Step::Job))
    }
}

/// The state of every iteration step of `plan` (iteration, step, state), in the order
/// `run_fusion` takes them, against the suite's records and running markers. The reference
/// evaluations are left out: they are jobs of the suite's own plan. A merge counts as done only
/// when `run_fusion` would skip it (its fused base is still on disk); otherwise it is missing.
pub fn step_states<'a>(
    plan: &'a FusionPlan,
    records: &BTreeMap<String, ResultRecord>,
    running: &BTreeMap<String, Liveness>,
) -> Vec<(usize, Step<'a>, JobState)> {
    plan.iterations
        .iter()
        .flat_map(|it| it.steps().map(move |step| (it.k, step)))
        .map(|(k, step)| {
            let state = runner::job_state(step.id(), step.config_hash(), records, running);
            let state = match (step, state, records.get(step.id())) {
                (Step::Merge(m), JobState::Done, Some(r)) if !merge_is_done(r, m) => {
                    JobState::Missing
                }
                _ => state,
            };
            (k, step, state)
        })
        .collect()
}

/// A result written under the unscoped names of earlier builds (`fusion-iter<k>`) for a step of the
/// current plan: the same job (the record's config hash is the step's hash under the old names)
/// under another id (an evaluation), or the same id with another hash (a contributor starting
/// from a fused base, a later merge), or naming the fused base the old way (iteration 1's merge).
/// `run_fusion` renames it (`adopt_legacy_results`) rather than redoing the work.
#[derive(Debug, Clone, PartialEq)]
pub struct LegacyResult {
    pub old_id: String,
    pub new_id: String,
    pub new_hash: String,
    /// The record's new `model.name` and `model.id`: the step's model (an evaluation), base (a
    /// contributor) or fused base (the merge), as a fresh record of the step would have them.
    pub model_name: String,
    pub model_id: String,
    /// The step already has a current result under its new id (a rename interrupted after the
    /// write): the old file is only removed.
    pub superseded: bool,
}

/// The records of the suite (by job id) that `adopt_legacy_results` renames: results of the
/// current plan's steps under the unscoped names. Pairing is unambiguous: the record is in this
/// suite's results directory, under the id the step had, with exactly the hash it had.
pub fn legacy_results(
    suite: &Suite,
    records: &BTreeMap<String, ResultRecord>,
) -> Result<Vec<LegacyResult>> {
    let old = plan_named(suite, Naming::Unscoped)?;
    let new = plan_fusion(suite)?;
    let mut found = Vec::new();
    for (old_it, new_it) in old.iterations.iter().zip(&new.iterations) {
        for (o, n) in old_it.steps().zip(new_it.steps()) {
            let Some(r) = records
                .get(o.id())
                .filter(|r| r.config_hash == o.config_hash())
            else {
                continue;
            };
            let (model_name, model_id) = step_model(n);
            // Iteration 1's contributors are untouched by the names; its merge keeps its id and
            // hash but its record names the fused base.
            let same = o.id() == n.id()
                && o.config_hash() == n.config_hash()
                && r.model.name == model_name
                && r.model.id == model_id;
            if same {
                continue;
            }
            let superseded = o.id() != n.id()
                && records
                    .get(n.id())
                    .is_some_and(|r| r.config_hash == n.config_hash());
            found.push(LegacyResult {
                old_id: o.id().to_string(),
                new_id: n.id().to_string(),
                new_hash: n.config_hash().to_string(),
                model_name,
                model_id,
                superseded,
            });
        }
    }
    Ok(found)
}

/// The model a step's record names (see `runner::success_record` and `merge_record`).
fn step_model(step: Step) -> (String, String) {
    match step {
        Step::Job(j) => match &j.spec {
            JobSpec::Eval {
                model_name, model, ..
            } => (model_name.clone(), model.display_id()),
            JobSpec::Donor {
                base_name, base, ..
            } => (base_name.clone(), base.display_id()),
        },
        Step::Merge(m) => (m.model.name.clone(), m.model.source.display_id()),
    }
}

/// Renames the suite's `legacy_results`: each record is written again (atomically) under its new
/// id, with its new hash and model names and everything else as it was (scores, checkpoint,
/// versions, times), then the old file is removed. Returns what was renamed.
pub fn adopt_legacy_results(suite: &Suite, store: &ResultStore) -> Result<Vec<LegacyResult>> {
    let records = runner::records_by_job(store, suite)?;
    let found = legacy_results(suite, &records)?;
    for l in &found {
        if !l.superseded {
            let mut r = records[&l.old_id].clone();
            r.job_id = l.new_id.clone();
            r.config_hash = l.new_hash.clone();
            r.model.name = l.model_name.clone();
            r.model.id = l.model_id.clone();
            store
                .write(&r)
                .with_context(|| format!("renaming the result of {} to {}", l.old_id, l.new_id))?;
        }
        if l.old_id != l.new_id {
            store.remove(&suite.name, &l.old_id)?;
        }
    }
    Ok(found)
}

/// Ids among `records` of evaluations of fused bases under the unscoped names
/// (`eval/fusion-iter<k>/…`) other than those `adoptable` renames: results of an earlier
/// configuration that no step of the plan claims. The leaderboard would show them as rows
/// `fusion:iter<k>`.
pub fn unscoped_leftovers<'a>(
    records: &'a BTreeMap<String, ResultRecord>,
    adoptable: &[LegacyResult],
) -> Vec<&'a str> {
    records
        .keys()
        .map(String::as_str)
        .filter(|id| !adoptable.iter().any(|l| l.old_id == *id))
        .filter(|id| {
            id.strip_prefix("eval/fusion-iter").is_some_and(|rest| {
                let digits = rest.chars().take_while(char::is_ascii_digit).count();
                digits > 0 && rest[digits..].starts_with('/')
            })
        })
        .collect()
}

/// sha256 of the merge's identity: iteration, method, heads dropped, contributors (id + hash).
fn merge_hash(k: usize, contributors: &[Job]) -> Result<String> {
    let inputs: Vec<serde_json::Value> = contributors
        .iter()
        .map(|j| serde_json::json!({ "id": j.id, "config_hash": j.config_hash }))
        .collect();
    let value = serde_json::json!({
        "schema_version": RESULT_SCHEMA_VERSION,
        "spec": {
            "kind": "fusion_merge",
            "iteration": k,
            "method": Method::Average.as_str(),
            "keep_head": false,
            "contributors": inputs,
        }
    });
    Ok(sha256_hex(canonical_json(&value).as_bytes()))
}

/// What `run_fusion` did, and where it stopped if an iteration could not be completed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FuseSummary {
    /// Every job and merge step: done, skipped (already done) and failed.
    pub jobs: RunSummary,
    /// The iteration at which the loop stopped (a contributor or the merge failed).
    pub stopped_at: Option<usize>,
    /// Results under earlier builds' unscoped names, renamed to this plan's before the loop ran.
    pub adopted: Vec<LegacyResult>,
}

/// Runs the fusion of `suite`: first renames the results of its steps written under recycle
/// builds' unscoped names (`adopt_legacy_results`), then runs the reference evaluations, then
/// iteration by iteration the contributors, the merge and the evaluations. A failed contributor
/// or merge ends the loop (later iterations depend on it); a failed evaluation is recorded and the
/// loop goes on.
/// `model_dir` resolves a model to its local checkpoint dir (the template of the first merge).
pub fn run_fusion(
    suite: &Suite,
    store: &ResultStore,
    executor: &dyn JobExecutor,
    model_dir: &dyn Fn(&ModelRef) -> Result<PathBuf>,
    progress: &mut dyn Progress,
) -> Result<FuseSummary> {
    let plan = plan_fusion(suite)?;
    let fusion = suite
        .fusion
        .as_ref()
        .context("the suite has no fusion section")?;
    let settings = RunSettings {
        // The runner saves donors under <donor_dir>/<suite>/: here <home>/fusion/<suite>/.
        donor_dir: fusion
            .dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| fusion.dir.clone()),
        selection: plan::Selection::All,
    };
    let mut summary = FuseSummary {
        adopted: adopt_legacy_results(suite, store)?,
        ..FuseSummary::default()
    };
    let mut stage = |jobs: &[Job], summary: &mut FuseSummary| -> Result<bool> {
        let s = runner::run_jobs(
            suite,
            store,
            executor,
            &settings,
            jobs,
            jobs.to_vec(),
            progress,
        )?;
        let ok = s.failed.is_empty();
        summary.jobs.done.extend(s.done);
        summary.jobs.skipped.extend(s.skipped);
        summary.jobs.failed.extend(s.failed);
        Ok(ok)
    };
    stage(&plan.reference_evals, &mut summary)?;
    for it in &plan.iterations {
        if !stage(&it.contributors, &mut summary)? {
            summary.stopped_at = Some(it.k);
            break;
        }
        let started = Instant::now();
        let merged = match existing_merge(store, suite, &it.merge)? {
            Some(_) => {
                summary.jobs.skipped.push(it.merge.id.clone());
                true
            }
            None => {
                let outcome = merge_iteration(store, suite, it, model_dir);
                let wall = started.elapsed().as_secs_f64();
                let (record, ok) = match outcome {
                    Ok(sha) => (
                        merge_record(suite, fusion, it, Ok(sha), wall, SystemTime::now())?,
                        true,
                    ),
                    Err(e) => {
                        let msg = format!("{e:#}");
                        summary.jobs.failed.push((it.merge.id.clone(), msg.clone()));
                        (
                            merge_record(suite, fusion, it, Err(msg), wall, SystemTime::now())?,
                            false,
                        )
                    }
                };
                store
                    .write(&record)
                    .with_context(|| format!("job {}: cannot write its result", it.merge.id))?;
                if ok {
                    summary.jobs.done.push(it.merge.id.clone());
                }
                ok
            }
        };
        if !merged {
            summary.stopped_at = Some(it.k);
            break;
        }
        stage(&it.evals, &mut summary)?;
    }
    Ok(summary)
}

/// The merge's record when it is done for this configuration and its checkpoint is still there.
fn existing_merge(
    store: &ResultStore,
    suite: &Suite,
    step: &MergeStep,
) -> Result<Option<ResultRecord>> {
    let Some(r) = store.get(&suite.name, &step.id)? else {
        return Ok(None);
    };
    Ok(merge_is_done(&r, step).then_some(r))
}

/// Whether `r` is the record of `step` done for its current configuration, with the fused base
/// still on disk (a merge whose checkpoint is gone is redone).
fn merge_is_done(r: &ResultRecord, step: &MergeStep) -> bool {
    let present = r
        .checkpoint
        .as_ref()
        .is_some_and(|c| Path::new(c).join("config.json").is_file());
    r.config_hash == step.config_hash && r.kind == RecordKind::Donor && present
}

/// Averages the bodies of the iteration's contributors (heads dropped) into `it.merge.out`, with
/// the iteration's base as the template (config and tokenizer carried over); returns the sha256
/// of the fused weights.
fn merge_iteration(
    store: &ResultStore,
    suite: &Suite,
    it: &IterationPlan,
    model_dir: &dyn Fn(&ModelRef) -> Result<PathBuf>,
) -> Result<String> {
    let mut models = Vec::new();
    for c in &it.contributors {
        let r = store
            .get(&suite.name, &c.id)?
            .filter(|r| r.config_hash == c.config_hash && r.kind == RecordKind::Donor)
            .ok_or_else(|| {
                anyhow!(
                    "contributor {} has no checkpoint for its configuration",
                    c.id
                )
            })?;
        let ckpt = r
            .checkpoint
            .ok_or_else(|| anyhow!("the result of job {} names no checkpoint", c.id))?;
        models.push(PathBuf::from(ckpt));
    }
    let template = model_dir(&it.base.source)
        .with_context(|| format!("iteration {}: base model {}", it.k, it.base.name))?;
    let out = &it.merge.out;
    if out.exists() {
        // Left by a merge of another configuration, or by one whose record was lost.
        std::fs::remove_dir_all(out)
            .with_context(|| format!("removing the stale fused base {}", out.display()))?;
    }
    let req = MergeRequest {
        spec: MergeSpec::new(Method::Average, models.len()),
        base: Some(template),
        models,
        keep_head: false,
        out: out.clone(),
    };
    merge_checkpoints(&req).with_context(|| format!("merging into {}", out.display()))?;
    crate::executor::weights_sha256(out)
}

/// The record of a merge step: a donor-like record whose checkpoint is the fused base.
fn merge_record(
    suite: &Suite,
    fusion: &Fusion,
    it: &IterationPlan,
    outcome: std::result::Result<String, String>,
    wall: f64,
    at: SystemTime,
) -> Result<ResultRecord> {
    let (kind, sha, error) = match outcome {
        Ok(sha) => (RecordKind::Donor, Some(sha), None),
        Err(e) => (RecordKind::Failure, None, Some(e)),
    };
    Ok(ResultRecord {
        schema_version: RESULT_SCHEMA_VERSION,
        kind,
        recycle_version: RECYCLE_VERSION.to_string(),
        git_revision: git_revision().map(str::to_string),
        job_id: it.merge.id.clone(),
        config_hash: it.merge.config_hash.clone(),
        suite: suite.name.clone(),
        arch: suite.arch.clone(),
        role: None,
        model: ModelRecord {
            name: it.merge.model.name.clone(),
            id: it.merge.model.source.display_id(),
            revision: None,
            weights_sha256: sha,
        },
        dataset: DatasetRecord {
            id: it.sources.join("+"),
            fingerprint: None,
            revision: None,
        },
        target: None,
        protocol: fusion.protocol.clone(),
        protocol_hash: plan::protocol_hash(&fusion.protocol)?,
        seed: fusion.seed,
        metric: None,
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
        checkpoint: (kind == RecordKind::Donor).then(|| it.merge.out.display().to_string()),
        probe: None,
        error,
    })
}

/// Checks that a fusion plan's ids are unique (ids are result file paths).
pub fn check_ids(plan: &FusionPlan) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    let ids = plan.reference_evals.iter().map(|j| j.id.as_str()).chain(
        plan.iterations
            .iter()
            .flat_map(|it| it.steps().map(|s| s.id())),
    );
    for id in ids {
        if !seen.insert(id) {
            bail!("fusion plan: job id {id} appears twice");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUITE: &str = r#"{
        "name": "s", "arch": "a",
        "baseline": {"name": "base", "path": "/m/base"},
        "targets": [
            {"name": "t1", "dataset": {"path": "/d/t1"}, "metric": "accuracy"},
            {"name": "t2", "dataset": {"path": "/d/t2"}, "metric": "accuracy"},
            {"name": "t3", "dataset": {"path": "/d/t3"}, "metric": "accuracy"},
            {"name": "held", "dataset": {"path": "/d/held"}, "metric": "accuracy"}
        ],
        "seeds": {"baseline": 3, "candidates": 2},
        "fusion": {"iterations": 3, "contributors": 2, "sources": ["t1", "t2", "t3"], "seed": 7}
    }"#;

    fn suite(text: &str) -> Suite {
        Suite::parse(text, Path::new("s.json"), None, Path::new("/h")).unwrap()
    }

    #[test]
    fn sampling_is_seeded_without_replacement_and_varies() {
        for k in 1..50 {
            let s = sample_sources(5, 3, 7, k);
            assert_eq!(s.len(), 3);
            assert!(s.windows(2).all(|w| w[0] < w[1]), "{s:?}");
            assert!(s.iter().all(|&i| i < 5));
            assert_eq!(s, sample_sources(5, 3, 7, k));
        }
        let draws: std::collections::BTreeSet<Vec<usize>> =
            (1..50).map(|k| sample_sources(5, 3, 7, k)).collect();
        assert!(
            draws.len() > 3,
            "iterations should not all draw the same sources"
        );
        let other: Vec<Vec<usize>> = (1..50).map(|k| sample_sources(5, 3, 8, k)).collect();
        let same: Vec<Vec<usize>> = (1..50).map(|k| sample_sources(5, 3, 7, k)).collect();
        assert_ne!(other, same, "another seed should give another sequence");
        assert_eq!(sample_sources(3, 3, 1, 1), vec![0, 1, 2]);
    }

    #[test]
    fn plan_has_stable_ids_and_chained_hashes() {
        let s = suite(SUITE);
        let p = plan_fusion(&s).unwrap();
        check_ids(&p).unwrap();
        let ref_ids: Vec<&str> = p.reference_evals.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(
            ref_ids,
            [
                "eval/base/held/seed0",
                "eval/base/held/seed1",
                "eval/base/held/seed2"
            ]
        );
        assert_eq!(p.iterations.len(), 3);
        let it2 = &p.iterations[1];
        assert_eq!(it2.merge.id, "fuse/iter2/merge");
        assert_eq!(it2.merge.out, Path::new("/h/fusion/s/iter2"));
        assert_eq!(it2.contributors.len(), 2);
        for (c, src) in it2.contributors.iter().zip(&it2.sources) {
            assert_eq!(c.id, format!("fuse/iter2/contrib/{src}"));
            let JobSpec::Donor {
                base, base_hash, ..
            } = &c.spec
            else {
                panic!("a contributor is a donor job")
            };
            assert_eq!(base, &iteration_model(s.fusion.as_ref().unwrap(), 1).source);
            assert_eq!(base_hash.as_ref(), Some(&p.iterations[0].merge.config_hash));
        }
        let eval_ids: Vec<&str> = it2.evals.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(
            eval_ids,
            [
                "eval/fusion-s-iter2/held/seed0",
                "eval/fusion-s-iter2/held/seed1"
            ]
        );
        // Iteration 1 starts from the baseline, with no chained hash.
        let JobSpec::Donor { base_hash, .. } = &p.iterations[0].contributors[0].spec else {
            panic!()
        };
        assert!(base_hash.is_none());

        // A change to iteration 1 (its protocol) changes every later hash.
        let changed = suite(&SUITE.replace(
            r#""seed": 7}"#,
            r#""seed": 7, "protocol": {"learning_rate": 1e-3}}"#,
        ));
        let q = plan_fusion(&changed).unwrap();
        for (a, b) in p.iterations.iter().zip(&q.iterations) {
            assert_ne!(a.merge.config_hash, b.merge.config_hash);
            assert_ne!(a.evals[0].config_hash, b.evals[0].config_hash);
        }
        // The reference evaluations do not depend on the fusion settings.
        assert_eq!(p.reference_evals, q.reference_evals);
        // The same suite plans the same hashes.
        assert_eq!(plan_fusion(&suite(SUITE)).unwrap(), p);
    }
}
