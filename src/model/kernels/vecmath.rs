//! Vectorisable row loops for the fused kernels: an `exp` made only of arithmetic and bit
//! operations (libm's `expf` is a scalar call the compiler cannot vectorise), softmax over a row,
//! and GELU forward and backward over slices.
//!
//! Each public loop is compiled three times, for AVX-512, for AVX2 + FMA and for the baseline, and
//! picks one at run time (`multiversion!`): the build targets baseline x86-64, so without this the
//! loops would run on 128-bit vectors at best.

/// Defines `pub fn $name(args)` that runs `$body(args)` compiled for the widest vector extension
/// this CPU has.
macro_rules! multiversion {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) => $body:ident) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the CPU has every feature the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// Lanes of the partial sums and maxima: one AVX-512 register of f32.
const LANES: usize = 16;

/// `e^x` in f32 from arithmetic only, within 2 ulp of the correctly rounded value on the range
/// softmax and GELU use (checked against `f32::exp` in the tests). Range reduction
/// `x = n ln2 + r`, |r| ≤ ln2/2, with ln2 split in two parts so `n ln2` is exact; a degree-6
/// polynomial for `e^r` (Cephes' coefficients); `2^n` built in the exponent bits. Below −87 the
/// result is 0 (the true value is under 1.7e-38); NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 · 2²³: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];
    let lo = x < -87.0;
    let xc = if lo {
        -87.0
    } else if x > 88.0 {
        88.0
    } else {
        x
    };
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((P[0] * r + P[1]) * r + P[2]) * r + P[3]) * r + P[4]) * r + P[5];
    let er = p * r * r + r + 1.0;
    // The low bits of `t` hold n + 0x40_0000 + ...; shifting by 23 keeps exactly (n + 127) << 23.
    let two_n = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    if lo {
        0.0
    } else {
        er * two_n
    }
}

#[inline(always)]
fn max_of(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in tail {
        m = m.max(v);
    }
    m
}

#[inline(always)]
fn softmax_in_place_body(row: &mut [f32]) {
    let max = max_of(row);
    for v in row.iter_mut() {
        *v = exp(*v - max);
    }
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let sum = acc.iter().sum::<f32>() + tail.iter().sum::<f32>();
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

multiversion! {
    /// Softmax of one row in place (the row max subtracted first).
    pub fn softmax_in_place(row: &mut [f32]) => softmax_in_place_body
}

/// 1/√(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// Φ(x) and φ(x), the standard normal CDF and density, sharing one `exp(-x²/2)`: erf by
/// Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, under f32 rounding of the outputs
/// that matter), which needs the same exponential as the density.
#[inline(always)]
pub fn cdf_pdf(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * z);
    let e = exp(-z * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let erf = 1.0 - poly * e;
    let cdf = 0.5 * (1.0 + if x < 0.0 { -erf } else { erf });
    (cdf, INV_SQRT_2PI * e)
}

#[inline(always)]
fn gelu_body(x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = x * cdf_pdf(x).0;
    }
}

#[inline(always)]
fn gelu_bwd_body(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((d, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
        let (cdf, pdf) = cdf_pdf(x);
        *d = g * (cdf + x * pdf);
    }
}

multiversion! {
    /// `y = x Φ(x)` elementwise (exact GELU).
    pub fn gelu(x: &[f32], y: &mut [f32]) => gelu_body
}

multiversion! {
    /// `dx = dy (Φ(x) + x φ(x))` elementwise, the derivative of `gelu`.
    pub fn gelu_bwd(x: &[f32], dy: &[f32], dx: &mut [f32]) => gelu_bwd_body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> i64 {
        (i64::from(a.to_bits() as i32) - i64::from(b.to_bits() as i32)).abs()
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_over_the_range_softmax_and_gelu_use() {
        let mut worst = (0i64, 0f32);
        let n = 2_000_000;
        for i in 0..=n {
            let x = -87.0 + 175.0 * i as f32 / n as f32;
            let u = ulps(exp(x), x.exp());
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(worst.0 <= 2, "exp({}) is {} ulp off", worst.1, worst.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(-1e9), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn softmax_and_gelu_match_their_libm_forms_dispatched_and_on_the_baseline_path() {
        // Lengths around the 16-lane chunks, and rows with a masked (-1e9) tail.
        for len in [1, 7, 16, 17, 33, 128] {
            let row: Vec<f32> = (0..len)
                .map(|i| {
                    if i > 4 && i % 5 == 0 {
                        -1e9
                    } else {
                        (i as f32 * 0.37).sin() * 6.0
                    }
                })
                .collect();
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
            let s: f32 = e.iter().sum();
            let mut got = row.clone();
            softmax_in_place(&mut got);
            let mut baseline = row.clone();
            softmax_in_place_body(&mut baseline);
            for (i, ((g, b), w)) in got.iter().zip(&baseline).zip(&e).enumerate() {
                assert!(
                    (g - w / s).abs() <= 1e-6,
                    "len {len} [{i}]: {g} vs {}",
                    w / s
                );
                assert!(
                    (b - w / s).abs() <= 1e-6,
                    "baseline len {len} [{i}]: {b} vs {}",
                    w / s
                );
            }
        }
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 60.0).collect();
        let mut y = vec![0f32; x.len()];
        gelu(&x, &mut y);
        let dy: Vec<f32> = (0..1000).map(|i| 1.0 + (i % 3) as f32).collect();
        let mut dx = vec![0f32; x.len()];
        gelu_bwd(&x, &dy, &mut dx);
        let (mut y0, mut dx0) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        gelu_body(&x, &mut y0);
        gelu_bwd_body(&x, &dy, &mut dx0);
        for i in 0..x.len() {
            assert!(
                (y0[i] - y[i]).abs() <= 1e-6 * y[i].abs().max(1.0),
                "baseline gelu({})",
                x[i]
            );
            assert!(
                (dx0[i] - dx[i]).abs() <= 1e-6 * dx[i].abs().max(1.0),
                "baseline gelu'({})",
                x[i]
            );
            // The same formulas with libm's exp.
            let z = x[i].abs() * std::f32::consts::FRAC_1_SQRT_2;
            let e = (-z * z).exp();
            let t = 1.0 / (1.0 + 0.327_591_1 * z);
            let poly = t
                * (0.254_829_6
                    + t * (-0.284_496_74
                        + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
            let erf = 1.0 - poly * e;
            let cdf = 0.5 * (1.0 + if x[i] < 0.0 { -erf } else { erf });
            let want_y = x[i] * cdf;
            let want_dx = dy[i] * (cdf + x[i] * INV_SQRT_2PI * e);
            assert!(
                (y[i] - want_y).abs() <= 1e-6 * want_y.abs().max(1.0),
                "gelu({})",
                x[i]
            );
            assert!(
                (dx[i] - want_dx).abs() <= 1e-6 * want_dx.abs().max(1.0),
                "gelu'({})",
                x[i]
            );
        }
    }
}
