//! A suite that names its model and dataset by hub id runs end to end through the CLI against the
//! stand-in hub: files land in the standard HF cache, the dataset is materialised through its
//! mapping (multi-column text, a pair, a hidden test carved out of train), results record both
//! commits, and the same suite run offline from the cache gives the same results.

use super::fake_hub::{FakeFile, FakeHub, FakeRepos};
use recycle::data::{Dataset, Label, Task};
use recycle::results::ResultStore;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

const MODEL_SHA: &str = "5eed5eed5eed5eed5eed5eed5eed5eed5eed5eed";
const DATA_SHA: &str = "da7ada7ada7ada7ada7ada7ada7ada7ada7ada7a";

/// Word pieces the rows below use; the fixture BERT has 40 embeddings.
const VOCAB: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "good", "bad", "movie", "film", "great",
    "awful", "was", "is", "it", "a", "plot", "acting", "fun", "boring", ".", "?", "did", "you",
    "like",
];

/// The parity fixture BERT (tests/fixtures/parity/bert) without its classifier: a base model.
fn base_bert_files() -> Vec<(&'static str, FakeFile)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity/bert");
    let dev = candle_core::Device::Cpu;
    let mut tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
    tensors.retain(|k, _| !k.starts_with("classifier."));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    vec![
        ("config.json", FakeFile::text(&config)),
        (
            "model.safetensors",
            FakeFile::lfs(std::fs::read(path).unwrap()),
        ),
        ("vocab.txt", FakeFile::text(&(VOCAB.join("\n") + "\n"))),
        (
            "tokenizer_config.json",
            FakeFile::text(r#"{"do_lower_case": true, "model_max_length": 16}"#),
        ),
    ]
}

/// A parquet file with the given UTF-8 columns and an `int64` `label` column.
fn parquet(cols: &[(&str, Vec<String>)], labels: &[i64]) -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let fields: String = cols
        .iter()
        .map(|(n, _)| format!("REQUIRED BYTE_ARRAY {n} (UTF8); "))
        .collect();
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(&format!(
            "message schema {{ {fields}REQUIRED INT64 label; }}"
        ))
        .unwrap(),
    );
    let mut buf = Vec::new();
    let mut w = SerializedFileWriter::new(
        &mut buf,
        schema,
        Arc::new(WriterProperties::builder().build()),
    )
    .unwrap();
    let mut rg = w.next_row_group().unwrap();
    for (_, values) in cols {
        let v: Vec<ByteArray> = values.iter().map(|s| ByteArray::from(s.as_str())).collect();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&v, None, None)
            .unwrap();
        col.close().unwrap();
    }
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<Int64Type>()
        .write_batch(labels, None, None)
        .unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    w.close().unwrap();
    buf
}

/// `n` review rows: title, body, question; label 1 (`yes`) for a good review. `hidden` writes -1
/// labels, as the hub does for a benchmark's hidden test split.
fn review_split(n: usize, offset: usize, hidden: bool) -> Vec<u8> {
    let (mut title, mut body, mut question, mut labels) = (vec![], vec![], vec![], vec![]);
    let good = ["good", "great", "fun"];
    let bad = ["bad", "awful", "boring"];
    let thing = ["movie", "film", "plot", "acting"];
    for i in offset..offset + n {
        let positive = i % 2 == 0;
        let word = if positive { good[i % 3] } else { bad[i % 3] };
        title.push(format!("the {}", thing[i % 4]));
        body.push(format!("it was {word} ."));
        question.push("did you like it ?".to_string());
        labels.push(if hidden { -1 } else { i64::from(positive) });
    }
    parquet(
        &[("title", title), ("body", body), ("question", question)],
        &labels,
    )
}

const CARD: &str = "---\ndataset_info:\n  features:\n  - name: title\n    dtype: string\n  - name: body\n    dtype: string\n  - name: question\n    dtype: string\n  - name: label\n    dtype:\n      class_label:\n        names:\n          '0': 'no'\n          '1': 'yes'\n---\n# tiny reviews\n";

