//! A dense layer's three products as a column-major GEMM sees them: which row-major tensor is
//! cuBLAS's `A` and which its `B`, the transposes, the sizes and the leading dimensions, and which
//! epilogue vector fits which product.
//!
//! Why: cuBLASLt (`kernels::cuda_lt`) computes `D = op(A)·op(B)` over column-major matrices and can
//! add a bias in the same kernel (`BIAS`, a vector of `m`) or sum its `B` operand over `k` into a
//! bias gradient (`BGRADB`, a vector of `n`). A row-major `[r, c]` tensor is a column-major
//! `[c, r]` one, so each product is a transposition puzzle that a wrong leading dimension turns
//! into reads past a buffer on a GPU. The mapping lives here, free of CUDA, so that the CPU tests
//! below run it through a reference of cuBLAS's column-major semantics (`reference`) and check it
//! against the row-major formulas; the CUDA side only reads a `Gemm`.

use candle_core::{bail, Result};

/// A dense layer `y = x·Wᵀ + b` (`x` `[rows, inp]`, `W` `[out, inp]`, `y` `[rows, out]`) and its
/// gradients, `dy` `[rows, out]` being `y`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Product {
    /// `y = x·Wᵀ` (`BIAS` adds `b`).
    Forward,
    /// `dx = dy·W`, `[rows, inp]`.
    InputGrad,
    /// `dW = dyᵀ·x`, `[out, inp]` (`BGRADB` also gives `db = Σ_rows dy`).
    WeightGrad,
}

/// Which tensor a GEMM operand is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// `x`, the layer's input.
    Input,
    /// `W`.
    Weight,
    /// `dy`, the gradient of the layer's output.
    OutGrad,
}

/// A column-major `C[m×n] = op(A)[m×k]·op(B)[k×n]`, `C` contiguous (`ldc = m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gemm {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

/// A row-major product `Y[m×n] = L·op(R)` (each operand row-major with its own row stride):
/// the three shapes a dense layer and attention's heads need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `Y = L·Rᵀ`: `L` `[m, k]`, `R` `[n, k]`.
    ABt,
    /// `Y = L·R`: `L` `[m, k]`, `R` `[k, n]`.
    AB,
    /// `Y = Lᵀ·R`: `L` `[k, m]`, `R` `[k, n]`.
    AtB,
}

/// The column-major GEMM of a row-major product: `Y` row-major is `Yᵀ` column-major, so
/// `Yᵀ = op(R)ᵀ·op(L)ᵀ` makes `R` cuBLAS's `A` and `L` its `B` in every form. `ld_*` are the
/// operands' row strides in elements.
pub fn row_major(
    form: Form,
    (m, n, k): (usize, usize, usize),
    ld_l: usize,
    ld_r: usize,
    ld_y: usize,
) -> Gemm {
    // R [n, k] row-major is [k, n] column-major: transposed, [n, k]. R [k, n] is [n, k] column
    // -major as it stands. L [m, k] is [k, m] column-major as it stands; L [k, m] is [m, k],
    // transposed to [k, m].
    let (transa, transb) = match form {
        Form::ABt => (true, false),
        Form::AB => (false, false),
        Form::AtB => (false, true),
    };
    Gemm {
        transa,
        transb,
        m: n,
        n: m,
        k,
        lda: ld_r,
        ldb: ld_l,
        ldc: ld_y,
    }
}

/// `product` of a layer with these sizes: the GEMM and which tensors are its `A` and `B`.
pub fn gemm(product: Product, rows: usize, inp: usize, out: usize) -> (Gemm, [Operand; 2]) {
    match product {
        // y[rows, out] = x·Wᵀ.
        Product::Forward => (
            row_major(Form::ABt, (rows, out, inp), inp, inp, out),
            [Operand::Weight, Operand::Input],
        ),
        // dx[rows, inp] = dy·W.
        Product::InputGrad => (
            row_major(Form::AB, (rows, inp, out), out, inp, inp),
            [Operand::Weight, Operand::OutGrad],
        ),
        // dW[out, inp] = dyᵀ·x: the sum over the rows is over k, and dy is B, so BGRADB's vector
        // of n = out is db.
        Product::WeightGrad => (
            row_major(Form::AtB, (out, inp, rows), out, inp, inp),
            [Operand::Input, Operand::OutGrad],
        ),
    }
}

