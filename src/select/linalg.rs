//! Small dense linear algebra on f64 for the selection estimators: a row-major matrix, a symmetric
//! eigendecomposition (cyclic Jacobi) and a Cholesky solve. Sizes here are features × features
//! (hidden size ≤ ~1k) or models × targets, so clarity wins over blocking and SIMD.

use anyhow::{bail, ensure, Result};
use std::ops::{Index, IndexMut};

/// A dense row-major matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f64>,
}

impl Matrix {
    /// A `rows × cols` matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// The `n × n` identity.
    pub fn identity(n: usize) -> Self {
        let mut m = Self::zeros(n, n);
        for i in 0..n {
            m[(i, i)] = 1.0;
        }
        m
    }

    /// Wraps row-major `data`; its length must be `rows × cols`.
    pub fn from_vec(rows: usize, cols: usize, data: Vec<f64>) -> Result<Self> {
        ensure!(
            data.len() == rows * cols,
            "matrix data has {} values, expected {rows} × {cols} = {}",
            data.len(),
            rows * cols
        );
        Ok(Self { rows, cols, data })
    }

    /// Builds a matrix from rows of equal length (an empty list gives a `0 × 0` matrix).
    pub fn from_rows(rows: &[Vec<f64>]) -> Result<Self> {
        let cols = rows.first().map_or(0, Vec::len);
        let mut data = Vec::with_capacity(rows.len() * cols);
        for (i, r) in rows.iter().enumerate() {
            ensure!(
                r.len() == cols,
                "row {i} has {} values, row 0 has {cols}",
                r.len()
            );
            data.extend_from_slice(r);
        }
        Ok(Self {
            rows: rows.len(),
            cols,
            data,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row-major values.
    pub fn as_slice(&self) -> &[f64] {
        &self.data
    }

    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn row_mut(&mut self, i: usize) -> &mut [f64] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn transpose(&self) -> Self {
        let mut t = Self::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                t[(j, i)] = self[(i, j)];
            }
        }
        t
    }

    /// The product `self · other`.
    pub fn matmul(&self, other: &Matrix) -> Result<Self> {
        ensure!(
            self.cols == other.rows,
            "matrix product of {}×{} and {}×{}",
            self.rows,
            self.cols,
            other.rows,
            other.cols
        );
        let mut out = Self::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            let out_row = &mut out.data[i * other.cols..(i + 1) * other.cols];
            for (k, &a) in self.row(i).iter().enumerate() {
                if a == 0.0 {
                    continue;
                }
                for (o, &b) in out_row.iter_mut().zip(other.row(k)) {
                    *o += a * b;
                }
            }
        }
        Ok(out)
    }

    /// `selfᵀ · self` (`cols × cols`, symmetric).
    pub fn gram(&self) -> Self {
        let n = self.cols;
        let mut g = Self::zeros(n, n);
        for r in 0..self.rows {
            let row = self.row(r);
            for i in 0..n {
                let a = row[i];
                if a == 0.0 {
                    continue;
                }
                for j in i..n {
                    g.data[i * n + j] += a * row[j];
                }
            }
        }
        for i in 0..n {
            for j in 0..i {
                g.data[i * n + j] = g.data[j * n + i];
            }
        }
        g
    }

    /// `self · selfᵀ` (`rows × rows`, symmetric).
    pub fn outer_gram(&self) -> Self {
        let n = self.rows;
        let mut g = Self::zeros(n, n);
        for i in 0..n {
            for j in i..n {
                let v = dot(self.row(i), self.row(j));
                g.data[i * n + j] = v;
                g.data[j * n + i] = v;
            }
        }
        g
    }

    /// `self · x` for a vector `x` of length `cols`.
    pub fn mul_vec(&self, x: &[f64]) -> Result<Vec<f64>> {
        ensure!(
            x.len() == self.cols,
            "vector of length {} against {} columns",
            x.len(),
            self.cols
        );
        Ok((0..self.rows).map(|i| dot(self.row(i), x)).collect())
    }

