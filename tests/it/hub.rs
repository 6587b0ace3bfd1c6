//! Hub access against a stand-in hub on 127.0.0.1: downloads land in the standard HF cache layout,
//! resolve again offline, and each failure names its repo, revision and file. Also checks the
//! shape of configs/ibm36.json.

mod errors;
mod fake_hub;
mod suite_config;
mod suite_run;

use fake_hub::{FakeFile, FakeHub, FakeRepos};
use recycle::hub::{
    self, DatasetRef, FeatureType, HubOptions, ModelRef, NetworkMode, PickleMode, Token, Weights,
};
use std::path::Path;
use std::sync::Arc;

const MODEL_SHA: &str = "1a2b3c4d5e6f708192a3b4c5d6e7f80912a3b4c5";
const DATA_SHA: &str = "d47a5e7d47a5e7d47a5e7d47a5e7d47a5e7d47a5";
const CONV_SHA: &str = "c0ffeec0ffeec0ffeec0ffeec0ffeec0ffeec0ff";

fn online(cache: &Path, hub: &FakeHub) -> HubOptions {
    let mut o = HubOptions::new(cache);
    o.endpoint = hub.endpoint.clone();
    o
}

fn offline(cache: &Path) -> HubOptions {
    let mut o = HubOptions::new(cache);
    o.endpoint = "http://127.0.0.1:1".into();
    o.network = NetworkMode::Offline;
    o
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

fn tiny_bert_config() -> FakeFile {
    FakeFile::text(
        r#"{"architectures":["BertForMaskedLM"],"model_type":"bert","vocab_size":12,"hidden_size":8,"num_hidden_layers":1,"num_attention_heads":2,"intermediate_size":16,"max_position_embeddings":32,"type_vocab_size":2,"hidden_act":"gelu","hidden_dropout_prob":0.1,"attention_probs_dropout_prob":0.1,"layer_norm_eps":1e-12,"pad_token_id":0}"#,
    )
}

fn tiny_safetensors(names: &[&str]) -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("w.safetensors");
    let dev = candle_core::Device::Cpu;
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                n.to_string(),
                candle_core::Tensor::full(i as f32 + 0.5, (12, 8), &dev).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    std::fs::read(path).unwrap()
}

const VOCAB: &str = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\ngood\nbad\nmovie\n##s\nwas\n.\n";

fn tiny_bert_files() -> Vec<(&'static str, FakeFile)> {
    vec![
        ("config.json", tiny_bert_config()),
        (
            "model.safetensors",
            FakeFile::lfs(tiny_safetensors(&[
                "bert.embeddings.word_embeddings.weight",
            ])),
        ),
        ("vocab.txt", FakeFile::text(VOCAB)),
        (
            "tokenizer_config.json",
            FakeFile::text(r#"{"do_lower_case": true, "model_max_length": 32}"#),
        ),
        ("README.md", FakeFile::text("# tiny\n")),
    ]
}

/// A parquet file with a `text` string column and an `int64` `label` column.
fn tiny_parquet(rows: &[(&str, i64)]) -> Vec<u8> {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message schema { REQUIRED BYTE_ARRAY text (UTF8); REQUIRED INT64 label; }",
        )
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
    let texts: Vec<ByteArray> = rows.iter().map(|(t, _)| ByteArray::from(*t)).collect();
    let labels: Vec<i64> = rows.iter().map(|(_, l)| *l).collect();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>()
        .write_batch(&texts, None, None)
        .unwrap();
    col.close().unwrap();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<Int64Type>()
        .write_batch(&labels, None, None)
        .unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    w.close().unwrap();
    buf
}

fn parquet_rows(path: &Path) -> i64 {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let r = SerializedFileReader::new(std::fs::File::open(path).unwrap()).unwrap();
    r.metadata().file_metadata().num_rows()
}

