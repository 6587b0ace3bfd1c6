//! Selection regret: what fine-tuning only the top-k candidates by a proxy loses against evaluating
//! every candidate. Per target, `regret = best gain among all candidates − best gain among the
//! proxy's top k`; the paper reports the mean over targets (top-3: 0.34 points, top-1: 2.33). The
//! seed noise floor is reported beside it: a regret below the seed std is indistinguishable from 0.

use super::GainTable;
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// Proxy scores (higher = better candidate).
#[derive(Debug, Clone, Copy)]
pub enum Proxy<'a> {
    /// One score per model, used for every target (e.g. MNLI linear probe accuracy).
    Global(&'a [Option<f64>]),
    /// A score per model and target (e.g. LogME on each target's training split), `[model][target]`.
    PerTarget(&'a [Vec<Option<f64>>]),
}

impl Proxy<'_> {
    fn score(&self, m: usize, t: usize) -> Option<f64> {
        match self {
            Proxy::Global(s) => s[m],
            Proxy::PerTarget(s) => s[m][t],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetRegret {
    pub target: String,
    /// Candidates on this target: models with both a gain and a proxy score.
    pub candidates: usize,
    pub best_model: String,
    pub best_gain: f64,
    /// The proxy's top k, best first.
    pub selected: Vec<String>,
    pub best_selected_gain: f64,
    pub regret: f64,
    /// Mean seed std of the candidates' scores on this target, where known.
    pub noise_floor: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegretReport {
    pub k: usize,
    /// One entry per target with at least one candidate, in table order.
    pub per_target: Vec<TargetRegret>,
    /// Targets without any candidate (no model has both a gain and a proxy score there).
    pub skipped_targets: Vec<String>,
    pub mean_regret: Option<f64>,
    pub max_regret: Option<f64>,
    /// Mean over targets of the per-target noise floors that are known.
    pub noise_floor: Option<f64>,
}

/// Model indices sorted by descending proxy score; models without a score are left out, ties keep
/// table order.
pub fn rank_by_proxy(scores: &[Option<f64>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).filter(|&m| scores[m].is_some()).collect();
    order.sort_by(|&i, &j| {
        let (a, b) = (
            scores[i].unwrap_or(f64::NEG_INFINITY),
            scores[j].unwrap_or(f64::NEG_INFINITY),
        );
        b.total_cmp(&a)
    });
    order
}

/// Top-`k` selection regret of `proxy` on `table`.
pub fn regret(table: &GainTable, proxy: Proxy, k: usize) -> Result<RegretReport> {
    table.validate()?;
    ensure!(k > 0, "selection regret needs k ≥ 1");
    let nm = table.models.len();
    match proxy {
        Proxy::Global(s) => ensure!(
            s.len() == nm,
            "proxy has {} scores for {nm} models",
            s.len()
        ),
        Proxy::PerTarget(s) => ensure!(
            s.len() == nm && s.iter().all(|r| r.len() == table.targets.len()),
            "per-target proxy must be {nm} models × {} targets",
            table.targets.len()
        ),
    }
    for m in 0..nm {
        for t in 0..table.targets.len() {
            if let Some(s) = proxy.score(m, t) {
                ensure!(
                    s.is_finite(),
                    "proxy score of model {} is {s}",
                    table.models[m]
                );
            }
        }
    }
    let mut per_target = Vec::new();
    let mut skipped_targets = Vec::new();
    for (t, target) in table.targets.iter().enumerate() {
        let scores: Vec<Option<f64>> = (0..nm)
            .map(|m| table.get(m, t).and(proxy.score(m, t)))
            .collect();
        let ranked = rank_by_proxy(&scores);
        let Some(&first) = ranked.first() else {
            skipped_targets.push(target.clone());
            continue;
        };
        let gain = |m: usize| table.get(m, t).unwrap_or(f64::NEG_INFINITY);
        let best = ranked
            .iter()
            .copied()
            .fold(first, |b, m| if gain(m) > gain(b) { m } else { b });
        let selected = &ranked[..k.min(ranked.len())];
        let best_selected_gain = selected
            .iter()
            .map(|&m| gain(m))
            .fold(f64::NEG_INFINITY, f64::max);
        let stds: Vec<f64> = ranked.iter().filter_map(|&m| table.std(m, t)).collect();
        per_target.push(TargetRegret {
            target: target.clone(),
            candidates: ranked.len(),
            best_model: table.models[best].clone(),
            best_gain: gain(best),
            selected: selected.iter().map(|&m| table.models[m].clone()).collect(),
            best_selected_gain,
            regret: gain(best) - best_selected_gain,
            noise_floor: (!stds.is_empty()).then(|| stds.iter().sum::<f64>() / stds.len() as f64),
        });
    }
    let regrets: Vec<f64> = per_target.iter().map(|r| r.regret).collect();
    let floors: Vec<f64> = per_target.iter().filter_map(|r| r.noise_floor).collect();
    Ok(RegretReport {
        k,
        mean_regret: (!regrets.is_empty())
            .then(|| regrets.iter().sum::<f64>() / regrets.len() as f64),
        max_regret: regrets.iter().copied().reduce(f64::max),
        noise_floor: (!floors.is_empty()).then(|| floors.iter().sum::<f64>() / floors.len() as f64),
        per_target,
        skipped_targets,
    })
}