    /// `selfᵀ · x` for a vector `x` of length `rows`.
    pub fn tmul_vec(&self, x: &[f64]) -> Result<Vec<f64>> {
        ensure!(
            x.len() == self.rows,
            "vector of length {} against {} rows",
            x.len(),
            self.rows
        );
        let mut out = vec![0.0; self.cols];
        for (i, &xi) in x.iter().enumerate() {
            for (o, &a) in out.iter_mut().zip(self.row(i)) {
                *o += a * xi;
            }
        }
        Ok(out)
    }

    /// Largest absolute difference to `other` (same shape), for tests and convergence checks.
    pub fn max_abs_diff(&self, other: &Matrix) -> f64 {
        if self.rows != other.rows || self.cols != other.cols {
            return f64::INFINITY;
        }
        self.data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    }

    fn is_symmetric(&self, tol: f64) -> bool {
        let scale = self
            .data
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs()))
            .max(1.0);
        (0..self.rows).all(|i| (0..i).all(|j| (self[(i, j)] - self[(j, i)]).abs() <= tol * scale))
    }
}

impl Index<(usize, usize)> for Matrix {
    type Output = f64;
    fn index(&self, (i, j): (usize, usize)) -> &f64 {
        &self.data[i * self.cols + j]
    }
}

impl IndexMut<(usize, usize)> for Matrix {
    fn index_mut(&mut self, (i, j): (usize, usize)) -> &mut f64 {
        &mut self.data[i * self.cols + j]
    }
}

/// The dot product of two equally long slices (the shorter length wins otherwise).
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Eigenvalues and eigenvectors of a symmetric matrix: `A = V · diag(values) · Vᵀ`.
#[derive(Debug, Clone)]
pub struct SymEigen {
    /// Eigenvalues, in descending order.
    pub values: Vec<f64>,
    /// Orthonormal eigenvectors as columns, aligned with `values`.
    pub vectors: Matrix,
}

impl SymEigen {
    /// The `k`-th eigenvector (a column of `vectors`).
    pub fn vector(&self, k: usize) -> Vec<f64> {
        (0..self.vectors.rows())
            .map(|i| self.vectors[(i, k)])
            .collect()
    }
}

/// Sweeps of the cyclic Jacobi method before giving up; it converges quadratically, typically in
/// fewer than 10 sweeps.
const JACOBI_MAX_SWEEPS: usize = 60;

/// Symmetric eigendecomposition by the cyclic Jacobi method: rotations zero each off-diagonal entry
/// in turn until the off-diagonal mass is negligible against the diagonal's.
pub fn sym_eigen(a: &Matrix) -> Result<SymEigen> {
    ensure!(
        a.rows == a.cols,
        "eigendecomposition of a non-square {}×{} matrix",
        a.rows,
        a.cols
    );
    ensure!(
        a.data.iter().all(|v| v.is_finite()),
        "eigendecomposition of a matrix with NaN or infinite entries"
    );
    ensure!(
        a.is_symmetric(1e-9),
        "eigendecomposition of a non-symmetric matrix"
    );
    let n = a.rows;
    let mut m = a.clone();
    let mut v = Matrix::identity(n);
    let total: f64 = m.data.iter().map(|x| x * x).sum();
    let mut converged = false;
    for _ in 0..JACOBI_MAX_SWEEPS {
        let off: f64 = (0..n)
            .map(|i| {
                (0..n)
                    .filter(|&j| j != i)
                    .map(|j| m[(i, j)].powi(2))
                    .sum::<f64>()
            })
            .sum();
        if off <= 1e-30 * total || off == 0.0 {
            converged = true;
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[(p, q)];
                if apq.abs() <= f64::MIN_POSITIVE {
                    continue;
                }
                let theta = (m[(q, q)] - m[(p, p)]) / (2.0 * apq);
                // tan of the rotation angle: the smaller root of t² + 2θt − 1 = 0.
                let t = if theta.is_infinite() {
                    0.0
                } else {
                    theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt())
                };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                rotate(&mut m, &mut v, p, q, c, s);
            }
        }
    }
    if !converged {
        bail!("Jacobi eigendecomposition of a {n}×{n} matrix did not converge in {JACOBI_MAX_SWEEPS} sweeps");
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| m[(j, j)].total_cmp(&m[(i, i)]));
    let values = order.iter().map(|&i| m[(i, i)]).collect();
    let mut vectors = Matrix::zeros(n, n);
    for (k, &i) in order.iter().enumerate() {
        for r in 0..n {
            vectors[(r, k)] = v[(r, i)];
        }
    }
    Ok(SymEigen { values, vectors })
}

