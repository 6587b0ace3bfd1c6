//! The linear probe: multinomial logistic regression on frozen, pooled features, trained on one split
//! and scored (accuracy) on another — the cheap pre-screen of the model-recycling paper (the MNLI LP
//! column). Also the pooling helpers that turn hidden states into one feature row per example.
//!
//! Training is deterministic: features are standardised with the training split's mean and std, the
//! weights start at zero, and a fixed budget of Nesterov-accelerated gradient steps (step 1/L, with
//! L the gradient's Lipschitz bound, restarted when momentum points uphill) minimises
//! `mean cross-entropy + l2/2 · ‖W‖²` (the bias is not penalised).

use super::linalg::{dot, Matrix};
use anyhow::{bail, ensure, Result};

/// Settings of the probe; every default in one place.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeConfig {
    /// L2 penalty on the weights (not the bias), on standardised features.
    pub l2: f64,
    /// Gradient steps; the budget is fixed so the probe costs the same for every candidate.
    pub iterations: usize,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        // 1e-3 keeps separable data from pushing weights to infinity without costing accuracy;
        // 500 accelerated steps converge to ~1e-6 of the optimum on hidden sizes up to 1024.
        Self {
            l2: 1e-3,
            iterations: 500,
        }
    }
}

/// A trained probe.
#[derive(Debug, Clone)]
pub struct Probe {
    num_classes: usize,
    mean: Vec<f64>,
    scale: Vec<f64>,
    /// `num_classes × (d + 1)`; the last column is the bias.
    weights: Matrix,
    /// Training objective after the last step.
    pub final_loss: f64,
}

/// Accuracy of a probe trained on one split and evaluated on another.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeOutcome {
    pub train_accuracy: f64,
    pub test_accuracy: f64,
    pub final_loss: f64,
}

/// Trains on (`train`, `train_labels`) and reports accuracy on both splits.
pub fn probe(
    train: &Matrix,
    train_labels: &[usize],
    test: &Matrix,
    test_labels: &[usize],
    num_classes: usize,
    config: &ProbeConfig,
) -> Result<ProbeOutcome> {
    let p = Probe::fit(train, train_labels, num_classes, config)?;
    Ok(ProbeOutcome {
        train_accuracy: p.accuracy(train, train_labels)?,
        test_accuracy: p.accuracy(test, test_labels)?,
        final_loss: p.final_loss,
    })
}

impl Probe {
    pub fn fit(
        features: &Matrix,
        labels: &[usize],
        num_classes: usize,
        config: &ProbeConfig,
    ) -> Result<Self> {
        let (n, d) = (features.rows(), features.cols());
        ensure!(n > 0, "linear probe: no training examples");
        ensure!(num_classes > 0, "linear probe: needs at least one class");
        ensure!(
            labels.len() == n,
            "linear probe: {} labels for {n} feature rows",
            labels.len()
        );
        ensure!(
            config.l2 >= 0.0 && config.l2.is_finite(),
            "linear probe: l2 must be ≥ 0, got {}",
            config.l2
        );
        check_labels(labels, num_classes)?;
        ensure!(
            features.as_slice().iter().all(|v| v.is_finite()),
            "linear probe: a feature is NaN or infinite"
        );
        let mut mean = vec![0.0; d];
        for i in 0..n {
            for (m, v) in mean.iter_mut().zip(features.row(i)) {
                *m += v / n as f64;
            }
        }
        let mut scale = vec![0.0; d];
        for i in 0..n {
            for ((s, v), m) in scale.iter_mut().zip(features.row(i)).zip(&mean) {
                *s += (v - m).powi(2) / n as f64;
            }
        }
        // A constant feature becomes 0 after centring; dividing by 1 keeps it there.
        let scale: Vec<f64> = scale
            .iter()
            .map(|v| if v.sqrt() > 1e-12 { v.sqrt() } else { 1.0 })
            .collect();
        let x = augment(features, &mean, &scale);
        let lipschitz = 0.5 * max_eigen_gram(&x) * 1.1 + config.l2;
        let step = 1.0 / lipschitz;
        let dim = num_classes * (d + 1);
        let mut w = vec![0.0; dim];
        let mut look = w.clone();
        let mut t = 1.0f64;
        for _ in 0..config.iterations {
            let (_, g) = objective(&x, labels, num_classes, &look, config.l2);
            let next: Vec<f64> = look.iter().zip(&g).map(|(y, g)| y - step * g).collect();
            let t_next = (1.0 + (1.0 + 4.0 * t * t).sqrt()) / 2.0;
            let delta: Vec<f64> = next.iter().zip(&w).map(|(a, b)| a - b).collect();
            if dot(&g, &delta) > 0.0 {
                // Momentum points uphill: restart it.
                t = 1.0;
                look = next.clone();
            } else {
                let beta = (t - 1.0) / t_next;
                look = next
                    .iter()
                    .zip(&delta)
                    .map(|(a, dl)| a + beta * dl)
                    .collect();
                t = t_next;
            }
            w = next;
        }
        let (final_loss, _) = objective(&x, labels, num_classes, &w, config.l2);
        Ok(Self {
            num_classes,
            mean,
            scale,
            weights: Matrix::from_vec(num_classes, d + 1, w)?,
            final_loss,
        })
    }