// ---- attention's heads -----------------------------------------------------------------------------

/// Where each head's matrix starts in a buffer, in elements: `base + b·per_b + h·per_h` for
/// batch `b` and head `h` (a batched product's pointer array, batch index `b·heads + h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub base: usize,
    pub per_b: usize,
    pub per_h: usize,
}

impl Heads {
    /// The offset of batch index `i` (`b·heads + h`).
    pub fn offset(&self, i: usize, heads: usize) -> usize {
        self.base + (i / heads) * self.per_b + (i % heads) * self.per_h
    }
}

/// Attention's six per-head products, each as one batched GEMM over every (batch, head) that
/// reads q, k and v where the fused `[b, s, 3·hidden]` product holds them and reads or writes the
/// context (and its gradient) in `[b, s, hidden]`: no split into heads and no merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadProduct {
    /// `scores = Q·Kᵀ` (`L` q, `R` k; `Y` `[b, heads, s, s]`).
    Scores,
    /// `ctx = P·V` (`L` the probabilities, `R` v; `Y` the context `[b, s, hidden]`).
    Context,
    /// `dP = G·Vᵀ` (`L` the context's gradient, `R` v; `Y` `[b, heads, s, s]`).
    DProbs,
    /// `dQ = dS·K` (`L` the scores' gradient, `R` k; `Y` q's part of `[b, s, 3·hidden]`).
    DQ,
    /// `dK = dSᵀ·Q` (`L` the scores' gradient, `R` q; `Y` k's part).
    DK,
    /// `dV = Pᵀ·G` (`L` the probabilities, `R` the context's gradient; `Y` v's part).
    DV,
}

impl HeadProduct {
    /// The six, forward then backward.
    pub const ALL: [HeadProduct; 6] = [
        HeadProduct::Scores,
        HeadProduct::Context,
        HeadProduct::DProbs,
        HeadProduct::DQ,
        HeadProduct::DK,
        HeadProduct::DV,
    ];
}

/// A per-head product: the GEMM every batch index shares, and where `L`, `R` and `Y` start for
/// each (cuBLAS's `B`, `A` and `C`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadGemm {
    pub gemm: Gemm,
    pub l: Heads,
    pub r: Heads,
    pub y: Heads,
}

/// `p` for `heads` heads of `d` over sequences of `s`.
pub fn head_gemm(p: HeadProduct, s: usize, heads: usize, d: usize) -> HeadGemm {
    let h = heads * d;
    // q, k and v (or their gradients) in [b, s, 3h]; the context in [b, s, h]; the [s, s]
    // matrices of [b, heads, s, s].
    let part = |i: usize| Heads {
        base: i * h,
        per_b: s * 3 * h,
        per_h: d,
    };
    let ctx = Heads {
        base: 0,
        per_b: s * h,
        per_h: d,
    };
    let square = Heads {
        base: 0,
        per_b: heads * s * s,
        per_h: s * s,
    };
    let (q, k, v) = (part(0), part(1), part(2));
    let (three, one) = (3 * h, h);
    let (form, mnk, (l, ld_l), (r, ld_r), (y, ld_y)) = match p {
        HeadProduct::Scores => (Form::ABt, (s, s, d), (q, three), (k, three), (square, s)),
        HeadProduct::Context => (Form::AB, (s, d, s), (square, s), (v, three), (ctx, one)),
        HeadProduct::DProbs => (Form::ABt, (s, s, d), (ctx, one), (v, three), (square, s)),
        HeadProduct::DQ => (Form::AB, (s, d, s), (square, s), (k, three), (q, three)),
        HeadProduct::DK => (Form::AtB, (s, d, s), (square, s), (q, three), (k, three)),
        HeadProduct::DV => (Form::AtB, (s, d, s), (square, s), (ctx, one), (v, three)),
    };
    HeadGemm {
        gemm: row_major(form, mnk, ld_l, ld_r, ld_y),
        l,
        r,
        y,
    }
}

