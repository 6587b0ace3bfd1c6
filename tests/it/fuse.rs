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
        stdout.contains("fusion:iter1") && stdout.contains("fusion:iter2"),
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
    assert_eq!(c2.model.id, "fusion:iter1");

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
    let board: serde_json::Value = serde_json::from_slice(&rank.get_output().stdout).unwrap();
    let rows: Vec<&str> = board["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["model"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.contains(&"fusion:iter1") && rows.contains(&"fusion:iter2"));
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