    /// The most likely class of each row (ties go to the lower class index).
    pub fn predict(&self, features: &Matrix) -> Result<Vec<usize>> {
        ensure!(
            features.cols() + 1 == self.weights.cols(),
            "linear probe: {} features, trained on {}",
            features.cols(),
            self.weights.cols() - 1
        );
        let x = augment(features, &self.mean, &self.scale);
        Ok((0..x.rows())
            .map(|i| {
                let mut best = 0;
                let mut best_z = f64::NEG_INFINITY;
                for c in 0..self.num_classes {
                    let z = dot(self.weights.row(c), x.row(i));
                    if z > best_z {
                        best = c;
                        best_z = z;
                    }
                }
                best
            })
            .collect())
    }

    /// Fraction of rows whose predicted class is the label.
    pub fn accuracy(&self, features: &Matrix, labels: &[usize]) -> Result<f64> {
        ensure!(
            labels.len() == features.rows(),
            "linear probe: {} labels for {} rows",
            labels.len(),
            features.rows()
        );
        ensure!(
            !labels.is_empty(),
            "linear probe: accuracy of an empty split"
        );
        check_labels(labels, self.num_classes)?;
        let pred = self.predict(features)?;
        let correct = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
        Ok(correct as f64 / labels.len() as f64)
    }
}

fn check_labels(labels: &[usize], num_classes: usize) -> Result<()> {
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= num_classes) {
        bail!("linear probe: label {l} of example {i} is out of range for {num_classes} classes");
    }
    Ok(())
}

/// Standardised features with a trailing column of ones (the bias input).
fn augment(features: &Matrix, mean: &[f64], scale: &[f64]) -> Matrix {
    let (n, d) = (features.rows(), features.cols());
    let mut x = Matrix::zeros(n, d + 1);
    for i in 0..n {
        let row = x.row_mut(i);
        for (j, v) in features.row(i).iter().enumerate() {
            row[j] = (v - mean[j]) / scale[j];
        }
        row[d] = 1.0;
    }
    x
}

/// Largest eigenvalue of `XᵀX / n` by power iteration (deterministic start).
fn max_eigen_gram(x: &Matrix) -> f64 {
    let n = x.rows() as f64;
    let mut v: Vec<f64> = (0..x.cols())
        .map(|j| 1.0 + j as f64 / x.cols() as f64)
        .collect();
    let mut lambda = 0.0;
    for _ in 0..100 {
        let xv = (0..x.rows()).map(|i| dot(x.row(i), &v)).collect::<Vec<_>>();
        let mut w = vec![0.0; x.cols()];
        for (i, s) in xv.iter().enumerate() {
            for (wj, xj) in w.iter_mut().zip(x.row(i)) {
                *wj += s * xj / n;
            }
        }
        let norm = dot(&w, &w).sqrt();
        if norm == 0.0 {
            return 0.0;
        }
        lambda = norm / dot(&v, &v).sqrt();
        v = w.iter().map(|a| a / norm).collect();
    }
    lambda
}

