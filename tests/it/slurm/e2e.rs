//! End to end with the real executor on tiny random BERTs (tests/fixtures/parity/) and a tiny
//! dataset written here: a sharded or Slurm run must give the leaderboard of an unsharded run.

use assert_cmd::cargo::cargo_bin;
use recycle::data::store::{write_dataset, Draft, Existing};
use recycle::data::{Example, Label, Task};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Words of the toy vocabulary; the label is whether a sentence holds more "good" words.
const WORDS: [&str; 8] = [
    "good", "great", "fine", "nice", "bad", "poor", "awful", "sad",
];

/// A model directory: a fixture checkpoint plus a WordPiece vocabulary of its 40 ids.
fn model(root: &Path, name: &str, fixture: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(fixture);
    let dir = root.join("models").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .chain(WORDS.iter())
        .map(|s| s.to_string())
        .collect();
    while vocab.len() < 40 {
        vocab.push(format!("w{}", vocab.len()));
    }
    std::fs::write(dir.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
    dir
}

/// A two-class dataset of `n` training sentences (and half as many dev and test ones).
fn dataset(root: &Path, name: &str, n: usize, salt: usize) -> PathBuf {
    let rows = |count: usize, offset: usize| -> Vec<Example> {
        (0..count)
            .map(|i| {
                let k = i * 7 + offset + salt;
                let words: Vec<&str> = (0..4).map(|j| WORDS[(k + j * 3 + j * j) % 8]).collect();
                let positive = words.iter().filter(|w| WORDS[..4].contains(w)).count();
                Example {
                    text: words.join(" "),
                    text_pair: None,
                    label: Some(Label::Class(u32::from(positive * 2 >= words.len()))),
                }
            })
            .collect()
    };
    let draft = Draft {
        name: name.into(),
        task: Task::Classification {
            labels: vec!["neg".into(), "pos".into()],
        },
        source: "tests/it/slurm/e2e.rs".into(),
        license: "CC0-1.0".into(),
        split_seed: None,
        splits: vec![
            ("train".into(), rows(n, 0)),
            ("validation".into(), rows(n / 2, 1000)),
            ("test".into(), rows(n / 2, 2000)),
        ],
    };
    let dir = root.join("datasets").join(name);
    write_dataset(&dir, &draft, Existing::Fail).unwrap();
    dir
}

/// A suite of 2 models × 2 targets: 3 baseline seeds + 1 candidate seed per target, 8 jobs.
pub fn tiny_suite(root: &Path) -> PathBuf {
    let base = model(root, "base", "bert");
    let cand = model(root, "cand", "bert_bare");
    let t1 = dataset(root, "toy1", 24, 0);
    let t2 = dataset(root, "toy2", 16, 5);
    let suite = serde_json::json!({
        "name": "tiny",
        "arch": "tiny-bert",
        "baseline": {"name": "base", "path": base},
        "candidates": [{"name": "cand", "path": cand}],
        "targets": [
            {"name": "toy1", "dataset": {"path": t1}, "metric": "accuracy"},
            {"name": "toy2", "dataset": {"path": t2}, "metric": "accuracy"}
        ],
        "protocol": {"max_epochs": 2, "batch_size": 8, "micro_batch_size": 4,
                     "max_length": 12, "patience": 0, "warmup_ratio": 0.0},
        "seeds": {"baseline": 3, "candidates": 1}
    });
    let path = root.join("tiny.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&suite).unwrap()).unwrap();
    path
}

/// `recycle` with its home in `root/home`, single-threaded so scores do not depend on scheduling.
pub fn recycle_cmd(root: &Path) -> Command {
    let mut c = Command::new(cargo_bin("recycle"));
    c.env("RECYCLE_HOME", root.join("home"))
        .env("RAYON_NUM_THREADS", "1")
        .env("HF_HUB_OFFLINE", "1");
    c
}

/// Runs the whole suite unsharded into `results` and returns its leaderboard.
pub fn unsharded_board(root: &Path, suite: &Path, results: &Path) -> Value {
    let out = recycle_cmd(root)
        .arg("run")
        .arg(suite)
        .args(["--device", "cpu", "--no-report", "--results"])
        .arg(results)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    board(root, results)
}

/// The JSON leaderboard of `results`, without what differs between runs of the same results
/// (provenance: generation time, versions, result counts).
pub fn board(root: &Path, results: &Path) -> Value {
    let out = recycle_cmd(root)
        .args([
            "rank",
            "--arch",
            "tiny-bert",
            "--format",
            "json",
            "--results",
        ])
        .arg(results)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    strip(serde_json::from_slice(&out.stdout).unwrap())
}

pub fn strip(mut v: Value) -> Value {
    if let Some(m) = v.as_object_mut() {
        m.remove("provenance");
    }
    v
}

/// Every job of the suite has a finished (not failed) record, and no marker or temp is left.
pub fn assert_complete(results: &Path, n_jobs: usize) {
    let records = recycle::results::ResultStore::new(results)
        .load_suite("tiny")
        .unwrap();
    assert_eq!(records.len(), n_jobs);
    for r in &records {
        assert!(r.error.is_none(), "{}: {:?}", r.job_id, r.error);
        assert!(r.test_score.is_some(), "{}", r.job_id);
    }
    let mut stack = vec![results.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            assert!(
                !name.starts_with(".tmp-") && !name.ends_with(".running"),
                "left behind: {}",
                p.display()
            );
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
}

#[test]
fn four_shards_at_once_give_the_board_of_one_unsharded_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let suite = tiny_suite(root);
    let shared = root.join("sharded");
    let children: Vec<_> = (0..4)
        .map(|i| {
            recycle_cmd(root)
                .arg("run")
                .arg(&suite)
                .args([
                    "--device",
                    "cpu",
                    "--no-report",
                    "--shard",
                    &format!("{i}/4"),
                ])
                .arg("--results")
                .arg(&shared)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "shard {i}/4: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_complete(&shared, 8);
    let reference = unsharded_board(root, &suite, &root.join("whole"));
    assert_eq!(board(root, &shared), reference);
    // Not a vacuous comparison: both boards hold a ranked candidate with a gain on every target.
    let row = &reference["rows"][0];
    assert_eq!(row["coverage"]["done"], 2, "{reference:#}");
    assert!(row["avg_gain"].is_number(), "{reference:#}");
}
