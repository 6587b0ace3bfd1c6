//! The model/target decomposition of gains: `gain[m, t] = μ + a_m + b_t (+ u_m·v_t) + ε`. The paper
//! finds the model effect `a_m` and target effect `b_t` largely independent, so a candidate's quality
//! is mostly one number; this module estimates it from an incomplete table, says how much of the
//! variance each part explains, and predicts the cells that were never evaluated.
//!
//! Fitting is alternating least squares (backfitting) over the observed cells, with sum-to-zero
//! constraints `Σ a = Σ b = 0` (and `Σ u = Σ v = 0`, `‖v‖ = 1` for the interaction). Uncertainty comes
//! from a seeded residual bootstrap: refit on `fitted + resampled residuals` (residuals inflated by
//! `√(n / dof)`), standard errors are the replicates' standard deviation, and a missing cell's
//! interval is `estimate ± z·√(bootstrap variance + residual variance)`.

use super::rng::SplitMix64;
use super::GainTable;
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};

/// Whether to fit an interaction term beyond the additive model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interaction {
    /// `μ + a_m + b_t`.
    Additive,
    /// `μ + a_m + b_t + u_m·v_t`.
    RankOne,
}

/// Settings of the decomposition; every default in one place.
#[derive(Debug, Clone, PartialEq)]
pub struct DecomposeConfig {
    pub interaction: Interaction,
    /// Backfitting sweeps at most.
    pub max_iter: usize,
    /// Stop when no fitted cell moves by more than this (points).
    pub tol: f64,
    /// Bootstrap replicates; 0 skips standard errors and intervals.
    pub bootstrap: usize,
    /// Seed of the bootstrap.
    pub seed: u64,
    /// Normal quantile of the prediction intervals (1.96: 95 %).
    pub z: f64,
}

impl Default for DecomposeConfig {
    fn default() -> Self {
        Self {
            interaction: Interaction::Additive,
            max_iter: 5000,
            tol: 1e-9,
            bootstrap: 200,
            seed: 0,
            z: 1.96,
        }
    }
}

/// An estimated effect with its bootstrap standard error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Effect {
    pub name: String,
    pub estimate: f64,
    pub std_err: Option<f64>,
}

/// Shares of the observed cells' sum of squares around their mean. In a complete table they sum to
/// 1; with missing cells the parts are not exactly orthogonal and the sum can differ slightly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VarianceShares {
    pub model: f64,
    pub target: f64,
    pub interaction: Option<f64>,
    pub residual: f64,
    /// Σ (gain − mean gain)² over observed cells, points².
    pub total_ss: f64,
}

/// A prediction for a cell that was not evaluated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellPrediction {
    pub model: String,
    pub target: String,
    pub estimate: f64,
    pub lower: Option<f64>,
    pub upper: Option<f64>,
}

/// The rank-one interaction `u_m·v_t`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankOneTerm {
    pub u: Vec<f64>,
    pub v: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decomposition {
    pub interaction: Interaction,
    /// Grand mean μ: the expected gain of an average model on an average target.
    pub mean: Effect,
    /// `a_m`, aligned with the table's models.
    pub model_effects: Vec<Effect>,
    /// `b_t`, aligned with the table's targets.
    pub target_effects: Vec<Effect>,
    pub rank_one: Option<RankOneTerm>,
    /// `None` when the table cannot split its variance (see `notes`).
    pub variance: Option<VarianceShares>,
    /// √(residual SS / dof), when dof > 0.
    pub residual_std: Option<f64>,
    /// Observed cells minus free parameters.
    pub dof: usize,
    pub observed_cells: usize,
    /// Every cell that is `None` in the table.
    pub predictions: Vec<CellPrediction>,
    /// Backfitting sweeps of the main fit, and whether it met the tolerance.
    pub iterations: usize,
    pub converged: bool,
    /// What this table does not allow to estimate, and why (one sentence each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Decomposition {
    /// `μ + a_m` : the model's expected average gain over all the table's targets, adjusted for
    /// which targets it was evaluated on.
    pub fn model_average(&self, m: usize) -> f64 {
        self.mean.estimate + self.model_effects[m].estimate
    }
}

#[derive(Debug, Clone)]
struct Params {
    mu: f64,
    a: Vec<f64>,
    b: Vec<f64>,
    /// Empty for the additive model.
    u: Vec<f64>,
    v: Vec<f64>,
}

impl Params {
    fn fitted(&self, m: usize, t: usize) -> f64 {
        let inter = if self.u.is_empty() {
            0.0
        } else {
            self.u[m] * self.v[t]
        };
        self.mu + self.a[m] + self.b[t] + inter
    }
}

struct Cell {
    m: usize,
    t: usize,
    y: f64,
}

