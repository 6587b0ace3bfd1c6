//! Structural checks of configs/ibm36.json, read as plain JSON until the runner's suite format
//! lands: every one of IBM's 36 targets once, complete and consistent.

use recycle::hub::{DatasetRef, ModelRef};
use serde_json::Value;
use std::collections::BTreeSet;

const IBM36: [&str; 36] = [
    "20_newsgroup",
    "ag_news",
    "amazon_reviews_multi",
    "anli",
    "boolq",
    "cb",
    "cola",
    "copa",
    "dbpedia",
    "esnli",
    "financial_phrasebank",
    "imdb",
    "isear",
    "mnli",
    "mrpc",
    "multirc",
    "poem_sentiment",
    "qnli",
    "qqp",
    "rotten_tomatoes",
    "rte",
    "sst2",
    "sst_5bins",
    "stsb",
    "trec_coarse",
    "trec_fine",
    "tweet_ev_emoji",
    "tweet_ev_emotion",
    "tweet_ev_hate",
    "tweet_ev_irony",
    "tweet_ev_offensive",
    "tweet_ev_sentiment",
    "wic",
    "wnli",
    "wsc",
    "yahoo_answers",
];

fn load() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/ibm36.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn columns(v: &Value, what: &str) -> Vec<String> {
    match v {
        Value::String(s) if !s.is_empty() => vec![s.clone()],
        Value::Array(a) if !a.is_empty() => a
            .iter()
            .map(|c| {
                c.as_str()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| panic!("{what}: bad column {c}"))
                    .to_string()
            })
            .collect(),
        other => panic!("{what}: expected a column or a non-empty list of columns, got {other}"),
    }
}

/// A split is a split name, or a carve-out of train.
fn split(v: &Value, what: &str) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Object(o) => {
            assert_eq!(
                o.get("carve_from").and_then(Value::as_str),
                Some("train"),
                "{what}"
            );
            let f = o.get("fraction").and_then(Value::as_f64).unwrap_or(-1.0);
            assert!(f > 0.0 && f < 1.0, "{what}: fraction {f}");
            assert!(
                o.get("max").and_then(Value::as_u64).unwrap_or(0) > 0,
                "{what}: max"
            );
            assert_eq!(o.len(), 3, "{what}: unknown keys in {v}");
            None
        }
        other => panic!("{what}: expected a split name or a carve-out, got {other}"),
    }
}

#[test]
fn ibm36_lists_every_target_once_complete_and_consistent() {
    let s = load();
    assert_eq!(s["name"], "ibm36");
    assert_eq!(s["arch"], "roberta-base");
    ModelRef::parse(s["baseline"]["hub"].as_str().unwrap()).unwrap();
    assert_eq!(s["seeds"]["baseline"], 5);
    assert_eq!(s["seeds"]["candidates"], 1);
    let cands = s["candidates"].as_array().unwrap();
    assert!(!cands.is_empty());
    let mut hubs = BTreeSet::new();
    for c in cands {
        let hub = c["hub"].as_str().unwrap();
        ModelRef::parse(hub).unwrap();
        assert!(c["name"].as_str().is_some_and(|n| !n.is_empty()));
        assert!(hubs.insert(hub.to_string()), "candidate {hub} twice");
        assert_ne!(
            Some(hub),
            s["baseline"]["hub"].as_str(),
            "the baseline is not a candidate"
        );
    }

    let targets = s["targets"].as_array().unwrap();
    let names: Vec<&str> = targets
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    let unique: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(names.len(), unique.len(), "a target is listed twice");
    assert_eq!(unique, IBM36.iter().copied().collect::<BTreeSet<_>>());

    let allowed: BTreeSet<&str> = ["name", "dataset", "columns", "splits", "metric", "note"].into();
    for t in targets {
        let name = t["name"].as_str().unwrap();
        let keys: BTreeSet<&str> = t.as_object().unwrap().keys().map(String::as_str).collect();
        assert!(keys.is_subset(&allowed), "{name}: unknown keys {keys:?}");
        let d = &t["dataset"];
        let config = d["config"].as_str().map(str::to_string);
        assert!(
            d["config"].is_null() || config.as_deref().is_some_and(|c| !c.is_empty()),
            "{name}: config"
        );
        DatasetRef::parse(
            d["hub"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: dataset.hub")),
            config,
        )
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(
            d["revision"].is_null() || d["revision"].as_str().is_some(),
            "{name}: revision"
        );

        let text = columns(&t["columns"]["text"], name);
        let pair = if t["columns"]["text_pair"].is_null() {
            vec![]
        } else {
            columns(&t["columns"]["text_pair"], name)
        };
        let label = t["columns"]["label"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: label column"));
        let all: Vec<&String> = text.iter().chain(&pair).collect();
        assert_eq!(
            all.iter().collect::<BTreeSet<_>>().len(),
            all.len(),
            "{name}: a column is used twice"
        );
        assert!(
            !all.iter().any(|c| c.as_str() == label),
            "{name}: the label is also an input"
        );

        let sp = &t["splits"];
        let train =
            split(&sp["train"], name).unwrap_or_else(|| panic!("{name}: train cannot be carved"));
        let dev = split(&sp["dev"], name);
        let test = split(&sp["test"], name);
        let named: Vec<&String> = [Some(&train), dev.as_ref(), test.as_ref()]
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(
            named.iter().collect::<BTreeSet<_>>().len(),
            named.len(),
            "{name}: a split is used twice"
        );

        let metric = t["metric"].as_str().unwrap();
        assert_eq!(
            metric == "spearman",
            name == "stsb",
            "{name}: metric {metric}"
        );
        assert!(
            ["accuracy", "spearman"].contains(&metric),
            "{name}: metric {metric}"
        );
    }

    let mnli = targets.iter().find(|t| t["name"] == "mnli").unwrap();
    assert_eq!(mnli["splits"]["dev"], "validation_matched");
    assert_eq!(mnli["splits"]["test"], "validation_mismatched");
    // GLUE and SuperGLUE hide test labels: those tests are carved from train.
    for t in targets.iter().filter(|t| {
        t["dataset"]["hub"]
            .as_str()
            .is_some_and(|h| h.ends_with("/glue") || h.ends_with("/super_glue"))
            && t["name"] != "mnli"
    }) {
        assert!(
            t["splits"]["test"].is_object(),
            "{}: hidden test must be carved",
            t["name"]
        );
    }
}
