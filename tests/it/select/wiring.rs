//! The selection commands end to end: `probe` on a tiny fixture model and dataset (records, feature
//! cache), the leaderboard's proxy column, `analyze` against the library report, regret through the
//! CLI against a hand computation.

#[allow(dead_code)]
#[path = "../runner/schema.rs"]
mod schema;

use assert_cmd::Command;
use recycle::data::store::{write_dataset, Draft, Existing};
use recycle::data::{Dataset, Example, Label, Task};
use recycle::leaderboard::Metric;
use recycle::plan::Role;
use recycle::results::{
    DatasetRecord, FeatureLayers, FeaturePooling, ModelRecord, ProbeScores, RecordKind,
    ResultRecord, ResultStore, RESULT_SCHEMA_VERSION,
};
use recycle::select::analyze::{from_leaderboard, report_with, to_markdown, AnalysisReport};
use recycle::select::features::{extract, FeatureSpec};
use recycle::select::hscore::{hscore, CovInverse};
use recycle::select::linear_probe::{probe, ProbeConfig};
use recycle::select::logme::logme;
use recycle::suite::Protocol;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Fixtures written by the tests
// ---------------------------------------------------------------------------------------------

/// Words of each of the three classes; every text mixes two class words with filler.
const CLASS_WORDS: [[&str; 3]; 3] = [
    ["red", "green", "blue"],
    ["cat", "dog", "cow"],
    ["one", "two", "six"],
];
const FILLER: [&str; 3] = ["the", "a", "of"];

/// A word-level tokenizer over the fixture words (ids below the fixture model's vocab of 40).
fn write_tokenizer(path: &Path) {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;
    let mut vocab = serde_json::Map::new();
    let words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        .into_iter()
        .chain(CLASS_WORDS.iter().flatten().copied())
        .chain(FILLER);
    for (i, w) in words.enumerate() {
        vocab.insert(w.to_string(), i.into());
    }
    let model: WordLevel = serde_json::from_str(
        &serde_json::json!({"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}).to_string(),
    )
    .unwrap();
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .unwrap()
            .try_pair("[CLS] $A [SEP] $B:1 [SEP]:1")
            .unwrap()
            .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
            .build()
            .unwrap(),
    ));
    tok.save(path, false).unwrap();
}

/// The tiny BERT of tests/fixtures/parity/bert plus the fixture tokenizer.
fn write_model(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/bert");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    write_tokenizer(&dir.join("tokenizer.json"));
    dir.to_path_buf()
}

fn examples(n: usize, offset: usize) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let k = i + offset;
            let c = k % 3;
            let text = format!(
                "{} {} {}",
                CLASS_WORDS[c][k % 3],
                FILLER[(k / 3) % 3],
                CLASS_WORDS[c][(k / 3 + 1) % 3]
            );
            Example {
                text,
                text_pair: None,
                label: Some(Label::Class(c as u32)),
            }
        })
        .collect()
}

/// A 3-class dataset named `name` with `splits` as (split name, examples), written to `dir`.
fn write_toy_splits(dir: &Path, name: &str, splits: Vec<(String, Vec<Example>)>) -> PathBuf {
    let draft = Draft {
        name: name.into(),
        task: Task::Classification {
            labels: vec!["colour".into(), "animal".into(), "number".into()],
        },
        source: "written by tests/it/select/wiring.rs".into(),
        license: "CC0".into(),
        split_seed: None,
        splits,
    };
    write_dataset(dir, &draft, Existing::Fail).unwrap();
    dir.to_path_buf()
}

/// A 3-class dataset: 36 train and 18 test examples.
fn write_toy_dataset(dir: &Path) -> PathBuf {
    write_toy_splits(
        dir,
        "toy3",
        vec![
            ("train".into(), examples(36, 0)),
            ("test".into(), examples(18, 5)),
        ],
    )
}

