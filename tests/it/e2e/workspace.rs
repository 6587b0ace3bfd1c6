//! A scratch directory for one end-to-end test: tiny datasets imported with `recycle data import`,
//! a suite file over the tiny checkpoints of tests/fixtures/tiny, and `recycle` commands run inside
//! it with their own `RECYCLE_HOME`.

use assert_cmd::Command;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

/// A tiny checkpoint of tests/fixtures/tiny (made by make_tiny.sh).
pub fn tiny_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name)
}

/// The datasets every workspace has: two targets and a donor source.
pub const DATASETS: [(&str, u64); 3] = [("t1", 1), ("t2", 2), ("src", 3)];

pub struct Workspace {
    pub tmp: tempfile::TempDir,
}

impl Workspace {
    /// A workspace with the datasets of `DATASETS` imported under `data/`.
    pub fn new() -> Workspace {
        let ws = Workspace {
            tmp: tempfile::tempdir().unwrap(),
        };
        for (name, seed) in DATASETS {
            ws.import(name, seed);
        }
        ws
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// `recycle` with the workspace as working directory and `home` as `RECYCLE_HOME`.
    pub fn cmd_in(&self, home: &str) -> Command {
        let mut c = Command::cargo_bin("recycle").unwrap();
        c.current_dir(self.tmp.path())
            .env("RECYCLE_HOME", self.path(home));
        c
    }

    pub fn cmd(&self) -> Command {
        self.cmd_in("home")
    }

    /// Writes a sentiment-like dataset (label = which word list the third word comes from) as CSV
    /// files and imports them as `data/<name>`.
    fn import(&self, name: &str, seed: u64) {
        for (split, n, salt) in [("train", 32, 0), ("dev", 9, 10), ("test", 15, 20)] {
            let mut csv = String::from("text,label\n");
            for (text, label) in sentences(n, seed * 100 + salt) {
                csv.push_str(&format!("{text},{label}\n"));
            }
            std::fs::write(self.path(&format!("{name}_{split}.csv")), csv).unwrap();
        }
        let out = self
            .cmd()
            .args([
                "data",
                "import",
                &format!("{name}_train.csv"),
                "--name",
                name,
            ])
            .args(["--validation", &format!("{name}_dev.csv")])
            .args(["--test", &format!("{name}_test.csv")])
            .args(["--out", &format!("data/{name}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "import {name}: {}", stderr(&out));
    }

    /// Writes `suite` as `<file>` and returns the file name.
    pub fn write_suite(&self, file: &str, suite: &Value) -> String {
        std::fs::write(
            self.path(file),
            serde_json::to_string_pretty(suite).unwrap(),
        )
        .unwrap();
        file.to_string()
    }

    /// `recycle run SUITE --results RESULTS --device cpu` with `home` as `RECYCLE_HOME`.
    pub fn run_in(&self, home: &str, suite: &str, results: &str) -> Output {
        self.cmd_in(home)
            .args(["run", suite, "--results", results, "--device", "cpu"])
            .output()
            .unwrap()
    }

    pub fn run(&self, suite: &str, results: &str) -> Output {
        self.run_in("home", suite, results)
    }

    /// Every result record under `results`, by path relative to it (the HTML report and temporary
    /// files left out).
    pub fn records(&self, results: &str) -> BTreeMap<String, Value> {
        files_under(&self.path(results))
            .into_iter()
            .filter(|(rel, _)| {
                let name = Path::new(rel).file_name().and_then(|n| n.to_str());
                rel.ends_with(".json") && !name.is_some_and(|n| n.starts_with('.'))
            })
            .map(|(rel, bytes)| (rel, serde_json::from_slice(&bytes).unwrap()))
            .collect()
    }
}

/// The standard suite: a bare BERT baseline (3 seeds), one candidate, one donor fine-tuned from the
/// baseline on `data/src`, two targets; tiny caps and protocol so that a job takes a fraction of a
/// second.
pub fn suite() -> Value {
    json!({
        "name": "tiny",
        "arch": "tiny-bert",
        "baseline": {"name": "base", "path": tiny_model("bert_bare")},
        "candidates": [{"name": "cand", "path": tiny_model("bert")}],
        "donors": [{"name": "d1", "base": "base", "source": {"path": "data/src"}}],
        "targets": [
            {"name": "t1", "dataset": {"path": "data/t1"}, "metric": "accuracy"},
            {"name": "t2", "dataset": {"path": "data/t2"}, "metric": "accuracy"}
        ],
        "protocol": {"learning_rate": 3e-2, "warmup_ratio": 0.0, "batch_size": 4,
                     "micro_batch_size": 2, "max_epochs": 2, "max_length": 16},
        "seeds": {"baseline": 3, "candidates": 1},
        "max_train": 32,
        "max_eval": 16
    })
}

/// The job ids of `suite()`, in plan order.
pub const JOBS: [&str; 11] = [
    "donor/d1",
    "eval/base/t1/seed0",
    "eval/base/t1/seed1",
    "eval/base/t1/seed2",
    "eval/base/t2/seed0",
    "eval/base/t2/seed1",
    "eval/base/t2/seed2",
    "eval/cand/t1/seed0",
    "eval/cand/t2/seed0",
    "eval/d1/t1/seed0",
    "eval/d1/t2/seed0",
];

/// The result file of a job id, relative to the results directory.
pub fn result_file(job: &str) -> String {
    format!("tiny/{job}.json")
}

/// Every file under `dir` (recursively, hidden ones included) with its bytes, by relative path.
pub fn files_under(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Every path under `dir` whose file name starts with `prefix`.
pub fn names_starting(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
            {
                out.push(p.clone());
            }
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `n` labelled sentences from a fixed xorshift stream: filler, noun, filler, then a positive or
/// negative word that decides the label. Every word is in the tiny vocabulary.
fn sentences(n: usize, seed: u64) -> Vec<(String, &'static str)> {
    const POS: [&str; 7] = ["good", "great", "fine", "nice", "happy", "love", "best"];
    const NEG: [&str; 7] = ["bad", "awful", "poor", "sad", "hate", "worst", "terrible"];
    const NOUNS: [&str; 6] = ["movie", "film", "food", "meal", "service", "place"];
    const FILL: [&str; 10] = [
        "the", "a", "was", "is", "very", "really", "so", "it", "this", "and",
    ];
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move |k: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % k as u64) as usize
    };
    (0..n)
        .map(|_| {
            let positive = next(2) == 1;
            let words = [
                FILL[next(FILL.len())],
                NOUNS[next(NOUNS.len())],
                FILL[next(FILL.len())],
                if positive {
                    POS[next(POS.len())]
                } else {
                    NEG[next(NEG.len())]
                },
            ];
            (words.join(" "), if positive { "pos" } else { "neg" })
        })
        .collect()
}