const CARD: &str = "---\nlanguage:\n- en\ndataset_info:\n  features:\n  - name: text\n    dtype: string\n  - name: label\n    dtype:\n      class_label:\n        names:\n          '0': neg\n          '1': pos\n  splits:\n  - name: train\n    num_examples: 3\n---\n# tiny sentiment\n";

fn repos() -> FakeRepos {
    let mut r = FakeRepos::default();
    r.add(
        "models",
        "org/tiny-bert",
        "main",
        MODEL_SHA,
        tiny_bert_files(),
    );
    r.add(
        "datasets",
        "org/tiny-sentiment",
        "main",
        DATA_SHA,
        vec![
            ("README.md", FakeFile::text(CARD)),
            (
                "data/train-00000-of-00001.parquet",
                FakeFile::lfs(tiny_parquet(&[
                    ("good movie", 1),
                    ("bad movie", 0),
                    ("the movies was good", 1),
                ])),
            ),
            (
                "data/test-00000-of-00001.parquet",
                FakeFile::lfs(tiny_parquet(&[("bad", 0), ("good", 1)])),
            ),
        ],
    );
    // A script-based dataset: only the hub's parquet conversion has data files.
    r.add(
        "datasets",
        "legacy",
        "main",
        "0".repeat(40).as_str(),
        vec![
            ("README.md", FakeFile::text(CARD)),
            ("legacy.py", FakeFile::text("# loader")),
        ],
    );
    r.add(
        "datasets",
        "legacy",
        "refs/convert/parquet",
        CONV_SHA,
        vec![
            (
                "plain_text/train/0000.parquet",
                FakeFile::lfs(tiny_parquet(&[("good", 1)])),
            ),
            (
                "plain_text/train/0001.parquet",
                FakeFile::lfs(tiny_parquet(&[("bad", 0)])),
            ),
            (
                "plain_text/test/0000.parquet",
                FakeFile::lfs(tiny_parquet(&[("the", 0)])),
            ),
        ],
    );
    r
}

