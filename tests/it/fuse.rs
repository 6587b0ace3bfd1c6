//! `recycle fuse` end to end on the tiny BERT fixture and tiny datasets written here: 2 iterations
//! × 2 contributors through the CLI, the fused base against an independently computed average,
//! resume after a lost iteration, a failed contributor, and the leaderboard's fusion rows.

use assert_cmd::Command;
use candle_core::{DType, Tensor};
use recycle::data::store::{write_dataset, Draft, Existing};
use recycle::data::{Example, Label, Task};
use recycle::fuse::{plan_fusion, run_fusion, FusionPlan};
use recycle::plan::{Job, JobSpec};
use recycle::progress::{Silent, StepInfo};
use recycle::results::{RecordKind, ResultStore};
use recycle::runner::{JobExecutor, JobOutput};
use recycle::suite::{ModelRef, Suite};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const WORDS: &[&str] = &[
    "good", "bad", "fine", "awful", "great", "poor", "nice", "sad", "happy", "dull",
];

/// A copy of the parity BERT fixture with a WordPiece vocabulary (40 entries, as its config).
fn base_model(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/bert");
    let out = dir.join("models/base");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), out.join(f)).unwrap();
    }
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    vocab.extend(WORDS.iter().map(|s| s.to_string()));
    while vocab.len() < 40 {
        vocab.push(format!("w{}", vocab.len()));
    }
    std::fs::write(out.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
    out
}

/// A 2-class dataset whose label is bit `shift`-ish of the first word's index (a different rule
/// per dataset, so contributors trained on different datasets end up different).
fn dataset(dir: &Path, name: &str, shift: usize) {
    let rows = |n: usize, off: usize| -> Vec<Example> {
        (0..n)
            .map(|i| {
                let w = (i + off) % WORDS.len();
                Example {
                    text: format!("{} {}", WORDS[w], WORDS[(w + 3) % WORDS.len()]),
                    text_pair: None,
                    label: Some(Label::Class(((w / (shift + 1)) % 2) as u32)),
                }
            })
            .collect()
    };
    let draft = Draft {
        name: name.to_string(),
        task: Task::Classification {
            labels: vec!["no".into(), "yes".into()],
        },
        source: "written by tests/it/fuse.rs".into(),
        license: "CC0-1.0".into(),
        split_seed: None,
        splits: vec![
            ("train".into(), rows(8, 0)),
            ("validation".into(), rows(4, 1)),
            ("test".into(), rows(4, 2)),
        ],
    };
    write_dataset(&dir.join("data").join(name), &draft, Existing::Fail).unwrap();
}

const SUITE: &str = r#"{
  "name": "fz",
  "arch": "tiny-bert",
  "baseline": {"name": "base", "path": "${RECYCLE_HOME}/models/base"},
  "targets": [
    {"name": "t1", "dataset": {"path": "${RECYCLE_HOME}/data/t1"}, "metric": "accuracy"},
    {"name": "t2", "dataset": {"path": "${RECYCLE_HOME}/data/t2"}, "metric": "accuracy"},
    {"name": "t3", "dataset": {"path": "${RECYCLE_HOME}/data/t3"}, "metric": "accuracy"},
    {"name": "held", "dataset": {"path": "${RECYCLE_HOME}/data/held"}, "metric": "accuracy"}
  ],
  "protocol": {"batch_size": 4, "micro_batch_size": 4, "max_epochs": 1, "max_length": 12,
               "patience": 0, "warmup_ratio": 0.0, "learning_rate": 1e-3},
  "seeds": {"baseline": 3, "candidates": 1},
  "fusion": {"iterations": 2, "contributors": 2, "sources": ["t1", "t2", "t3"], "seed": 5}
}"#;

struct Setup {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    suite_file: PathBuf,
    results: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    base_model(&home);
    for (i, name) in ["t1", "t2", "t3", "held"].iter().enumerate() {
        dataset(&home, name, i);
    }
    let suite_file = tmp.path().join("fz.json");
    std::fs::write(&suite_file, SUITE).unwrap();
    let results = tmp.path().join("results");
    Setup {
        _tmp: tmp,
        home,
        suite_file,
        results,
    }
}

