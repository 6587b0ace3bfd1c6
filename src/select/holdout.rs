//! Checks the decomposition's predictions of unevaluated cells on cells that *were* evaluated:
//! hide one observed cell at a time, refit on the rest, and compare the prediction and its interval
//! with the real gain (leave-one-out). The coverage of the intervals says whether `analyze`'s
//! intervals for the truly missing cells can be trusted; the error of a target-mean-only prediction
//! beside it says whether the model effect adds anything.

use super::decompose::{decompose, DecomposeConfig};
use super::GainTable;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// One hidden cell: its real gain and what the refit without it predicted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldOutCell {
    pub model: String,
    pub target: String,
    /// The evaluated gain, points.
    pub actual: f64,
    /// `μ + a_m + b_t (+ u_m·v_t)` of the refit without this cell.
    pub predicted: f64,
    pub lower: Option<f64>,
    pub upper: Option<f64>,
    /// Whether `actual` lies in `[lower, upper]`; `None` without an interval.
    pub covered: Option<bool>,
    /// The mean gain of the other models evaluated on this target (the prediction that ignores
    /// which model it is); `None` when no other model was.
    pub target_mean: Option<f64>,
}

/// The leave-one-out check of a gain table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldoutReport {
    pub cells: Vec<HeldOutCell>,
    /// Cells that could not be hidden (the only cell of their model or target, or the only link
    /// between their model's and their target's groups), as `model / target`.
    pub skipped: Vec<String>,
    /// The intervals' nominal coverage (from the decomposition's z).
    pub nominal_coverage: f64,
    /// Share of the held-out cells with an interval whose interval holds the real gain.
    pub coverage: Option<f64>,
    /// Mean |actual − predicted| over the held-out cells, points.
    pub mean_abs_error: Option<f64>,
    /// Mean |actual − target mean| over the cells that have a target mean, points.
    pub target_mean_abs_error: Option<f64>,
}

