//! The CI gate: compares a current leaderboard with a reference one and finds regressions (an
//! average gain that moved beyond the noise, a changed top-k set, a rank correlation too low, a
//! model that disappeared). Pure: boards in, findings out.

use crate::leaderboard::{Cell, Leaderboard, Row};
use serde::Serialize;
use std::collections::BTreeMap;

/// Tolerance used for a model whose noise cannot be estimated (no or zero baseline spread), in points.
pub const FALLBACK_TOLERANCE: f64 = 1.0;

#[derive(Debug, Clone, PartialEq)]
pub struct CheckSettings {
    /// Allowed change of a model's average gain, in points; `None`: noise-aware (see `tolerance`).
    pub tolerance: Option<f64>,
    pub top_k: usize,
    pub min_tau: f64,
}

impl Default for CheckSettings {
    fn default() -> Self {
        Self {
            tolerance: None,
            top_k: 3,
            min_tau: 0.7,
        }
    }
}

/// One model's comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelDelta {
    pub model: String,
    pub reference: Option<f64>,
    pub current: Option<f64>,
    pub tolerance: f64,
    pub regression: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckReport {
    pub deltas: Vec<ModelDelta>,
    pub top_k: usize,
    pub reference_top: Vec<String>,
    pub current_top: Vec<String>,
    /// Kendall tau-b over the models complete in both boards; `None` with fewer than two.
    pub tau: Option<f64>,
    pub min_tau: f64,
    /// Human-readable reasons the check fails; empty when it passes.
    pub regressions: Vec<String>,
}

impl CheckReport {
    pub fn passed(&self) -> bool {
        self.regressions.is_empty()
    }

    /// The report as the terminal shows it.
    pub fn render(&self) -> String {
        let mut s = String::from(
            "model                                    reference    current   change  tolerance\n",
        );
        let f = |x: Option<f64>| x.map(|v| format!("{v:+.2}")).unwrap_or_else(|| "—".into());
        for d in &self.deltas {
            let change = match (d.reference, d.current) {
                (Some(r), Some(c)) => format!("{:+.2}", c - r),
                _ => "—".into(),
            };
            let mark = if d.regression { "  << REGRESSION" } else { "" };
            s.push_str(&format!(
                "{:<40} {:>9} {:>10} {:>8} {:>10.2}{mark}\n",
                d.model,
                f(d.reference),
                f(d.current),
                change,
                d.tolerance
            ));
        }
        s.push_str(&format!(
            "top-{}: reference [{}], current [{}]\n",
            self.top_k,
            self.reference_top.join(", "),
            self.current_top.join(", ")
        ));
        match self.tau {
            Some(t) => s.push_str(&format!(
                "Kendall tau-b: {t:.3} (minimum {:.3})\n",
                self.min_tau
            )),
            None => {
                s.push_str("Kendall tau-b: not defined (fewer than two common ranked models)\n")
            }
        }
        if self.passed() {
            s.push_str("PASS\n");
        } else {
            for r in &self.regressions {
                s.push_str(&format!("REGRESSION: {r}\n"));
            }
        }
        s
    }
}

/// Squared standard error of a row's average gain, from the baseline spread: each cell's gain is
/// a difference of two means with the baseline's per-seed std as the noise of both.
fn avg_gain_var(board: &Leaderboard, row: &Row) -> Option<f64> {
    let n = row.cells.len();
    if n == 0 {
        return None;
    }
    let mut total = 0.0;
    for (c, b) in row.cells.iter().zip(&board.baseline.cells) {
        let Cell::Done { seeds, .. } = c else {
            return None;
        };
        let sd = b.std?;
        let nb = b.scores.len().max(1) as f64;
        total += sd * sd * (1.0 / nb + 1.0 / (*seeds).max(1) as f64);
    }
    Some(total / (n * n) as f64)
}