/// Applies `A ← JᵀAJ`, `V ← VJ` for the plane rotation `J` in coordinates `p, q`.
fn rotate(m: &mut Matrix, v: &mut Matrix, p: usize, q: usize, c: f64, s: f64) {
    let n = m.rows;
    for k in 0..n {
        let (akp, akq) = (m[(k, p)], m[(k, q)]);
        m[(k, p)] = c * akp - s * akq;
        m[(k, q)] = s * akp + c * akq;
    }
    for k in 0..n {
        let (apk, aqk) = (m[(p, k)], m[(q, k)]);
        m[(p, k)] = c * apk - s * aqk;
        m[(q, k)] = s * apk + c * aqk;
    }
    m[(p, q)] = 0.0;
    m[(q, p)] = 0.0;
    for k in 0..n {
        let (vkp, vkq) = (v[(k, p)], v[(k, q)]);
        v[(k, p)] = c * vkp - s * vkq;
        v[(k, q)] = s * vkp + c * vkq;
    }
}

/// The Cholesky factor `L` (lower triangular) of a symmetric positive-definite `A = L·Lᵀ`.
#[derive(Debug, Clone)]
pub struct Cholesky {
    l: Matrix,
}

impl Cholesky {
    /// Factors `a`; fails when `a` is not square, not symmetric or not positive definite.
    pub fn new(a: &Matrix) -> Result<Self> {
        ensure!(
            a.rows == a.cols,
            "Cholesky factorisation of a non-square {}×{} matrix",
            a.rows,
            a.cols
        );
        ensure!(
            a.is_symmetric(1e-9),
            "Cholesky factorisation of a non-symmetric matrix"
        );
        let n = a.rows;
        let mut l = Matrix::zeros(n, n);
        for j in 0..n {
            let d = a[(j, j)] - (0..j).map(|k| l[(j, k)].powi(2)).sum::<f64>();
            if !(d > 0.0) {
                bail!("matrix is not positive definite (pivot {j} is {d})");
            }
            let ljj = d.sqrt();
            l[(j, j)] = ljj;
            for i in j + 1..n {
                let s = a[(i, j)] - (0..j).map(|k| l[(i, k)] * l[(j, k)]).sum::<f64>();
                l[(i, j)] = s / ljj;
            }
        }
        Ok(Self { l })
    }

    /// The lower-triangular factor.
    pub fn factor(&self) -> &Matrix {
        &self.l
    }

    /// Solves `A x = b`.
    pub fn solve(&self, b: &[f64]) -> Result<Vec<f64>> {
        let n = self.l.rows;
        ensure!(
            b.len() == n,
            "right-hand side of length {} for a {n}×{n} system",
            b.len()
        );
        let mut y = vec![0.0; n];
        for i in 0..n {
            let s: f64 = (0..i).map(|k| self.l[(i, k)] * y[k]).sum();
            y[i] = (b[i] - s) / self.l[(i, i)];
        }
        let mut x = vec![0.0; n];
        for i in (0..n).rev() {
            let s: f64 = (i + 1..n).map(|k| self.l[(k, i)] * x[k]).sum();
            x[i] = (y[i] - s) / self.l[(i, i)];
        }
        Ok(x)
    }