#[test]
fn model_lands_in_the_standard_cache_and_resolves_offline() {
    let cache = tempfile::tempdir().unwrap();
    let hub = FakeHub::start(repos());
    let m = hub::resolve_model(
        &ModelRef::parse("org/tiny-bert").unwrap(),
        &online(cache.path(), &hub),
    )
    .unwrap();
    let folder = cache.path().join("models--org--tiny-bert");
    assert_eq!(m.commit, MODEL_SHA);
    assert_eq!(m.revision, "main");
    assert_eq!(m.dir, folder.join("snapshots").join(MODEL_SHA));
    assert_eq!(
        std::fs::read_to_string(folder.join("refs/main"))
            .unwrap()
            .trim(),
        MODEL_SHA
    );
    let weights = FakeFile::lfs(tiny_safetensors(&[
        "bert.embeddings.word_embeddings.weight",
    ]));
    assert_eq!(
        m.weights,
        Weights::Safetensors(m.dir.join("model.safetensors"))
    );
    // Snapshot entries are relative symlinks into blobs/, named by etag (sha256 for LFS files).
    let link = std::fs::read_link(m.dir.join("model.safetensors")).unwrap();
    assert!(link.is_relative(), "{link:?}");
    assert_eq!(
        std::fs::canonicalize(m.dir.join("model.safetensors")).unwrap(),
        std::fs::canonicalize(folder.join("blobs").join(weights.sha256())).unwrap()
    );
    for f in ["config.json", "vocab.txt", "tokenizer_config.json"] {
        assert!(m.dir.join(f).is_file(), "{f} missing");
    }
    assert!(
        !m.dir.join("README.md").exists(),
        "fetched a file the model does not need"
    );
    let st =
        candle_core::safetensors::load(m.dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(st["bert.embeddings.word_embeddings.weight"].dims(), [12, 8]);

    // The tokenizer comes from vocab.txt + tokenizer_config.json (no tokenizer.json in the repo).
    let tok = hub::tokenizer_for(&m.dir).unwrap();
    let enc = tok.encode(("The movies", "was GOOD."), true).unwrap();
    assert_eq!(
        enc.get_tokens(),
        ["[CLS]", "the", "movie", "##s", "[SEP]", "was", "good", ".", "[SEP]"]
    );

    // A second online resolution reuses the cache: only the info call goes out.
    let before = hub.paths().len();
    hub::resolve_model(
        &ModelRef::parse("org/tiny-bert").unwrap(),
        &online(cache.path(), &hub),
    )
    .unwrap();
    assert_eq!(
        hub.paths()[before..],
        ["/api/models/org/tiny-bert/revision/main".to_string()]
    );

    drop(hub);
    let again = hub::resolve_model(
        &ModelRef::parse("org/tiny-bert").unwrap(),
        &offline(cache.path()),
    )
    .unwrap();
    assert_eq!(again, m);
    // Online but the hub is unreachable: the cached revision stands in, as in huggingface_hub.
    let mut dead = offline(cache.path());
    dead.network = NetworkMode::Online;
    assert_eq!(
        hub::resolve_model(&ModelRef::parse("org/tiny-bert").unwrap(), &dead).unwrap(),
        m
    );
    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/tiny-bert@v9").unwrap(),
        &dead,
    ));
    assert!(
        err.contains("cannot reach") && err.contains("org/tiny-bert@v9"),
        "{err}"
    );
    let by_sha = hub::resolve_model(
        &ModelRef::parse(&format!("org/tiny-bert@{MODEL_SHA}")).unwrap(),
        &offline(cache.path()),
    )
    .unwrap();
    assert_eq!(by_sha.dir, m.dir);

    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/tiny-bert@v2").unwrap(),
        &offline(cache.path()),
    ));
    assert!(
        err.contains("org/tiny-bert") && err.contains("v2") && err.contains("refs"),
        "{err}"
    );
    std::fs::remove_file(m.dir.join("vocab.txt")).unwrap();
    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/tiny-bert").unwrap(),
        &offline(cache.path()),
    ));
    assert!(
        err.contains("vocab.txt") && err.contains("org/tiny-bert"),
        "{err}"
    );
    std::fs::remove_file(m.dir.join("model.safetensors")).unwrap();
    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/tiny-bert").unwrap(),
        &offline(cache.path()),
    ));
    assert!(
        err.contains("model.safetensors") && err.contains("main"),
        "{err}"
    );
}

