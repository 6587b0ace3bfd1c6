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
    /// What tables show when `display_name(id)` alone would be ambiguous on this board (two local
    /// checkpoints in directories of the same name, or one checkpoint under two suite names):
    /// `suite name (directory)`. Set by `build`; `None` keeps the plain display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl ModelInfo {
    /// The name a table shows: a hub id as it is, a local checkpoint by its directory name (the
    /// full path stays in `id`, in the JSON and CSV exports and in the report's provenance), or
    /// `label` where that would be ambiguous.
    pub fn label(&self) -> &str {
        self.label
            .as_deref()
            .unwrap_or_else(|| display_name(&self.id))
    }
}

/// Gives every model whose display name it shares with another model of the board (rows are
/// keyed by suite name) the label `name (display name)`, so no two rows read the same.
fn disambiguate(models: &mut [(&str, &mut ModelInfo)]) {
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for (_, m) in models.iter() {
        *count.entry(display_name(&m.id).to_string()).or_default() += 1;
    }
    for (name, m) in models.iter_mut() {
        let shown = display_name(&m.id);
        if count[shown] > 1 {
            m.label = Some(format!("{name} ({shown})"));
        }
    }
}

/// A model id as tables show it: a hub id as it is, a local path by its last component.
pub fn display_name(id: &str) -> &str {
    let local = id.starts_with(['/', '.', '$', '~']);
    match local.then(|| id.trim_end_matches('/').rsplit('/').next()) {
        Some(Some(last)) if !last.is_empty() => last,
        _ => id,
    }
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

// ---------------------------------------------------------------------------------------------
// Building a board from result records (pure)
// ---------------------------------------------------------------------------------------------

use crate::plan::Role;
use crate::results::{RecordKind, ResultRecord};
use crate::suite::Suite;
use anyhow::{bail, Result};

/// The shape of a board: target columns (in order) and the models' rows, by suite name.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub targets: Vec<TargetInfo>,
    /// The baseline model's name.
    pub baseline: String,
    /// Candidate names; rows appear for these even when they have no result yet.
    pub candidates: Vec<String>,
}

impl Layout {
    /// The layout of one or more suites of the same architecture (targets and candidates in
    /// suite order, each once).
    pub fn from_suites(arch: &str, suites: &[Suite]) -> Result<Layout> {
        let mut layout: Option<Layout> = None;
        for s in suites.iter().filter(|s| s.arch == arch) {
            let l = layout.get_or_insert_with(|| Layout {
                targets: Vec::new(),
                baseline: s.baseline.name.clone(),
                candidates: Vec::new(),
            });
            if l.baseline != s.baseline.name {
                bail!(
                    "suite {} ({}): baseline {:?} differs from {:?} of another suite of arch {arch}",
                    s.name,
                    s.file.display(),
                    s.baseline.name,
                    l.baseline
                );
            }
            for t in &s.targets {
                if !l.targets.iter().any(|x| x.name == t.name) {
                    l.targets.push(TargetInfo {
                        name: t.name.clone(),
                        metric: t.metric,
                    });
                }
            }
            for m in s.evaluated_models().into_iter().skip(1) {
                if !l.candidates.contains(&m.name) {
                    l.candidates.push(m.name);
                }
            }
        }
        layout
            .ok_or_else(|| anyhow::anyhow!("--arch {arch}: none of the given suites has this arch"))
    }

    /// Adds the fused bases of the suites' `fusion` sections (`recycle fuse`) that have results
    /// among `records`: a suite whose fusion loop never ran gets no empty rows for it.
    pub fn add_fused(&mut self, arch: &str, suites: &[Suite], records: &[ResultRecord]) {
        for f in suites
            .iter()
            .filter(|s| s.arch == arch)
            .filter_map(|s| s.fusion.as_ref())
        {
            for k in 1..=f.iterations {
                let name = crate::fuse::iteration_model(f, k).name;
                let ran = records
                    .iter()
                    .any(|r| r.arch == arch && r.model.name == name);
                if ran && !self.candidates.contains(&name) {
                    self.candidates.push(name);
                }
            }
        }
    }

