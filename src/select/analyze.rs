//! The `recycle analyze` report as data: the gain decomposition, each model's adjusted average gain,
//! and for each proxy its correlation with that average and its top-k selection regret; plus its
//! Markdown rendering. The CLI only builds the [`GainTable`] and the proxy scores, from result files
//! or from a leaderboard ([`from_leaderboard`]).

use super::correlate::{pearson, spearman};
use super::decompose::{decompose, DecomposeConfig, Decomposition};
use super::holdout::{leave_one_out, HoldoutReport};
use super::regret::{regret, Proxy, RegretReport};
use super::GainTable;
use crate::leaderboard::{Cell, Leaderboard};
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Settings of the analysis.
#[derive(Debug, Clone, PartialEq)]
pub struct AnalysisConfig {
    pub decompose: DecomposeConfig,
    /// The k of the top-k regrets (the paper reports 1 and 3).
    pub ks: Vec<usize>,
    /// Whether to check the predictions on evaluated cells, hiding them one at a time.
    pub holdout: Holdout,
}

/// The check of the decomposition's predictions on cells whose gain is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Holdout {
    /// No check (the report's `holdout` is absent).
    #[default]
    Off,
    /// Hide each evaluated cell in turn, refit, compare ([`leave_one_out`]).
    LeaveOneOut,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        Self {
            decompose: DecomposeConfig::default(),
            ks: vec![1, 3],
            holdout: Holdout::Off,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisReport {
    pub models: usize,
    pub targets: usize,
    pub observed_cells: usize,
    pub decomposition: Decomposition,
    /// One row per model, best adjusted average first.
    pub averages: Vec<ModelAverage>,
    pub proxies: Vec<ProxyAnalysis>,
    /// Predictions of hidden evaluated cells against their real gains, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout: Option<HoldoutReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelAverage {
    pub model: String,
    /// `μ + a_m`: the expected mean gain over all targets, from the decomposition.
    pub adjusted: f64,
    pub std_err: Option<f64>,
    /// The plain mean, only when the model was evaluated on every target.
    pub observed: Option<f64>,
    pub evaluated_targets: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyAnalysis {
    pub name: String,
    /// Models of the table that the proxy scores.
    pub scored_models: usize,
    /// Models the proxy scores that the table does not have (ignored).
    pub unknown_models: Vec<String>,
    /// Against the adjusted average gain, over the scored models.
    pub pearson: Option<f64>,
    pub spearman: Option<f64>,
    pub regret: Vec<RegretReport>,
}

/// [`report_with`] with the default settings.
pub fn report(
    gains: &GainTable,
    proxies: &BTreeMap<String, BTreeMap<String, f64>>,
) -> Result<AnalysisReport> {
    report_with(gains, proxies, &AnalysisConfig::default())
}

/// Decomposes `gains` and evaluates every proxy (`proxy name → model id → score`, higher = better).
pub fn report_with(
    gains: &GainTable,
    proxies: &BTreeMap<String, BTreeMap<String, f64>>,
    config: &AnalysisConfig,
) -> Result<AnalysisReport> {
    ensure!(
        !config.ks.is_empty(),
        "analysis needs at least one k for the top-k regret"
    );
    ensure!(
        !gains.models.is_empty(),
        "no candidate to analyse: gains need at least one model besides the baseline evaluated on \
         a target (`recycle rank` shows the baseline's scores)"
    );
    let decomposition = decompose(gains, &config.decompose)?;
    let nt = gains.targets.len();
    let mut averages: Vec<ModelAverage> = (0..gains.models.len())
        .map(|m| {
            let observed: Vec<f64> = gains.gains[m].iter().flatten().copied().collect();
            ModelAverage {
                model: gains.models[m].clone(),
                adjusted: decomposition.model_average(m),
                std_err: decomposition.model_effects[m].std_err,
                observed: (observed.len() == nt).then(|| observed.iter().sum::<f64>() / nt as f64),
                evaluated_targets: observed.len(),
            }
        })
        .collect();
    averages.sort_by(|a, b| b.adjusted.total_cmp(&a.adjusted));

    let mut analyses = Vec::new();
    for (name, scores) in proxies {
        let per_model: Vec<Option<f64>> = gains
            .models
            .iter()
            .map(|m| scores.get(m).copied())
            .collect();
        let unknown_models: Vec<String> = scores
            .keys()
            .filter(|m| !gains.models.contains(m))
            .cloned()
            .collect();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for (m, s) in per_model.iter().enumerate() {
            if let Some(s) = s {
                x.push(*s);
                y.push(decomposition.model_average(m));
            }
        }
        let regrets = config
            .ks
            .iter()
            .map(|&k| regret(gains, Proxy::Global(&per_model), k))
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("proxy {name}"))?;
        analyses.push(ProxyAnalysis {
            name: name.clone(),
            scored_models: x.len(),
            unknown_models,
            pearson: pearson(&x, &y).with_context(|| format!("proxy {name}"))?,
            spearman: spearman(&x, &y).with_context(|| format!("proxy {name}"))?,
            regret: regrets,
        });
    }
    let holdout = match config.holdout {
        Holdout::Off => None,
        Holdout::LeaveOneOut => Some(
            leave_one_out(gains, &config.decompose)
                .context("leave-one-out check of predictions")?,
        ),
    };
    Ok(AnalysisReport {
        models: gains.models.len(),
        targets: nt,
        observed_cells: decomposition.observed_cells,
        decomposition,
        averages,
        proxies: analyses,
        holdout,
    })
}

/// Proxy scores by proxy name, then model id.
pub type ProxyScores = BTreeMap<String, BTreeMap<String, f64>>;

/// The gain table and proxy scores of a leaderboard: `Done` cells give gains, `Missing` and `Failed`
/// cells stay missing; the noise floor of a cell is the baseline's seed std on its target.
pub fn from_leaderboard(board: &Leaderboard) -> Result<(GainTable, ProxyScores)> {
    let targets: Vec<String> = board.targets.iter().map(|t| t.name.clone()).collect();
    ensure!(
        board.baseline.cells.len() == targets.len(),
        "leaderboard {}: baseline has {} cells for {} targets",
        board.arch,
        board.baseline.cells.len(),
        targets.len()
    );
    let mut models = Vec::new();
    let mut gains = Vec::new();
    let mut stds = Vec::new();
    let mut proxies = ProxyScores::new();
    for row in &board.rows {
        ensure!(
            row.cells.len() == targets.len(),
            "leaderboard {}: model {} has {} cells for {} targets",
            board.arch,
            row.model.id,
            row.cells.len(),
            targets.len()
        );
        let mut g = Vec::new();
        let mut sd = Vec::new();
        for (cell, base) in row.cells.iter().zip(&board.baseline.cells) {
            match cell {
                Cell::Done { gain, .. } => {
                    g.push(Some(*gain));
                    sd.push(base.std);
                }
                Cell::Missing | Cell::Failed { .. } => {
                    g.push(None);
                    sd.push(None);
                }
            }
        }
        for (name, score) in &row.proxies {
            proxies
                .entry(name.clone())
                .or_default()
                .insert(row.model.id.clone(), *score);
        }
        models.push(row.model.id.clone());
        gains.push(g);
        stds.push(sd);
    }
    let table = GainTable::new(models, targets, gains)
        .and_then(|t| t.with_seed_std(stds))
        .with_context(|| format!("leaderboard {}", board.arch))?;
    Ok((table, proxies))
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{v:.digits$}"))
}

/// The report as Markdown: variance shares, model ranking, proxies. Local model paths are shown by
/// their directory name (the JSON keeps the full ids).
pub fn to_markdown(r: &AnalysisReport) -> String {
    use crate::leaderboard::display_name;
    let d = &r.decomposition;
    let mut s = String::new();
    let _ = writeln!(s, "# Gain analysis\n");
    let _ = writeln!(
        s,
        "{} models × {} targets, {} cells evaluated. Gains in points.\n",
        r.models, r.targets, r.observed_cells
    );
    if !d.notes.is_empty() {
        let _ = writeln!(s, "Not computed:\n");
        for n in &d.notes {
            let _ = writeln!(s, "- {n}.");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "## Variance of gains\n");
    match &d.variance {
        Some(v) => {
            let _ = writeln!(s, "| part | share |\n|---|---:|");
            let _ = writeln!(s, "| model effect | {:.1} % |", 100.0 * v.model);
            let _ = writeln!(s, "| target effect | {:.1} % |", 100.0 * v.target);
            if let Some(i) = v.interaction {
                let _ = writeln!(s, "| rank-1 interaction | {:.1} % |", 100.0 * i);
            }
            let _ = writeln!(s, "| residual | {:.1} % |", 100.0 * v.residual);
        }
        None => {
            let _ = writeln!(s, "Not computed (see above).");
        }
    }
    let _ = writeln!(
        s,
        "\nMean gain μ = {:.2} (± {}), residual std {}, {} degrees of freedom.\n",
        d.mean.estimate,
        opt(d.mean.std_err, 2),
        opt(d.residual_std, 2),
        d.dof
    );
    let _ = writeln!(s, "## Models by adjusted average gain\n");
    let _ = writeln!(
        s,
        "| model | μ + a | ± se | mean over all targets | targets |\n|---|---:|---:|---:|---:|"
    );
    for a in &r.averages {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {} | {} | {}/{} |",
            display_name(&a.model),
            a.adjusted,
            opt(a.std_err, 2),
            opt(a.observed, 2),
            a.evaluated_targets,
            r.targets
        );
    }
    if !r.proxies.is_empty() {
        let _ = writeln!(s, "\n## Proxies\n");
        let mut header = "| proxy | models | Pearson | Spearman |".to_string();
        let mut rule = "|---|---:|---:|---:|".to_string();
        for k in r.proxies[0].regret.iter().map(|g| g.k) {
            let _ = write!(header, " regret top-{k} (mean / max) |");
            rule.push_str("---:|");
        }
        header.push_str(" seed noise |");
        rule.push_str("---:|");
        let _ = writeln!(s, "{header}\n{rule}");
        for p in &r.proxies {
            let mut line = format!(
                "| {} | {} | {} | {} |",
                p.name,
                p.scored_models,
                opt(p.pearson, 2),
                opt(p.spearman, 2)
            );
            for g in &p.regret {
                let _ = write!(
                    line,
                    " {} / {} |",
                    opt(g.mean_regret, 2),
                    opt(g.max_regret, 2)
                );
            }
            let noise = p.regret.first().and_then(|g| g.noise_floor);
            let _ = write!(line, " {} |", opt(noise, 2));
            let _ = writeln!(s, "{line}");
        }
    }
    if !d.predictions.is_empty() {
        let _ = writeln!(s, "\n## Predicted gains of unevaluated cells\n");
        let _ = writeln!(
            s,
            "| model | target | predicted | interval |\n|---|---|---:|---|"
        );
        for c in &d.predictions {
            let interval = match (c.lower, c.upper) {
                (Some(l), Some(u)) => format!("[{l:.2}, {u:.2}]"),
                _ => "—".to_string(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {} |",
                display_name(&c.model),
                c.target,
                c.estimate,
                interval
            );
        }
    }
    if let Some(h) = &r.holdout {
        let _ = writeln!(
            s,
            "\n## Predictions of hidden evaluated cells (leave-one-out)\n"
        );
        let _ = writeln!(
            s,
            "{} cells hidden one at a time. Interval coverage {} (nominal {:.0} %); mean absolute error \
             {} points, against {} for the mean of the other models on the target.{}\n",
            h.cells.len(),
            h.coverage
                .map_or_else(|| "—".to_string(), |c| format!("{:.0} %", 100.0 * c)),
            100.0 * h.nominal_coverage,
            opt(h.mean_abs_error, 2),
            opt(h.target_mean_abs_error, 2),
            if h.skipped.is_empty() {
                String::new()
            } else {
                format!(" Not hidden (sole cell of a row or column): {}.", h.skipped.join(", "))
            }
        );
        let _ = writeln!(
            s,
            "| model | target | real | predicted | interval | covered |\n|---|---|---:|---:|---|---|"
        );
        for c in &h.cells {
            let interval = match (c.lower, c.upper) {
                (Some(l), Some(u)) => format!("[{l:.2}, {u:.2}]"),
                _ => "—".to_string(),
            };
            let covered = match c.covered {
                Some(true) => "yes",
                Some(false) => "no",
                None => "—",
            };
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {:.2} | {} | {} |",
                display_name(&c.model),
                c.target,
                c.actual,
                c.predicted,
                interval,
                covered
            );
        }
    }
    s
}
