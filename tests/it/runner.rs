//! The experiment runner end to end with a deterministic fake executor: suites, plans, shards,
//! the result store, resume, failures, leaderboards, exporters and the `check` gate.

mod fixtures;
mod schema;

use assert_cmd::Command;
use recycle::leaderboard::{build, Cell, Layout};
use recycle::plan::{self, Job, JobSpec, Selection, Shard};
use recycle::progress::{Silent, StepInfo};
use recycle::results::{RecordKind, ResultStore};
use recycle::runner::{self, JobExecutor, JobOutput, RunSettings};
use recycle::suite::Suite;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Scores are a function of (model, target, seed); counts executions; fails the jobs it is told to.
#[derive(Default)]
struct FakeExecutor {
    runs: Mutex<BTreeMap<String, usize>>,
    fail: BTreeSet<String>,
    /// Jobs that fail as a kernel fault does, losing the CUDA context.
    lose_context: BTreeSet<String>,
    /// Donor checkpoints seen by evaluation jobs.
    donor_checkpoints: Mutex<BTreeMap<String, PathBuf>>,
}

fn unit(parts: &[&str]) -> f64 {
    let h = plan::sha256_hex(parts.join("\u{1f}").as_bytes());
    u64::from_str_radix(&h[..12], 16).unwrap() as f64 / (1u64 << 48) as f64
}

/// The fake's test score: a model effect, a target effect and a little seed noise.
fn fake_score(model: &str, target: &str, seed: u32) -> f64 {
    0.6 + 0.1 * unit(&[model])
        + 0.1 * unit(&[target])
        + 0.01 * unit(&[model, target, &seed.to_string()])
}

impl FakeExecutor {
    fn failing(ids: &[&str]) -> Self {
        FakeExecutor {
            fail: ids.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }
    fn total_runs(&self) -> usize {
        self.runs.lock().unwrap().values().sum()
    }
}

impl JobExecutor for FakeExecutor {
    fn execute(&self, job: &Job, on_step: &mut dyn FnMut(&StepInfo)) -> anyhow::Result<JobOutput> {
        *self.runs.lock().unwrap().entry(job.id.clone()).or_default() += 1;
        on_step(&StepInfo {
            step: 1,
            total_steps: Some(1),
            epoch: 0,
            loss: Some(0.5),
            examples_per_sec: None,
        });
        if self.fail.contains(&job.id) {
            anyhow::bail!("simulated failure of {}", job.id);
        }
        if self.lose_context.contains(&job.id) {
            anyhow::bail!(
                "training step 3: DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory \
                 access was encountered\")"
            );
        }
        let mut out = JobOutput {
            n_train: 8,
            n_dev: 4,
            n_test: 4,
            steps: 1,
            epochs: 1.0,
            device: "cpu".into(),
            ..Default::default()
        };
        match &job.spec {
            JobSpec::Donor { .. } => out.checkpoint = job.output_dir.clone(),
            JobSpec::Eval {
                model_name,
                target,
                seed,
                ..
            } => {
                if let Some(c) = &job.donor_checkpoint {
                    self.donor_checkpoints
                        .lock()
                        .unwrap()
                        .insert(job.id.clone(), c.clone());
                }
                out.test_score = Some(fake_score(model_name, target, *seed));
                out.dev_score = out.test_score;
            }
        }
        Ok(out)
    }
}

const SUITE: &str = r#"{
  "name": "mini",
  "arch": "tiny-arch",
  "baseline": {"name": "base", "hub": "org/base@main"},
  "candidates": [
    {"name": "alpha", "hub": "org/alpha"},
    {"name": "beta", "path": "${RECYCLE_HOME}/models/beta"},
    {"name": "gamma", "hub": "org/gamma@v2"}
  ],
  "targets": [
    {"name": "sst2", "dataset": {"path": "data/sst2"}, "metric": "accuracy"},
    {"name": "stsb", "dataset": {"hub": "glue", "config": "stsb"}, "metric": "spearman"}
  ],
  "seeds": {"baseline": 3, "candidates": 2},
  "profiles": {"quick": {"max_train": 16}}
}"#;