/// Decomposes `table`; every model and every target needs at least one evaluated cell.
pub fn decompose(table: &GainTable, config: &DecomposeConfig) -> Result<Decomposition> {
    table.validate()?;
    let (nm, nt) = (table.models.len(), table.targets.len());
    ensure!(
        config.z > 0.0 && config.z.is_finite(),
        "decomposition: interval quantile z must be > 0"
    );
    let cells: Vec<Cell> = (0..nm)
        .flat_map(|m| (0..nt).filter_map(move |t| table.get(m, t).map(|y| Cell { m, t, y })))
        .collect();
    for m in 0..nm {
        if !cells.iter().any(|c| c.m == m) {
            bail!(
                "decomposition: model {} has no evaluated target",
                table.models[m]
            );
        }
    }
    for t in 0..nt {
        if !cells.iter().any(|c| c.t == t) {
            bail!(
                "decomposition: target {} has no evaluated model",
                table.targets[t]
            );
        }
    }
    ensure!(!cells.is_empty(), "decomposition of an empty gain table");
    if config.interaction == Interaction::RankOne {
        ensure!(
            nm >= 2 && nt >= 2,
            "a rank-one interaction needs at least 2 models and 2 targets"
        );
    }
    let (params, iterations, converged) = fit(&cells, nm, nt, config, None);
    let n = cells.len();
    // Each group of models and targets linked by evaluated cells has an offset of its own: the
    // additive model has nm + nt − groups free parameters, and compares models only within a group.
    let (model_group, target_group, groups) = groups(&cells, nm, nt);
    let mut free = nm + nt - groups;
    if config.interaction == Interaction::RankOne {
        free += nm + nt - 3;
    }
    let dof = n.saturating_sub(free);
    let residuals: Vec<f64> = cells
        .iter()
        .map(|c| c.y - params.fitted(c.m, c.t))
        .collect();
    let resid_ss: f64 = residuals.iter().map(|r| r * r).sum();
    let residual_std = (dof > 0).then(|| (resid_ss / dof as f64).sqrt());

    let grand = cells.iter().map(|c| c.y).sum::<f64>() / n as f64;
    let total_ss: f64 = cells.iter().map(|c| (c.y - grand).powi(2)).sum();
    let mut notes = Vec::new();
    if groups > 1 {
        let members: Vec<String> = (0..groups)
            .map(|g| {
                let names: Vec<&str> = (0..nm)
                    .filter(|&m| model_group[m] == g)
                    .map(|m| table.models[m].as_str())
                    .collect();
                format!("[{}]", names.join(", "))
            })
            .collect();
        notes.push(format!(
            "comparisons across groups: the evaluated cells fall into {groups} groups of models              that share no evaluated target ({}), so model effects and adjusted averages compare              models only within a group, and gains across groups are neither split nor predicted",
            members.join(" ")
        ));
    }
    let unsplit = if groups > 1 {
        Some("the evaluated cells do not link every model to every target (above)".to_string())
    } else {
        split_unavailable(nm, nt, total_ss)
    };
    if let Some(why) = &unsplit {
        notes.push(format!("variance shares: {why}"));
    }
    if config.bootstrap > 1 && dof == 0 {
        notes.push(format!(
            "standard errors, residual std and prediction intervals: they need more evaluated \
             cells than fitted parameters; have {n} cell{} for {free} parameter{}",
            plural(n),
            plural(free)
        ));
    }
    let share = |ss: f64| ss / total_ss;
    let variance = unsplit.is_none().then(|| VarianceShares {
        model: share(cells.iter().map(|c| params.a[c.m].powi(2)).sum()),
        target: share(cells.iter().map(|c| params.b[c.t].powi(2)).sum()),
        interaction: (!params.u.is_empty()).then(|| {
            share(
                cells
                    .iter()
                    .map(|c| (params.u[c.m] * params.v[c.t]).powi(2))
                    .sum(),
            )
        }),
        residual: share(resid_ss),
        total_ss,
    });

    // Only cells within a group can be predicted (see `groups`).
    let missing: Vec<(usize, usize)> = (0..nm)
        .flat_map(|m| (0..nt).map(move |t| (m, t)))
        .filter(|&(m, t)| table.get(m, t).is_none() && model_group[m] == target_group[t])
        .collect();

    // Residual bootstrap.
    let mut se_mu = None;
    let mut se_a = vec![None; nm];
    let mut se_b = vec![None; nt];
    let mut pred_var = vec![None; missing.len()];
    if config.bootstrap > 1 && dof > 0 {
        let inflate = (n as f64 / dof as f64).sqrt();
        let mean_resid = residuals.iter().sum::<f64>() / n as f64;
        let scaled: Vec<f64> = residuals
            .iter()
            .map(|r| (r - mean_resid) * inflate)
            .collect();
        let mut rng = SplitMix64::new(config.seed);
        let mut acc = Moments::new(1 + nm + nt + missing.len());
        let mut sample = Vec::with_capacity(n);
        for _ in 0..config.bootstrap {
            sample.clear();
            sample.extend(cells.iter().map(|c| Cell {
                m: c.m,
                t: c.t,
                y: params.fitted(c.m, c.t) + scaled[rng.below(n)],
            }));
            let (p, _, _) = fit(&sample, nm, nt, config, Some(&params));
            let mut values = vec![p.mu];
            values.extend_from_slice(&p.a);
            values.extend_from_slice(&p.b);
            values.extend(missing.iter().map(|&(m, t)| p.fitted(m, t)));
            acc.push(&values);
        }
        let var = acc.variance();
        se_mu = Some(var[0].sqrt());
        for m in 0..nm {
            se_a[m] = Some(var[1 + m].sqrt());
        }
        for t in 0..nt {
            se_b[t] = Some(var[1 + nm + t].sqrt());
        }
        for k in 0..missing.len() {
            pred_var[k] = Some(var[1 + nm + nt + k]);
        }
    }
    let sigma2 = residual_std.map(|s| s * s);
    let predictions = missing
        .iter()
        .zip(&pred_var)
        .map(|(&(m, t), var)| {
            let estimate = params.fitted(m, t);
            let half = match (var, sigma2) {
                (Some(v), Some(s2)) => Some(config.z * (v + s2).sqrt()),
                _ => None,
            };
            CellPrediction {
                model: table.models[m].clone(),
                target: table.targets[t].clone(),
                estimate,
                lower: half.map(|h| estimate - h),
                upper: half.map(|h| estimate + h),
            }
        })
        .collect();
    Ok(Decomposition {
        interaction: config.interaction,
        mean: Effect {
            name: "mean".into(),
            estimate: params.mu,
            std_err: se_mu,
        },
        model_effects: (0..nm)
            .map(|m| Effect {
                name: table.models[m].clone(),
                estimate: params.a[m],
                std_err: se_a[m],
            })
            .collect(),
        target_effects: (0..nt)
            .map(|t| Effect {
                name: table.targets[t].clone(),
                estimate: params.b[t],
                std_err: se_b[t],
            })
            .collect(),
        rank_one: (!params.u.is_empty()).then(|| RankOneTerm {
            u: params.u.clone(),
            v: params.v.clone(),
        }),
        variance,
        residual_std,
        dof,
        observed_cells: n,
        predictions,
        iterations,
        converged,
        notes,
    })
}