fn recycle(home: &Path) -> Command {
    let mut c = Command::cargo_bin("recycle").unwrap();
    c.env("RECYCLE_HOME", home).env("HF_HUB_OFFLINE", "1");
    c
}

fn base_record(kind: RecordKind, model: &str, target: &str, seed: u32) -> ResultRecord {
    let protocol = Protocol::default();
    ResultRecord {
        schema_version: RESULT_SCHEMA_VERSION,
        kind,
        recycle_version: "test".into(),
        git_revision: None,
        job_id: format!("eval/{model}/{target}/seed{seed}"),
        config_hash: "h".into(),
        suite: "hand".into(),
        arch: "toy".into(),
        role: None,
        model: ModelRecord {
            name: model.into(),
            id: model.into(),
            revision: None,
            weights_sha256: None,
        },
        dataset: DatasetRecord {
            id: target.into(),
            revision: None,
            fingerprint: None,
        },
        target: Some(target.into()),
        protocol_hash: recycle::plan::protocol_hash(&protocol).unwrap(),
        protocol,
        seed,
        metric: Some(Metric::Accuracy),
        dev_score: None,
        test_score: None,
        n_train: None,
        n_dev: None,
        n_test: None,
        steps: None,
        epochs: None,
        wall_time_s: 1.0,
        device: None,
        finished_at: "2026-01-01T00:00:00Z".into(),
        checkpoint: None,
        error: None,
        probe: None,
    }
}

fn finetune(model: &str, role: Role, target: &str, seed: u32, score: f64) -> ResultRecord {
    ResultRecord {
        role: Some(role),
        test_score: Some(score),
        ..base_record(RecordKind::Finetune, model, target, seed)
    }
}

fn probe_rec(model: &str, name: &str, lp: f64, logme: Option<f64>) -> ResultRecord {
    ResultRecord {
        job_id: format!("probe/mnli/{model}/mean-last"),
        test_score: Some(lp),
        target: Some("mnli".into()),
        probe: Some(ProbeScores {
            name: Some(name.into()),
            pooling: FeaturePooling::Mean,
            layers: FeatureLayers::Last,
            features: 16,
            eval_split: "test".into(),
            lp_accuracy: Some(lp),
            logme,
            hscore: None,
            cached: false,
        }),
        ..base_record(RecordKind::Probe, model, "mnli", 0)
    }
}

/// The hand table of `regret_equals_the_hand_computation` (tests/it/select.rs) as a result store:
///
/// ```text
///          t1    t2    t3    lp    (baseline: 50, 52, 54 on every target → mean 52, std 2)
///   A     1.0  -0.5   2.0    90
///   B     3.0   0.0    —     50
///   C     2.0   1.5   0.5    70
///   D     0.5   2.5   1.0    10
/// ```
fn write_hand_store(dir: &Path) -> ResultStore {
    let store = ResultStore::new(dir);
    let gains: [(&str, [Option<f64>; 3], f64); 4] = [
        ("A", [Some(1.0), Some(-0.5), Some(2.0)], 0.9),
        ("B", [Some(3.0), Some(0.0), None], 0.5),
        ("C", [Some(2.0), Some(1.5), Some(0.5)], 0.7),
        ("D", [Some(0.5), Some(2.5), Some(1.0)], 0.1),
    ];
    let targets = ["t1", "t2", "t3"];
    for t in targets {
        for (seed, s) in [0.50, 0.52, 0.54].into_iter().enumerate() {
            store
                .write(&finetune("base", Role::Baseline, t, seed as u32, s))
                .unwrap();
        }
    }
    for (m, row, lp) in gains {
        for (t, g) in targets.iter().zip(row) {
            if let Some(g) = g {
                store
                    .write(&finetune(m, Role::Candidate, t, 0, 0.52 + g / 100.0))
                    .unwrap();
            }
        }
        store.write(&probe_rec(m, "lp", lp, Some(-lp))).unwrap();
    }
    store
}

// ---------------------------------------------------------------------------------------------
// probe
// ---------------------------------------------------------------------------------------------

