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

/// Symmetric eigendecomposition: Householder reduction to tridiagonal form, then implicit QR steps
/// with Wilkinson shifts on the tridiagonal matrix, accumulating every transformation into the
/// eigenvectors. O(n³) with a small constant: a 768 × 768 feature covariance takes about a second.
pub fn sym_eigen(a: &Matrix) -> Result<SymEigen> {
    check_symmetric(a)?;
    let n = a.rows;
    let mut t = a.clone();
    let mut q = Matrix::identity(n);
    householder_tridiagonalise(&mut t, &mut q);
    // Rotations of the QR phase update rows of Z = Qᵀ (contiguous), not columns of Q.
    let mut z = q.transpose();
    tridiagonal_qr(&mut t, &mut z)?;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| t[(j, j)].total_cmp(&t[(i, i)]));
    let values = order.iter().map(|&i| t[(i, i)]).collect();
    let mut vectors = Matrix::zeros(n, n);
    for (k, &i) in order.iter().enumerate() {
        for r in 0..n {
            vectors[(r, k)] = z[(i, r)];
        }
    }
    Ok(SymEigen { values, vectors })
}

fn check_symmetric(a: &Matrix) -> Result<()> {
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
    Ok(())
}

/// `T ← H T H` for Householder reflections `H = I − τvvᵀ` that zero each column below its
/// subdiagonal in turn; `Q ← Q H` so that the input equals `Q T Qᵀ` throughout.
fn householder_tridiagonalise(t: &mut Matrix, q: &mut Matrix) {
    let n = t.rows;
    for k in 0..n.saturating_sub(2) {
        let m = k + 1; // the reflection acts on coordinates m..n
        let norm = (m..n).map(|i| t[(i, k)].powi(2)).sum::<f64>().sqrt();
        if norm == 0.0 {
            continue;
        }
        let x0 = t[(m, k)];
        let alpha = if x0 >= 0.0 { -norm } else { norm };
        let mut v: Vec<f64> = (m..n).map(|i| t[(i, k)]).collect();
        v[0] -= alpha;
        let vtv: f64 = v.iter().map(|x| x * x).sum();
        if vtv == 0.0 {
            continue;
        }
        let tau = 2.0 / vtv;
        // Column (and row) k become alpha·e₁.
        t[(m, k)] = alpha;
        t[(k, m)] = alpha;
        for i in m + 1..n {
            t[(i, k)] = 0.0;
            t[(k, i)] = 0.0;
        }
        // Trailing block S ← S − v wᵀ − w vᵀ with p = τSv, w = p − (τ/2)(vᵀp) v.
        let p: Vec<f64> = (m..n).map(|i| tau * dot(&t.row(i)[m..], &v)).collect();
        let half = 0.5 * tau * dot(&v, &p);
        let w: Vec<f64> = p.iter().zip(&v).map(|(p, v)| p - half * v).collect();
        for (ii, i) in (m..n).enumerate() {
            let (vi, wi) = (v[ii], w[ii]);
            let row = &mut t.row_mut(i)[m..];
            for ((r, vj), wj) in row.iter_mut().zip(&v).zip(&w) {
                *r -= vi * wj + wi * vj;
            }
        }
        for i in 0..n {
            let row = &mut q.row_mut(i)[m..];
            let s = tau * dot(row, &v);
            for (r, vj) in row.iter_mut().zip(&v) {
                *r -= s * vj;
            }
        }
    }
}

