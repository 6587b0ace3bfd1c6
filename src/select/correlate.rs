//! How well a proxy tracks the average gain: Pearson's r on the values and Spearman's ρ on their
//! ranks (tied values share the average of their ranks), as the paper reports for MNLI LP.

use anyhow::{ensure, Result};

/// Pearson correlation of paired samples; `None` when there are fewer than 2 pairs or either side
/// is constant (the correlation is undefined, not 0).
pub fn pearson(x: &[f64], y: &[f64]) -> Result<Option<f64>> {
    check(x, y)?;
    let n = x.len();
    if n < 2 {
        return Ok(None);
    }
    let mx = x.iter().sum::<f64>() / n as f64;
    let my = y.iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    if sxx <= 0.0 || syy <= 0.0 {
        return Ok(None);
    }
    Ok(Some((sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0)))
}

/// Spearman rank correlation: Pearson's r of the average ranks.
pub fn spearman(x: &[f64], y: &[f64]) -> Result<Option<f64>> {
    check(x, y)?;
    pearson(&average_ranks(x), &average_ranks(y))
}

/// 1-based ranks in ascending order; a run of equal values gets the mean of the ranks it spans.
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
    let mut ranks = vec![0.0; x.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && x[order[end]] == x[order[start]] {
            end += 1;
        }
        // Positions start..end hold ranks start+1..=end; their mean is (start + 1 + end) / 2.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

fn check(x: &[f64], y: &[f64]) -> Result<()> {
    ensure!(
        x.len() == y.len(),
        "correlation of samples of different lengths ({} and {})",
        x.len(),
        y.len()
    );
    ensure!(
        x.iter().chain(y).all(|v| v.is_finite()),
        "correlation of samples with NaN or infinite values"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_and_undefined() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let y = [2.0, 4.0, 6.0, 8.0];
        assert!((pearson(&x, &y).unwrap().unwrap() - 1.0).abs() < 1e-12);
        let neg: Vec<f64> = y.iter().map(|v| -v * v).collect();
        assert!((spearman(&x, &neg).unwrap().unwrap() + 1.0).abs() < 1e-12);
        assert_eq!(pearson(&x, &[1.0; 4]).unwrap(), None);
        assert_eq!(pearson(&[1.0], &[2.0]).unwrap(), None);
        assert!(pearson(&x, &y[..3]).is_err());
        assert!(pearson(&[f64::NAN, 1.0], &[1.0, 2.0]).is_err());
    }

    #[test]
    fn ranks_average_ties() {
        assert_eq!(
            average_ranks(&[10.0, 20.0, 20.0, 5.0, 20.0]),
            vec![2.0, 4.0, 4.0, 1.0, 4.0]
        );
    }
}