fn write_suite(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("suite.json");
    std::fs::write(&p, text).unwrap();
    p
}

fn parse(text: &str) -> Suite {
    Suite::parse(text, Path::new("suite.json"), None, Path::new("/home")).unwrap()
}

fn settings(dir: &Path, selection: Selection) -> RunSettings {
    RunSettings {
        donor_dir: dir.join("donors"),
        selection,
    }
}

fn recycle() -> Command {
    let mut c = Command::cargo_bin("recycle").unwrap();
    c.env("RECYCLE_HOME", "/nonexistent-recycle-home");
    c
}

#[test]
fn run_rank_check_pass_regression_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let results = tmp.path().join("results");
    let suite = parse(SUITE);
    let exec = FakeExecutor::default();
    let summary = runner::run(
        &suite,
        &ResultStore::new(&results),
        &exec,
        &settings(tmp.path(), Selection::All),
        &mut Silent,
    )
    .unwrap();
    assert_eq!(summary.done.len(), 2 * 3 + 3 * 2 * 2);
    assert!(summary.failed.is_empty());

    let reference = tmp.path().join("ref.json");
    recycle()
        .args([
            "rank",
            "--arch",
            "tiny-arch",
            "--format",
            "json",
            "--results",
        ])
        .arg(&results)
        .arg("--out")
        .arg(&reference)
        .assert()
        .success();
    recycle()
        .args(["check", "--reference"])
        .arg(&reference)
        .arg("--results")
        .arg(&results)
        .assert()
        .code(0);

    // Perturb the best model's average gain far beyond any noise: a regression.
    let mut board: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&reference).unwrap()).unwrap();
    let g = board["rows"][0]["avg_gain"].as_f64().unwrap();
    board["rows"][0]["avg_gain"] = serde_json::json!(g + 25.0);
    let perturbed = tmp.path().join("perturbed.json");
    std::fs::write(&perturbed, serde_json::to_vec(&board).unwrap()).unwrap();
    let out = recycle()
        .args(["check", "--reference"])
        .arg(&perturbed)
        .arg("--results")
        .arg(&results)
        .assert()
        .code(1);
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    assert!(stdout.contains("REGRESSION"), "{stdout}");

    // Not a leaderboard: bad input.
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, "{\"rows\": 3}").unwrap();
    let out = recycle()
        .args(["check", "--reference"])
        .arg(&bad)
        .arg("--results")
        .arg(&results)
        .assert()
        .code(2);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).to_string();
    assert!(stderr.contains("bad.json"), "{stderr}");
    // A missing reference file is bad input too.
    recycle()
        .args(["check", "--reference"])
        .arg(tmp.path().join("nope.json"))
        .arg("--results")
        .arg(&results)
        .assert()
        .code(2);
}

#[test]
fn resume_runs_no_job_twice_and_reruns_changed_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ResultStore::new(tmp.path().join("results"));
    let suite = parse(SUITE);
    let exec = FakeExecutor::default();
    let all = settings(tmp.path(), Selection::All);
    let first = runner::run(&suite, &store, &exec, &all, &mut Silent).unwrap();
    let second = runner::run(&suite, &store, &exec, &all, &mut Silent).unwrap();
    assert!(second.done.is_empty());
    assert_eq!(second.skipped, first.done);
    assert!(exec.runs.lock().unwrap().values().all(|&n| n == 1));
    assert_eq!(exec.total_runs(), first.done.len());

    // A protocol change on one target re-runs exactly that target's jobs (and replaces them).
    let changed = parse(&SUITE.replace(
        r#""metric": "spearman"}"#,
        r#""metric": "spearman", "protocol": {"learning_rate": 2e-5}}"#,
    ));
    let third = runner::run(&changed, &store, &exec, &all, &mut Silent).unwrap();
    assert!(!third.done.is_empty());
    assert!(
        third.done.iter().all(|id| id.contains("/stsb/")),
        "{:?}",
        third.done
    );
    assert_eq!(third.done.len() + third.skipped.len(), first.done.len());
    let rec = store.get("mini", &third.done[0]).unwrap().unwrap();
    assert_eq!(rec.protocol.learning_rate, 2e-5);
}

