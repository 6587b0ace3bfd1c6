//! configs/ibm36.json is a valid suite (`Suite::load`): every one of IBM's 36 targets once, each
//! complete and consistent with IBM's split rule.

use recycle::hub::{DatasetRef, ModelRef};
use recycle::leaderboard::Metric;
use recycle::suite::{self, DatasetRef as SuiteDataset, Protocol, SplitSource, Suite};
use std::collections::BTreeSet;
use std::path::Path;

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

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/ibm36.json");

fn load() -> Suite {
    Suite::load(Path::new(PATH), None).unwrap_or_else(|e| panic!("{e:#}"))
}

/// IBM's carve rule: the smaller of 1000 examples or 10 % of train, seed 0.
fn is_ibm_carve(s: &SplitSource) -> bool {
    *s == SplitSource::Carve {
        fraction_ppm: 100_000,
        max: Some(1000),
        seed: suite::DEFAULT_CARVE_SEED,
    }
}

#[test]
fn ibm36_parses_as_a_suite_with_every_target_once_complete_and_consistent() {
    let s = load();
    assert_eq!(s.name, "ibm36");
    assert_eq!(s.arch, "roberta-base");
    assert_eq!((s.seeds.baseline, s.seeds.candidates), (5, 1));
    let hub_id = |m: &suite::ModelEntry| match &m.source {
        suite::ModelRef::Hub { id, revision } => {
            ModelRef::parse(id).unwrap_or_else(|e| panic!("{}: {e:#}", m.name));
            assert!(revision.is_none(), "{}: pinned", m.name);
            id.clone()
        }
        other => panic!("{}: not a hub model: {other:?}", m.name),
    };
    let base = hub_id(&s.baseline);
    assert!(!s.candidates.is_empty());
    let mut hubs = BTreeSet::new();
    for c in &s.candidates {
        let id = hub_id(c);
        assert_ne!(id, base, "the baseline is not a candidate");
        assert!(hubs.insert(id.clone()), "candidate {id} twice");
    }

    let names: BTreeSet<&str> = s.targets.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names.len(), s.targets.len(), "a target is listed twice");
    assert_eq!(names, IBM36.iter().copied().collect::<BTreeSet<_>>());

    for t in &s.targets {
        let name = &t.name;
        assert_eq!(t.protocol, Protocol::default(), "{name}: IBM's protocol");
        assert_eq!((t.max_train, t.max_eval), (None, None), "{name}: capped");
        assert_eq!(
            t.metric == Metric::Spearman,
            name == "stsb",
            "{name}: metric {:?}",
            t.metric
        );
        let SuiteDataset::Hub {
            id,
            config,
            revision,
            mapping: m,
        } = &t.dataset
        else {
            panic!("{name}: not a hub dataset")
        };
        DatasetRef::parse(id, config.clone()).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(config.as_deref() != Some(""), "{name}: empty config");
        assert!(revision.is_none(), "{name}: pinned");

        let c = &m.columns;
        let inputs: Vec<&String> = c.text.iter().chain(&c.text_pair).collect();
        assert!(!c.text.is_empty(), "{name}: no text column");
        assert!(
            inputs.iter().all(|x| !x.is_empty()) && !c.label.is_empty(),
            "{name}: empty column name"
        );
        assert_eq!(
            inputs.iter().collect::<BTreeSet<_>>().len(),
            inputs.len(),
            "{name}: a column is used twice"
        );
        assert!(
            !inputs.contains(&&c.label),
            "{name}: the label is also an input"
        );
        if t.metric == Metric::Spearman {
            assert!(m.labels.is_none(), "{name}: regression with labels");
        }

        let sp = &m.splits;
        assert!(!sp.train.is_empty(), "{name}: train");
        for (what, src) in [("dev", &sp.dev), ("test", &sp.test)] {
            match src {
                SplitSource::Name(n) => assert_ne!(n, &sp.train, "{name}: {what} is train"),
                carve => assert!(is_ibm_carve(carve), "{name}: {what}: {carve:?}"),
            }
        }
        if let (SplitSource::Name(a), SplitSource::Name(b)) = (&sp.dev, &sp.test) {
            assert_ne!(a, b, "{name}: dev and test are one split");
        }
    }

    let mnli = s.targets.iter().find(|t| t.name == "mnli").unwrap();
    let SuiteDataset::Hub { mapping, .. } = &mnli.dataset else {
        panic!("mnli: not a hub dataset")
    };
    assert_eq!(
        mapping.splits.dev,
        SplitSource::Name("validation_matched".into())
    );
    assert_eq!(
        mapping.splits.test,
        SplitSource::Name("validation_mismatched".into())
    );
    // GLUE and SuperGLUE hide test labels: as IBM's loader does, validation is the test set and
    // dev is carved from train. Datasets without a validation split carve dev and keep their test.
    let mut hidden = 0;
    for t in &s.targets {
        let SuiteDataset::Hub { id, mapping, .. } = &t.dataset else {
            continue;
        };
        if (id.ends_with("/glue") || id.ends_with("/super_glue")) && t.name != "mnli" {
            hidden += 1;
            assert!(
                is_ibm_carve(&mapping.splits.dev),
                "{}: dev must be carved from train",
                t.name
            );
            assert_eq!(
                mapping.splits.test,
                SplitSource::Name("validation".into()),
                "{}: validation is the test set",
                t.name
            );
        }
        assert!(
            !is_ibm_carve(&mapping.splits.test) || is_ibm_carve(&mapping.splits.dev),
            "{}: test carved while dev is a named split",
            t.name
        );
    }
    // cola mrpc qnli qqp rte sst2 stsb wnli (GLUE) and boolq cb copa multirc wic wsc (SuperGLUE).
    assert_eq!(hidden, 14);
}

#[test]
fn broken_hub_mappings_are_errors_naming_the_field() {
    let text = std::fs::read_to_string(PATH).unwrap();
    let parse = |t: &str| {
        Suite::parse(t, Path::new("ibm36.json"), None, Path::new("/home"))
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    };
    parse(&text).unwrap();
    let cases = [
        // A carve fraction outside (0, 1).
        (
            text.replacen("\"fraction\": 0.1", "\"fraction\": 1.5", 1),
            "targets[0].dataset.splits.dev.fraction",
        ),
        // Carving from a split that is not train.
        (
            text.replacen("\"carve_from\": \"train\"", "\"carve_from\": \"test\"", 1),
            "carve_from",
        ),
        // The label column doubling as an input.
        (
            text.replacen("\"label\": \"label\"", "\"label\": \"text\"", 1),
            "targets[0].dataset.columns.label",
        ),
        // An unknown key inside a dataset.
        (
            text.replacen("\"columns\": {", "\"colums\": {", 1),
            "targets[0].dataset",
        ),
    ];
    for (bad, field) in cases {
        assert_ne!(bad, text, "the mutation for {field} did not apply");
        let e = parse(&bad).expect_err(field);
        assert!(
            e.starts_with("ibm36.json: ") && e.contains(field),
            "{field}: {e}"
        );
    }
}