impl Setup {
    fn suite(&self) -> Suite {
        Suite::parse(SUITE, &self.suite_file, None, &self.home).unwrap()
    }
    fn fuse(&self) -> assert_cmd::assert::Assert {
        Command::cargo_bin("recycle")
            .unwrap()
            .env("RECYCLE_HOME", &self.home)
            .env("HF_HUB_OFFLINE", "1")
            .arg("fuse")
            .arg(&self.suite_file)
            .arg("--results")
            .arg(&self.results)
            .args(["--device", "cpu"])
            .assert()
    }
    /// Every result file's bytes, by job id.
    fn files(&self) -> BTreeMap<String, String> {
        ResultStore::new(&self.results)
            .load_suite("fz")
            .unwrap()
            .into_iter()
            .map(|r| (r.job_id.clone(), serde_json::to_string(&r).unwrap()))
            .collect()
    }
}

fn ids(plan: &FusionPlan) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = plan.reference_evals.iter().map(|j| j.id.clone()).collect();
    for it in &plan.iterations {
        out.extend(it.contributors.iter().map(|j| j.id.clone()));
        out.insert(it.merge.id.clone());
        out.extend(it.evals.iter().map(|j| j.id.clone()));
    }
    out
}

/// Body tensors of a checkpoint by their name without the `bert.` prefix (heads left out).
fn body(dir: &Path) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("classifier.") && !n.starts_with("cls."))
        .map(|(n, t)| (n.strip_prefix("bert.").unwrap_or(&n).to_string(), t))
        .collect()
}