/// Objective and gradient at flat weights `w` (`classes × (d + 1)`, row-major).
fn objective(x: &Matrix, labels: &[usize], classes: usize, w: &[f64], l2: f64) -> (f64, Vec<f64>) {
    let (n, cols) = (x.rows(), x.cols());
    let mut grad = vec![0.0; w.len()];
    let mut loss = 0.0;
    let mut z = vec![0.0; classes];
    for i in 0..n {
        let row = x.row(i);
        for (c, zc) in z.iter_mut().enumerate() {
            *zc = dot(&w[c * cols..(c + 1) * cols], row);
        }
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
        let log_norm = max + sum.ln();
        loss += (log_norm - z[labels[i]]) / n as f64;
        for c in 0..classes {
            let p = (z[c] - log_norm).exp() - if c == labels[i] { 1.0 } else { 0.0 };
            for (g, xv) in grad[c * cols..(c + 1) * cols].iter_mut().zip(row) {
                *g += p * xv / n as f64;
            }
        }
    }
    for c in 0..classes {
        for j in 0..cols - 1 {
            let v = w[c * cols + j];
            loss += 0.5 * l2 * v * v;
            grad[c * cols + j] += l2 * v;
        }
    }
    (loss, grad)
}

/// How hidden states become one feature row per example.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The first token's state (`<s>` / `[CLS]`).
    Cls,
    /// The mean of the states of real tokens (attention mask 1).
    Mean,
}

/// A read-only view of one layer's hidden states, `[batch, seq, hidden]` row-major (as
/// `Tensor::flatten_all()?.to_vec1::<f32>()` gives them).
#[derive(Debug, Clone, Copy)]
pub struct HiddenView<'a> {
    values: &'a [f32],
    batch: usize,
    seq: usize,
    hidden: usize,
}

impl<'a> HiddenView<'a> {
    pub fn new(values: &'a [f32], batch: usize, seq: usize, hidden: usize) -> Result<Self> {
        ensure!(
            values.len() == batch * seq * hidden,
            "hidden states have {} values, expected {batch} × {seq} × {hidden}",
            values.len()
        );
        Ok(Self {
            values,
            batch,
            seq,
            hidden,
        })
    }

    fn token(&self, b: usize, s: usize) -> &[f32] {
        let start = (b * self.seq + s) * self.hidden;
        &self.values[start..start + self.hidden]
    }
}

/// Pools one layer into `batch × hidden` features; `mask` is the `[batch, seq]` attention mask.
pub fn pool(h: &HiddenView, mask: &[u32], pooling: Pooling) -> Result<Matrix> {
    match pooling {
        Pooling::Cls => pool_cls(h),
        Pooling::Mean => pool_mean(h, mask),
    }
}

/// The first token of each example.
pub fn pool_cls(h: &HiddenView) -> Result<Matrix> {
    ensure!(h.seq > 0, "CLS pooling of empty sequences");
    let mut out = Matrix::zeros(h.batch, h.hidden);
    for b in 0..h.batch {
        for (o, v) in out.row_mut(b).iter_mut().zip(h.token(b, 0)) {
            *o = f64::from(*v);
        }
    }
    Ok(out)
}

/// The mean over the tokens whose mask is non-zero; an example with no such token is an error.
pub fn pool_mean(h: &HiddenView, mask: &[u32]) -> Result<Matrix> {
    ensure!(
        mask.len() == h.batch * h.seq,
        "attention mask has {} values, expected {} × {}",
        mask.len(),
        h.batch,
        h.seq
    );
    let mut out = Matrix::zeros(h.batch, h.hidden);
    for b in 0..h.batch {
        let mut count = 0usize;
        for s in 0..h.seq {
            if mask[b * h.seq + s] != 0 {
                count += 1;
                for (o, v) in out.row_mut(b).iter_mut().zip(h.token(b, s)) {
                    *o += f64::from(*v);
                }
            }
        }
        if count == 0 {
            bail!("mean pooling: example {b} of the batch has no unmasked token");
        }
        for o in out.row_mut(b) {
            *o /= count as f64;
        }
    }
    Ok(out)
}