#[test]
fn probe_warns_when_its_training_sample_misses_a_class() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("model"));
    let data = write_toy_dataset(&tmp.path().join("toy3"));
    let out = recycle(tmp.path())
        .args(["probe", "--model"])
        .arg(&model)
        .arg("--dataset")
        .arg(&data)
        .args(["--arch", "toy", "--device", "cpu", "--max-length", "12"])
        // Two training examples for three classes: at least one class is missing.
        .args(["--max-train", "2"])
        .arg("--results")
        .arg(tmp.path().join("results"))
        .arg("--features")
        .arg(tmp.path().join("features"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: model ") && err.contains("has no example of class(es)"),
        "{err}"
    );
}

#[test]
fn probe_writes_records_and_reads_features_back_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("model"));
    let data = write_toy_dataset(&tmp.path().join("toy3"));
    let results = tmp.path().join("results");
    let features = tmp.path().join("features");
    let probe_cli = |name: &str| {
        recycle(tmp.path())
            .args(["probe", "--model"])
            .arg(&model)
            .arg("--dataset")
            .arg(&data)
            .args(["--name", name, "--arch", "toy", "--device", "cpu"])
            .args(["--max-length", "12", "--batch-size", "7"])
            .arg("--results")
            .arg(&results)
            .arg("--features")
            .arg(&features)
            .assert()
            .success();
    };
    let run = || {
        probe_cli("toy_lp");
        let records = ResultStore::new(&results).load_all().unwrap();
        assert_eq!(records.len(), 1, "one probe record, rewritten in place");
        records.into_iter().next().unwrap()
    };
    let first = run();
    let cache_files = || {
        std::fs::read_dir(&features)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .count()
    };
    assert_eq!(cache_files(), 1);
    let second = run();
    assert_eq!(cache_files(), 1);
    let (p1, p2) = (first.probe.clone().unwrap(), second.probe.clone().unwrap());
    assert!(!p1.cached, "the first run computes the features");
    assert!(p2.cached, "the second run reads them from the cache");
    assert_eq!(
        (p1.lp_accuracy, p1.logme, p1.hscore),
        (p2.lp_accuracy, p2.logme, p2.hscore)
    );
    assert_eq!(first.kind, RecordKind::Probe);
    assert_eq!(first.role, None);
    assert_eq!(first.config_hash, second.config_hash);
    assert_eq!((first.n_train, first.n_test), (Some(36), Some(18)));
    assert_eq!(p1.features, 16);

    // The scores are the library's estimators on features computed independently here.
    let dataset = Dataset::load(&data).unwrap();
    let loaded = recycle::model::load(
        &model,
        &recycle::model::LoadOptions {
            num_labels: 2,
            problem: recycle::model::Problem::SingleLabel,
            seed: 0,
            precision: recycle::model::Precision::F32,
            hidden_dropout: None,
        },
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let inference = loaded.inference_model().unwrap();
    let tok =
        recycle::tokenize::TextTokenizer::from_file(&model.join("tokenizer.json"), 12).unwrap();
    let spec = FeatureSpec {
        pooling: FeaturePooling::Mean,
        layers: FeatureLayers::Last,
        batch_size: 64,
    };
    let feats = |split: &str| {
        let rows = dataset.split(split).unwrap();
        let enc = tok.encode(rows).unwrap();
        let x = extract(
            inference.as_ref(),
            &enc,
            tok.pad_id(),
            &spec,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let y: Vec<usize> = rows
            .iter()
            .map(|e| match e.label {
                Some(Label::Class(c)) => c as usize,
                _ => unreachable!(),
            })
            .collect();
        (x, y)
    };
    let (xtr, ytr) = feats("train");
    let (xte, yte) = feats("test");
    let lp = probe(&xtr, &ytr, &xte, &yte, 3, &ProbeConfig::default()).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * (1.0 + b.abs());
    assert!(close(p1.lp_accuracy.unwrap(), lp.test_accuracy));
    assert!(close(p1.logme.unwrap(), logme(&xtr, &ytr, 3).unwrap()));
    assert!(close(
        p1.hscore.unwrap(),
        hscore(&xtr, &ytr, 3, CovInverse::default()).unwrap()
    ));

    // The record validates against the documented schema.
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/result-schema.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let path = ResultStore::new(&results).path_for(&first.suite, &first.job_id);
    let value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let errors = schema::validate(&schema, &schema, &value, "");
    assert!(errors.is_empty(), "{errors:?}");

    // A probe under another --name keeps its own record beside the first.
    probe_cli("other_lp");
    let names: BTreeSet<String> = ResultStore::new(&results)
        .load_all()
        .unwrap()
        .iter()
        .filter_map(|r| r.probe.as_ref().and_then(|p| p.name.clone()))
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["other_lp".to_string(), "toy_lp".to_string()])
    );
}