    /// The layout the records of `arch` imply: targets and candidates in name order.
    pub fn from_records(arch: &str, records: &[ResultRecord]) -> Result<Layout> {
        let mut targets: BTreeMap<String, Metric> = BTreeMap::new();
        let mut baselines = std::collections::BTreeSet::new();
        let mut candidates = std::collections::BTreeSet::new();
        for r in records.iter().filter(|r| r.arch == arch) {
            let (Some(role), Some(t)) = (r.role, &r.target) else {
                continue;
            };
            if let Some(m) = r.metric {
                targets.entry(t.clone()).or_insert(m);
            }
            match role {
                Role::Baseline => baselines.insert(r.model.name.clone()),
                Role::Candidate => candidates.insert(r.model.name.clone()),
            };
        }
        let baseline = match baselines.len() {
            0 => bail!("--arch {arch}: no baseline results found"),
            1 => baselines.into_iter().next().unwrap_or_default(),
            _ => bail!(
                "--arch {arch}: the results have several baselines ({}); rank one suite at a time",
                baselines.into_iter().collect::<Vec<_>>().join(", ")
            ),
        };
        Ok(Layout {
            targets: targets
                .into_iter()
                .map(|(name, metric)| TargetInfo { name, metric })
                .collect(),
            baseline,
            candidates: candidates.into_iter().collect(),
        })
    }
}

fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Sample standard deviation (n − 1); `None` with fewer than two values.
pub fn sample_std(xs: &[f64]) -> Option<f64> {
    let m = mean(xs)?;
    (xs.len() >= 2)
        .then(|| (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64).sqrt())
}

/// One (model, target) cell's records: successful scores (points) by seed, and failures.
#[derive(Default)]
struct Gathered {
    scores: BTreeMap<u32, f64>,
    errors: BTreeMap<u32, String>,
}