/// Whether every (batch, head) matrix the six products read or write starts on a 16-byte
/// boundary, given buffers of `elem`-byte elements that do. A batched product's pointer arrays live
/// on the device, where cuBLAS cannot look at them when it picks a kernel, and its documentation
/// asks that 16-bit operands be properly aligned; with an odd sequence length a head's `[s, s]`
/// matrix starts 2 bytes past a boundary, and with a head size that is not a multiple of 8 (in
/// bf16) so does every head's q, k and v but the first.
pub fn heads_aligned(s: usize, heads: usize, d: usize, elem: usize) -> bool {
    HeadProduct::ALL.iter().all(|&p| {
        let g = head_gemm(p, s, heads, d);
        [g.l, g.r, g.y]
            .iter()
            .flat_map(|x| [x.base, x.per_b, x.per_h])
            .all(|offset| (offset * elem).is_multiple_of(16))
    })
}

impl Gemm {
    /// The stored (column-major) sizes of `A` and `B`: `[rows, cols]` each.
    pub fn stored(&self) -> [[usize; 2]; 2] {
        let a = if self.transa {
            [self.k, self.m]
        } else {
            [self.m, self.k]
        };
        let b = if self.transb {
            [self.n, self.k]
        } else {
            [self.k, self.n]
        };
        [a, b]
    }

    /// What cuBLAS asks of the sizes: none zero, each leading dimension at least its matrix's
    /// stored rows.
    pub fn validate(&self) -> Result<()> {
        let [a, b] = self.stored();
        if self.m == 0 || self.n == 0 || self.k == 0 {
            bail!("gemm: an empty product {}×{}×{}", self.m, self.n, self.k);
        }
        for (what, ld, rows) in [
            ("lda", self.lda, a[0]),
            ("ldb", self.ldb, b[0]),
            ("ldc", self.ldc, self.m),
        ] {
            if ld < rows {
                bail!("gemm: {what} {ld} below the matrix's {rows} rows");
            }
        }
        Ok(())
    }

    /// Elements each operand's buffer must hold from its first: `[A, B, C]`.
    pub fn extents(&self) -> [usize; 3] {
        let [a, b] = self.stored();
        let extent = |[rows, cols]: [usize; 2], ld: usize| (cols - 1) * ld + rows;
        [
            extent(a, self.lda),
            extent(b, self.ldb),
            extent([self.m, self.n], self.ldc),
        ]
    }
}

/// The largest power of two up to 256 that divides `addr`: what cuBLASLt may assume of an
/// operand's address (its preferences' minimum alignments).
pub fn alignment(addr: u64) -> u32 {
    if addr == 0 {
        256
    } else {
        (1u64 << addr.trailing_zeros().min(8)) as u32
    }
}

/// Where a weight gradient of `elems` elements of `elem_bytes` each puts its bias's gradient in
/// the buffer it shares with it (`BGRADB`'s vector): the next 256-byte boundary.
pub fn bias_grad_offset(elems: usize, elem_bytes: usize) -> usize {
    elems.next_multiple_of(256 / elem_bytes.clamp(1, 256))
}