#[test]
fn features_batched_with_padding_equal_features_one_example_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("model"));
    let loaded = recycle::model::load(
        &model,
        &recycle::model::LoadOptions {
            num_labels: 2,
            problem: recycle::model::Problem::SingleLabel,
            seed: 0,
            precision: recycle::model::Precision::F32,
            hidden_dropout: None,
        },
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let inference = loaded.inference_model().unwrap();
    let tok =
        recycle::tokenize::TextTokenizer::from_file(&model.join("tokenizer.json"), 12).unwrap();
    let mut rows = examples(9, 0);
    rows[4].text = "red".into(); // a short one among longer ones: padding in its batch
    rows[7].text = "cat dog cow of the a two".into();
    let enc = tok.encode(&rows).unwrap();
    for layers in [FeatureLayers::Last, FeatureLayers::AllMean] {
        for pooling in [FeaturePooling::Cls, FeaturePooling::Mean] {
            let spec = |batch_size| FeatureSpec {
                pooling,
                layers,
                batch_size,
            };
            let cpu = &candle_core::Device::Cpu;
            let batched = extract(inference.as_ref(), &enc, tok.pad_id(), &spec(4), cpu).unwrap();
            let single = extract(inference.as_ref(), &enc, tok.pad_id(), &spec(1), cpu).unwrap();
            assert!(
                batched.max_abs_diff(&single) < 1e-5,
                "{pooling:?} {layers:?}: {}",
                batched.max_abs_diff(&single)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// leaderboard proxies, analyze, regret
// ---------------------------------------------------------------------------------------------

#[test]
fn the_leaderboard_fills_proxies_from_named_probe_records() {
    let tmp = tempfile::tempdir().unwrap();
    write_hand_store(tmp.path());
    let board = recycle::cli::rank::build_board("toy", tmp.path(), &[]).unwrap();
    let row = |m: &str| board.rows.iter().find(|r| r.model.id == m).unwrap();
    assert_eq!(row("A").proxies["lp"], 90.0);
    assert_eq!(row("D").proxies["lp"], 10.0);
    assert_eq!(row("C").proxies["lp:logme"], -0.7);
    assert!(!row("C").proxies.contains_key("lp:hscore"));
    // Probe records make no rows and no cells.
    assert_eq!(board.rows.len(), 4);
    assert_eq!(board.targets.len(), 3);
    // Another arch sees none of them.
    let mut other = probe_rec("A", "lp", 0.1, None);
    other.arch = "other".into();
    other.job_id = "probe/mnli/A/other".into();
    ResultStore::new(tmp.path()).write(&other).unwrap();
    let board = recycle::cli::rank::build_board("toy", tmp.path(), &[]).unwrap();
    let a = board.rows.iter().find(|r| r.model.id == "A").unwrap();
    assert_eq!(a.proxies["lp"], 90.0);
}

#[test]
fn analyze_prints_the_library_report_of_the_same_results() {
    let tmp = tempfile::tempdir().unwrap();
    write_hand_store(tmp.path());
    let run = |format: &str| {
        let out = recycle(tmp.path())
            .args([
                "analyze",
                "--arch",
                "toy",
                "--bootstrap",
                "30",
                "--format",
                format,
            ])
            .arg("--results")
            .arg(tmp.path())
            .assert()
            .success();
        String::from_utf8(out.get_output().stdout.clone()).unwrap()
    };
    let board = recycle::cli::rank::build_board("toy", tmp.path(), &[]).unwrap();
    let (table, proxies) = from_leaderboard(&board).unwrap();
    assert_eq!(proxies.len(), 2, "lp and lp:logme: {proxies:?}");
    let mut config = recycle::select::analyze::AnalysisConfig::default();
    config.decompose.bootstrap = 30;
    let expected = report_with(&table, &proxies, &config).unwrap();
    assert_eq!(
        run("json"),
        serde_json::to_string_pretty(&expected).unwrap() + "\n"
    );
    assert_eq!(run("md"), to_markdown(&expected));
    // --arch may be left out when the store holds one architecture.
    let out = recycle(tmp.path())
        .args([
            "analyze",
            "--bootstrap",
            "30",
            "--format",
            "md",
            "--results",
        ])
        .arg(tmp.path())
        .assert()
        .success();
    assert_eq!(
        String::from_utf8(out.get_output().stdout.clone()).unwrap(),
        to_markdown(&expected)
    );
}

#[test]
fn regret_through_analyze_equals_the_hand_computation() {
    let tmp = tempfile::tempdir().unwrap();
    write_hand_store(tmp.path());
    let out = recycle(tmp.path())
        .args(["analyze", "--arch", "toy", "--format", "json", "--k", "1,2"])
        .args(["--bootstrap", "0", "--results"])
        .arg(tmp.path())
        .assert()
        .success();
    let report: AnalysisReport = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let lp = report.proxies.iter().find(|p| p.name == "lp").unwrap();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    // k = 1 selects A (lp 90): t1 3.0 − 1.0, t2 2.5 − (−0.5), t3 2.0 − 2.0.
    let r1: Vec<f64> = lp.regret[0].per_target.iter().map(|r| r.regret).collect();
    assert_eq!(r1.len(), 3);
    for (got, want) in r1.iter().zip([2.0, 3.0, 0.0]) {
        assert!(close(*got, want), "k=1: {r1:?}");
    }
    assert!(close(lp.regret[0].mean_regret.unwrap(), 5.0 / 3.0));
    assert!(close(lp.regret[0].max_regret.unwrap(), 3.0));
    assert_eq!(lp.regret[0].per_target[1].best_model, "D");
    // k = 2 selects A and C (lp 70).
    let r2: Vec<f64> = lp.regret[1].per_target.iter().map(|r| r.regret).collect();
    for (got, want) in r2.iter().zip([1.0, 1.0, 0.0]) {
        assert!(close(*got, want), "k=2: {r2:?}");
    }
    // The baseline's seed std (2 points) is the noise floor of every target.
    assert!(close(lp.regret[0].noise_floor.unwrap(), 2.0));
    // lp:logme (= −lp) ranks D first: k = 1 regret t1 3.0 − 0.5, t2 0, t3 2.0 − 1.0.
    let inv = report
        .proxies
        .iter()
        .find(|p| p.name == "lp:logme")
        .unwrap();
    let ri: Vec<f64> = inv.regret[0].per_target.iter().map(|r| r.regret).collect();
    for (got, want) in ri.iter().zip([2.5, 0.0, 1.0]) {
        assert!(close(*got, want), "lp:logme k=1: {ri:?}");
    }
}

#[test]
fn leave_one_out_through_analyze_matches_the_library_and_names_every_cell() {
    let tmp = tempfile::tempdir().unwrap();
    write_hand_store(tmp.path());
    let out = recycle(tmp.path())
        .args(["analyze", "--arch", "toy", "--format", "json"])
        .args([
            "--holdout",
            "leave-one-out",
            "--bootstrap",
            "20",
            "--results",
        ])
        .arg(tmp.path())
        .assert()
        .success();
    let report: AnalysisReport = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let h = report
        .holdout
        .expect("--holdout leave-one-out reports the check");
    // 11 evaluated cells, each hidden once; none is the sole cell of its model or target.
    assert_eq!(h.cells.len(), 11);
    assert!(h.skipped.is_empty());
    let board = recycle::cli::rank::build_board("toy", tmp.path(), &[]).unwrap();
    let (table, _) = from_leaderboard(&board).unwrap();
    let config = recycle::select::decompose::DecomposeConfig {
        bootstrap: 20,
        ..Default::default()
    };
    // The same cells and figures as the library's (JSON parsing may move the last bit of a float).
    let want = recycle::select::holdout::leave_one_out(&table, &config).unwrap();
    let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() < 1e-9,
        (a, b) => a == b,
    };
    assert_eq!(h.cells.len(), want.cells.len());
    for (got, want) in h.cells.iter().zip(&want.cells) {
        assert_eq!(
            (&got.model, &got.target, got.covered),
            (&want.model, &want.target, want.covered)
        );
        assert!(close(Some(got.actual), Some(want.actual)), "{got:?}");
        assert!(close(Some(got.predicted), Some(want.predicted)), "{got:?}");
        assert!(
            close(got.lower, want.lower) && close(got.upper, want.upper),
            "{got:?}"
        );
        assert!(close(got.target_mean, want.target_mean), "{got:?}");
    }
    assert!(close(h.coverage, want.coverage) && close(h.mean_abs_error, want.mean_abs_error));
    assert!(close(h.target_mean_abs_error, want.target_mean_abs_error));
    // The real gains are the table's (A/t2 = −0.5), the target means those of the other models
    // (t2 without A: (0 + 1.5 + 2.5) / 3).
    let a_t2 = h
        .cells
        .iter()
        .find(|c| c.model == "A" && c.target == "t2")
        .unwrap();
    assert!((a_t2.actual + 0.5).abs() < 1e-9, "{a_t2:?}");
    assert!(
        (a_t2.target_mean.unwrap() - 4.0 / 3.0).abs() < 1e-9,
        "{a_t2:?}"
    );
    // Without the flag the report has no holdout section.
    let out = recycle(tmp.path())
        .args([
            "analyze",
            "--arch",
            "toy",
            "--format",
            "json",
            "--bootstrap",
            "0",
        ])
        .arg("--results")
        .arg(tmp.path())
        .assert()
        .success();
    let plain: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert!(plain.get("holdout").is_none());
}

/// `analyze` on tables too small for a decomposition: only the baseline (refused, exit 2, with the
/// reason), and one candidate on one target (the gain is reported; the variance split and the
/// standard errors are named as not computed instead of printed as 0 %).
#[test]
fn analyze_says_what_a_degenerate_table_cannot_give() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ResultStore::new(tmp.path());
    for (seed, s) in [0.50, 0.52, 0.54].into_iter().enumerate() {
        store
            .write(&finetune("base", Role::Baseline, "t1", seed as u32, s))
            .unwrap();
    }
    let analyze = |format: &str| {
        let mut c = recycle(tmp.path());
        c.args(["analyze", "--arch", "toy", "--format", format, "--results"])
            .arg(tmp.path());
        c
    };
    let out = analyze("md").assert().code(2);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).to_string();
    assert!(
        stderr.contains("--arch toy") && stderr.contains("no candidate to analyse"),
        "{stderr}"
    );
    assert!(out.get_output().stdout.is_empty());

    store
        .write(&finetune("A", Role::Candidate, "t1", 0, 0.55))
        .unwrap();
    let out = analyze("md").assert().success();
    let md = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    assert!(
        md.contains(
            "- variance shares: the model/target effect split needs at least 2 models and 2 \
             targets; have 1 × 1."
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "- standard errors, residual std and prediction intervals: they need more evaluated \
             cells than fitted parameters; have 1 cell for 1 parameter."
        ),
        "{md}"
    );
    assert!(!md.contains(" % |"), "no variance shares: {md}");
    // What is meaningful is still there: A's gain, 55 − 52 points.
    assert!(md.contains("| A | 3.00 | — | 3.00 | 1/1 |"), "{md}");
    let out = analyze("json").assert().success();
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).to_string();
    assert!(
        stderr.contains("warning: --arch toy: not computed: variance shares"),
        "{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert!(report["decomposition"]["variance"].is_null(), "{report}");
    assert_eq!(
        report["decomposition"]["notes"].as_array().unwrap().len(),
        2
    );

    // A second target makes it 1 × 2: still no split (a lone model's effect is zero by
    // construction); the average is over both targets.
    for (seed, s) in [0.60, 0.62, 0.64].into_iter().enumerate() {
        store
            .write(&finetune("base", Role::Baseline, "t2", seed as u32, s))
            .unwrap();
    }
    store
        .write(&finetune("A", Role::Candidate, "t2", 0, 0.61))
        .unwrap();
    let out = analyze("md").assert().success();
    let md = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    assert!(md.contains("have 1 × 2."), "{md}");
    assert!(md.contains("| A | 1.00 | — | 1.00 | 2/2 |"), "{md}");
}

// ---------------------------------------------------------------------------------------------
// select
// ---------------------------------------------------------------------------------------------

/// Counts the jobs it is asked to run; every candidate scores by its name's length.
struct Counting(std::cell::RefCell<Vec<String>>);

impl recycle::runner::JobExecutor for Counting {
    fn execute(
        &self,
        job: &recycle::plan::Job,
        _on_step: &mut dyn FnMut(&recycle::progress::StepInfo),
    ) -> anyhow::Result<recycle::runner::JobOutput> {
        self.0.borrow_mut().push(job.id.clone());
        let score = 0.5 + job.id.len() as f64 / 1000.0;
        Ok(recycle::runner::JobOutput {
            test_score: Some(score),
            device: "cpu".into(),
            ..Default::default()
        })
    }
}

#[test]
fn select_fine_tunes_exactly_the_top_k_and_the_baseline_seeds() {
    use recycle::select::choose::{rank, SelectionSuite, SuiteModel};
    let tmp = tempfile::tempdir().unwrap();
    let data = write_toy_dataset(&tmp.path().join("toy3"));
    let dir = |n: &str| {
        let d = tmp.path().join(n);
        std::fs::create_dir_all(&d).unwrap();
        d.display().to_string()
    };
    let names = ["c1", "c2", "c3", "c4"];
    let scores: Vec<(String, Option<f64>)> = names
        .iter()
        .zip([Some(0.4), Some(0.9), None, Some(0.6)])
        .map(|(n, s)| (n.to_string(), s))
        .collect();
    let ranked = rank(&scores, 2).unwrap();
    let selected: Vec<&str> = ranked
        .iter()
        .filter(|r| r.selected)
        .map(|r| r.model.as_str())
        .collect();
    assert_eq!(selected, vec!["c2", "c4"]);
    let spec = SelectionSuite {
        name: "select-toy3".into(),
        arch: "toy".into(),
        baseline: SuiteModel {
            name: "base".into(),
            ..SuiteModel::from_spec(&dir("base"), true)
        },
        candidates: selected
            .iter()
            .map(|n| SuiteModel::from_spec(&dir(n), true))
            .collect(),
        target: "toy3".into(),
        dataset: data.display().to_string(),
        baseline_seeds: 3,
        max_train: Some(10),
        max_eval: None,
        protocol: serde_json::json!({"max_epochs": 1}),
    };
    let suite = recycle::suite::Suite::parse(
        &spec.to_json().to_string(),
        &tmp.path().join("select.json"),
        None,
        tmp.path(),
    )
    .unwrap();
    let store = ResultStore::new(tmp.path().join("results"));
    let exec = Counting(Default::default());
    let out = recycle::cli::select::fine_tune_selected(
        &suite,
        &store,
        &exec,
        &mut recycle::progress::Silent,
    )
    .unwrap();
    let mut ran = exec.0.borrow().clone();
    ran.sort();
    assert_eq!(
        ran,
        vec![
            "eval/base/toy3/seed0",
            "eval/base/toy3/seed1",
            "eval/base/toy3/seed2",
            "eval/c2/toy3/seed0",
            "eval/c4/toy3/seed0",
        ]
    );
    assert_eq!(out.board.rows.len(), 2);
    assert!(out.board.rows.iter().all(|r| r.avg_gain.is_some()));
    // Run again: everything is in the store, nothing is fine-tuned twice.
    let again = Counting(Default::default());
    recycle::cli::select::fine_tune_selected(
        &suite,
        &store,
        &again,
        &mut recycle::progress::Silent,
    )
    .unwrap();
    assert!(again.0.borrow().is_empty());
    // `recycle rank` sees the selection's results.
    let board = recycle::cli::rank::build_board("toy", store.dir(), &[]).unwrap();
    assert_eq!(board.rows.len(), 2);
}

#[test]
fn select_exits_1_when_a_candidate_cannot_be_probed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("model"));
    let cand = write_model(&tmp.path().join("cand"));
    let data = write_toy_splits(
        &tmp.path().join("toy3dev"),
        "toy3dev",
        vec![
            ("train".into(), examples(36, 0)),
            ("validation".into(), examples(9, 3)),
            ("test".into(), examples(9, 5)),
        ],
    );
    let missing = tmp.path().join("nope");
    let out = recycle(tmp.path())
        .env("HF_HUB_OFFLINE", "1")
        .args(["select", "--target"])
        .arg(&data)
        .arg("--baseline")
        .arg(&model)
        .arg("--candidates")
        .arg(&cand)
        .arg(&missing)
        .args([
            "--budget",
            "1",
            "--baseline-seeds",
            "3",
            "--max-epochs",
            "1",
        ])
        .args(["--max-length", "12", "--patience", "0", "--device", "cpu"])
        .arg("--results")
        .arg(tmp.path().join("results"))
        .arg("--features")
        .arg(tmp.path().join("features"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("nope") && stderr.contains("could not be probed"),
        "{stderr}"
    );
}

