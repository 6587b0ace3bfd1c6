//! H-score (Bao et al., ICIP 2019): how separable the classes are in a frozen feature space, as
//! `tr(cov(f)⁻¹ · cov(E[f | y]))` — the between-class covariance measured in the metric of the total
//! covariance. It ranges from 0 (class means coincide) to `min(d, C − 1)` (classes are points).
//!
//! Covariances are population covariances (divided by n). Feature covariance is often singular
//! (constant or collinear features, `n < d`); [`CovInverse`] says how it is inverted.

use super::linalg::{sym_eigen, Cholesky, Matrix};
use anyhow::{bail, ensure, Context, Result};

/// How the feature covariance is inverted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CovInverse {
    /// Moore–Penrose pseudo-inverse: eigen-directions with eigenvalue below `rel_tol × λ_max` are
    /// dropped (a constant feature then contributes nothing).
    PseudoInverse { rel_tol: f64 },
    /// Shrinkage towards a scaled identity: `(1 − λ)Σ + λ·tr(Σ)/d·I`, with `0 < λ ≤ 1` (the
    /// "regularised H-score" of Ibrahim et al. 2022).
    Shrinkage { lambda: f64 },
}

impl Default for CovInverse {
    fn default() -> Self {
        CovInverse::PseudoInverse { rel_tol: 1e-10 }
    }
}

/// H-score of `features` (`n × d`) for class `labels` in `0..num_classes`. Classes without examples
/// are ignored; one class, or features that are constant, give 0.
pub fn hscore(
    features: &Matrix,
    labels: &[usize],
    num_classes: usize,
    inverse: CovInverse,
) -> Result<f64> {
    let (n, d) = (features.rows(), features.cols());
    ensure!(n > 0, "H-score needs at least one example");
    ensure!(
        labels.len() == n,
        "H-score: {} labels for {n} feature rows",
        labels.len()
    );
    ensure!(
        features.as_slice().iter().all(|v| v.is_finite()),
        "H-score: a feature is NaN or infinite"
    );
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= num_classes) {
        bail!("H-score: label {l} of example {i} is out of range for {num_classes} classes");
    }
    let mean = column_means(features, None);
    let mut centred = features.clone();
    for i in 0..n {
        for (v, m) in centred.row_mut(i).iter_mut().zip(&mean) {
            *v -= m;
        }
    }
    let mut cov = centred.gram();
    for v in 0..d * d {
        let (i, j) = (v / d, v % d);
        cov[(i, j)] /= n as f64;
    }
    // Between-class covariance as weighted outer products of centred class means: Σ_c w_c g_c g_cᵀ.
    let mut between: Vec<(f64, Vec<f64>)> = Vec::new();
    for c in 0..num_classes {
        let members: Vec<usize> = (0..n).filter(|&i| labels[i] == c).collect();
        if members.is_empty() {
            continue;
        }
        let g = column_means(&centred, Some(&members));
        between.push((members.len() as f64 / n as f64, g));
    }
    let score = match inverse {
        CovInverse::PseudoInverse { rel_tol } => {
            ensure!(
                rel_tol >= 0.0,
                "H-score: pseudo-inverse tolerance must be ≥ 0, got {rel_tol}"
            );
            let eig = sym_eigen(&cov).context("H-score feature covariance")?;
            let max = eig.values.first().copied().unwrap_or(0.0);
            let mut total = 0.0;
            for (k, &lambda) in eig.values.iter().enumerate() {
                if max <= 0.0 || lambda <= rel_tol * max || lambda <= 0.0 {
                    continue;
                }
                let v = eig.vector(k);
                let quad: f64 = between
                    .iter()
                    .map(|(w, g)| w * super::linalg::dot(&v, g).powi(2))
                    .sum();
                total += quad / lambda;
            }
            total
        }
        CovInverse::Shrinkage { lambda } => {
            ensure!(
                lambda > 0.0 && lambda <= 1.0,
                "H-score: shrinkage must be in (0, 1], got {lambda}"
            );
            let trace: f64 = (0..d).map(|i| cov[(i, i)]).sum();
            if trace <= 0.0 {
                return Ok(0.0);
            }
            let mut shrunk = cov.clone();
            for i in 0..d {
                for j in 0..d {
                    shrunk[(i, j)] *= 1.0 - lambda;
                }
                shrunk[(i, i)] += lambda * trace / d as f64;
            }
            let ch = Cholesky::new(&shrunk).context("H-score shrunk covariance")?;
            let mut total = 0.0;
            for (w, g) in &between {
                total += w * super::linalg::dot(g, &ch.solve(g)?);
            }
            total
        }
    };
    Ok(score)
}