/// Hides each observed cell of `table` in turn and refits with `config`.
pub fn leave_one_out(table: &GainTable, config: &DecomposeConfig) -> Result<HoldoutReport> {
    table.validate()?;
    let (nm, nt) = (table.models.len(), table.targets.len());
    let mut cells = Vec::new();
    let mut skipped = Vec::new();
    for m in 0..nm {
        for t in 0..nt {
            let Some(actual) = table.get(m, t) else {
                continue;
            };
            let label = format!("{} / {}", table.models[m], table.targets[t]);
            let row_left = (0..nt).any(|u| u != t && table.get(m, u).is_some());
            let col_left = (0..nm).any(|n| n != m && table.get(n, t).is_some());
            if !row_left || !col_left {
                skipped.push(label);
                continue;
            }
            let mut hidden = table.clone();
            hidden.gains[m][t] = None;
            let d = decompose(&hidden, config)?;
            // Without it, its model and target may fall into groups no cell links, which the
            // decomposition does not predict across: such a cell is skipped too.
            let Some(p) = d
                .predictions
                .iter()
                .find(|p| p.model == table.models[m] && p.target == table.targets[t])
            else {
                skipped.push(label);
                continue;
            };
            let others: Vec<f64> = (0..nm)
                .filter(|&n| n != m)
                .filter_map(|n| table.get(n, t))
                .collect();
            let covered = match (p.lower, p.upper) {
                (Some(l), Some(u)) => Some(l <= actual && actual <= u),
                _ => None,
            };
            cells.push(HeldOutCell {
                model: table.models[m].clone(),
                target: table.targets[t].clone(),
                actual,
                predicted: p.estimate,
                lower: p.lower,
                upper: p.upper,
                covered,
                target_mean: mean(&others),
            });
        }
    }
    let flags: Vec<f64> = cells
        .iter()
        .filter_map(|c| c.covered)
        .map(|c| if c { 1.0 } else { 0.0 })
        .collect();
    let errors: Vec<f64> = cells
        .iter()
        .map(|c| (c.actual - c.predicted).abs())
        .collect();
    let target_errors: Vec<f64> = cells
        .iter()
        .filter_map(|c| c.target_mean.map(|g| (c.actual - g).abs()))
        .collect();
    Ok(HoldoutReport {
        cells,
        skipped,
        nominal_coverage: normal_coverage(config.z),
        coverage: mean(&flags),
        mean_abs_error: mean(&errors),
        target_mean_abs_error: mean(&target_errors),
    })
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// P(|Z| ≤ z) for a standard normal Z: `erf(z / √2)`, by Abramowitz & Stegun 7.1.26 (error < 1.5e-7).
fn normal_coverage(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    1.0 - poly * (-x * x).exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::rng::SplitMix64;

    fn table(gains: Vec<Vec<Option<f64>>>) -> GainTable {
        let models = (0..gains.len()).map(|i| format!("m{i}")).collect();
        let targets = (0..gains[0].len()).map(|i| format!("t{i}")).collect();
        GainTable::new(models, targets, gains).unwrap()
    }

    #[test]
    fn a_two_by_two_table_is_predicted_by_the_other_three_cells() {
        // With three cells the additive model fits exactly: g00 = g01 + g10 − g11.
        let t = table(vec![vec![Some(1.0), Some(2.0)], vec![Some(3.0), Some(5.0)]]);
        let r = leave_one_out(&t, &DecomposeConfig::default()).unwrap();
        let want = [
            2.0 + 3.0 - 5.0,
            1.0 + 5.0 - 3.0,
            1.0 + 5.0 - 2.0,
            2.0 + 3.0 - 1.0,
        ];
        assert_eq!(r.cells.len(), 4);
        for (c, w) in r.cells.iter().zip(want) {
            assert!((c.predicted - w).abs() < 1e-6, "{c:?} vs {w}");
            // No residual degrees of freedom: no interval, no coverage claimed.
            assert_eq!(c.covered, None);
        }
        assert_eq!(r.coverage, None);
        // Errors: |1−0|, |2−3|, |3−4|, |5−4| → mean 1; target means: 3, 5, 1, 2 → |−2|,|−3|,2,3 → 2.5.
        assert!((r.mean_abs_error.unwrap() - 1.0).abs() < 1e-6);
        assert!((r.target_mean_abs_error.unwrap() - 2.5).abs() < 1e-12);
    }

    #[test]
    fn a_sole_cell_of_its_model_is_skipped_not_guessed() {
        let t = table(vec![
            vec![Some(1.0), None],
            vec![Some(3.0), Some(5.0)],
            vec![Some(0.0), Some(1.0)],
        ]);
        let r = leave_one_out(&t, &DecomposeConfig::default()).unwrap();
        assert_eq!(r.skipped, vec!["m0 / t0".to_string()]);
        assert_eq!(r.cells.len(), 4);
    }

    #[test]
    fn planted_additive_gains_are_predicted_within_noise_and_intervals_cover() {
        let mut rng = SplitMix64::new(11);
        let (nm, nt, noise) = (10, 5, 0.5);
        let a: Vec<f64> = (0..nm).map(|_| 3.0 * rng.normal()).collect();
        let b: Vec<f64> = (0..nt).map(|_| 3.0 * rng.normal()).collect();
        let gains = (0..nm)
            .map(|m| {
                (0..nt)
                    .map(|t| Some(1.0 + a[m] + b[t] + noise * rng.normal()))
                    .collect()
            })
            .collect();
        let config = DecomposeConfig {
            bootstrap: 50,
            ..DecomposeConfig::default()
        };
        let r = leave_one_out(&table(gains), &config).unwrap();
        assert_eq!(r.cells.len(), nm * nt);
        assert!(r.skipped.is_empty());
        let mae = r.mean_abs_error.unwrap();
        // The model effect matters here: knowing the model beats the target mean by far.
        assert!(mae < 2.0 * noise, "mae {mae}");
        assert!(r.target_mean_abs_error.unwrap() > 3.0 * mae, "{r:?}");
        let cov = r.coverage.unwrap();
        assert!((0.85..=1.0).contains(&cov), "coverage {cov}");
        assert!((r.nominal_coverage - 0.95).abs() < 1e-3);
    }

    #[test]
    fn nominal_coverage_of_known_quantiles() {
        assert!((normal_coverage(1.0) - 0.682_689_5).abs() < 1e-6);
        assert!((normal_coverage(1.959_964) - 0.95).abs() < 1e-6);
        assert!(normal_coverage(0.0).abs() < 1e-6);
    }
}