/// Builds the board of `arch` from result records. Only evaluation records of this arch count;
/// for each (model, target, seed) a success wins over a failure.
pub fn build(
    arch: &str,
    layout: &Layout,
    records: &[ResultRecord],
    generated_at: &str,
) -> Leaderboard {
    let mut cells: BTreeMap<(String, String), Gathered> = BTreeMap::new();
    let mut info: BTreeMap<String, ModelInfo> = BTreeMap::new();
    let mut suites = std::collections::BTreeSet::new();
    let mut hashes = std::collections::BTreeSet::new();
    let mut used = 0;
    for r in records
        .iter()
        .filter(|r| r.arch == arch && r.role.is_some())
    {
        let Some(target) = &r.target else { continue };
        let known = r.model.name == layout.baseline || layout.candidates.contains(&r.model.name);
        if !known || !layout.targets.iter().any(|t| &t.name == target) {
            continue;
        }
        used += 1;
        suites.insert(r.suite.clone());
        hashes.insert(r.protocol_hash.clone());
        let g = cells
            .entry((r.model.name.clone(), target.clone()))
            .or_default();
        match (r.kind, r.test_score) {
            (RecordKind::Finetune, Some(s)) => {
                g.scores.insert(r.seed, s * 100.0);
                info.insert(
                    r.model.name.clone(),
                    ModelInfo {
                        id: r.model.id.clone(),
                        revision: r.model.revision.clone(),
                        label: None,
                    },
                );
            }
            _ => {
                g.errors.insert(
                    r.seed,
                    r.error
                        .clone()
                        .unwrap_or_else(|| "no test score".to_string()),
                );
                info.entry(r.model.name.clone())
                    .or_insert_with(|| ModelInfo {
                        id: r.model.id.clone(),
                        revision: r.model.revision.clone(),
                        label: None,
                    });
            }
        }
    }
    let proxy_scores = probe_proxies(arch, records);
    let model_info = |name: &str| {
        info.get(name).cloned().unwrap_or_else(|| ModelInfo {
            id: name.to_string(),
            revision: None,
            label: None,
        })
    };

    let baseline_cells: Vec<BaselineCell> = layout
        .targets
        .iter()
        .map(|t| {
            let g = cells.get(&(layout.baseline.clone(), t.name.clone()));
            let scores: Vec<f64> = g
                .map(|g| g.scores.values().copied().collect())
                .unwrap_or_default();
            let failed = g.map_or(0, |g| {
                g.errors
                    .keys()
                    .filter(|s| !g.scores.contains_key(s))
                    .count()
            });
            BaselineCell {
                mean: mean(&scores),
                std: sample_std(&scores),
                scores,
                failed,
            }
        })
        .collect();
    let base_means: Vec<Option<f64>> = baseline_cells.iter().map(|c| c.mean).collect();
    let baseline = BaselineRow {
        model: model_info(&layout.baseline),
        avg_score: base_means
            .iter()
            .copied()
            .collect::<Option<Vec<f64>>>()
            .and_then(|v| mean(&v)),
        cells: baseline_cells.clone(),
    };

    let mut rows: Vec<(String, Row)> = layout
        .candidates
        .iter()
        .map(|name| {
            let row_cells: Vec<Cell> = layout
                .targets
                .iter()
                .zip(&baseline_cells)
                .map(|(t, b)| {
                    let g = cells.get(&(name.clone(), t.name.clone()));
                    let scores: Vec<f64> = g
                        .map(|g| g.scores.values().copied().collect())
                        .unwrap_or_default();
                    match (mean(&scores), b.mean, g) {
                        (Some(score), Some(base), _) => {
                            let gain = score - base;
                            Cell::Done {
                                score,
                                gain,
                                seeds: scores.len(),
                                within_noise: b.std.is_some_and(|s| gain.abs() <= s),
                            }
                        }
                        (None, _, Some(g)) if !g.errors.is_empty() => Cell::Failed {
                            error: g.errors.values().next().cloned().unwrap_or_default(),
                        },
                        // No score, or no baseline to measure the gain against.
                        _ => Cell::Missing,
                    }
                })
                .collect();
            let gains: Vec<f64> = row_cells
                .iter()
                .filter_map(|c| match c {
                    Cell::Done { gain, .. } => Some(*gain),
                    _ => None,
                })
                .collect();
            let total = row_cells.len();
            let complete = gains.len() == total && total > 0;
            let row = Row {
                rank: None,
                model: model_info(name),
                avg_gain: if complete { mean(&gains) } else { None },
                partial_avg_gain: if complete { None } else { mean(&gains) },
                coverage: Coverage {
                    done: gains.len(),
                    total,
                },
                cells: row_cells,
                proxies: proxy_scores.get(name).cloned().unwrap_or_default(),
            };
            (name.clone(), row)
        })
        .collect();
    rows.sort_by(|(an, a), (bn, b)| {
        let key = |r: &Row| match (r.avg_gain, r.partial_avg_gain) {
            (Some(g), _) => (0, -g),
            (None, Some(p)) => (1, -p),
            (None, None) => (2, 0.0),
        };
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1)).then(an.cmp(bn))
    });
    let mut rank = 0;
    for (_, r) in rows.iter_mut() {
        if r.avg_gain.is_some() {
            rank += 1;
            r.rank = Some(rank);
        }
    }

    let mut baseline = baseline;
    let mut named: Vec<(&str, &mut ModelInfo)> =
        vec![(layout.baseline.as_str(), &mut baseline.model)];
    named.extend(rows.iter_mut().map(|(n, r)| (n.as_str(), &mut r.model)));
    disambiguate(&mut named);

    Leaderboard {
        schema_version: LEADERBOARD_SCHEMA_VERSION,
        arch: arch.to_string(),
        targets: layout.targets.clone(),
        baseline,
        rows: rows.into_iter().map(|(_, r)| r).collect(),
        provenance: Provenance {
            recycle_version: crate::results::RECYCLE_VERSION.to_string(),
            generated_at: generated_at.to_string(),
            suites: suites.into_iter().collect(),
            protocol_hashes: hashes.into_iter().collect(),
            results: used,
        },
    }
}