fn repos() -> FakeRepos {
    let mut r = FakeRepos::default();
    r.add(
        "models",
        "org/tiny-bert",
        "main",
        MODEL_SHA,
        base_bert_files(),
    );
    r.add(
        "datasets",
        "org/tiny-reviews",
        "main",
        DATA_SHA,
        vec![
            ("README.md", FakeFile::text(CARD)),
            (
                "data/train-00000-of-00001.parquet",
                FakeFile::lfs(review_split(30, 0, false)),
            ),
            (
                "data/validation-00000-of-00001.parquet",
                FakeFile::lfs(review_split(8, 100, false)),
            ),
            (
                "data/test-00000-of-00001.parquet",
                FakeFile::lfs(review_split(6, 200, true)),
            ),
        ],
    );
    r
}

const SUITE: &str = r#"{
  "name": "hubrun",
  "arch": "tiny-bert",
  "baseline": {"name": "base", "hub": "org/tiny-bert"},
  "candidates": [{"name": "pinned", "hub": "org/tiny-bert@MODEL_SHA"}],
  "targets": [{
    "name": "reviews",
    "dataset": {
      "hub": "org/tiny-reviews",
      "columns": {"text": ["title", "body"], "text_pair": "question", "label": "label"},
      "splits": {"train": "train", "dev": "validation",
                 "test": {"carve_from": "train", "fraction": 0.5, "max": 5, "seed": 7}}
    },
    "metric": "accuracy",
    "note": "test labels are hidden: test carved from train"
  }],
  "protocol": {"batch_size": 4, "micro_batch_size": 4, "max_epochs": 2, "max_length": 16,
               "patience": 0, "learning_rate": 1e-3},
  "seeds": {"baseline": 3, "candidates": 1}
}"#;

fn recycle(hf_home: &Path, home: &Path) -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("recycle").unwrap();
    c.env("HF_HOME", hf_home)
        .env("RECYCLE_HOME", home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
    c
}

/// Per job: test score, dev score, model commit, dataset commit, dataset fingerprint, config hash.
type Summary = BTreeMap<String, (Option<f64>, Option<f64>, Vec<Option<String>>)>;

fn summary(results: &Path) -> Summary {
    ResultStore::new(results)
        .load_all()
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.job_id,
                (
                    r.test_score,
                    r.dev_score,
                    vec![
                        r.model.revision,
                        r.dataset.revision,
                        r.dataset.fingerprint,
                        Some(r.config_hash),
                    ],
                ),
            )
        })
        .collect()
}