#[test]
fn a_failed_job_is_recorded_the_others_complete_and_it_is_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ResultStore::new(tmp.path().join("results"));
    let suite = parse(SUITE);
    let broken = "eval/beta/sst2/seed1";
    let exec = FakeExecutor::failing(&[broken]);
    let all = settings(tmp.path(), Selection::All);
    let summary = runner::run(&suite, &store, &exec, &all, &mut Silent).unwrap();
    assert_eq!(summary.failed.len(), 1);
    assert_eq!(summary.failed[0].0, broken);
    assert!(summary.failed[0].1.contains("simulated failure"));
    assert_eq!(summary.done.len(), plan::plan(&suite).unwrap().len() - 1);
    let rec = store.get("mini", broken).unwrap().unwrap();
    assert_eq!(rec.kind, RecordKind::Failure);
    assert!(rec.error.as_deref().unwrap().contains("simulated failure"));

    // The board shows the cell from the remaining seed; with every seed failing it shows Failed.
    let fixed = FakeExecutor::default();
    let again = runner::run(&suite, &store, &fixed, &all, &mut Silent).unwrap();
    assert_eq!(again.done, vec![broken.to_string()]);
    assert_eq!(fixed.total_runs(), 1);
}

/// A job that loses the CUDA context stops the run (every later job would fail the same way):
/// the error says so and how to resume, the jobs before it are kept, its failure is recorded,
/// nothing after it runs, and the same command resumes where it stopped.
#[test]
fn a_lost_cuda_context_stops_the_run_and_a_rerun_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ResultStore::new(tmp.path().join("results"));
    let suite = parse(SUITE);
    let jobs = plan::plan(&suite).unwrap();
    let faulting = jobs[2].id.clone();
    let exec = FakeExecutor {
        lose_context: [faulting.clone()].into(),
        ..Default::default()
    };
    let all = settings(tmp.path(), Selection::All);
    let err = runner::run(&suite, &store, &exec, &all, &mut Silent).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains(&faulting) && text.contains("CUDA context is lost") && text.contains("again"),
        "{text}"
    );
    assert_eq!(exec.total_runs(), 3, "nothing ran after the fault");
    let rec = store.get("mini", &faulting).unwrap().unwrap();
    assert_eq!(rec.kind, RecordKind::Failure);
    for job in &jobs[..2] {
        assert!(
            store.get("mini", &job.id).unwrap().is_some(),
            "{} kept",
            job.id
        );
    }
    assert!(store.get("mini", &jobs[3].id).unwrap().is_none());

    let fixed = FakeExecutor::default();
    let again = runner::run(&suite, &store, &fixed, &all, &mut Silent).unwrap();
    assert_eq!(again.skipped.len(), 2);
    assert_eq!(again.done.len(), jobs.len() - 2);
    assert!(again.done.contains(&faulting));
}