#[test]
fn dataset_parquet_files_and_labels_resolve_online_and_offline() {
    let cache = tempfile::tempdir().unwrap();
    let hub = FakeHub::start(repos());
    let d = hub::resolve_dataset(
        &DatasetRef::parse("org/tiny-sentiment", None).unwrap(),
        &online(cache.path(), &hub),
    )
    .unwrap();
    let folder = cache.path().join("datasets--org--tiny-sentiment");
    assert_eq!(
        (
            d.commit.as_str(),
            d.config.as_str(),
            d.files_revision.as_str()
        ),
        (DATA_SHA, "default", "main")
    );
    assert_eq!(d.dir, folder.join("snapshots").join(DATA_SHA));
    assert_eq!(
        std::fs::read_to_string(folder.join("refs/main"))
            .unwrap()
            .trim(),
        DATA_SHA
    );
    assert_eq!(d.splits.keys().collect::<Vec<_>>(), ["test", "train"]);
    assert_eq!(
        d.splits["train"],
        [d.dir.join("data/train-00000-of-00001.parquet")]
    );
    assert_eq!(parquet_rows(&d.splits["train"][0]), 3);
    assert_eq!(parquet_rows(&d.splits["test"][0]), 2);
    assert_eq!(d.label_names, Some(vec!["neg".to_string(), "pos".into()]));
    assert_eq!(d.features[0].name, "text");
    assert_eq!(d.features[0].dtype, FeatureType::Value("string".into()));

    // No parquet files of its own: the refs/convert/parquet branch, stored under its own ref.
    let l = hub::resolve_dataset(
        &DatasetRef::parse("legacy", None).unwrap(),
        &online(cache.path(), &hub),
    )
    .unwrap();
    let lfolder = cache.path().join("datasets--legacy");
    assert_eq!(
        (
            l.commit.as_str(),
            l.config.as_str(),
            l.files_revision.as_str()
        ),
        (CONV_SHA, "plain_text", "refs/convert/parquet")
    );
    assert_eq!(
        std::fs::read_to_string(lfolder.join("refs/refs/convert/parquet"))
            .unwrap()
            .trim(),
        CONV_SHA
    );
    assert_eq!(
        l.splits["train"],
        [
            l.dir.join("plain_text/train/0000.parquet"),
            l.dir.join("plain_text/train/0001.parquet")
        ]
    );
    assert_eq!(l.label_names, Some(vec!["neg".to_string(), "pos".into()]));
    let err = err_text(hub::resolve_dataset(
        &DatasetRef::parse("legacy", Some("nope".into())).unwrap(),
        &online(cache.path(), &hub),
    ));
    assert!(
        err.contains("nope") && err.contains("plain_text") && err.contains("legacy"),
        "{err}"
    );

    drop(hub);
    let again = hub::resolve_dataset(
        &DatasetRef::parse("org/tiny-sentiment", None).unwrap(),
        &offline(cache.path()),
    )
    .unwrap();
    assert_eq!(again, d);
    let mut dead = offline(cache.path());
    dead.network = NetworkMode::Online;
    assert_eq!(
        hub::resolve_dataset(
            &DatasetRef::parse("org/tiny-sentiment", None).unwrap(),
            &dead
        )
        .unwrap(),
        d
    );
    let l2 = hub::resolve_dataset(
        &DatasetRef::parse("legacy", None).unwrap(),
        &offline(cache.path()),
    )
    .unwrap();
    assert_eq!(l2, l);
    let err = err_text(hub::resolve_dataset(
        &DatasetRef::parse("org/tiny-sentiment", Some("other".into())).unwrap(),
        &offline(cache.path()),
    ));
    assert!(
        err.contains("org/tiny-sentiment@main")
            && err.contains("\"other\"")
            && err.contains("offline"),
        "{err}"
    );
}

#[test]
fn unknown_repo_and_missing_file_are_404_errors_naming_them() {
    let cache = tempfile::tempdir().unwrap();
    let mut r = repos();
    r.add(
        "models",
        "org/no-tokenizer",
        "main",
        MODEL_SHA,
        vec![
            ("config.json", tiny_bert_config()),
            ("model.safetensors", FakeFile::lfs(vec![1, 2, 3])),
        ],
    );
    let hub = FakeHub::start(r);
    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/missing").unwrap(),
        &online(cache.path(), &hub),
    ));
    assert!(
        err.contains("org/missing@main") && err.contains("404"),
        "{err}"
    );
    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/tiny-bert@nobranch").unwrap(),
        &online(cache.path(), &hub),
    ));
    assert!(
        err.contains("org/tiny-bert@nobranch") && err.contains("404"),
        "{err}"
    );
    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/no-tokenizer").unwrap(),
        &online(cache.path(), &hub),
    ));
    assert!(
        err.contains("org/no-tokenizer") && err.contains("tokenizer") && err.contains("vocab.txt"),
        "{err}"
    );
    // Pinned to a commit: resolved and cached without any ref, as huggingface_hub does.
    let m = hub::resolve_model(
        &ModelRef::parse(&format!("org/tiny-bert@{MODEL_SHA}")).unwrap(),
        &online(cache.path(), &hub),
    )
    .unwrap();
    assert_eq!(
        (m.commit.as_str(), m.revision.as_str()),
        (MODEL_SHA, MODEL_SHA)
    );
    assert!(m.dir.join("config.json").is_file());
    let refs = cache.path().join("models--org--tiny-bert/refs");
    assert!(!refs.join(MODEL_SHA).exists() && !refs.join("main").exists());
}