/// Why the gains' variance cannot be split into model and target effects, if it cannot: with one
/// model (one target) that effect is zero by construction and the other takes all the variance, and
/// equal gains have no variance to split.
pub fn split_unavailable(models: usize, targets: usize, total_ss: f64) -> Option<String> {
    if models < 2 || targets < 2 {
        return Some(format!(
            "the model/target effect split needs at least 2 models and 2 targets; have {models} × \
             {targets}"
        ));
    }
    (total_ss <= 0.0)
        .then(|| "every evaluated gain is the same, so there is no variance to split".to_string())
}

/// The connected groups of the table: models and targets are linked by evaluated cells. Returns
/// each model's group, each target's group (numbered by first model) and how many there are.
fn groups(cells: &[Cell], nm: usize, nt: usize) -> (Vec<usize>, Vec<usize>, usize) {
    // Union-find over models 0..nm and targets nm..nm + nt.
    let mut parent: Vec<usize> = (0..nm + nt).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for c in cells {
        let (a, b) = (root(&mut parent, c.m), root(&mut parent, nm + c.t));
        parent[a.max(b)] = a.min(b);
    }
    let mut number = vec![usize::MAX; nm + nt];
    let mut count = 0;
    let mut group_of = |i: usize, parent: &mut [usize]| {
        let r = root(parent, i);
        if number[r] == usize::MAX {
            number[r] = count;
            count += 1;
        }
        number[r]
    };
    let models: Vec<usize> = (0..nm).map(|m| group_of(m, &mut parent)).collect();
    let targets: Vec<usize> = (0..nt).map(|t| group_of(nm + t, &mut parent)).collect();
    (models, targets, count)
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Backfitting from `init` (or from zero effects); returns the parameters, sweeps and convergence.
fn fit(
    cells: &[Cell],
    nm: usize,
    nt: usize,
    config: &DecomposeConfig,
    init: Option<&Params>,
) -> (Params, usize, bool) {
    let rank_one = config.interaction == Interaction::RankOne;
    let mut p = match init {
        Some(p) => p.clone(),
        None => {
            let (u, v) = if rank_one {
                // A centred, unit-norm ramp: any start not orthogonal to the true v works.
                let c = (nt as f64 - 1.0) / 2.0;
                let v: Vec<f64> = (0..nt).map(|t| t as f64 - c).collect();
                let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                (vec![0.0; nm], v.iter().map(|x| x / norm).collect())
            } else {
                (Vec::new(), Vec::new())
            };
            Params {
                mu: 0.0,
                a: vec![0.0; nm],
                b: vec![0.0; nt],
                u,
                v,
            }
        }
    };
    let inter = |p: &Params, m: usize, t: usize| if p.u.is_empty() { 0.0 } else { p.u[m] * p.v[t] };
    let mut sums_m = vec![0.0; nm];
    let mut counts_m = vec![0.0; nm];
    let mut sums_t = vec![0.0; nt];
    let mut counts_t = vec![0.0; nt];
    for c in cells {
        counts_m[c.m] += 1.0;
        counts_t[c.t] += 1.0;
    }
    let mut previous: Vec<f64> = cells.iter().map(|c| p.fitted(c.m, c.t)).collect();
    for sweep in 1..=config.max_iter {
        p.mu = cells
            .iter()
            .map(|c| c.y - p.a[c.m] - p.b[c.t] - inter(&p, c.m, c.t))
            .sum::<f64>()
            / cells.len() as f64;
        sums_m.iter_mut().for_each(|s| *s = 0.0);
        for c in cells {
            sums_m[c.m] += c.y - p.mu - p.b[c.t] - inter(&p, c.m, c.t);
        }
        for m in 0..nm {
            p.a[m] = sums_m[m] / counts_m[m];
        }
        let shift = mean(&p.a);
        p.mu += shift;
        p.a.iter_mut().for_each(|a| *a -= shift);
        sums_t.iter_mut().for_each(|s| *s = 0.0);
        for c in cells {
            sums_t[c.t] += c.y - p.mu - p.a[c.m] - inter(&p, c.m, c.t);
        }
        for t in 0..nt {
            p.b[t] = sums_t[t] / counts_t[t];
        }
        let shift = mean(&p.b);
        p.mu += shift;
        p.b.iter_mut().for_each(|b| *b -= shift);
        if rank_one {
            rank_one_step(cells, &mut p);
        }
        let current: Vec<f64> = cells.iter().map(|c| p.fitted(c.m, c.t)).collect();
        let moved = current
            .iter()
            .zip(&previous)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        previous = current;
        if moved <= config.tol {
            return (p, sweep, true);
        }
    }
    (p, config.max_iter, false)
}

/// One alternating least-squares update of `u` then `v` on the additive model's residuals.
fn rank_one_step(cells: &[Cell], p: &mut Params) {
    let (nm, nt) = (p.a.len(), p.b.len());
    let resid = |p: &Params, c: &Cell| c.y - p.mu - p.a[c.m] - p.b[c.t];
    let mut num = vec![0.0; nm];
    let mut den = vec![0.0; nm];
    for c in cells {
        num[c.m] += resid(p, c) * p.v[c.t];
        den[c.m] += p.v[c.t] * p.v[c.t];
    }
    for m in 0..nm {
        p.u[m] = if den[m] > 1e-12 { num[m] / den[m] } else { 0.0 };
    }
    let shift = mean(&p.u);
    p.u.iter_mut().for_each(|u| *u -= shift);
    let mut num = vec![0.0; nt];
    let mut den = vec![0.0; nt];
    for c in cells {
        num[c.t] += resid(p, c) * p.u[c.m];
        den[c.t] += p.u[c.m] * p.u[c.m];
    }
    if den.iter().all(|d| *d <= 1e-12) {
        return; // no interaction signal: keep v, u is zero
    }
    for t in 0..nt {
        p.v[t] = if den[t] > 1e-12 { num[t] / den[t] } else { 0.0 };
    }
    let shift = mean(&p.v);
    p.v.iter_mut().for_each(|v| *v -= shift);
    let norm = p.v.iter().map(|v| v * v).sum::<f64>().sqrt();
    if norm > 1e-12 {
        p.v.iter_mut().for_each(|v| *v /= norm);
        p.u.iter_mut().for_each(|u| *u *= norm);
    }
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Running means and sums of squares (Welford), one per tracked quantity.
struct Moments {
    count: f64,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl Moments {
    fn new(k: usize) -> Self {
        Self {
            count: 0.0,
            mean: vec![0.0; k],
            m2: vec![0.0; k],
        }
    }

    fn push(&mut self, values: &[f64]) {
        self.count += 1.0;
        for ((m, s), x) in self.mean.iter_mut().zip(&mut self.m2).zip(values) {
            let d = x - *m;
            *m += d / self.count;
            *s += d * (x - *m);
        }
    }

    /// Sample variances (n − 1).
    fn variance(&self) -> Vec<f64> {
        self.m2
            .iter()
            .map(|s| {
                if self.count > 1.0 {
                    s / (self.count - 1.0)
                } else {
                    0.0
                }
            })
            .collect()
    }
}