/// Proxy scores of `arch`'s models from named probe records, by model name: `NAME` is the
/// linear-probe accuracy in points (the paper's `mnli_lp`), `NAME:logme` and `NAME:hscore` the
/// other two scores where present. Of several records for the same model and name, the last in
/// record order wins.
pub fn probe_proxies(
    arch: &str,
    records: &[ResultRecord],
) -> BTreeMap<String, BTreeMap<String, f64>> {
    let mut out: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| r.arch == arch && r.kind == RecordKind::Probe)
    {
        let Some(p) = &r.probe else { continue };
        let Some(name) = &p.name else { continue };
        let scores = out.entry(r.model.name.clone()).or_default();
        let named = [
            (name.clone(), p.lp_accuracy.map(|a| a * 100.0)),
            (format!("{name}:logme"), p.logme),
            (format!("{name}:hscore"), p.hscore),
        ];
        for (key, value) in named {
            match value {
                Some(v) => scores.insert(key, v),
                None => scores.remove(&key),
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{disambiguate, ModelInfo};

    fn label(id: &str) -> String {
        ModelInfo {
            id: id.to_string(),
            revision: None,
            label: None,
        }
        .label()
        .to_string()
    }

    #[test]
    fn local_checkpoints_are_labelled_by_their_directory_and_hub_ids_as_they_are() {
        assert_eq!(
            label("${RECYCLE_HOME}/models/all-MiniLM-L6-v2"),
            "all-MiniLM-L6-v2"
        );
        assert_eq!(label("/data/ckpt/run-3/"), "run-3");
        assert_eq!(label("./models/x"), "x");
        assert_eq!(label("FacebookAI/roberta-base"), "FacebookAI/roberta-base");
        assert_eq!(label("donor:from-sarcasm"), "donor:from-sarcasm");
        assert_eq!(label("/"), "/");
    }

    #[test]
    fn models_that_would_read_the_same_are_labelled_by_suite_name() {
        let info = |id: &str| ModelInfo {
            id: id.to_string(),
            revision: None,
            label: None,
        };
        let mut models = [
            ("base", info("org/base")),
            ("run1", info("/runs/1/checkpoint-500")),
            ("run2", info("/runs/2/checkpoint-500/")),
            ("other", info("/runs/3/final")),
            ("alias", info("/runs/3/final")),
            ("hub", info("org/checkpoint-500")),
        ];
        let mut named: Vec<(&str, &mut ModelInfo)> =
            models.iter_mut().map(|(n, m)| (*n, m)).collect();
        disambiguate(&mut named);
        let labels: Vec<&str> = models.iter().map(|(_, m)| m.label()).collect();
        assert_eq!(
            labels,
            [
                "org/base",
                "run1 (checkpoint-500)",
                "run2 (checkpoint-500)",
                "other (final)",
                "alias (final)",
                "org/checkpoint-500",
            ]
        );
        // An unambiguous board keeps the plain names and serialises as before (no `label`).
        let mut alone = [("run1", info("/runs/1/checkpoint-500"))];
        let mut named: Vec<(&str, &mut ModelInfo)> =
            alone.iter_mut().map(|(n, m)| (*n, m)).collect();
        disambiguate(&mut named);
        assert_eq!(alone[0].1.label(), "checkpoint-500");
        assert!(!serde_json::to_string(&alone[0].1)
            .unwrap()
            .contains("label"));
    }
}
