//! Speed of the symmetric eigendecomposition behind LogME and H-score: Householder + implicit QR
//! (`sym_eigen`) against the cyclic Jacobi baseline (`sym_eigen_jacobi`), measured in the same run
//! on Gram matrices of random features; prints the ratio. Run with `cargo bench --bench select_eigen`.

use recycle::select::linalg::{sym_eigen, sym_eigen_jacobi, Matrix};
use recycle::select::rng::SplitMix64;
use std::time::{Duration, Instant};

fn best_of(reps: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

fn main() -> anyhow::Result<()> {
    for n in [64usize, 128, 256] {
        let mut rng = SplitMix64::new(n as u64);
        let f = Matrix::from_vec(2 * n, n, (0..2 * n * n).map(|_| rng.normal()).collect())?;
        let gram = f.gram();
        let qr = best_of(3, || sym_eigen(&gram).map(drop))?;
        let jacobi = best_of(3, || sym_eigen_jacobi(&gram).map(drop))?;
        println!(
            "n = {n:4}: QR {:>10.3?}  Jacobi {:>10.3?}  Jacobi / QR = {:.1}×",
            qr,
            jacobi,
            jacobi.as_secs_f64() / qr.as_secs_f64()
        );
    }
    Ok(())
}