    /// `log det A = 2 Σ log Lᵢᵢ`.
    pub fn log_det(&self) -> f64 {
        (0..self.l.rows).map(|i| 2.0 * self.l[(i, i)].ln()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::rng::SplitMix64;

    fn random_symmetric(n: usize, seed: u64) -> Matrix {
        let mut rng = SplitMix64::new(seed);
        let mut a = Matrix::zeros(n, n);
        for i in 0..n {
            for j in 0..=i {
                let v = rng.uniform() * 2.0 - 1.0;
                a[(i, j)] = v;
                a[(j, i)] = v;
            }
        }
        a
    }

    #[test]
    fn eigen_reconstructs_random_symmetric_matrix() {
        for (n, seed) in [(1, 1), (2, 2), (7, 3), (30, 4)] {
            let a = random_symmetric(n, seed);
            let e = sym_eigen(&a).unwrap();
            // V diag(λ) Vᵀ == A
            let mut vd = e.vectors.clone();
            for i in 0..n {
                for k in 0..n {
                    vd[(i, k)] *= e.values[k];
                }
            }
            let rebuilt = vd.matmul(&e.vectors.transpose()).unwrap();
            assert!(
                rebuilt.max_abs_diff(&a) < 1e-10,
                "n={n}: {}",
                rebuilt.max_abs_diff(&a)
            );
            // VᵀV == I
            let vtv = e.vectors.transpose().matmul(&e.vectors).unwrap();
            assert!(vtv.max_abs_diff(&Matrix::identity(n)) < 1e-10);
            assert!(e.values.windows(2).all(|w| w[0] >= w[1]));
        }
    }

    #[test]
    fn eigen_of_known_2x2() {
        // [[2,1],[1,2]] has eigenvalues 3 and 1, eigenvectors (1,1)/√2 and (1,−1)/√2.
        let a = Matrix::from_rows(&[vec![2.0, 1.0], vec![1.0, 2.0]]).unwrap();
        let e = sym_eigen(&a).unwrap();
        assert!((e.values[0] - 3.0).abs() < 1e-12 && (e.values[1] - 1.0).abs() < 1e-12);
        let v0 = e.vector(0);
        assert!((v0[0].abs() - 0.5f64.sqrt()).abs() < 1e-12 && (v0[0] - v0[1]).abs() < 1e-12);
    }

    #[test]
    fn eigen_rejects_non_symmetric() {
        let a = Matrix::from_rows(&[vec![1.0, 2.0], vec![0.0, 1.0]]).unwrap();
        assert!(sym_eigen(&a).is_err());
    }

    #[test]
    fn cholesky_solves() {
        let n = 12;
        let b = random_symmetric(n, 9);
        // A = BᵀB + I is positive definite.
        let mut a = b.gram();
        for i in 0..n {
            a[(i, i)] += 1.0;
        }
        let x_true: Vec<f64> = (0..n).map(|i| i as f64 - 5.5).collect();
        let rhs = a.mul_vec(&x_true).unwrap();
        let ch = Cholesky::new(&a).unwrap();
        let x = ch.solve(&rhs).unwrap();
        for (got, want) in x.iter().zip(&x_true) {
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
        let l = ch.factor();
        assert!(l.matmul(&l.transpose()).unwrap().max_abs_diff(&a) < 1e-9);
        // log det against the eigenvalues.
        let e = sym_eigen(&a).unwrap();
        let want: f64 = e.values.iter().map(|v| v.ln()).sum();
        assert!((ch.log_det() - want).abs() < 1e-9);
    }

    #[test]
    fn cholesky_rejects_indefinite() {
        let a = Matrix::from_rows(&[vec![1.0, 2.0], vec![2.0, 1.0]]).unwrap();
        assert!(Cholesky::new(&a).is_err());
    }

    #[test]
    fn gram_and_matmul_agree() {
        let a = Matrix::from_rows(&[vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]]).unwrap();
        assert_eq!(a.gram(), a.transpose().matmul(&a).unwrap());
        assert_eq!(a.outer_gram(), a.matmul(&a.transpose()).unwrap());
        assert_eq!(a.mul_vec(&[1.0, 0.0, -1.0]).unwrap(), vec![-2.0, -2.0]);
        assert_eq!(a.tmul_vec(&[1.0, -1.0]).unwrap(), vec![-3.0, -3.0, -3.0]);
    }
}