fn column_means(m: &Matrix, rows: Option<&[usize]>) -> Vec<f64> {
    let all: Vec<usize>;
    let rows = match rows {
        Some(r) => r,
        None => {
            all = (0..m.rows()).collect();
            &all
        }
    };
    let mut mean = vec![0.0; m.cols()];
    for &i in rows {
        for (a, v) in mean.iter_mut().zip(m.row(i)) {
            *a += v;
        }
    }
    for a in &mut mean {
        *a /= rows.len() as f64;
    }
    mean
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::rng::SplitMix64;

    #[test]
    fn two_class_one_dimensional_by_hand() {
        // f = 0, 1 | 3, 4. Mean 2; var = (4 + 1 + 1 + 4)/4 = 2.5. Class means 0.5 and 3.5, both
        // 1.5 from the mean, weight ½ each: between-class variance 1.5² = 2.25. H = 2.25/2.5 = 0.9.
        let f = Matrix::from_vec(4, 1, vec![0.0, 1.0, 3.0, 4.0]).unwrap();
        let h = hscore(&f, &[0, 0, 1, 1], 2, CovInverse::default()).unwrap();
        assert!((h - 0.9).abs() < 1e-12, "{h}");
        // Shrinkage in 1-D is the identity map: (1 − λ)σ² + λσ² = σ².
        let h = hscore(&f, &[0, 0, 1, 1], 2, CovInverse::Shrinkage { lambda: 0.3 }).unwrap();
        assert!((h - 0.9).abs() < 1e-12, "{h}");
    }

    #[test]
    fn informative_features_score_higher_than_noise() {
        let mut rng = SplitMix64::new(11);
        let n = 120;
        let labels: Vec<usize> = (0..n).map(|i| i % 2).collect();
        let mut good = Matrix::zeros(n, 4);
        let mut noise = Matrix::zeros(n, 4);
        for i in 0..n {
            for j in 0..4 {
                good[(i, j)] = rng.normal() + if j == 0 { 3.0 * labels[i] as f64 } else { 0.0 };
                noise[(i, j)] = rng.normal();
            }
        }
        for inv in [CovInverse::default(), CovInverse::Shrinkage { lambda: 0.1 }] {
            let g = hscore(&good, &labels, 2, inv).unwrap();
            let b = hscore(&noise, &labels, 2, inv).unwrap();
            assert!(g > 0.5 && b < 0.2, "{inv:?}: informative {g} vs noise {b}");
        }
    }

    #[test]
    fn degenerate_inputs_are_defined() {
        let f = Matrix::from_vec(4, 2, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).unwrap();
        // One class: no between-class spread.
        assert_eq!(hscore(&f, &[0; 4], 1, CovInverse::default()).unwrap(), 0.0);
        // Constant features.
        let c = Matrix::from_vec(4, 2, vec![5.0; 8]).unwrap();
        assert_eq!(
            hscore(&c, &[0, 1, 0, 1], 2, CovInverse::default()).unwrap(),
            0.0
        );
        assert_eq!(
            hscore(&c, &[0, 1, 0, 1], 2, CovInverse::Shrinkage { lambda: 0.5 }).unwrap(),
            0.0
        );
        // More classes than examples, collinear columns (rank 1): pseudo-inverse gives 1 (each
        // example is its own class along the single direction).
        let h = hscore(&f, &[0, 1, 2, 3], 9, CovInverse::default()).unwrap();
        assert!((h - 1.0).abs() < 1e-9, "{h}");
        assert!(hscore(&f, &[0, 1, 2, 9], 9, CovInverse::default()).is_err());
        assert!(hscore(&f, &[0, 1], 2, CovInverse::default()).is_err());
        assert!(hscore(&f, &[0, 1, 0, 1], 2, CovInverse::Shrinkage { lambda: 0.0 }).is_err());
    }
}