/// The element-wise mean of equally shaped pooled layers.
pub fn average_layers(layers: &[Matrix]) -> Result<Matrix> {
    let first = layers
        .first()
        .ok_or_else(|| anyhow::anyhow!("averaging over zero layers"))?;
    let mut out = Matrix::zeros(first.rows(), first.cols());
    for (k, l) in layers.iter().enumerate() {
        ensure!(
            l.rows() == first.rows() && l.cols() == first.cols(),
            "layer {k} is {}×{}, layer 0 is {}×{}",
            l.rows(),
            l.cols(),
            first.rows(),
            first.cols()
        );
        for i in 0..l.rows() {
            for (o, v) in out.row_mut(i).iter_mut().zip(l.row(i)) {
                *o += v / layers.len() as f64;
            }
        }
    }
    Ok(out)
}

/// Stacks pooled batches into one feature matrix.
pub fn stack_rows(blocks: &[Matrix]) -> Result<Matrix> {
    let cols = blocks.first().map_or(0, Matrix::cols);
    let mut data = Vec::new();
    let mut rows = 0;
    for (k, b) in blocks.iter().enumerate() {
        ensure!(
            b.cols() == cols,
            "batch {k} has {} features, batch 0 has {cols}",
            b.cols()
        );
        data.extend_from_slice(b.as_slice());
        rows += b.rows();
    }
    Matrix::from_vec(rows, cols, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::rng::SplitMix64;

    /// Three Gaussian blobs far apart in 5-D, plus two pure-noise columns.
    fn blobs(n: usize, seed: u64, spread: f64) -> (Matrix, Vec<usize>) {
        let mut rng = SplitMix64::new(seed);
        let centres = [[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]];
        let labels: Vec<usize> = (0..n).map(|i| i % 3).collect();
        let mut f = Matrix::zeros(n, 5);
        for i in 0..n {
            for j in 0..3 {
                f[(i, j)] = centres[labels[i]][j] + spread * rng.normal();
            }
            f[(i, 3)] = rng.normal();
            f[(i, 4)] = 7.0; // constant
        }
        (f, labels)
    }

    #[test]
    fn separable_data_is_learnt_perfectly() {
        let (train, ytr) = blobs(90, 1, 0.3);
        let (test, yte) = blobs(60, 2, 0.3);
        let out = probe(&train, &ytr, &test, &yte, 3, &ProbeConfig::default()).unwrap();
        assert_eq!(out.train_accuracy, 1.0);
        assert_eq!(out.test_accuracy, 1.0);
        assert!(
            out.final_loss.is_finite() && out.final_loss < 0.2,
            "{}",
            out.final_loss
        );
    }

    #[test]
    fn training_decreases_the_objective_and_is_deterministic() {
        let (train, ytr) = blobs(60, 3, 2.5);
        let short = Probe::fit(
            &train,
            &ytr,
            3,
            &ProbeConfig {
                iterations: 5,
                ..Default::default()
            },
        )
        .unwrap();
        let long = Probe::fit(&train, &ytr, 3, &ProbeConfig::default()).unwrap();
        assert!(
            long.final_loss < short.final_loss,
            "{} vs {}",
            long.final_loss,
            short.final_loss
        );
        // Zero weights give ln 3; any training must beat it.
        assert!(short.final_loss < 3f64.ln());
        let again = Probe::fit(&train, &ytr, 3, &ProbeConfig::default()).unwrap();
        assert_eq!(again.final_loss, long.final_loss);
    }

    #[test]
    fn noise_features_stay_near_chance() {
        let mut rng = SplitMix64::new(9);
        let n = 300;
        let noise = Matrix::from_vec(n, 4, (0..n * 4).map(|_| rng.normal()).collect()).unwrap();
        let labels: Vec<usize> = (0..n).map(|i| i % 2).collect();
        let (train, test) = (stack_rows(&[noise.clone()]).unwrap(), noise);
        let p = Probe::fit(&train, &labels, 2, &ProbeConfig::default()).unwrap();
        // Held-out noise with labels independent of the features.
        let shuffled: Vec<usize> = (0..n).map(|i| (i / 2) % 2).collect();
        let acc = p.accuracy(&test, &shuffled).unwrap();
        assert!((0.35..0.65).contains(&acc), "{acc}");
    }

    #[test]
    fn degenerate_inputs() {
        let (train, _) = blobs(6, 4, 0.3);
        // One class: always predicted.
        let p = Probe::fit(&train, &[0; 6], 1, &ProbeConfig::default()).unwrap();
        assert_eq!(p.accuracy(&train, &[0; 6]).unwrap(), 1.0);
        // More classes than examples.
        let p = Probe::fit(&train, &[0, 1, 2, 3, 4, 5], 10, &ProbeConfig::default()).unwrap();
        assert!(p.final_loss.is_finite());
        assert_eq!(p.accuracy(&train, &[0, 1, 2, 3, 4, 5]).unwrap(), 1.0);
        // Constant features only.
        let c = Matrix::from_vec(4, 2, vec![1.0; 8]).unwrap();
        let p = Probe::fit(&c, &[0, 1, 1, 1], 2, &ProbeConfig::default()).unwrap();
        assert_eq!(p.predict(&c).unwrap(), vec![1; 4]);
        // Errors.
        assert!(Probe::fit(&train, &[0; 6], 0, &ProbeConfig::default()).is_err());
        assert!(Probe::fit(&train, &[9; 6], 2, &ProbeConfig::default()).is_err());
        assert!(Probe::fit(&Matrix::zeros(0, 3), &[], 2, &ProbeConfig::default()).is_err());
        assert!(p.predict(&train).is_err());
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (train, y) = blobs(12, 5, 1.0);
        let x = augment(&train, &[0.0; 5], &[1.0; 5]);
        let w: Vec<f64> = (0..3 * 6)
            .map(|k| ((k * 7) % 5) as f64 * 0.1 - 0.2)
            .collect();
        let (_, g) = objective(&x, &y, 3, &w, 0.3);
        for k in 0..w.len() {
            let h = 1e-6;
            let (mut up, mut down) = (w.clone(), w.clone());
            up[k] += h;
            down[k] -= h;
            let numeric =
                (objective(&x, &y, 3, &up, 0.3).0 - objective(&x, &y, 3, &down, 0.3).0) / (2.0 * h);
            assert!(
                (numeric - g[k]).abs() < 1e-6,
                "weight {k}: {numeric} vs {}",
                g[k]
            );
        }
    }

    #[test]
    fn pooling_helpers() {
        // batch 2, seq 3, hidden 2.
        let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let h = HiddenView::new(&values, 2, 3, 2).unwrap();
        let cls = pool(&h, &[1; 6], Pooling::Cls).unwrap();
        assert_eq!(cls.as_slice(), &[0.0, 1.0, 6.0, 7.0]);
        // Example 0 uses tokens 0 and 1: (0+2)/2, (1+3)/2. Example 1 uses token 0 only.
        let mean = pool(&h, &[1, 1, 0, 1, 0, 0], Pooling::Mean).unwrap();
        assert_eq!(mean.as_slice(), &[1.0, 2.0, 6.0, 7.0]);
        assert!(pool_mean(&h, &[1, 1, 0, 0, 0, 0]).is_err());
        assert!(HiddenView::new(&values, 2, 2, 2).is_err());
        let avg = average_layers(&[cls.clone(), mean]).unwrap();
        assert_eq!(avg.as_slice(), &[0.5, 1.5, 6.0, 7.0]);
        assert!(average_layers(&[]).is_err());
        let stacked = stack_rows(&[cls.clone(), cls]).unwrap();
        assert_eq!(stacked.rows(), 4);
    }
}
