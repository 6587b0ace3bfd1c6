//! LogME (You et al., ICML 2021): how well frozen features explain the labels, as the log marginal
//! likelihood (evidence) of a Bayesian linear regression from features to each one-hot label column,
//! with the prior precision α and noise precision β chosen to maximise it. Higher is better.
//!
//! With `F` the `n × d` features, `σᵢ` the `k` non-zero eigenvalues of `FᵀF` (squared singular
//! values), `uᵢ` the left singular vectors and `xᵢ = uᵢᵀy`, the evidence of one target column `y` is
//!
//! ```text
//! L(α, β) = k/2 ln α + n/2 ln β − ½ Σᵢ ln(α + βσᵢ) − β/2 ‖y − Fm‖² − α/2 ‖m‖² − n/2 ln 2π
//! ‖m‖² = Σᵢ σᵢ xᵢ² / (σᵢ + α/β)²,   ‖y − Fm‖² = Σᵢ xᵢ² / (1 + σᵢ β/α)² + (‖y‖² − Σᵢ xᵢ²)
//! ```
//!
//! maximised by the fixed point `γ = Σ σᵢ/(σᵢ + α/β)`, `α ← γ/‖m‖²`, `β ← (n − γ)/‖y − Fm‖²`. The
//! `k/2 ln α` term is `d/2 ln α` minus the `d − k` zero directions of `αI + βFᵀF`; the reference
//! implementation keeps `d/2` and so favours wide features when `n < d`; here zero-padding a feature
//! matrix does not change its score. The score is the mean over label columns of `L / n`.

use super::linalg::{sym_eigen, Matrix};
use anyhow::{bail, ensure, Context, Result};

/// Added to the denominators of the α and β updates, as in the reference implementation: a target
/// the features explain perfectly (or not at all) then gives a large finite evidence, not infinity.
const EPSILON: f64 = 1e-5;
/// Fixed-point iterations at most; the reference stops after 11, it usually converges in 3–5.
const MAX_ITER: usize = 100;
/// Relative change of α/β at which the fixed point has converged.
const TOL: f64 = 1e-6;

/// Mean LogME of `features` (`n × d`) for class `labels` in `0..num_classes`: the mean over classes
/// of the per-example log-evidence of the one-hot column. A class without examples contributes the
/// evidence of an all-zero column (it is defined, not NaN).
pub fn logme(features: &Matrix, labels: &[usize], num_classes: usize) -> Result<f64> {
    ensure!(num_classes > 0, "LogME needs at least one class");
    ensure!(
        labels.len() == features.rows(),
        "LogME: {} labels for {} feature rows",
        labels.len(),
        features.rows()
    );
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= num_classes) {
        bail!("LogME: label {l} of example {i} is out of range for {num_classes} classes");
    }
    let spectrum = Spectrum::new(features).context("LogME features")?;
    let mut total = 0.0;
    for c in 0..num_classes {
        let y: Vec<f64> = labels
            .iter()
            .map(|&l| if l == c { 1.0 } else { 0.0 })
            .collect();
        total += spectrum
            .evidence(&y)
            .with_context(|| format!("LogME of class {c}"))?;
    }
    Ok(total / num_classes as f64)
}

/// LogME of a single real-valued target (the regression variant), per example.
pub fn logme_regression(features: &Matrix, targets: &[f64]) -> Result<f64> {
    ensure!(
        targets.len() == features.rows(),
        "LogME: {} targets for {} feature rows",
        targets.len(),
        features.rows()
    );
    ensure!(
        targets.iter().all(|v| v.is_finite()),
        "LogME: a regression target is NaN or infinite"
    );
    Spectrum::new(features)
        .context("LogME features")?
        .evidence(targets)
}

/// The non-zero spectrum of the features and a way to project targets onto the left singular vectors.
struct Spectrum<'a> {
    features: &'a Matrix,
    /// Non-zero eigenvalues σᵢ of FᵀF.
    sigma: Vec<f64>,
    /// Eigenvectors aligned with `sigma`: right singular vectors (d ≤ n) or left ones (d > n).
    vectors: Vec<Vec<f64>>,
    /// Whether `vectors` are right singular vectors (we decomposed FᵀF, `d × d`).
    right: bool,
}