/// The column-major product as cuBLAS defines it, in f64 (for tests): `C = op(A)·op(B)`, plus
/// `bias[i]` on row `i` of `C` where given (`BIAS`); also the sums of `op(B)` over `k`, one per
/// column of `C` (`BGRADB`).
pub fn reference(g: &Gemm, a: &[f32], b: &[f32], bias: Option<&[f32]>) -> (Vec<f64>, Vec<f64>) {
    let op_a = |i: usize, l: usize| {
        f64::from(if g.transa {
            a[l + i * g.lda]
        } else {
            a[i + l * g.lda]
        })
    };
    let op_b = |l: usize, j: usize| {
        f64::from(if g.transb {
            b[j + l * g.ldb]
        } else {
            b[l + j * g.ldb]
        })
    };
    let mut c = vec![0f64; g.ldc * g.n];
    for j in 0..g.n {
        for i in 0..g.m {
            let dot: f64 = (0..g.k).map(|l| op_a(i, l) * op_b(l, j)).sum();
            c[i + j * g.ldc] = dot + bias.map_or(0.0, |v| f64::from(v[i]));
        }
    }
    let bgrad = (0..g.n)
        .map(|j| (0..g.k).map(|l| op_b(l, j)).sum())
        .collect();
    (c, bgrad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// Row-major `[r, c]` element.
    fn at(t: &[f32], c: usize, i: usize, j: usize) -> f64 {
        f64::from(t[i * c + j])
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * (1.0 + b.abs())
    }

    /// Each product through the column-major reference equals the row-major formula, element by
    /// element (`C`'s column-major order being the row-major result's), with its epilogue.
    #[test]
    fn each_product_through_cublas_semantics_is_the_row_major_formula() {
        for &(rows, inp, out) in &[(5, 3, 4), (1, 7, 2), (6, 6, 6), (9, 2, 11)] {
            let x = random(rows * inp, 1);
            let w = random(out * inp, 2);
            let dy = random(rows * out, 3);
            let bias = random(out, 4);
            let of = |t: Operand| match t {
                Operand::Input => &x,
                Operand::Weight => &w,
                Operand::OutGrad => &dy,
            };
            // Forward with BIAS: y[r, o] = Σ_i x[r, i]·W[o, i] + b[o].
            let (g, [a, b]) = gemm(Product::Forward, rows, inp, out);
            g.validate().unwrap();
            let (c, _) = reference(&g, of(a), of(b), Some(&bias));
            assert_eq!(c.len(), rows * out);
            for r in 0..rows {
                for o in 0..out {
                    let want: f64 = (0..inp)
                        .map(|i| at(&x, inp, r, i) * at(&w, inp, o, i))
                        .sum();
                    let want = want + f64::from(bias[o]);
                    assert!(close(c[r * out + o], want), "forward [{r}, {o}]");
                }
            }
            // dx[r, i] = Σ_o dy[r, o]·W[o, i].
            let (g, [a, b]) = gemm(Product::InputGrad, rows, inp, out);
            g.validate().unwrap();
            let (c, _) = reference(&g, of(a), of(b), None);
            for r in 0..rows {
                for i in 0..inp {
                    let want: f64 = (0..out)
                        .map(|o| at(&dy, out, r, o) * at(&w, inp, o, i))
                        .sum();
                    assert!(close(c[r * inp + i], want), "input grad [{r}, {i}]");
                }
            }
            // dW[o, i] = Σ_r dy[r, o]·x[r, i]; BGRADB: db[o] = Σ_r dy[r, o].
            let (g, [a, b]) = gemm(Product::WeightGrad, rows, inp, out);
            g.validate().unwrap();
            let (c, db) = reference(&g, of(a), of(b), None);
            for o in 0..out {
                for i in 0..inp {
                    let want: f64 = (0..rows)
                        .map(|r| at(&dy, out, r, o) * at(&x, inp, r, i))
                        .sum();
                    assert!(close(c[o * inp + i], want), "weight grad [{o}, {i}]");
                }
                let want: f64 = (0..rows).map(|r| at(&dy, out, r, o)).sum();
                assert!(close(db[o], want), "bias grad [{o}]");
            }
        }
    }

    /// The epilogue vectors' lengths are the bias's: `m` for `BIAS` on the forward, `n` for
    /// `BGRADB` on the weight gradient; and every operand's extent is its tensor's size, so no
    /// read leaves a buffer.
    #[test]
    fn epilogue_lengths_and_extents_fit_the_tensors() {
        let (rows, inp, out) = (16384, 768, 3072);
        let size = |t: Operand| match t {
            Operand::Input => rows * inp,
            Operand::Weight => out * inp,
            Operand::OutGrad => rows * out,
        };
        let (f, ops) = gemm(Product::Forward, rows, inp, out);
        assert_eq!(f.m, out);
        let (w, wops) = gemm(Product::WeightGrad, rows, inp, out);
        assert_eq!(w.n, out);
        let (d, dops) = gemm(Product::InputGrad, rows, inp, out);
        for (g, [a, b], c) in [
            (f, ops, rows * out),
            (w, wops, out * inp),
            (d, dops, rows * inp),
        ] {
            g.validate().unwrap();
            assert_eq!(g.extents(), [size(a), size(b), c]);
        }
    }

    /// Each per-head product, run through the column-major reference batch by batch at its
    /// offsets, equals attention's formula for that (batch, head); and `Y`'s writes cover its
    /// region exactly once (the context and q, k, v parts are interleaved across heads).
    #[test]
    fn each_head_product_through_cublas_semantics_is_attention_per_head() {
        let (nb, s, heads, d) = (2, 5, 3, 4);
        let h = heads * d;
        let qkv = random(nb * s * 3 * h, 11);
        let square = random(nb * heads * s * s, 12);
        let ctx = random(nb * s * h, 13);
        // Row-major element getters per (b, head).
        let q = |b: usize, hd: usize, t: usize, e: usize, part: usize| {
            f64::from(qkv[(b * s + t) * 3 * h + part * h + hd * d + e])
        };
        let sq = |b: usize, hd: usize, t: usize, u: usize| {
            f64::from(square[((b * heads + hd) * s + t) * s + u])
        };
        let g =
            |b: usize, hd: usize, t: usize, e: usize| f64::from(ctx[(b * s + t) * h + hd * d + e]);
        for p in HeadProduct::ALL {
            let hg = head_gemm(p, s, heads, d);
            hg.gemm.validate().unwrap();
            let (l_buf, r_buf, y_len): (&[f32], &[f32], usize) = match p {
                HeadProduct::Scores => (&qkv, &qkv, nb * heads * s * s),
                HeadProduct::Context => (&square, &qkv, nb * s * h),
                HeadProduct::DProbs => (&ctx, &qkv, nb * heads * s * s),
                HeadProduct::DQ | HeadProduct::DK => (&square, &qkv, nb * s * 3 * h),
                HeadProduct::DV => (&square, &ctx, nb * s * 3 * h),
            };
            let mut y = vec![f64::NAN; y_len];
            let mut written = vec![0u8; y_len];
            for i in 0..nb * heads {
                let (lo, ro, yo) = (
                    hg.l.offset(i, heads),
                    hg.r.offset(i, heads),
                    hg.y.offset(i, heads),
                );
                let [ea, eb, ec] = hg.gemm.extents();
                assert!(ro + ea <= r_buf.len() && lo + eb <= l_buf.len() && yo + ec <= y_len);
                let (c, _) = reference(&hg.gemm, &r_buf[ro..], &l_buf[lo..], None);
                for col in 0..hg.gemm.n {
                    for row in 0..hg.gemm.m {
                        let at = yo + row + col * hg.gemm.ldc;
                        y[at] = c[row + col * hg.gemm.ldc];
                        written[at] += 1;
                    }
                }
            }
            for b in 0..nb {
                for hd in 0..heads {
                    // Y[t, j] of this head, and where it lies.
                    let (rows, cols) = match p {
                        HeadProduct::Scores | HeadProduct::DProbs => (s, s),
                        _ => (s, d),
                    };
                    for t in 0..rows {
                        for j in 0..cols {
                            let (want, at) = match p {
                                HeadProduct::Scores => (
                                    (0..d).map(|e| q(b, hd, t, e, 0) * q(b, hd, j, e, 1)).sum(),
                                    ((b * heads + hd) * s + t) * s + j,
                                ),
                                HeadProduct::Context => (
                                    (0..s).map(|u| sq(b, hd, t, u) * q(b, hd, u, j, 2)).sum(),
                                    (b * s + t) * h + hd * d + j,
                                ),
                                HeadProduct::DProbs => (
                                    (0..d).map(|e| g(b, hd, t, e) * q(b, hd, j, e, 2)).sum(),
                                    ((b * heads + hd) * s + t) * s + j,
                                ),
                                HeadProduct::DQ => (
                                    (0..s).map(|u| sq(b, hd, t, u) * q(b, hd, u, j, 1)).sum(),
                                    (b * s + t) * 3 * h + hd * d + j,
                                ),
                                HeadProduct::DK => (
                                    (0..s).map(|u| sq(b, hd, u, t) * q(b, hd, u, j, 0)).sum(),
                                    (b * s + t) * 3 * h + h + hd * d + j,
                                ),
                                HeadProduct::DV => (
                                    (0..s).map(|u| sq(b, hd, u, t) * g(b, hd, u, j)).sum(),
                                    (b * s + t) * 3 * h + 2 * h + hd * d + j,
                                ),
                            };
                            assert!(close(y[at], want), "{p:?} b {b} head {hd} [{t}, {j}]");
                        }
                    }
                }
            }
            // Each written element once; a part of [b, s, 3h] exactly, other parts untouched.
            let expect_written = match p {
                HeadProduct::DQ | HeadProduct::DK | HeadProduct::DV => nb * s * h,
                _ => y_len,
            };
            assert!(
                written.iter().all(|&w| w <= 1),
                "{p:?}: an element written twice"
            );
            assert_eq!(
                written.iter().filter(|&&w| w == 1).count(),
                expect_written,
                "{p:?}"
            );
        }
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1010), 16);
        assert_eq!(alignment(0), 256);
    }

    #[test]
    fn a_bias_gradient_starts_on_a_256_byte_boundary_after_its_weight_gradient() {
        for bytes in [2, 4] {
            let per = 256 / bytes;
            for elems in [1, 63, 64, 127, 128, 129, 768 * 768, 3072 * 768 + 5] {
                let at = bias_grad_offset(elems, bytes);
                assert!(at >= elems && at < elems + per, "{elems} × {bytes}: {at}");
                assert_eq!(at * bytes % 256, 0);
            }
        }
    }

    #[test]
    fn validate_names_a_short_leading_dimension() {
        let (mut g, _) = gemm(Product::InputGrad, 4, 3, 2);
        g.ldb = 1;
        let err = g.validate().unwrap_err().to_string();
        assert!(err.contains("ldb 1"), "{err}");
        let (mut g, _) = gemm(Product::Forward, 0, 3, 2);
        g.ldc = 2;
        assert!(g.validate().is_err());
    }

    /// roberta-base's heads at a sequence length of whole 4s (8 bytes of `[s, s]` bf16 rows: `s²`
    /// elements a head) start on 16-byte boundaries; an odd length, a length of 2 mod 4, a head
    /// size that is not a multiple of 8 bf16 elements do not; f32 needs a multiple of 4 in each.
    #[test]
    fn heads_are_aligned_only_where_every_head_matrix_starts_on_16_bytes() {
        assert!(heads_aligned(128, 12, 64, 2));
        assert!(heads_aligned(4, 12, 64, 2));
        assert!(heads_aligned(120, 12, 64, 2));
        assert!(!heads_aligned(13, 12, 64, 2));
        assert!(!heads_aligned(126, 12, 64, 2));
        assert!(!heads_aligned(128, 12, 4, 2));
        assert!(heads_aligned(128, 12, 8, 2));
        assert!(heads_aligned(126, 12, 64, 4));
        assert!(!heads_aligned(125, 12, 64, 4));
        assert!(!heads_aligned(128, 3, 2, 4));
    }
}
