//! Scores of predictions against gold labels: accuracy, Spearman and Pearson correlation.

/// Fraction of predictions equal to the gold class; 0 for an empty slice.
pub fn accuracy(predicted: &[u32], gold: &[u32]) -> f64 {
    if gold.is_empty() {
        return 0.0;
    }
    let hits = predicted.iter().zip(gold).filter(|(p, g)| p == g).count();
    hits as f64 / gold.len() as f64
}

/// Index of the largest value of each row (the first one on ties).
pub fn argmax_rows(logits: &[Vec<f32>]) -> Vec<u32> {
    logits
        .iter()
        .map(|row| {
            let mut best = 0usize;
            for (i, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

/// Pearson correlation; 0 when either side has no variance (or fewer than 2 values).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    if n < 2 {
        return 0.0;
    }
    let mx = x[..n].iter().sum::<f64>() / n as f64;
    let my = y[..n].iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (dx, dy) = (x[i] - mx, y[i] - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx == 0.0 || syy == 0.0 {
        return 0.0;
    }
    sxy / (sxx.sqrt() * syy.sqrt())
}

/// 1-based ranks, tied values sharing the average of their ranks (scipy's `rankdata` "average").
pub fn average_ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        // positions i..=j (0-based) hold ranks i+1..=j+1; their average:
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = avg;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman rank correlation: Pearson over average ranks (ties handled as scipy does).
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&average_ranks(x), &average_ranks(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_counts_hits() {
        assert_eq!(accuracy(&[1, 0, 2, 2], &[1, 1, 2, 0]), 0.5);
        assert_eq!(
            argmax_rows(&[vec![0.1, 0.9], vec![2.0, -1.0], vec![1.0, 1.0]]),
            vec![1, 0, 0]
        );
    }

    #[test]
    fn ranks_average_ties() {
        assert_eq!(
            average_ranks(&[10.0, 20.0, 20.0, 5.0]),
            vec![2.0, 3.5, 3.5, 1.0]
        );
    }

    #[test]
    fn spearman_with_ties_by_hand() {
        // x = [1, 2, 2, 3] → ranks [1, 2.5, 2.5, 4]; y = [1, 3, 2, 4] → ranks [1, 3, 2, 4].
        // Means 2.5 and 2.5; deviations dx = [-1.5, 0, 0, 1.5], dy = [-1.5, 0.5, -0.5, 1.5].
        // Σdxdy = 2.25 + 0 + 0 + 2.25 = 4.5; Σdx² = 4.5; Σdy² = 2.25+0.25+0.25+2.25 = 5.
        let expected = 4.5 / (4.5f64.sqrt() * 5f64.sqrt());
        let got = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]);
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
    }

    #[test]
    fn monotone_is_one_and_reversed_is_minus_one() {
        let x = [1.0, 5.0, 7.0, 100.0];
        assert!((spearman(&x, &[0.0, 1.0, 2.0, 3.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&x, &[3.0, 2.0, 1.0, 0.0]) + 1.0).abs() < 1e-12);
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]) - 1.0).abs() < 1e-12);
        assert_eq!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), 0.0);
    }
}
