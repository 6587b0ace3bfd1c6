//! The per-architecture leaderboard: the data every exporter (JSON, Markdown, CSV, HTML) renders.
//!
//! Scores and gains here are in *points* (metric × 100), as in the model-recycling paper. A cell that
//! was never run is `Missing` and a cell whose job failed is `Failed`; an average is only reported
//! for a row that covers every target (`avg_gain`), the partial one is labelled as such.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the leaderboard JSON format (the reference format of `recycle check`).
pub const LEADERBOARD_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leaderboard {
    pub schema_version: u32,
    /// The architecture label the board is keyed by, e.g. `roberta-base`.
    pub arch: String,
    /// Target columns, in suite order.
    pub targets: Vec<TargetInfo>,
    /// The vanilla pretrained model, in absolute scores (mean ± std over seeds).
    pub baseline: BaselineRow,
    /// Candidates: complete rows sorted by `avg_gain` (descending), then incomplete rows by
    /// `partial_avg_gain`.
    pub rows: Vec<Row>,
    pub provenance: Provenance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Accuracy,
    Spearman,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub name: String,
    pub metric: Metric,
}

/// A model as the board names it: hub id or local path, and the revision it was evaluated at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineRow {
    pub model: ModelInfo,
    /// One cell per target, aligned with `Leaderboard::targets`.
    pub cells: Vec<BaselineCell>,
    /// Mean of the per-target means, only when every target has at least one seed.
    pub avg_score: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaselineCell {
    /// Mean test score over the successful seeds, in points; `None` when no seed succeeded.
    pub mean: Option<f64>,
    /// Sample standard deviation over seeds (points); `None` with fewer than two seeds.
    pub std: Option<f64>,
    /// The successful seeds' scores, in points, in seed order.
    pub scores: Vec<f64>,
    pub failed: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// 1-based position among complete rows; `None` for an incomplete row.
    pub rank: Option<usize>,
    pub model: ModelInfo,
    /// One cell per target, aligned with `Leaderboard::targets`.
    pub cells: Vec<Cell>,
    /// Mean gain over all targets; only for a row that covers every target.
    pub avg_gain: Option<f64>,
    /// Mean gain over the targets this row has; reported for incomplete rows, flagged as partial.
    pub partial_avg_gain: Option<f64>,
    pub coverage: Coverage,
    /// Cheap proxy scores known for this model (e.g. `mnli_lp`), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub proxies: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    pub done: usize,
    pub total: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Cell {
    Done {
        /// Mean test score over this candidate's seeds (points).
        score: f64,
        /// `score` − baseline mean of the same target (points).
        gain: f64,
        seeds: usize,
        /// |gain| is within the baseline's seed standard deviation on this target.
        within_noise: bool,
    },
    Missing,
    Failed {
        error: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub recycle_version: String,
    /// RFC 3339 UTC time the board was built.
    pub generated_at: String,
    /// Suites whose results the board was built from.
    pub suites: Vec<String>,
    /// Hashes of the resolved fine-tuning protocols seen in the results.
    pub protocol_hashes: Vec<String>,
    /// Number of result records read.
    pub results: usize,
}