/// Kendall tau-b of paired values (ties in either list handled).
pub fn kendall_tau_b(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len().min(y.len());
    if n < 2 {
        return None;
    }
    let (mut concordant, mut discordant, mut ties_x, mut ties_y) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..n {
        for j in (i + 1)..n {
            let dx = (x[i] - x[j]).partial_cmp(&0.0)? as i64;
            let dy = (y[i] - y[j]).partial_cmp(&0.0)? as i64;
            match (dx, dy) {
                (0, 0) => {}
                (0, _) => ties_x += 1,
                (_, 0) => ties_y += 1,
                _ if dx == dy => concordant += 1,
                _ => discordant += 1,
            }
        }
    }
    let denom =
        (((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) as f64).sqrt();
    (denom > 0.0).then(|| (concordant - discordant) as f64 / denom)
}

/// How reference and current rows are paired and named: the model id, plus the board's
/// disambiguating label where one checkpoint appears under several suite names.
fn key(r: &Row) -> String {
    match &r.model.label {
        Some(label) => format!("{} [{label}]", r.model.id),
        None => r.model.id.clone(),
    }
}

fn top(board: &Leaderboard, k: usize) -> Vec<String> {
    board
        .rows
        .iter()
        .filter(|r| r.avg_gain.is_some())
        .take(k)
        .map(key)
        .collect()
}

/// Compares `current` with `reference`.
pub fn compare(
    reference: &Leaderboard,
    current: &Leaderboard,
    settings: &CheckSettings,
) -> CheckReport {
    let mut regressions = Vec::new();
    if reference.arch != current.arch {
        regressions.push(format!(
            "arch changed from {} to {}",
            reference.arch, current.arch
        ));
    }
    let cur: BTreeMap<String, &Row> = current.rows.iter().map(|r| (key(r), r)).collect();
    let mut deltas = Vec::new();
    let mut paired = Vec::new();
    for r in &reference.rows {
        let c = cur.get(&key(r)).copied();
        let tolerance = settings.tolerance.unwrap_or_else(|| {
            // A zero spread (every baseline seed scored the same) says nothing about the noise:
            // treat it like no spread, not as a zero tolerance.
            let vr = avg_gain_var(reference, r).filter(|v| *v > 0.0);
            let vc = c
                .and_then(|c| avg_gain_var(current, c))
                .filter(|v| *v > 0.0);
            match (vr, vc) {
                (Some(a), Some(b)) => 2.0 * (a + b).sqrt(),
                (Some(a), None) | (None, Some(a)) => 2.0 * (2.0 * a).sqrt(),
                (None, None) => FALLBACK_TOLERANCE,
            }
        });
        let current_gain = c.and_then(|c| c.avg_gain);
        let regression = match (r.avg_gain, current_gain) {
            (Some(a), Some(b)) => {
                paired.push((a, b));
                if (b - a).abs() > tolerance {
                    regressions.push(format!(
                        "{}: average gain {:+.2} → {:+.2} (change {:+.2} beyond ±{tolerance:.2})",
                        key(r),
                        a,
                        b,
                        b - a
                    ));
                    true
                } else {
                    false
                }
            }
            (Some(a), None) => {
                regressions.push(format!(
                    "{}: had average gain {a:+.2}, now no complete row",
                    key(r)
                ));
                true
            }
            _ => false,
        };
        deltas.push(ModelDelta {
            model: key(r),
            reference: r.avg_gain,
            current: current_gain,
            tolerance,
            regression,
        });
    }
    for c in &current.rows {
        if !reference.rows.iter().any(|r| key(r) == key(c)) {
            deltas.push(ModelDelta {
                model: key(c),
                reference: None,
                current: c.avg_gain,
                tolerance: settings.tolerance.unwrap_or(FALLBACK_TOLERANCE),
                regression: false,
            });
        }
    }
    let reference_top = top(reference, settings.top_k);
    let current_top = top(current, settings.top_k);
    let mut a = reference_top.clone();
    let mut b = current_top.clone();
    a.sort();
    b.sort();
    if a != b {
        regressions.push(format!(
            "top-{} changed: [{}] → [{}]",
            settings.top_k,
            reference_top.join(", "),
            current_top.join(", ")
        ));
    }
    let (x, y): (Vec<f64>, Vec<f64>) = paired.into_iter().unzip();
    let tau = kendall_tau_b(&x, &y);
    if let Some(t) = tau {
        if t < settings.min_tau {
            regressions.push(format!(
                "Kendall tau-b {t:.3} below the minimum {:.3}",
                settings.min_tau
            ));
        }
    }
    CheckReport {
        deltas,
        top_k: settings.top_k,
        reference_top,
        current_top,
        tau,
        min_tau: settings.min_tau,
        regressions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tau_b_of_identical_reversed_and_tied_orders() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(kendall_tau_b(&x, &x), Some(1.0));
        assert_eq!(kendall_tau_b(&x, &[4.0, 3.0, 2.0, 1.0]), Some(-1.0));
        // One swapped pair out of six: (5 − 1) / 6.
        let t = kendall_tau_b(&x, &[1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!((t - 4.0 / 6.0).abs() < 1e-12);
        // Ties in y: pairs (1,2) tied in y only; C = 5, D = 0, n0 = 6, ties_y = 1.
        let t = kendall_tau_b(&x, &[1.0, 1.0, 3.0, 4.0]).unwrap();
        assert!((t - 5.0 / (6.0f64 * 5.0).sqrt()).abs() < 1e-12);
        assert_eq!(kendall_tau_b(&[1.0], &[1.0]), None);
    }

    use crate::leaderboard::{
        BaselineCell, BaselineRow, Coverage, ModelInfo, Provenance, LEADERBOARD_SCHEMA_VERSION,
    };

    /// A one-target board: baseline std 1 over 4 seeds, candidates with one seed each.
    fn board(gains: &[(&str, Option<f64>)]) -> Leaderboard {
        let rows = gains
            .iter()
            .enumerate()
            .map(|(i, (id, g))| Row {
                rank: g.map(|_| i + 1),
                model: ModelInfo {
                    id: id.to_string(),
                    revision: None,
                    label: None,
                },
                cells: vec![match g {
                    Some(g) => Cell::Done {
                        score: 80.0 + g,
                        gain: *g,
                        seeds: 1,
                        within_noise: false,
                    },
                    None => Cell::Missing,
                }],
                avg_gain: *g,
                partial_avg_gain: None,
                coverage: Coverage {
                    done: usize::from(g.is_some()),
                    total: 1,
                },
                proxies: Default::default(),
            })
            .collect();
        Leaderboard {
            schema_version: LEADERBOARD_SCHEMA_VERSION,
            arch: "a".into(),
            targets: vec![crate::leaderboard::TargetInfo {
                name: "t".into(),
                metric: crate::leaderboard::Metric::Accuracy,
            }],
            baseline: BaselineRow {
                model: ModelInfo {
                    id: "b".into(),
                    revision: None,
                    label: None,
                },
                cells: vec![BaselineCell {
                    mean: Some(80.0),
                    std: Some(1.0),
                    scores: vec![79.0, 80.0, 81.0, 80.0],
                    failed: 0,
                }],
                avg_score: Some(80.0),
            },
            rows,
            provenance: Provenance {
                recycle_version: "0".into(),
                generated_at: "x".into(),
                suites: vec![],
                protocol_hashes: vec![],
                results: 0,
            },
        }
    }

    #[test]
    fn a_zero_baseline_spread_falls_back_to_the_default_tolerance() {
        let mut reference = board(&[("m1", Some(5.0))]);
        reference.baseline.cells[0].std = Some(0.0);
        reference.baseline.cells[0].scores = vec![80.0, 80.0, 80.0];
        let r = compare(&reference, &reference, &CheckSettings::default());
        assert_eq!(r.deltas[0].tolerance, FALLBACK_TOLERANCE);
        let mut moved = reference.clone();
        moved.rows[0].avg_gain = Some(5.5);
        assert!(compare(&reference, &moved, &CheckSettings::default()).passed());
        moved.rows[0].avg_gain = Some(6.5);
        assert!(!compare(&reference, &moved, &CheckSettings::default()).passed());
    }

    #[test]
    fn noise_aware_tolerance_top_k_tau_and_vanished_models() {
        let reference = board(&[
            ("m1", Some(5.0)),
            ("m2", Some(3.0)),
            ("m3", Some(1.0)),
            ("m4", Some(-1.0)),
        ]);
        let settings = CheckSettings {
            tolerance: None,
            top_k: 2,
            min_tau: 0.5,
        };
        assert!(compare(&reference, &reference, &settings).passed());
        // Per cell: var = 1² × (1/4 + 1/1) = 1.25 in each board; tolerance = 2 × sqrt(2.5).
        let r = compare(&reference, &reference, &settings);
        assert!((r.deltas[0].tolerance - 2.0 * 2.5f64.sqrt()).abs() < 1e-12);

        // Within tolerance (3.16): small moves pass.
        let moved = board(&[
            ("m1", Some(6.0)),
            ("m2", Some(2.0)),
            ("m3", Some(0.5)),
            ("m4", Some(-1.5)),
        ]);
        assert!(compare(&reference, &moved, &settings).passed());

        // m3 overtakes m2: the top-2 set changes, the rank correlation drops to 4/6.
        let swapped = board(&[
            ("m1", Some(5.0)),
            ("m3", Some(3.5)),
            ("m2", Some(2.5)),
            ("m4", Some(-1.0)),
        ]);
        let r = compare(&reference, &swapped, &settings);
        assert!(
            r.regressions.iter().any(|m| m.starts_with("top-2 changed")),
            "{:?}",
            r.regressions
        );
        assert!((r.tau.unwrap() - 4.0 / 6.0).abs() < 1e-12);
        let strict = CheckSettings {
            min_tau: 0.9,
            ..settings.clone()
        };
        assert!(compare(&reference, &swapped, &strict)
            .regressions
            .iter()
            .any(|m| m.contains("Kendall")));

        // A model with a complete row in the reference but not now.
        let gone = board(&[
            ("m1", Some(5.0)),
            ("m2", Some(3.0)),
            ("m3", None),
            ("m4", Some(-1.0)),
        ]);
        let r = compare(&reference, &gone, &settings);
        assert!(
            r.regressions
                .iter()
                .any(|m| m.starts_with("m3: had average gain")),
            "{:?}",
            r.regressions
        );

        // A fixed tolerance overrides the noise estimate.
        let tight = CheckSettings {
            tolerance: Some(0.1),
            ..settings
        };
        assert!(!compare(&reference, &moved, &tight).passed());
    }

    #[test]
    fn one_checkpoint_under_two_names_is_two_rows_to_compare() {
        // `a` and `c` are the same directory: the board labels them apart, and so does the gate.
        let mut reference = board(&[("/m/x", Some(5.0)), ("/m/x", Some(1.0))]);
        reference.rows[0].model.label = Some("a (x)".into());
        reference.rows[1].model.label = Some("c (x)".into());
        let settings = CheckSettings {
            tolerance: Some(0.5),
            top_k: 1,
            min_tau: -1.0,
        };
        let r = compare(&reference, &reference, &settings);
        assert!(r.passed(), "{:?}", r.regressions);
        assert_eq!(r.deltas.len(), 2);
        let mut moved = reference.clone();
        moved.rows[1].avg_gain = Some(3.0);
        let r = compare(&reference, &moved, &settings);
        assert_eq!(r.regressions.len(), 1, "{:?}", r.regressions);
        assert!(
            r.regressions[0].starts_with("/m/x [c (x)]"),
            "{:?}",
            r.regressions
        );
    }
}