/// Diagonalises the tridiagonal `t` in place by implicit shifted QR (bulge chasing), applying each
/// rotation `R` as `T ← R T Rᵀ` and `Z ← R Z`.
fn tridiagonal_qr(t: &mut Matrix, z: &mut Matrix) -> Result<()> {
    let n = t.rows;
    if n < 2 {
        return Ok(());
    }
    let max_steps = 50 * n;
    let mut steps = 0;
    let mut h = n - 1;
    while h > 0 {
        for i in 0..h {
            if t[(i + 1, i)].abs() <= f64::EPSILON * (t[(i, i)].abs() + t[(i + 1, i + 1)].abs()) {
                t[(i + 1, i)] = 0.0;
                t[(i, i + 1)] = 0.0;
            }
        }
        if t[(h, h - 1)] == 0.0 {
            h -= 1;
            continue;
        }
        let mut l = h - 1;
        while l > 0 && t[(l, l - 1)] != 0.0 {
            l -= 1;
        }
        steps += 1;
        if steps > max_steps {
            bail!("symmetric QR of a {n}×{n} matrix did not converge in {max_steps} steps");
        }
        // Wilkinson shift: the eigenvalue of the trailing 2×2 block closer to its last entry.
        let (a, b, e) = (t[(h - 1, h - 1)], t[(h, h)], t[(h, h - 1)]);
        let dd = (a - b) / 2.0;
        let sign = if dd >= 0.0 { 1.0 } else { -1.0 };
        let mu = b - e * e / (dd + sign * dd.hypot(e));
        let mut x = t[(l, l)] - mu;
        let mut y = t[(l + 1, l)];
        for k in l..h {
            let r = x.hypot(y);
            let (c, s) = if r == 0.0 { (1.0, 0.0) } else { (x / r, y / r) };
            let lo = k.saturating_sub(1).max(l);
            let hi = (k + 2).min(h);
            for j in lo..=hi {
                let (p, q) = (t[(j, k)], t[(j, k + 1)]);
                t[(j, k)] = c * p + s * q;
                t[(j, k + 1)] = -s * p + c * q;
            }
            for j in lo..=hi {
                let (p, q) = (t[(k, j)], t[(k + 1, j)]);
                t[(k, j)] = c * p + s * q;
                t[(k + 1, j)] = -s * p + c * q;
            }
            if k > l {
                // The bulge this rotation chased away.
                t[(k + 1, k - 1)] = 0.0;
                t[(k - 1, k + 1)] = 0.0;
            }
            rotate_rows(z, k, c, s);
            if k + 1 < h {
                x = t[(k + 1, k)];
                y = t[(k + 2, k)];
            }
        }
    }
    Ok(())
}

/// Rows `k, k + 1` of `z` ← `[c s; −s c]` times them.
fn rotate_rows(z: &mut Matrix, k: usize, c: f64, s: f64) {
    let cols = z.cols;
    let (top, bottom) = z.data[k * cols..(k + 2) * cols].split_at_mut(cols);
    for (p, q) in top.iter_mut().zip(bottom.iter_mut()) {
        let (a, b) = (*p, *q);
        *p = c * a + s * b;
        *q = -s * a + c * b;
    }
}

/// Sweeps of the cyclic Jacobi method before giving up; it converges quadratically, typically in
/// fewer than 10 sweeps.
const JACOBI_MAX_SWEEPS: usize = 60;

/// Symmetric eigendecomposition by the cyclic Jacobi method: rotations zero each off-diagonal entry
/// in turn until the off-diagonal mass is negligible. Slower than [`sym_eigen`] (O(n³) per sweep)
/// but simple and very accurate; kept as an independent cross-check.
pub fn sym_eigen_jacobi(a: &Matrix) -> Result<SymEigen> {
    check_symmetric(a)?;
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
        for (n, seed, jacobi) in [
            (1, 1, false),
            (2, 2, false),
            (7, 3, false),
            (30, 4, false),
            (80, 5, false),
            (30, 6, true),
        ] {
            let a = random_symmetric(n, seed);
            let e = if jacobi {
                sym_eigen_jacobi(&a).unwrap()
            } else {
                sym_eigen(&a).unwrap()
            };
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
    fn qr_and_jacobi_agree_on_degenerate_spectra() {
        // A rank-2 Gram matrix (many zero eigenvalues), a diagonal one with repeats, and zero.
        let f = Matrix::from_rows(&[
            vec![1.0, 2.0, 0.0, 1.0, 3.0],
            vec![0.5, -1.0, 2.0, 0.0, 1.0],
        ])
        .unwrap();
        let mut diag = Matrix::zeros(6, 6);
        for (i, v) in [3.0, 1.0, 3.0, -2.0, 1.0, 0.0].iter().enumerate() {
            diag[(i, i)] = *v;
        }
        for a in [f.gram(), diag, Matrix::zeros(4, 4), random_symmetric(25, 8)] {
            let qr = sym_eigen(&a).unwrap();
            let jac = sym_eigen_jacobi(&a).unwrap();
            for (x, y) in qr.values.iter().zip(&jac.values) {
                assert!((x - y).abs() < 1e-10, "{x} vs {y}");
            }
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