#[test]
fn two_iterations_through_the_cli_then_resume_and_rank() {
    let s = setup();
    let out = s.fuse().success();
    let stdout = String::from_utf8_lossy(&out.get_output().stdout).to_string();
    assert!(
        stdout.contains("fusion:fz/iter1") && stdout.contains("fusion:fz/iter2"),
        "{stdout}"
    );

    let suite = s.suite();
    let plan = plan_fusion(&suite).unwrap();
    let files = s.files();
    let got: BTreeSet<String> = files.keys().cloned().collect();
    assert_eq!(got, ids(&plan));
    let store = ResultStore::new(&s.results);
    for id in &got {
        let r = store.get("fz", id).unwrap().unwrap();
        assert_ne!(r.kind, RecordKind::Failure, "{id}: {:?}", r.error);
    }

    // The fused base of iteration 1 is the mean of its contributors' bodies, saved with the
    // base's config and tokenizer, and loads back with exactly those tensors.
    let it1 = &plan.iterations[0];
    let contribs: Vec<BTreeMap<String, Tensor>> = it1
        .contributors
        .iter()
        .map(|c| {
            let r = store.get("fz", &c.id).unwrap().unwrap();
            body(Path::new(&r.checkpoint.unwrap()))
        })
        .collect();
    let fused = body(&it1.merge.out);
    let base = body(&s.home.join("models/base"));
    assert_eq!(
        fused.keys().collect::<Vec<_>>(),
        base.keys().collect::<Vec<_>>()
    );
    let mut compared = 0;
    for (name, t) in &fused {
        if t.dtype() != DType::F32 {
            continue;
        }
        let sum = contribs
            .iter()
            .map(|c| c[name].clone())
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
        let mean = (sum / contribs.len() as f64).unwrap();
        let diff = (t - &mean)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            diff <= 1e-6,
            "{name}: fused differs from the mean by {diff}"
        );
        // Fine-tuning moved the weights, so the check is not vacuous.
        compared += 1;
    }
    assert!(compared > 10);
    let moved: f32 = contribs[0]
        .iter()
        .filter(|(_, t)| t.dtype() == DType::F32)
        .map(|(n, t)| {
            (t - &contribs[1][n])
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum();
    assert!(moved > 0.0, "contributors should differ");
    for f in ["vocab.txt"] {
        assert_eq!(
            std::fs::read(it1.merge.out.join(f)).unwrap(),
            std::fs::read(s.home.join("models/base").join(f)).unwrap()
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(it1.merge.out.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["model_type"], "bert");
    assert_eq!(cfg["hidden_size"], 16);

    // Iteration 2 started from iteration 1's fused base.
    let c2 = store
        .get("fz", &plan.iterations[1].contributors[0].id)
        .unwrap()
        .unwrap();
    assert_eq!(c2.model.id, "fusion:fz/iter1");

    // Lose the last iteration's merge and evaluations: a re-run redoes exactly those.
    let it2 = &plan.iterations[1];
    let lost: BTreeSet<String> = std::iter::once(it2.merge.id.clone())
        .chain(it2.evals.iter().map(|j| j.id.clone()))
        .collect();
    for id in &lost {
        std::fs::remove_file(store.path_for("fz", id)).unwrap();
    }
    std::fs::remove_dir_all(&it2.merge.out).unwrap();
    s.fuse().success();
    let again = s.files();
    assert_eq!(
        again.keys().collect::<Vec<_>>(),
        files.keys().collect::<Vec<_>>()
    );
    for (id, text) in &files {
        if lost.contains(id) {
            assert_ne!(&again[id], text, "{id} should have been re-run");
        } else {
            assert_eq!(&again[id], text, "{id} should have been skipped");
        }
    }
    assert!(it2.merge.out.join("model.safetensors").is_file());

    // The leaderboard shows the fusion iterations as candidates on the held-out target.
    let board = rank_board(&s);
    let rows: Vec<&str> = board["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["model"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.contains(&"fusion:fz/iter1") && rows.contains(&"fusion:fz/iter2"));
    let targets: Vec<&str> = board["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(targets, ["held"]);
}

/// Saves a copy of the base as every donor checkpoint (scaled per job, so the average is not a
/// copy of any input); fails the jobs it is told to; counts runs.
struct CopyExecutor {
    base: PathBuf,
    fail: BTreeSet<String>,
    runs: Mutex<Vec<String>>,
}

impl JobExecutor for CopyExecutor {
    fn execute(&self, job: &Job, _: &mut dyn FnMut(&StepInfo)) -> anyhow::Result<JobOutput> {
        self.runs.lock().unwrap().push(job.id.clone());
        if self.fail.contains(&job.id) {
            anyhow::bail!("simulated failure of {}", job.id);
        }
        let mut out = JobOutput {
            device: "cpu".into(),
            ..Default::default()
        };
        match &job.spec {
            JobSpec::Donor { .. } => {
                let dir = job.output_dir.clone().unwrap();
                std::fs::create_dir_all(&dir).unwrap();
                for f in ["config.json", "vocab.txt"] {
                    std::fs::copy(self.base.join(f), dir.join(f)).unwrap();
                }
                let scale = 1.0 + self.runs.lock().unwrap().len() as f64;
                let tensors: std::collections::HashMap<String, Tensor> =
                    candle_core::safetensors::load(
                        self.base.join("model.safetensors"),
                        &candle_core::Device::Cpu,
                    )?
                    .into_iter()
                    .map(|(n, t)| {
                        let t = if t.dtype() == DType::F32 {
                            (t * scale).unwrap()
                        } else {
                            t
                        };
                        (n, t)
                    })
                    .collect();
                candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
                out.checkpoint = Some(dir);
            }
            JobSpec::Eval { .. } => out.test_score = Some(0.5),
        }
        Ok(out)
    }
}

fn model_dir(m: &ModelRef) -> anyhow::Result<PathBuf> {
    match m {
        ModelRef::Path { resolved, .. } => Ok(resolved.clone()),
        other => anyhow::bail!("not a local model: {other:?}"),
    }
}

#[test]
fn a_failed_contributor_stops_the_loop_and_a_rerun_does_only_the_rest() {
    let s = setup();
    let suite = s.suite();
    let plan = plan_fusion(&suite).unwrap();
    let store = ResultStore::new(&s.results);
    let failing = plan.iterations[1].contributors[1].id.clone();
    let exec = CopyExecutor {
        base: s.home.join("models/base"),
        fail: [failing.clone()].into(),
        runs: Mutex::new(Vec::new()),
    };
    let summary = run_fusion(&suite, &store, &exec, &model_dir, &mut Silent).unwrap();
    assert_eq!(summary.stopped_at, Some(2));
    assert_eq!(summary.jobs.failed.len(), 1);
    assert_eq!(summary.jobs.failed[0].0, failing);
    assert!(!plan.iterations[1].merge.out.exists());
    assert!(store
        .get("fz", &plan.iterations[1].merge.id)
        .unwrap()
        .is_none());
    let first: Vec<String> = exec.runs.lock().unwrap().clone();

    let exec2 = CopyExecutor {
        fail: BTreeSet::new(),
        runs: Mutex::new(Vec::new()),
        ..exec
    };
    let summary = run_fusion(&suite, &store, &exec2, &model_dir, &mut Silent).unwrap();
    assert_eq!(summary.stopped_at, None);
    assert!(summary.jobs.failed.is_empty());
    let rerun: Vec<String> = exec2.runs.lock().unwrap().clone();
    let mut want = vec![failing.clone()];
    want.extend(plan.iterations[1].evals.iter().map(|j| j.id.clone()));
    assert_eq!(rerun, want, "first run: {first:?}");
    assert!(summary.jobs.done.contains(&plan.iterations[1].merge.id));
    assert!(summary.jobs.skipped.contains(&plan.iterations[0].merge.id));
    assert!(plan.iterations[1]
        .merge
        .out
        .join("model.safetensors")
        .is_file());
}

#[test]
fn sampling_and_hashes_are_deterministic_given_the_seed() {
    let s = setup();
    let a = plan_fusion(&s.suite()).unwrap();
    let b = plan_fusion(&s.suite()).unwrap();
    assert_eq!(a, b);
    for it in &a.iterations {
        assert_eq!(it.sources.len(), 2);
        assert_eq!(it.sources.iter().collect::<BTreeSet<_>>().len(), 2);
    }
    let other = Suite::parse(
        &SUITE.replace("\"seed\": 5", "\"seed\": 6"),
        &s.suite_file,
        None,
        &s.home,
    )
    .unwrap();
    let c = plan_fusion(&other).unwrap();
    assert_ne!(
        a.iterations[0].merge.config_hash,
        c.iterations[0].merge.config_hash
    );
}

#[test]
fn fusion_section_errors_name_the_field() {
    let home = Path::new("/h");
    let parse = |text: &str| {
        format!(
            "{:#}",
            Suite::parse(text, Path::new("fz.json"), None, home).unwrap_err()
        )
    };
    let e = parse(&SUITE.replace("\"contributors\": 2", "\"contributors\": 4"));
    assert!(e.contains("fz.json: fusion.contributors"), "{e}");
    let e = parse(&SUITE.replace("[\"t1\", \"t2\", \"t3\"]", "[\"t1\", \"nope\"]"));
    assert!(e.contains("fusion.sources[1]") && e.contains("nope"), "{e}");
    let e = parse(&SUITE.replace(
        "[\"t1\", \"t2\", \"t3\"]",
        "[\"t1\", \"t2\", \"t3\", \"held\"]",
    ));
    assert!(e.contains("no target is left"), "{e}");
    let e = parse(&SUITE.replace("\"seed\": 5", "\"seed\": 5, \"colour\": 1"));
    assert!(e.contains("fusion") && e.contains("colour"), "{e}");
    let e = parse(&SUITE.replace("\"iterations\": 2", "\"iterations\": 0"));
    assert!(e.contains("fusion.iterations"), "{e}");
}

/// `recycle plan` / `status` list the fusion steps from the plan `recycle fuse` runs, with the
/// states the loop would see: a failed contributor, the merge and evaluation it blocks, and a merge
/// whose fused base was deleted (the loop would redo it, so it is missing, not done).
#[test]
fn plan_and_status_list_the_fusion_steps() {
    let s = setup();
    let suite = s.suite();
    let plan = plan_fusion(&suite).unwrap();
    let store = ResultStore::new(&s.results);
    let exec = CopyExecutor {
        base: s.home.join("models/base"),
        fail: [plan.iterations[1].contributors[1].id.clone()].into(),
        runs: Mutex::new(Vec::new()),
    };
    run_fusion(&suite, &store, &exec, &model_dir, &mut Silent).unwrap();
    let cli = |cmd: &str| {
        let out = Command::cargo_bin("recycle")
            .unwrap()
            .env("RECYCLE_HOME", &s.home)
            .arg(cmd)
            .arg(&s.suite_file)
            .arg("--results")
            .arg(&s.results)
            .assert()
            .success();
        String::from_utf8_lossy(&out.get_output().stdout).to_string()
    };
    // Every step, in the loop's order: (state, stage column, id).
    let expected = |merge1: &str| -> Vec<(String, String, String)> {
        let mut rows = Vec::new();
        for it in &plan.iterations {
            let k = it.k;
            let row =
                |state: &str, id: &str| (state.to_string(), format!("iter{k}"), id.to_string());
            for c in &it.contributors {
                let failed = exec.fail.contains(&c.id);
                rows.push(row(if failed { "failed" } else { "done" }, &c.id));
            }
            let done = k == 1;
            rows.push(row(if done { merge1 } else { "missing" }, &it.merge.id));
            for e in &it.evals {
                rows.push(row(if done { "done" } else { "missing" }, &e.id));
            }
        }
        rows
    };
    let fusion_lines = |stdout: &str| -> Vec<(String, String, String)> {
        stdout
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|w| w[1].starts_with("iter"))
            .map(|w| (w[0].to_string(), w[1].to_string(), w[2].to_string()))
            .collect()
    };
    let stdout = cli("plan");
    assert_eq!(fusion_lines(&stdout), expected("done"), "{stdout}");
    // The reference evaluations are the suite's own jobs, listed once, as done.
    for j in &plan.reference_evals {
        let n = stdout
            .lines()
            .filter(|l| l.contains(&format!(" {} ", j.id)))
            .count();
        assert_eq!(n, 1, "{}: {stdout}", j.id);
    }
    let stdout = cli("status");
    // 4 targets × 3 baseline seeds, of which the 3 on the held-out target are done.
    assert!(
        stdout.contains("fz: 12 jobs: 3 done, 0 failed, 0 stale, 9 missing,"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "fz fusion: 8 jobs: 5 done, 1 failed, 0 stale, 2 missing, 0 running, 0 stale-running"
        ),
        "{stdout}"
    );

    // Without its fused base, iteration 1's merge is pending again.
    std::fs::remove_dir_all(&plan.iterations[0].merge.out).unwrap();
    assert_eq!(fusion_lines(&cli("plan")), expected("missing"));
    let stdout = cli("status");
    assert!(
        stdout.contains("fz fusion: 8 jobs: 4 done, 1 failed, 0 stale, 3 missing,"),
        "{stdout}"
    );
}

/// A `CopyExecutor` whose evaluations score `score`.
struct Scoring {
    inner: CopyExecutor,
    score: f64,
}

impl JobExecutor for Scoring {
    fn execute(&self, job: &Job, s: &mut dyn FnMut(&StepInfo)) -> anyhow::Result<JobOutput> {
        let mut out = self.inner.execute(job, s)?;
        if matches!(job.spec, JobSpec::Eval { .. }) {
            out.test_score = Some(self.score);
        }
        Ok(out)
    }
}

/// `recycle rank --format json` of the setup's results.
fn rank_board(s: &Setup) -> serde_json::Value {
    let rank = Command::cargo_bin("recycle")
        .unwrap()
        .env("RECYCLE_HOME", &s.home)
        .args([
            "rank",
            "--arch",
            "tiny-bert",
            "--format",
            "json",
            "--results",
        ])
        .arg(&s.results)
        .assert()
        .success();
    serde_json::from_slice(&rank.get_output().stdout).unwrap()
}

/// The leaderboard's rows as model id → score on its one target.
fn rank_rows(s: &Setup) -> BTreeMap<String, f64> {
    rank_board(s)["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let cell = &r["cells"][0];
            assert_eq!(cell["state"], "done", "{r}");
            (
                r["model"]["id"].as_str().unwrap().to_string(),
                cell["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Two fusion suites of one architecture in one results directory: each suite's fused bases have
/// rows of their own, with their own seeds (they used to share the rows `fusion:iter<k>`, one
/// suite's scores overwriting the other's).
#[test]
fn two_fusion_suites_sharing_results_keep_their_own_rows() {
    let s = setup();
    let store = ResultStore::new(&s.results);
    for (name, score) in [("fz", 0.5), ("fz2", 0.75)] {
        let text = SUITE.replace("\"name\": \"fz\"", &format!("\"name\": \"{name}\""));
        let suite = Suite::parse(&text, &s.suite_file, None, &s.home).unwrap();
        let exec = Scoring {
            inner: CopyExecutor {
                base: s.home.join("models/base"),
                fail: BTreeSet::new(),
                runs: Mutex::new(Vec::new()),
            },
            score,
        };
        let summary = run_fusion(&suite, &store, &exec, &model_dir, &mut Silent).unwrap();
        assert!(summary.jobs.failed.is_empty(), "{:?}", summary.jobs.failed);
        let plan = plan_fusion(&suite).unwrap();
        assert_eq!(
            plan.iterations[1].evals[0].id,
            format!("eval/fusion-{name}-iter2/held/seed0")
        );
    }
    let rows = rank_rows(&s);
    let want: BTreeMap<String, f64> = [
        ("fusion:fz/iter1", 50.0),
        ("fusion:fz/iter2", 50.0),
        ("fusion:fz2/iter1", 75.0),
        ("fusion:fz2/iter2", 75.0),
    ]
    .into_iter()
    .map(|(id, score)| (id.to_string(), score))
    .collect();
    assert_eq!(rows, want);
}

/// The config hash of a merge as earlier builds computed it (src/fuse.rs `merge_hash` then).
fn merge_hash_unscoped(k: usize, contributors: &[(String, String)]) -> String {
    let inputs: Vec<serde_json::Value> = contributors
        .iter()
        .map(|(id, h)| serde_json::json!({ "id": id, "config_hash": h }))
        .collect();
    let value = serde_json::json!({
        "schema_version": 1,
        "spec": { "kind": "fusion_merge", "iteration": k, "method": "average",
                  "keep_head": false, "contributors": inputs }
    });
    recycle::plan::sha256_hex(recycle::plan::canonical_json(&value).as_bytes())
}

/// Rewrites the suite's fusion records as earlier builds wrote them: fused bases named
/// `fusion-iter<k>` / `fusion:iter<k>` in every suite, the ids and hashes that follow from that.
/// Built here from the job specs, independently of how `recycle::fuse` recognises them.
fn rewrite_as_unscoped(store: &ResultStore, plan: &FusionPlan) {
    let fused = |k: usize, dir: &Path| ModelRef::Path {
        raw: format!("fusion:iter{k}"),
        resolved: dir.to_path_buf(),
    };
    let mut previous: Option<String> = None; // the legacy hash of the previous merge
    for it in &plan.iterations {
        let k = it.k;
        let mut contribs = Vec::new();
        for c in &it.contributors {
            let mut spec = c.spec.clone();
            if let (
                JobSpec::Donor {
                    base_name,
                    base,
                    base_hash,
                    ..
                },
                Some(prev),
            ) = (&mut spec, &previous)
            {
                *base_name = format!("fusion-iter{}", k - 1);
                *base = fused(k - 1, &plan.iterations[k - 2].merge.out);
                *base_hash = Some(prev.clone());
            }
            let hash = recycle::plan::config_hash(&spec).unwrap();
            let mut r = store.get("fz", &c.id).unwrap().unwrap();
            r.config_hash = hash.clone();
            if k > 1 {
                r.model.name = format!("fusion-iter{}", k - 1);
                r.model.id = format!("fusion:iter{}", k - 1);
            }
            store.write(&r).unwrap();
            contribs.push((c.id.clone(), hash));
        }
        let merge = merge_hash_unscoped(k, &contribs);
        let mut r = store.get("fz", &it.merge.id).unwrap().unwrap();
        r.config_hash = merge.clone();
        r.model.name = format!("fusion-iter{k}");
        r.model.id = format!("fusion:iter{k}");
        store.write(&r).unwrap();
        for e in &it.evals {
            let mut spec = e.spec.clone();
            let JobSpec::Eval {
                model_name,
                model,
                donor_hash,
                target,
                seed,
                ..
            } = &mut spec
            else {
                panic!("an evaluation")
            };
            *model_name = format!("fusion-iter{k}");
            *model = fused(k, &it.merge.out);
            *donor_hash = Some(merge.clone());
            let old_id = format!("eval/fusion-iter{k}/{target}/seed{seed}");
            let mut r = store.get("fz", &e.id).unwrap().unwrap();
            r.job_id = old_id;
            r.config_hash = recycle::plan::config_hash(&spec).unwrap();
            r.model.name = format!("fusion-iter{k}");
            r.model.id = format!("fusion:iter{k}");
            store.write(&r).unwrap();
            store.remove("fz", &e.id).unwrap();
        }
        previous = Some(merge);
    }
}

/// Results of earlier builds (unscoped fusion names) are renamed to the suite-scoped ids by the
/// next `fuse`, exactly as a fresh run would have written them, without re-running anything;
/// `status` says so before; an old evaluation that matches no step is left and warned about.
#[test]
fn results_under_the_unscoped_ids_of_earlier_builds_are_renamed_not_rerun() {
    let s = setup();
    let suite = s.suite();
    let plan = plan_fusion(&suite).unwrap();
    let store = ResultStore::new(&s.results);
    let exec = CopyExecutor {
        base: s.home.join("models/base"),
        fail: BTreeSet::new(),
        runs: Mutex::new(Vec::new()),
    };
    run_fusion(&suite, &store, &exec, &model_dir, &mut Silent).unwrap();
    let fresh = s.files();
    rewrite_as_unscoped(&store, &plan);
    // An evaluation of an earlier configuration under an old id: no step claims it.
    let mut stray = store
        .get("fz", "eval/fusion-iter1/held/seed0")
        .unwrap()
        .unwrap();
    stray.job_id = "eval/fusion-iter1/held/seed7".into();
    stray.seed = 7;
    store.write(&stray).unwrap();
    let old = s.files();
    assert!(
        old.contains_key("eval/fusion-iter2/held/seed0"),
        "{:?}",
        old.keys()
    );
    assert!(!old.contains_key(&plan.iterations[1].evals[0].id));

    let status = Command::cargo_bin("recycle")
        .unwrap()
        .env("RECYCLE_HOME", &s.home)
        .arg("status")
        .arg(&s.suite_file)
        .arg("--results")
        .arg(&s.results)
        .assert()
        .success();
    let stderr = String::from_utf8_lossy(&status.get_output().stderr).to_string();
    // Iteration 2's contributors, merge and evaluation, iteration 1's merge and evaluation.
    assert!(
        stderr.contains("fz: 6 fusion results were written under earlier builds' unscoped names"),
        "{stderr}"
    );
    assert!(
        stderr.contains("fz: 1 results under the unscoped fusion ids")
            && stderr.contains("seed7.json"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&status.get_output().stdout).to_string();
    assert!(
        stdout.contains("fz fusion: 8 jobs: 3 done, 0 failed, 3 stale, 2 missing"),
        "{stdout}"
    );

    let again = CopyExecutor {
        base: s.home.join("models/base"),
        fail: BTreeSet::new(),
        runs: Mutex::new(Vec::new()),
    };
    let summary = run_fusion(&suite, &store, &again, &model_dir, &mut Silent).unwrap();
    assert_eq!(again.runs.lock().unwrap().len(), 0, "nothing is re-run");
    assert_eq!(summary.adopted.len(), 6);
    let mut renamed = s.files();
    assert!(renamed.remove("eval/fusion-iter1/held/seed7").is_some());
    assert_eq!(
        renamed, fresh,
        "the renamed records are those of a fresh run"
    );
    // The board has the scoped rows, and the stray old row, which is what the warning is about.
    let rows: BTreeSet<String> = rank_rows(&s).into_keys().collect();
    let want: BTreeSet<String> = ["fusion:fz/iter1", "fusion:fz/iter2", "fusion:iter1"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(rows, want);
}