#[test]
fn plan_and_status_show_job_states() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write_suite(tmp.path(), SUITE);
    let results = tmp.path().join("results");
    let suite = Suite::parse(SUITE, &file, None, Path::new("/home")).unwrap();
    let exec = FakeExecutor::failing(&["eval/alpha/sst2/seed0"]);
    let sel = Selection::Jobs(vec![
        "eval/alpha/sst2/seed0".into(),
        "eval/alpha/sst2/seed1".into(),
    ]);
    runner::run(
        &suite,
        &ResultStore::new(&results),
        &exec,
        &settings(tmp.path(), sel),
        &mut Silent,
    )
    .unwrap();
    let out = recycle()
        .arg("plan")
        .arg(&file)
        .arg("--results")
        .arg(&results)
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    let state_of = |id: &str| {
        stdout
            .lines()
            .find(|l| l.contains(&format!(" {id} ")))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
    };
    assert_eq!(state_of("eval/alpha/sst2/seed0").as_deref(), Some("failed"));
    assert_eq!(state_of("eval/alpha/sst2/seed1").as_deref(), Some("done"));
    assert_eq!(state_of("eval/base/stsb/seed2").as_deref(), Some("missing"));
    let n = plan::plan(&suite).unwrap().len();
    let out = recycle()
        .arg("status")
        .arg(&file)
        .arg("--results")
        .arg(&results)
        .assert()
        .success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    assert!(
        stdout.contains(&format!(
            "{n} jobs: 1 done, 1 failed, 0 stale, {} missing",
            n - 2
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("fusion"), "no fusion section: {stdout}");
}

#[test]
fn leaderboard_gains_equal_the_per_seed_results() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ResultStore::new(tmp.path().join("results"));
    let suite = parse(SUITE);
    runner::run(
        &suite,
        &store,
        &FakeExecutor::default(),
        &settings(tmp.path(), Selection::All),
        &mut Silent,
    )
    .unwrap();
    let records = store.load_all().unwrap();
    let layout = Layout::from_suites("tiny-arch", std::slice::from_ref(&suite)).unwrap();
    let board = build("tiny-arch", &layout, &records, "2024-01-01T00:00:00Z");

    let scores = |model: &str, target: &str| -> Vec<f64> {
        records
            .iter()
            .filter(|r| r.model.name == model && r.target.as_deref() == Some(target))
            .map(|r| r.test_score.unwrap() * 100.0)
            .collect()
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert_eq!(board.rows.len(), 3);
    for row in &board.rows {
        let name = suite
            .candidates
            .iter()
            .find(|c| c.source.display_id() == row.model.id)
            .unwrap()
            .name
            .clone();
        let mut gains = Vec::new();
        for (t, cell) in suite.targets.iter().zip(&row.cells) {
            let base = scores("base", &t.name);
            assert_eq!(base.len(), 3);
            let cand = scores(&name, &t.name);
            assert_eq!(cand.len(), 2);
            let expected = mean(&cand) - mean(&base);
            let Cell::Done { gain, seeds, .. } = cell else {
                panic!("{name}/{}: {cell:?}", t.name)
            };
            assert!(
                (gain - expected).abs() < 1e-9,
                "{name}/{}: {gain} vs {expected}",
                t.name
            );
            assert_eq!(*seeds, 2);
            gains.push(expected);
        }
        assert!((row.avg_gain.unwrap() - mean(&gains)).abs() < 1e-9);
    }
    let avgs: Vec<f64> = board.rows.iter().map(|r| r.avg_gain.unwrap()).collect();
    assert!(
        avgs.windows(2).all(|w| w[0] >= w[1]),
        "not sorted: {avgs:?}"
    );
    assert_eq!(
        board
            .rows
            .iter()
            .map(|r| r.rank.unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
}

#[test]
fn shard_slices_are_disjoint_and_cover_the_plan() {
    for n_cand in 0..4 {
        for n_targets in 1..4 {
            for n_donors in 0..3 {
                let cands: Vec<String> = (0..n_cand)
                    .map(|i| format!(r#"{{"name": "c{i}", "hub": "org/c{i}"}}"#))
                    .collect();
                let targets: Vec<String> = (0..n_targets)
                    .map(|i| format!(r#"{{"name": "t{i}", "dataset": {{"path": "d{i}"}}, "metric": "accuracy"}}"#))
                    .collect();
                let donors: Vec<String> = (0..n_donors)
                    .map(|i| {
                        format!(r#"{{"name": "d{i}", "base": "b", "source": {{"path": "s{i}"}}}}"#)
                    })
                    .collect();
                let text = format!(
                    r#"{{"name": "p", "arch": "a", "baseline": {{"name": "b", "hub": "b"}}, "candidates": [{}],
                        "donors": [{}], "targets": [{}], "seeds": {{"baseline": 3, "candidates": 2}}}}"#,
                    cands.join(","),
                    donors.join(","),
                    targets.join(",")
                );
                let jobs = plan::plan(&parse(&text)).unwrap();
                let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
                assert_eq!(
                    ids.iter().collect::<BTreeSet<_>>().len(),
                    ids.len(),
                    "duplicate ids"
                );
                for count in 1..=9 {
                    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
                    for index in 0..count {
                        let slice =
                            plan::select(&jobs, &Selection::Shard(Shard { index, count })).unwrap();
                        // Plan order is kept inside a slice.
                        let pos: Vec<usize> = slice
                            .iter()
                            .map(|j| ids.iter().position(|i| *i == j.id).unwrap())
                            .collect();
                        assert!(pos.windows(2).all(|w| w[0] < w[1]));
                        for j in slice {
                            *seen.entry(j.id).or_default() += 1;
                        }
                    }
                    assert_eq!(
                        seen.len(),
                        jobs.len(),
                        "cover: {n_cand} {n_targets} {n_donors} / {count}"
                    );
                    assert!(seen.values().all(|&k| k == 1), "disjoint");
                }
            }
        }
    }
}

#[test]
fn job_ids_and_hashes_survive_appending_to_a_suite() {
    let before = plan::plan(&parse(SUITE)).unwrap();
    let grown = SUITE
        .replace(
            r#"{"name": "gamma", "hub": "org/gamma@v2"}"#,
            r#"{"name": "gamma", "hub": "org/gamma@v2"}, {"name": "delta", "hub": "org/delta"}"#,
        )
        .replace(
            r#""metric": "spearman"}"#,
            r#""metric": "spearman"}, {"name": "rte", "dataset": {"path": "data/rte"}, "metric": "accuracy"}"#,
        );
    let after = plan::plan(&parse(&grown)).unwrap();
    assert!(after.len() > before.len());
    for j in &before {
        let k = after
            .iter()
            .find(|k| k.id == j.id)
            .unwrap_or_else(|| panic!("{} vanished", j.id));
        assert_eq!(k.config_hash, j.config_hash, "{}", j.id);
    }
    // And the hash does change with what determines the result.
    let reseeded = plan::plan(&parse(&SUITE.replace("org/alpha", "org/alpha@v9"))).unwrap();
    let a = |p: &[Job]| {
        p.iter()
            .find(|j| j.id == "eval/alpha/sst2/seed0")
            .unwrap()
            .config_hash
            .clone()
    };
    assert_ne!(a(&before), a(&reseeded));
}

#[test]
fn donors_run_first_and_their_checkpoint_reaches_the_evaluation() {
    let text = SUITE.replace(
        r#""targets""#,
        r#""donors": [{"name": "mnli-donor", "base": "base", "source": {"hub": "glue", "config": "mnli"}}], "targets""#,
    );
    let suite = parse(&text);
    let jobs = plan::plan(&suite).unwrap();
    assert_eq!(jobs[0].id, "donor/mnli-donor");
    assert!(jobs[1..].iter().all(|j| j.stage == 1));
    let tmp = tempfile::tempdir().unwrap();
    let store = ResultStore::new(tmp.path().join("results"));

    // Evaluating the donor before it exists fails clearly (e.g. a shard without stage 0).
    let exec = FakeExecutor::default();
    let early = Selection::Jobs(vec!["eval/mnli-donor/sst2/seed0".into()]);
    let s = runner::run(
        &suite,
        &store,
        &exec,
        &settings(tmp.path(), early.clone()),
        &mut Silent,
    )
    .unwrap();
    assert_eq!(s.failed.len(), 1);
    assert!(
        s.failed[0].1.contains("run job donor/mnli-donor first"),
        "{}",
        s.failed[0].1
    );

    let s = runner::run(
        &suite,
        &store,
        &exec,
        &settings(tmp.path(), Selection::All),
        &mut Silent,
    )
    .unwrap();
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    let donor = store.get("mini", "donor/mnli-donor").unwrap().unwrap();
    assert_eq!(donor.kind, RecordKind::Donor);
    let ckpt = PathBuf::from(donor.checkpoint.unwrap());
    assert!(ckpt.starts_with(tmp.path().join("donors").join("mini")));
    let seen = exec.donor_checkpoints.lock().unwrap();
    assert_eq!(seen.get("eval/mnli-donor/sst2/seed0"), Some(&ckpt));
    assert_eq!(seen.len(), 2 * 2);
}

#[test]
fn atomic_writes_leave_no_temp_files_and_stale_ones_are_ignored_then_cleaned() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ResultStore::new(tmp.path());
    let suite = parse(SUITE);
    let sel = Selection::Jobs(vec!["eval/base/sst2/seed0".into()]);
    runner::run(
        &suite,
        &store,
        &FakeExecutor::default(),
        &settings(tmp.path(), sel.clone()),
        &mut Silent,
    )
    .unwrap();
    let all_files = |root: &Path| -> Vec<PathBuf> {
        fn walk(p: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(p).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out)
                } else {
                    out.push(p)
                }
            }
        }
        let mut v = Vec::new();
        walk(root, &mut v);
        v
    };
    let files = all_files(&tmp.path().join("mini"));
    assert_eq!(
        files,
        vec![tmp.path().join("mini/eval/base/sst2/seed0.json")]
    );

    // A killed run's half-written temp file: ignored by readers, removed by the next run.
    let stale = tmp.path().join("mini/eval/base/sst2/.tmp-killed.json");
    std::fs::write(&stale, "{\"schema_ver").unwrap();
    // Old enough that no live shard can still be writing it (younger temps are left alone).
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - recycle::results::STALE_TEMP_AGE * 2)
        .unwrap();
    assert_eq!(store.load_all().unwrap().len(), 1);
    runner::run(
        &suite,
        &store,
        &FakeExecutor::default(),
        &settings(tmp.path(), sel),
        &mut Silent,
    )
    .unwrap();
    assert!(!stale.exists());
    assert_eq!(all_files(&tmp.path().join("mini")).len(), 1);
}

#[test]
fn a_corrupt_result_file_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("mini/eval/base/sst2/seed0.json");
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    std::fs::write(&bad, "{\"kind\": \"finetune\"}").unwrap();
    let err = format!("{:#}", ResultStore::new(tmp.path()).load_all().unwrap_err());
    assert!(
        err.contains("seed0.json") && err.contains("delete it and `recycle run` redoes"),
        "{err}"
    );
    // Cut short: not even JSON.
    std::fs::write(&bad, "{\"schema_version\": 1, \"ki").unwrap();
    let err = format!("{:#}", ResultStore::new(tmp.path()).load_all().unwrap_err());
    assert!(
        err.contains("seed0.json") && err.contains("cut short"),
        "{err}"
    );
}