impl<'a> Spectrum<'a> {
    fn new(features: &'a Matrix) -> Result<Self> {
        let (n, d) = (features.rows(), features.cols());
        ensure!(n > 0, "no examples");
        ensure!(
            features.as_slice().iter().all(|v| v.is_finite()),
            "a feature is NaN or infinite"
        );
        let right = d <= n;
        let gram = if right {
            features.gram()
        } else {
            features.outer_gram()
        };
        let eig = sym_eigen(&gram)?;
        let max = eig.values.first().copied().unwrap_or(0.0).max(0.0);
        let tol = max * (n.max(d) as f64) * f64::EPSILON;
        let mut sigma = Vec::new();
        let mut vectors = Vec::new();
        for (k, &s) in eig.values.iter().enumerate() {
            if s > tol && s > 0.0 {
                sigma.push(s);
                vectors.push(eig.vector(k));
            }
        }
        Ok(Self {
            features,
            sigma,
            vectors,
            right,
        })
    }

    /// `xᵢ = uᵢᵀ y` for each non-zero direction.
    fn project(&self, y: &[f64]) -> Result<Vec<f64>> {
        if self.right {
            // uᵢ = F vᵢ / √σᵢ, so uᵢᵀy = vᵢᵀ(Fᵀy) / √σᵢ.
            let fty = self.features.tmul_vec(y)?;
            Ok(self
                .vectors
                .iter()
                .zip(&self.sigma)
                .map(|(v, s)| super::linalg::dot(v, &fty) / s.sqrt())
                .collect())
        } else {
            Ok(self
                .vectors
                .iter()
                .map(|u| super::linalg::dot(u, y))
                .collect())
        }
    }