#[test]
fn gated_repo_needs_a_token_that_never_shows() {
    let cache = tempfile::tempdir().unwrap();
    let mut r = repos();
    r.add("models", "org/gated", "main", MODEL_SHA, tiny_bert_files());
    r.gated.insert("org/gated".into(), "hf_TOPSECRET".into());
    let hub = FakeHub::start(r);
    let m = ModelRef::parse("org/gated").unwrap();
    let err = err_text(hub::resolve_model(&m, &online(cache.path(), &hub)));
    assert!(
        err.contains("org/gated@main") && err.contains("401") && err.contains("HF_TOKEN"),
        "{err}"
    );
    let mut wrong = online(cache.path(), &hub);
    wrong.token = Token::new("hf_WRONG");
    let err = err_text(hub::resolve_model(&m, &wrong));
    assert!(
        err.contains("401") && err.contains("no access") && !err.contains("hf_WRONG"),
        "{err}"
    );
    let mut right = online(cache.path(), &hub);
    right.token = Token::new("hf_TOPSECRET");
    let ok = hub::resolve_model(&m, &right).unwrap();
    assert_eq!(ok.commit, MODEL_SHA);
    assert!(!format!("{right:?} {ok:?}").contains("TOPSECRET"));
    let log = hub.log.lock().unwrap().clone();
    assert!(
        log.iter()
            .any(|(p, a)| p.contains("/resolve/") && a.as_deref() == Some("Bearer hf_TOPSECRET")),
        "token not sent on downloads"
    );
}

#[test]
fn connection_refused_says_the_hub_is_unreachable() {
    let cache = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut o = HubOptions::new(cache.path());
    o.endpoint = format!("http://127.0.0.1:{port}");
    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/tiny-bert").unwrap(),
        &o,
    ));
    assert!(
        err.contains("org/tiny-bert@main")
            && err.contains("cannot reach")
            && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    let err = err_text(hub::resolve_dataset(
        &DatasetRef::parse("glue", Some("cola".into())).unwrap(),
        &o,
    ));
    assert!(
        err.contains("glue@main") && err.contains("cannot reach"),
        "{err}"
    );
}

#[test]
fn truncated_download_is_rejected_and_removed() {
    let cache = tempfile::tempdir().unwrap();
    let mut r = repos();
    let mut files = tiny_bert_files();
    let weights = &mut files[1].1;
    weights.truncate_to = Some(weights.body.len() / 2);
    let etag = weights.sha256();
    r.add("models", "org/flaky", "main", MODEL_SHA, files);
    let hub = FakeHub::start(r);
    let err = err_text(hub::resolve_model(
        &ModelRef::parse("org/flaky").unwrap(),
        &online(cache.path(), &hub),
    ));
    assert!(
        err.contains("corrupt")
            && err.contains("model.safetensors")
            && err.contains("org/flaky@main")
            && err.contains("bytes"),
        "{err}"
    );
    let folder = cache.path().join("models--org--flaky");
    assert!(
        !folder.join("blobs").join(etag).exists(),
        "corrupt blob left in the cache"
    );
    assert!(!folder
        .join("snapshots")
        .join(MODEL_SHA)
        .join("model.safetensors")
        .exists());
}

#[test]
fn tampered_files_fail_their_hash_check() {
    let cache = tempfile::tempdir().unwrap();
    let mut r = repos();
    let mut lfs = tiny_bert_files();
    lfs[1].1.tamper = true;
    r.add("models", "org/tampered-lfs", "main", MODEL_SHA, lfs);
    let mut git = tiny_bert_files();
    git[0].1.tamper = true;
    r.add("models", "org/tampered-git", "main", MODEL_SHA, git);
    let hub = FakeHub::start(r);
    for (repo, file) in [
        ("org/tampered-lfs", "model.safetensors"),
        ("org/tampered-git", "config.json"),
    ] {
        let err = err_text(hub::resolve_model(
            &ModelRef::parse(repo).unwrap(),
            &online(cache.path(), &hub),
        ));
        assert!(
            err.contains("corrupt")
                && err.contains(file)
                && err.contains(repo)
                && err.contains("does not match"),
            "{err}"
        );
    }
}