#[test]
fn json_files_that_are_not_records_are_skipped_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ResultStore::new(tmp.path());
    let suite = parse(SUITE);
    runner::run(
        &suite,
        &store,
        &FakeExecutor::default(),
        &settings(tmp.path(), Selection::All),
        &mut Silent,
    )
    .unwrap();
    let n = store.load_all().unwrap().len();
    assert!(n > 0);
    // recycle's own leaderboard JSON written into the results directory, at the top and inside
    // a suite (it has a schema_version of its own, and no `kind`).
    let board = recycle::export::exporter(recycle::export::Format::Json)
        .render(&build(
            "tiny-arch",
            &Layout::from_records("tiny-arch", &store.load_all().unwrap()).unwrap(),
            &store.load_all().unwrap(),
            "2026-01-01T00:00:00Z",
        ))
        .unwrap();
    assert!(String::from_utf8_lossy(&board).contains("\"schema_version\""));
    std::fs::write(tmp.path().join("reference.json"), &board).unwrap();
    std::fs::write(tmp.path().join("mini/board.json"), &board).unwrap();
    assert_eq!(store.load_all().unwrap().len(), n);
    assert_eq!(store.load_suite("mini").unwrap().len(), n);
}

#[test]
fn written_records_validate_against_the_json_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ResultStore::new(tmp.path());
    let suite = parse(&SUITE.replace(
        r#""targets""#,
        r#""donors": [{"name": "dn", "base": "alpha", "source": {"path": "src"}}], "targets""#,
    ));
    let exec = FakeExecutor::failing(&["eval/gamma/stsb/seed0"]);
    runner::run(
        &suite,
        &store,
        &exec,
        &settings(tmp.path(), Selection::All),
        &mut Silent,
    )
    .unwrap();
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/result-schema.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let records = store.load_all().unwrap();
    let kinds: BTreeSet<String> = records.iter().map(|r| format!("{:?}", r.kind)).collect();
    assert_eq!(
        kinds.len(),
        3,
        "want a finetune, a donor and a failure record: {kinds:?}"
    );
    for r in &records {
        let path = store.path_for(&r.suite, &r.job_id);
        let value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let errors = schema::validate(&schema, &schema, &value, "");
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
    }
    // The validator itself catches a wrong record.
    let mut wrong: serde_json::Value = serde_json::to_value(&records[0]).unwrap();
    wrong["kind"] = serde_json::json!("other");
    wrong["surprise"] = serde_json::json!(1);
    wrong.as_object_mut().unwrap().remove("seed");
    assert_eq!(schema::validate(&schema, &schema, &wrong, "").len(), 3);
    // A bf16 job records its precision in the protocol (f32 leaves the field out).
    let finetune = records
        .iter()
        .find(|r| r.kind == RecordKind::Finetune)
        .unwrap();
    let mut bf16 = serde_json::to_value(finetune).unwrap();
    assert!(bf16["protocol"].get("precision").is_none());
    bf16["protocol"]["precision"] = serde_json::json!("bf16");
    assert_eq!(
        schema::validate(&schema, &schema, &bf16, ""),
        Vec::<String>::new()
    );
    bf16["protocol"]["precision"] = serde_json::json!("fp8");
    assert_eq!(schema::validate(&schema, &schema, &bf16, "").len(), 1);
}