    /// The maximised log-evidence of `y`, divided by n.
    fn evidence(&self, y: &[f64]) -> Result<f64> {
        let n = y.len() as f64;
        let x = self.project(y)?;
        let x2: Vec<f64> = x.iter().map(|v| v * v).collect();
        let outside = (y.iter().map(|v| v * v).sum::<f64>() - x2.iter().sum::<f64>()).max(0.0);
        let k = self.sigma.len();
        // ‖m‖² and ‖y − Fm‖² at ratio t = α/β.
        let norms = |t: f64| {
            let m2: f64 = self
                .sigma
                .iter()
                .zip(&x2)
                .map(|(s, x2)| s * x2 / (s + t).powi(2))
                .sum();
            let res2: f64 = self
                .sigma
                .iter()
                .zip(&x2)
                .map(|(s, x2)| x2 / (1.0 + s / t).powi(2))
                .sum::<f64>()
                + outside;
            (m2, res2)
        };
        let (mut alpha, mut beta) = (1.0f64, 1.0f64);
        for _ in 0..MAX_ITER {
            let t = alpha / beta;
            let gamma: f64 = self.sigma.iter().map(|s| s / (s + t)).sum();
            let (m2, res2) = norms(t);
            alpha = if k == 0 { 1.0 } else { gamma / (m2 + EPSILON) };
            beta = (n - gamma) / (res2 + EPSILON);
            let t_new = alpha / beta;
            if ((t_new - t) / t).abs() <= TOL {
                break;
            }
        }
        let (m2, res2) = norms(alpha / beta);
        let log_det: f64 = self.sigma.iter().map(|s| (alpha + beta * s).ln()).sum();
        let evidence = k as f64 / 2.0 * alpha.ln() + n / 2.0 * beta.ln()
            - 0.5 * log_det
            - beta / 2.0 * (res2 + EPSILON)
            - alpha / 2.0 * (m2 + EPSILON) * if k == 0 { 0.0 } else { 1.0 }
            - n / 2.0 * (2.0 * std::f64::consts::PI).ln();
        ensure!(
            evidence.is_finite(),
            "LogME evidence is not finite (α = {alpha}, β = {beta})"
        );
        Ok(evidence / n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::rng::SplitMix64;

    fn labelled(n: usize, d: usize, informative: bool, seed: u64) -> (Matrix, Vec<usize>) {
        let mut rng = SplitMix64::new(seed);
        let labels: Vec<usize> = (0..n).map(|i| i % 3).collect();
        let mut f = Matrix::zeros(n, d);
        for i in 0..n {
            for j in 0..d {
                let signal = if informative && j % 3 == labels[i] {
                    2.0
                } else {
                    0.0
                };
                f[(i, j)] = signal + rng.normal();
            }
        }
        (f, labels)
    }

    #[test]
    fn informative_features_score_higher_than_noise() {
        let (good, labels) = labelled(150, 6, true, 1);
        let (noise, _) = labelled(150, 6, false, 2);
        let g = logme(&good, &labels, 3).unwrap();
        let b = logme(&noise, &labels, 3).unwrap();
        assert!(g > b + 0.05, "informative {g} vs noise {b}");
    }

    #[test]
    fn evidence_matches_the_direct_gaussian_formula() {
        // For fixed α, β the evidence is ln N(y | 0, β⁻¹I + α⁻¹FFᵀ); check the maximiser's value
        // against that density computed through a Cholesky factorisation, at the α, β found by
        // a brute-force grid: the fixed point must not be worse than the best grid point.
        let (f, labels) = labelled(20, 3, true, 5);
        let y: Vec<f64> = labels
            .iter()
            .map(|&l| if l == 0 { 1.0 } else { 0.0 })
            .collect();
        let ours = logme_regression(&f, &y).unwrap();
        let n = y.len();
        let mut best = f64::NEG_INFINITY;
        for ia in -20..=20 {
            for ib in -20..=20 {
                let (alpha, beta) = (10f64.powf(ia as f64 / 5.0), 10f64.powf(ib as f64 / 5.0));
                let mut cov = f.outer_gram();
                for i in 0..n {
                    for j in 0..n {
                        cov[(i, j)] /= alpha;
                    }
                    cov[(i, i)] += 1.0 / beta;
                }
                let ch = crate::select::linalg::Cholesky::new(&cov).unwrap();
                let sol = ch.solve(&y).unwrap();
                let quad = crate::select::linalg::dot(&y, &sol);
                let ll = -0.5 * quad
                    - 0.5 * ch.log_det()
                    - n as f64 / 2.0 * (2.0 * std::f64::consts::PI).ln();
                best = best.max(ll / n as f64);
            }
        }
        assert!(
            ours >= best - 1e-3,
            "fixed point {ours} below grid optimum {best}"
        );
        assert!(
            ours <= best + 0.05,
            "fixed point {ours} far above grid optimum {best}: wrong formula"
        );
    }

    #[test]
    fn zero_padding_does_not_change_the_score() {
        let (f, labels) = labelled(12, 3, true, 3);
        let mut padded = Matrix::zeros(12, 20);
        for i in 0..12 {
            for j in 0..3 {
                padded[(i, j)] = f[(i, j)];
            }
        }
        let a = logme(&f, &labels, 3).unwrap();
        let b = logme(&padded, &labels, 3).unwrap();
        assert!((a - b).abs() < 1e-8, "{a} vs {b}");
    }

    /// With all-zero features nothing is explained (k = 0): β = n / (‖y‖² + ε) and the evidence per
    /// example is ½ ln(n / (‖y‖² + ε)) − ½ − ½ ln 2π, a closed form per one-hot column.
    fn zero_feature_evidence(n: usize, count: usize) -> f64 {
        let n = n as f64;
        0.5 * (n / (count as f64 + EPSILON)).ln() - 0.5 - 0.5 * (2.0 * std::f64::consts::PI).ln()
    }

    #[test]
    fn zero_features_give_the_closed_form_evidence() {
        // Two classes of 3 and 7 examples.
        let labels: Vec<usize> = (0..10).map(|i| usize::from(i >= 3)).collect();
        let got = logme(&Matrix::zeros(10, 4), &labels, 2).unwrap();
        let want = (zero_feature_evidence(10, 3) + zero_feature_evidence(10, 7)) / 2.0;
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        // One class: the column is all ones.
        let got = logme(&Matrix::zeros(10, 4), &[0; 10], 1).unwrap();
        assert!((got - zero_feature_evidence(10, 10)).abs() < 1e-9, "{got}");
        // More classes than examples: the empty classes' columns are all zero, ‖y‖² = 0.
        let got = logme(&Matrix::zeros(2, 3), &[0, 4], 5).unwrap();
        let want = (2.0 * zero_feature_evidence(2, 1) + 3.0 * zero_feature_evidence(2, 0)) / 5.0;
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }

    #[test]
    fn degenerate_inputs_are_defined() {
        let (f, _) = labelled(10, 4, false, 4);
        // One class.
        assert!(logme(&f, &[0; 10], 1).unwrap().is_finite());
        // Constant and all-zero features.
        let constant = Matrix::from_vec(10, 4, vec![3.0; 40]).unwrap();
        let labels: Vec<usize> = (0..10).map(|i| i % 2).collect();
        assert!(logme(&constant, &labels, 2).unwrap().is_finite());
        assert!(logme(&Matrix::zeros(10, 4), &labels, 2)
            .unwrap()
            .is_finite());
        // More classes than examples.
        let few = Matrix::from_rows(&[vec![1.0, 0.0], vec![0.0, 1.0]]).unwrap();
        assert!(logme(&few, &[0, 4], 5).unwrap().is_finite());
        // Clear errors.
        assert!(logme(&f, &[0; 10], 0).is_err());
        assert!(logme(&f, &[7; 10], 2).is_err());
        assert!(logme(&f, &[0; 3], 2).is_err());
        assert!(logme(&Matrix::zeros(0, 3), &[], 2).is_err());
    }
}
