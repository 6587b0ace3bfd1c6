//! `recycle select` as data: rank candidates by a frozen-feature proxy on the target, keep the top K,
//! and write the one-target suite that fine-tunes exactly those K (plus the baseline's seeds), so
//! the runner, the result store and `recycle rank` treat a selection like any other suite.

use super::regret::rank_by_proxy;
use crate::results::ProbeScores;
use anyhow::{ensure, Result};
use serde_json::{json, Value};

/// Which probe score ranks the candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// Linear-probe accuracy on the target's test (or validation) split.
    Lp,
    /// LogME on the target's training features.
    Logme,
    /// H-score on the target's training features.
    Hscore,
}

impl ProxyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lp => "lp",
            Self::Logme => "logme",
            Self::Hscore => "hscore",
        }
    }

    /// This proxy's score in a probe's scores (higher = better), if it has one.
    pub fn score(self, s: &ProbeScores) -> Option<f64> {
        match self {
            Self::Lp => s.lp_accuracy,
            Self::Logme => s.logme,
            Self::Hscore => s.hscore,
        }
    }
}

/// A candidate and its proxy score (`None`: not scored, e.g. its probe failed).
#[derive(Debug, Clone, PartialEq)]
pub struct Ranked {
    pub model: String,
    pub score: Option<f64>,
    /// Among the top K that get fine-tuned.
    pub selected: bool,
}

/// Candidates best proxy first (ties and unscored ones in input order); the first `budget` scored
/// ones are marked selected.
pub fn rank(scores: &[(String, Option<f64>)], budget: usize) -> Result<Vec<Ranked>> {
    ensure!(budget >= 1, "--budget must be at least 1");
    let values: Vec<Option<f64>> = scores.iter().map(|(_, s)| *s).collect();
    let mut taken = 0;
    // rank_by_proxy orders the scored ones; the unscored follow in input order.
    let mut order = rank_by_proxy(&values);
    order.retain(|&i| values[i].is_some());
    order.extend((0..values.len()).filter(|&i| values[i].is_none()));
    Ok(order
        .into_iter()
        .map(|i| {
            let selected = values[i].is_some() && taken < budget;
            taken += usize::from(selected);
            Ranked {
                model: scores[i].0.clone(),
                score: values[i],
                selected,
            }
        })
        .collect())
}

/// A model of the selection suite: its suite name and its suite model object (`hub` or `path`).
#[derive(Debug, Clone, PartialEq)]
pub struct SuiteModel {
    pub name: String,
    pub source: Value,
}

impl SuiteModel {
    /// A checkpoint directory or a hub id (`org/name[@rev]`), named by a plain version of `spec`.
    pub fn from_spec(spec: &str, is_dir: bool) -> SuiteModel {
        let source = if is_dir {
            json!({ "path": spec })
        } else {
            json!({ "hub": spec })
        };
        SuiteModel {
            name: plain_name(spec),
            source,
        }
    }

    fn to_json(&self) -> Value {
        let mut v = self.source.clone();
        if let Some(o) = v.as_object_mut() {
            o.insert("name".into(), self.name.clone().into());
        }
        v
    }
}

/// `spec` as a suite name: the last path component of a directory (without trailing slashes),
/// hub ids with `/` as `--`, any other character outside `[A-Za-z0-9._-]` as `-`.
pub fn plain_name(spec: &str) -> String {
    let trimmed = spec.trim_end_matches('/');
    let base = if trimmed.starts_with('/') || trimmed.starts_with('.') {
        trimmed.rsplit('/').next().unwrap_or(trimmed)
    } else {
        trimmed
    };
    let s: String = base
        .replace('/', "--")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "model".to_string()
    } else {
        s
    }
}

/// Everything the selection suite needs.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectionSuite {
    pub name: String,
    pub arch: String,
    pub baseline: SuiteModel,
    /// The selected candidates only.
    pub candidates: Vec<SuiteModel>,
    pub target: String,
    /// The target's dataset directory.
    pub dataset: String,
    pub baseline_seeds: u32,
    pub max_train: Option<usize>,
    pub max_eval: Option<usize>,
    /// Suite-level protocol overrides (a JSON object, may be empty).
    pub protocol: Value,
}

impl SelectionSuite {
    /// The suite file's JSON (docs/suite-format.md).
    pub fn to_json(&self) -> Value {
        let mut target = json!({
            "name": self.target,
            "dataset": { "path": self.dataset },
            "metric": "accuracy",
        });
        if let Some(n) = self.max_train {
            target["max_train"] = n.into();
        }
        if let Some(n) = self.max_eval {
            target["max_eval"] = n.into();
        }
        json!({
            "name": self.name,
            "arch": self.arch,
            "baseline": self.baseline.to_json(),
            "candidates": self.candidates.iter().map(SuiteModel::to_json).collect::<Vec<_>>(),
            "targets": [target],
            "protocol": self.protocol,
            "seeds": { "baseline": self.baseline_seeds, "candidates": 1 },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_k_scored_candidates_are_selected() {
        let s = |m: &str, v: Option<f64>| (m.to_string(), v);
        let scores = [
            s("a", Some(0.2)),
            s("b", None),
            s("c", Some(0.9)),
            s("d", Some(0.5)),
        ];
        let r = rank(&scores, 2).unwrap();
        let order: Vec<(&str, bool)> = r.iter().map(|r| (r.model.as_str(), r.selected)).collect();
        assert_eq!(
            order,
            vec![("c", true), ("d", true), ("a", false), ("b", false)]
        );
        // A budget above the scored count selects only scored candidates.
        let r = rank(&scores, 10).unwrap();
        assert_eq!(r.iter().filter(|r| r.selected).count(), 3);
        assert!(rank(&scores, 0).is_err());
    }

    #[test]
    fn names_are_plain() {
        assert_eq!(plain_name("/tmp/x/my model/"), "my-model");
        assert_eq!(
            plain_name("textattack/roberta-base-MNLI@main"),
            "textattack--roberta-base-MNLI-main"
        );
        assert_eq!(plain_name("./m"), "m");
    }
}