#[test]
fn leaderboard_snapshots_markdown_csv_json() {
    fixtures::check_snapshots();
}

#[test]
fn bad_suite_files_give_one_clear_error_each() {
    let cases: &[(&str, String, &str)] = &[
        ("unknown top-level key", SUITE.replace(r#""arch""#, r#""colour": 1, "arch""#), "unknown field `colour`"),
        (
            "unknown nested key",
            SUITE.replace(r#""metric": "accuracy""#, r#""metric": "accuracy", "lr": 1"#),
            "targets[0].lr: unknown field `lr`",
        ),
        ("unknown metric", SUITE.replace(r#""metric": "accuracy""#, r#""metric": "f1""#), "targets[0].metric: unknown metric \"f1\""),
        ("missing field", SUITE.replace(r#", "metric": "accuracy""#, ""), "targets[0]: missing field `metric`"),
        (
            "unknown donor base",
            SUITE.replace(r#""targets""#, r#""donors": [{"name": "d", "base": "nobody", "source": {"path": "x"}}], "targets""#),
            "donors[0].base: unknown model \"nobody\"",
        ),
        ("zero candidate seeds", SUITE.replace(r#""candidates": 2"#, r#""candidates": 0"#), "seeds.candidates: 0 seeds"),
        ("too few baseline seeds", SUITE.replace(r#""baseline": 3"#, r#""baseline": 0"#), "seeds.baseline: 0 seeds"),
        (
            "duplicate model",
            SUITE.replace(r#""name": "gamma""#, r#""name": "alpha""#),
            "candidates[2].name: duplicate model name \"alpha\"",
        ),
        (
            "duplicate target",
            SUITE.replace(r#""name": "stsb""#, r#""name": "sst2""#),
            "targets[1].name: duplicate target name \"sst2\"",
        ),
        (
            "hub and path",
            SUITE.replace(r#"{"name": "alpha", "hub": "org/alpha"}"#, r#"{"name": "alpha", "hub": "a", "path": "b"}"#),
            "candidates[0]: give either",
        ),
        (
            "bad protocol value",
            SUITE.replace(r#""seeds""#, r#""protocol": {"micro_batch_size": 100}, "seeds""#),
            "protocol.micro_batch_size: 100 does not divide batch_size 256",
        ),
        ("profile seeds", SUITE.replace(r#""max_train": 16"#, r#""seeds": {"candidates": 0}"#), "profiles.quick.seeds.candidates"),
    ];
    for (what, text, want) in cases {
        let profile = what.starts_with("profile").then_some("quick");
        let err =
            Suite::parse(text, Path::new("configs/x.json"), profile, Path::new("/h")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.starts_with("configs/x.json: "), "{what}: {msg}");
        assert!(msg.contains(want), "{what}: want {want:?} in {msg}");
        assert_eq!(msg.lines().count(), 1, "{what}: one line: {msg}");
    }
}

#[test]
fn dataset_checks_are_hooked_in_with_file_and_field() {
    let suite = Suite::parse(SUITE, Path::new("configs/x.json"), None, Path::new("/h")).unwrap();
    let err = suite
        .check_datasets(&|u| {
            if u.metric == Some(recycle::leaderboard::Metric::Spearman) {
                anyhow::bail!("column `label` holds classes; spearman needs scores");
            }
            Ok(())
        })
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.starts_with("configs/x.json: targets[1].dataset: column `label`"),
        "{msg}"
    );
    assert!(suite.check_datasets(&|_| Ok(())).is_ok());
}

#[test]
fn a_run_picks_a_profile() {
    let quick = Suite::parse(SUITE, Path::new("s.json"), Some("quick"), Path::new("/h")).unwrap();
    let jobs = plan::plan(&quick).unwrap();
    assert!(jobs.iter().all(|j| matches!(
        j.spec,
        JobSpec::Eval {
            max_train: Some(16),
            ..
        }
    )));
    let full = plan::plan(&parse(SUITE)).unwrap();
    assert_ne!(jobs[0].config_hash, full[0].config_hash);
}

#[test]
fn model_paths_are_checked_before_any_job_and_named() {
    let home = tempfile::tempdir().unwrap();
    let suite = Suite::parse(SUITE, Path::new("suite.json"), None, home.path()).unwrap();
    let err = format!(
        "{:#}",
        recycle::executor::check_model_paths(&suite).unwrap_err()
    );
    assert!(
        err.contains("candidates[1].path") && err.contains("does not exist"),
        "{err}"
    );
    std::fs::create_dir_all(home.path().join("models/beta")).unwrap();
    let err = format!(
        "{:#}",
        recycle::executor::check_model_paths(&suite).unwrap_err()
    );
    assert!(err.contains("has no config.json"), "{err}");
    std::fs::write(home.path().join("models/beta/config.json"), "{}").unwrap();
    recycle::executor::check_model_paths(&suite).unwrap();
}

#[test]
fn rank_names_a_missing_results_directory() {
    let out = recycle()
        .args([
            "rank",
            "--arch",
            "tiny-arch",
            "--results",
            "/nonexistent-results",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent-results: no results directory"),
        "{err}"
    );
}