#[test]
fn suite_with_hub_model_and_dataset_runs_online_then_offline_with_the_same_results() {
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().join("hf");
    let suite = tmp.path().join("suite.json");
    std::fs::write(&suite, SUITE.replace("MODEL_SHA", MODEL_SHA)).unwrap();
    let hub = FakeHub::start(repos());

    let (home1, results1) = (tmp.path().join("home1"), tmp.path().join("results1"));
    recycle(&hf_home, &home1)
        .env("HF_ENDPOINT", &hub.endpoint)
        .args(["run", "--device", "cpu", "--results"])
        .arg(&results1)
        .arg(&suite)
        .assert()
        .success();

    // The standard HF cache layout, shared with Python tools.
    let cache = hf_home.join("hub");
    let model = cache.join("models--org--tiny-bert");
    assert_eq!(
        std::fs::read_to_string(model.join("refs/main"))
            .unwrap()
            .trim(),
        MODEL_SHA
    );
    for f in ["config.json", "model.safetensors", "vocab.txt"] {
        assert!(
            model.join("snapshots").join(MODEL_SHA).join(f).is_file(),
            "{f}"
        );
    }
    let data = cache.join("datasets--org--tiny-reviews");
    assert_eq!(
        std::fs::read_to_string(data.join("refs/main"))
            .unwrap()
            .trim(),
        DATA_SHA
    );
    assert!(data
        .join("snapshots")
        .join(DATA_SHA)
        .join("data/test-00000-of-00001.parquet")
        .is_file());

    // The materialised dataset: named by repo, config and commit; texts joined; test carved.
    let hub_dir = home1.join("datasets/hub");
    let dirs: Vec<_> = std::fs::read_dir(&hub_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let name = dirs[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(
        name.starts_with(&format!("org--tiny-reviews--default--{DATA_SHA}-")),
        "{name}"
    );
    let ds = Dataset::load(&dirs[0]).unwrap();
    assert_eq!(
        ds.task(),
        &Task::Classification {
            labels: vec!["no".into(), "yes".into()]
        }
    );
    let (train, dev, test) = (
        ds.split("train").unwrap(),
        ds.split("validation").unwrap(),
        ds.split("test").unwrap(),
    );
    assert_eq!(dev.len(), 8);
    assert!(
        (1..=5).contains(&test.len()),
        "test holds {} rows, the cap is 5",
        test.len()
    );
    assert_eq!(train.len() + test.len(), 30);
    assert!(test.iter().any(|e| e.label == Some(Label::Class(0))));
    assert!(test.iter().any(|e| e.label == Some(Label::Class(1))));
    assert_eq!(dev[0].text, "the movie it was great .");
    assert_eq!(dev[0].text_pair.as_deref(), Some("did you like it ?"));
    assert_eq!(dev[0].label, Some(Label::Class(1)));
    let record = ds.card.split_seed.as_ref().expect("carving is recorded");
    assert_eq!((record.seed, record.from.as_str()), (7, "train"));
    assert_eq!(record.carved.len(), 1);
    assert_eq!(record.carved[0].0, "test");

    let online = summary(&results1);
    assert_eq!(online.len(), 4, "{online:?}");
    for (id, (test, _, revs)) in &online {
        assert!(test.is_some_and(|t| (0.0..=1.0).contains(&t)), "{id}");
        assert_eq!(revs[0].as_deref(), Some(MODEL_SHA), "{id}: model commit");
        assert_eq!(revs[1].as_deref(), Some(DATA_SHA), "{id}: dataset commit");
        assert_eq!(revs[2].as_deref(), Some(ds.fingerprint().as_str()), "{id}");
    }

    let out = recycle(&hf_home, &home1)
        .args(["rank", "--arch", "tiny-bert", "--results"])
        .arg(&results1)
        .assert()
        .success()
        .get_output()
        .clone();
    let board = String::from_utf8_lossy(&out.stdout);
    assert!(
        board.contains("Leaderboard: tiny-bert") && board.contains("org/tiny-bert"),
        "{board}"
    );

    // The hub is gone: offline, with a fresh recycle home and results directory.
    drop(hub);
    let (home2, results2) = (tmp.path().join("home2"), tmp.path().join("results2"));
    recycle(&hf_home, &home2)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:1")
        .args(["run", "--device", "cpu", "--results"])
        .arg(&results2)
        .arg(&suite)
        .assert()
        .success();
    assert_eq!(summary(&results2), online);
    recycle(&hf_home, &home2)
        .args(["rank", "--arch", "tiny-bert", "--results"])
        .arg(&results2)
        .assert()
        .success();

    // Offline without the files in the cache: an error naming the dataset, no job runs.
    let out = recycle(&tmp.path().join("empty-hf"), &home2)
        .env("HF_HUB_OFFLINE", "1")
        .args(["run", "--device", "cpu", "--results"])
        .arg(tmp.path().join("results3"))
        .arg(&suite)
        .assert()
        .failure()
        .get_output()
        .clone();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("org/tiny-reviews") && err.contains("targets[0].dataset"),
        "{err}"
    );
}