#[test]
fn pickle_only_repo_needs_the_flag_and_sharded_weights_are_fetched() {
    let cache = tempfile::tempdir().unwrap();
    let mut r = repos();
    r.add(
        "models",
        "org/old",
        "main",
        MODEL_SHA,
        vec![
            ("config.json", tiny_bert_config()),
            ("pytorch_model.bin", FakeFile::lfs(vec![0; 16])),
            ("vocab.txt", FakeFile::text(VOCAB)),
        ],
    );
    let index = r#"{"metadata":{"total_size":768},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#;
    r.add(
        "models",
        "org/sharded",
        "main",
        MODEL_SHA,
        vec![
            ("config.json", tiny_bert_config()),
            ("model.safetensors.index.json", FakeFile::text(index)),
            (
                "model-00001-of-00002.safetensors",
                FakeFile::lfs(tiny_safetensors(&["a"])),
            ),
            (
                "model-00002-of-00002.safetensors",
                FakeFile::lfs(tiny_safetensors(&["b"])),
            ),
            ("vocab.txt", FakeFile::text(VOCAB)),
        ],
    );
    let hub = FakeHub::start(r);
    let old = ModelRef::parse("org/old").unwrap();
    let err = err_text(hub::resolve_model(&old, &online(cache.path(), &hub)));
    assert!(
        err.contains("--allow-pickle")
            && err.contains("pytorch_model.bin")
            && err.contains("org/old"),
        "{err}"
    );
    assert!(
        !hub.paths().iter().any(|p| p.ends_with("pytorch_model.bin")),
        "downloaded a pickle without the flag"
    );
    let mut allow = online(cache.path(), &hub);
    allow.pickle = PickleMode::Allow;
    let m = hub::resolve_model(&old, &allow).unwrap();
    assert_eq!(m.weights, Weights::Pickle(m.dir.join("pytorch_model.bin")));

    let s = hub::resolve_model(
        &ModelRef::parse("org/sharded").unwrap(),
        &online(cache.path(), &hub),
    )
    .unwrap();
    let Weights::Sharded { index, shards } = &s.weights else {
        panic!("not sharded: {:?}", s.weights)
    };
    assert_eq!(index, &s.dir.join("model.safetensors.index.json"));
    assert_eq!(
        shards,
        &[
            s.dir.join("model-00001-of-00002.safetensors"),
            s.dir.join("model-00002-of-00002.safetensors")
        ]
    );
    assert!(shards.iter().all(|p| p.is_file()));
}

#[test]
fn cli_download_prints_commit_and_snapshot() {
    let cache = tempfile::tempdir().unwrap();
    let hub = FakeHub::start(repos());
    let out = assert_cmd::Command::cargo_bin("recycle")
        .unwrap()
        .args([
            "hub",
            "download",
            "org/tiny-sentiment",
            "--dataset",
            "--revision",
            "main",
        ])
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_ENDPOINT", &hub.endpoint)
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_TOKEN", "hf_CLISECRET")
        .assert()
        .success()
        .get_output()
        .clone();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains(&format!("commit: {DATA_SHA}")), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "snapshot: {}",
            cache
                .path()
                .join("datasets--org--tiny-sentiment/snapshots")
                .join(DATA_SHA)
                .display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("labels: neg, pos"), "{stdout}");
    let all = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!all.contains("CLISECRET"));
    drop(hub);
    let out = assert_cmd::Command::cargo_bin("recycle")
        .unwrap()
        .args(["hub", "download", "org/tiny-bert"])
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .assert()
        .failure()
        .get_output()
        .clone();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("org/tiny-bert") && stderr.contains("offline"),
        "{stderr}"
    );
}