#[test]
fn probe_refuses_a_zero_batch_and_a_one_token_length() {
    let tmp = tempfile::tempdir().unwrap();
    for (flag, value) in [("--batch-size", "0"), ("--max-length", "1")] {
        let out = recycle(tmp.path())
            .args([
                "probe",
                "--model",
                "m",
                "--arch",
                "a",
                "--dataset",
                "d",
                flag,
                value,
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
}

#[test]
fn select_names_its_own_flags_in_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(&tmp.path().join("model"));
    let cand = write_model(&tmp.path().join("cand"));
    let data = write_toy_dataset(&tmp.path().join("toy3"));
    let select = |extra: &[&std::ffi::OsStr]| {
        let out = recycle(tmp.path())
            .args(["select", "--target"])
            .arg(&data)
            .arg("--baseline")
            .arg(&model)
            .args(["--budget", "1", "--device", "cpu", "--candidates"])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = select(&[cand.as_os_str(), "--baseline-seeds".as_ref(), "2".as_ref()]);
    assert!(
        err.contains("--baseline-seeds 2: the baseline needs at least 3"),
        "{err}"
    );
    let err = select(&[cand.as_os_str(), cand.as_os_str()]);
    assert!(err.contains("already taken by"), "{err}");
    // And the results flag of every command: a file is not a results directory.
    let file = tmp.path().join("results.txt");
    std::fs::write(&file, "x").unwrap();
    let out = recycle(tmp.path())
        .args(["rank", "--arch", "a", "--results"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a directory"), "{stderr}");
}
