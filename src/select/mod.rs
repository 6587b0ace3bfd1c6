//! Choosing which checkpoints to fine-tune without fine-tuning all of them: frozen-feature proxies
//! (linear probe, LogME, H-score), the model/target decomposition of gains, and how well a proxy
//! would have selected (correlation and regret against exhaustive evaluation).
//!
//! The estimators are pure functions of f64 matrices; [`features`] (hidden states → pooled rows,
//! with the on-disk feature cache) and [`probing`] (one probe end to end) are the only parts that
//! touch a model or a file. The caller pools hidden states from
//! `SequenceClassifier::hidden_states` into a [`Matrix`] of features (one row per example, see
//! [`linear_probe::pool_cls`], [`linear_probe::pool_mean`], [`linear_probe::average_layers`]) and
//! builds a [`GainTable`] from result files; nothing here reads files or prints.
//!
//! - [`linear_probe::probe`]: multinomial logistic regression on frozen features, accuracy on a held-out split.
//! - [`logme::logme`], [`logme::logme_regression`]: LogME (You et al. 2021), mean log-evidence per example.
//! - [`hscore::hscore`]: H-score (Bao et al. 2019).
//! - [`decompose::decompose`]: gain = μ + model effect + target effect (+ rank-1 interaction).
//! - [`holdout::leave_one_out`]: the decomposition's predictions checked on hidden evaluated cells.
//! - [`correlate::pearson`], [`correlate::spearman`]: proxy vs average gain.
//! - [`regret::regret`]: what selecting the top-k by a proxy loses against the best of all.
//! - [`analyze::report`]: all of the above for a gain table and a set of proxies, as one report.

pub mod analyze;
pub mod choose;
pub mod correlate;
pub mod decompose;
pub mod features;
pub mod holdout;
pub mod hscore;
pub mod linalg;
pub mod linear_probe;
pub mod logme;
pub mod probing;
pub mod regret;
pub mod rng;

pub use linalg::Matrix;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// Gains of candidate models on targets, in points (candidate score − mean baseline score, × 100).
/// `None` is a cell that was not evaluated (or failed): it is never filled in silently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GainTable {
    /// Row labels (model ids).
    pub models: Vec<String>,
    /// Column labels (target names).
    pub targets: Vec<String>,
    /// `gains[m][t]`.
    pub gains: Vec<Vec<Option<f64>>>,
    /// Seed standard deviation of the candidate's score per cell, in points, where known; empty when
    /// unknown. Used as the noise floor beside regrets.
    #[serde(default)]
    pub seed_std: Vec<Vec<Option<f64>>>,
}

impl GainTable {
    /// Checks shapes, uniqueness of labels and that every present gain is finite.
    pub fn new(
        models: Vec<String>,
        targets: Vec<String>,
        gains: Vec<Vec<Option<f64>>>,
    ) -> Result<Self> {
        let table = Self {
            models,
            targets,
            gains,
            seed_std: Vec::new(),
        };
        table.validate()?;
        Ok(table)
    }

    /// Adds per-cell seed standard deviations (same shape as the gains).
    pub fn with_seed_std(mut self, seed_std: Vec<Vec<Option<f64>>>) -> Result<Self> {
        self.seed_std = seed_std;
        self.validate()?;
        Ok(self)
    }

    /// The checks of [`GainTable::new`], for tables built field by field or deserialised.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.gains.len() == self.models.len(),
            "gain table has {} rows for {} models",
            self.gains.len(),
            self.models.len()
        );
        check_unique(&self.models, "model")?;
        check_unique(&self.targets, "target")?;
        for (m, row) in self.gains.iter().enumerate() {
            ensure!(
                row.len() == self.targets.len(),
                "gain row of model {} has {} cells for {} targets",
                self.models[m],
                row.len(),
                self.targets.len()
            );
            for (t, g) in row.iter().enumerate() {
                if let Some(g) = g {
                    ensure!(
                        g.is_finite(),
                        "gain of model {} on target {} is {g}",
                        self.models[m],
                        self.targets[t]
                    );
                }
            }
        }
        if !self.seed_std.is_empty() {
            ensure!(
                self.seed_std.len() == self.models.len()
                    && self.seed_std.iter().all(|r| r.len() == self.targets.len()),
                "seed_std must have the shape of the gains ({} models × {} targets)",
                self.models.len(),
                self.targets.len()
            );
        }
        Ok(())
    }

    pub fn get(&self, m: usize, t: usize) -> Option<f64> {
        self.gains[m][t]
    }

    /// Seed std of a cell, when known.
    pub fn std(&self, m: usize, t: usize) -> Option<f64> {
        self.seed_std.get(m).and_then(|r| r[t])
    }

    /// Number of evaluated cells.
    pub fn observed(&self) -> usize {
        self.gains.iter().flatten().filter(|g| g.is_some()).count()
    }
}

fn check_unique(names: &[String], what: &str) -> Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for n in names {
        ensure!(seen.insert(n), "{what} {n} appears twice in the gain table");
    }
    Ok(())
}
