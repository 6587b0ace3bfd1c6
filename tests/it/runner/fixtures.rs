//! Snapshot tests of the exporters: a small fixed result set (hand-chosen scores, a failed cell, a
//! missing cell, a within-noise gain) rendered as Markdown, CSV and JSON and compared byte for
//! byte with tests/fixtures/snapshots/. `UPDATE_SNAPSHOTS=1` rewrites the files (then review the
//! diff by eye before committing).

use recycle::export::{exporter, Format};
use recycle::leaderboard::{build, Layout, Leaderboard};
use recycle::plan::{Job, JobSpec, Selection};
use recycle::progress::{Silent, StepInfo};
use recycle::results::ResultStore;
use recycle::runner::{self, JobExecutor, JobOutput, RunSettings};
use recycle::suite::Suite;
use std::path::{Path, PathBuf};

const SUITE: &str = r#"{
  "name": "snap",
  "arch": "snap-arch",
  "baseline": {"name": "base", "hub": "org/base@abc123"},
  "candidates": [
    {"name": "good", "hub": "org/good"},
    {"name": "meh", "hub": "org/meh@v1"},
    {"name": "partial", "path": "${RECYCLE_HOME}/partial"},
    {"name": "broken", "hub": "org/broken"}
  ],
  "targets": [
    {"name": "sst2", "dataset": {"path": "data/sst2"}, "metric": "accuracy"},
    {"name": "stsb", "dataset": {"hub": "glue", "config": "stsb"}, "metric": "spearman"}
  ],
  "seeds": {"baseline": 3, "candidates": 1}
}"#;

/// Hand-chosen test scores (fractions).
struct Table;

impl JobExecutor for Table {
    fn execute(&self, job: &Job, _on_step: &mut dyn FnMut(&StepInfo)) -> anyhow::Result<JobOutput> {
        let JobSpec::Eval {
            model_name,
            target,
            seed,
            ..
        } = &job.spec
        else {
            anyhow::bail!("no donors here")
        };
        let score = match (model_name.as_str(), target.as_str(), seed) {
            ("base", "sst2", 0) => 0.90,
            ("base", "sst2", 1) => 0.91,
            ("base", "sst2", 2) => 0.92,
            ("base", "stsb", 0) => 0.80,
            ("base", "stsb", 1) => 0.84,
            ("base", "stsb", 2) => 0.82,
            ("good", "sst2", _) => 0.94,
            ("good", "stsb", _) => 0.86,
            ("meh", "sst2", _) => 0.915,
            ("meh", "stsb", _) => 0.80,
            ("partial", "sst2", _) => 0.95,
            ("broken", "sst2", _) => 0.89,
            ("broken", "stsb", _) => anyhow::bail!("CUDA out of memory"),
            other => anyhow::bail!("no score for {other:?}"),
        };
        Ok(JobOutput {
            test_score: Some(score),
            device: "cpu".into(),
            ..Default::default()
        })
    }
}

fn board() -> Leaderboard {
    let tmp = tempfile::tempdir().unwrap();
    let suite = Suite::parse(SUITE, Path::new("snap.json"), None, Path::new("/h")).unwrap();
    let store = ResultStore::new(tmp.path());
    let ids: Vec<String> = recycle::plan::plan(&suite)
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .filter(|id| id != "eval/partial/stsb/seed0")
        .collect();
    let settings = RunSettings {
        donor_dir: tmp.path().join("donors"),
        selection: Selection::Jobs(ids),
    };
    runner::run(&suite, &store, &Table, &settings, &mut Silent).unwrap();
    let layout = Layout::from_suites("snap-arch", &[suite]).unwrap();
    build(
        "snap-arch",
        &layout,
        &store.load_all().unwrap(),
        "2024-06-01T12:00:00Z",
    )
}

fn snapshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/snapshots")
}

pub fn check_snapshots() {
    let board = board();
    let update = std::env::var("UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1");
    let mut mismatched = Vec::new();
    for (format, file) in [
        (Format::Markdown, "leaderboard.md"),
        (Format::Csv, "leaderboard.csv"),
        (Format::Json, "leaderboard.json"),
    ] {
        let got = exporter(format).render(&board).unwrap();
        let path = snapshot_dir().join(file);
        if update {
            std::fs::create_dir_all(snapshot_dir()).unwrap();
            std::fs::write(&path, &got).unwrap();
            continue;
        }
        let want = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_SNAPSHOTS=1 writes it)", path.display()));
        if want != got {
            mismatched.push(format!(
                "--- {}\n+++ rendered\n{}",
                path.display(),
                String::from_utf8_lossy(&got)
            ));
        }
    }
    assert!(
        mismatched.is_empty(),
        "snapshots differ (UPDATE_SNAPSHOTS=1 rewrites them):\n{}",
        mismatched.join("\n")
    );
    // The JSON snapshot reads back into the same board (it is `recycle check`'s reference format).
    let text = std::fs::read_to_string(snapshot_dir().join("leaderboard.json")).unwrap();
    assert_eq!(
        recycle::export::json::parse(&text, "leaderboard.json").unwrap(),
        board
    );
}
