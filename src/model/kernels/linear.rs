//! Fused dense layer on the CPU: `y = x·Wᵀ + b` as one gemm over every leading dimension, the bias
//! written into the output before the gemm accumulates onto it, and a backward that calls gemm
//! directly for `dx = dy·W` and `dW = dyᵀ·x` and sums `db` column-wise in one pass.
//!
//! The composed path records a reshape, a transpose, a matmul, a second reshape and a broadcast
//! add, each of which costs candle's backward a zero-filled gradient buffer and an add; the bias
//! gradient goes through a strided reduction over the rows. This op is one node on the tape.

use super::{f32s, rows_of};
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use gemm::Parallelism;
use rayon::prelude::*;

/// Threads for one gemm: candle's own count (rayon's pool size unless set otherwise).
fn parallelism() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// An output buffer of `n` elements for a gemm that overwrites it (zero-filled: Rust has no safe
/// uninitialised f32 buffer, and the fill is one streaming pass).
fn buffer(n: usize) -> Vec<f32> {
    vec![0f32; n]
}

/// Elements a `rows × cols` operand with non-negative (column, row) strides reaches: one past its
/// last element.
fn span(rows: usize, cols: usize, (cs, rs): (isize, isize)) -> usize {
    if rows == 0 || cols == 0 {
        return 0;
    }
    (rows - 1) * rs as usize + (cols - 1) * cs as usize + 1
}

/// `dst[m×n] = (acc ? dst : 0) + lhs[m×k]·rhs[k×n]` with (column, row) strides for each operand.
/// Panics, rather than letting gemm read or write out of bounds, when a slice is too short for
/// its strides.
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    acc: bool,
    lhs: &[f32],
    lhs_strides: (isize, isize),
    rhs: &[f32],
    rhs_strides: (isize, isize),
) {
    assert!(
        dst.len() >= m * n
            && lhs.len() >= span(m, k, lhs_strides)
            && rhs.len() >= span(k, n, rhs_strides),
        "fused-linear: operand slices too short for a {m}×{k}·{k}×{n} product"
    );
    // SAFETY: every element gemm touches lies inside a slice (asserted above; all strides are
    // non-negative), and `dst` is row-major `m × n`.
    unsafe {
        super::strided_gemm(
            (m, n, k),
            dst.as_mut_ptr(),
            (1, n as isize),
            acc,
            lhs.as_ptr(),
            lhs_strides,
            rhs.as_ptr(),
            rhs_strides,
            1.0,
            parallelism(),
        )
    }
}

/// Sizes of one dense layer: `rows` input rows of `inp` features, `out` outputs.
#[derive(Debug, Clone, Copy)]
struct Dense {
    rows: usize,
    inp: usize,
    out: usize,
}

impl Dense {
    fn check(x: &Layout, w: &Layout, op: &str) -> Result<Self> {
        let (rows, inp) = rows_of(x.shape())?;
        let [out, w_in] = w.shape().dims() else {
            bail!("{op}: weight must be [out, in], got {:?}", w.shape());
        };
        if *w_in != inp {
            bail!("{op}: weight {:?} for rows of {inp}", w.shape());
        }
        Ok(Self {
            rows,
            inp,
            out: *out,
        })
    }

    fn out_shape(self, x: &Shape) -> Shape {
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.out;
        }
        Shape::from(dims)
    }

    /// `x·Wᵀ (+ b)`.
    fn forward(self, x: &[f32], w: &[f32], b: Option<&[f32]>) -> Vec<f32> {
        let mut y = buffer(self.rows * self.out);
        if let Some(b) = b {
            y.par_chunks_mut(self.out * 64).for_each(|rows| {
                rows.chunks_exact_mut(self.out)
                    .for_each(|r| r.copy_from_slice(b))
            });
        }
        // rhs = Wᵀ, element (i, j) = W[j, i]: column stride `inp`, row stride 1.
        matmul(
            self.rows,
            self.out,
            self.inp,
            &mut y,
            b.is_some(),
            x,
            (1, self.inp as isize),
            w,
            (self.inp as isize, 1),
        );
        y
    }
}

/// The forward op: inputs `x` `[.., in]`, `w` `[out, in]` and, as the third operand, `b` `[out]`.
struct Linear;

impl Linear {
    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "fused-linear";
        let d = Dense::check(x.1, w.1, name)?;
        let xs = f32s(x.0, x.1, name)?;
        let ws = f32s(w.0, w.1, name)?;
        let bs = match b {
            Some((s, l)) => {
                let bs = f32s(s, l, name)?;
                if bs.len() != d.out {
                    bail!("{name}: bias of {} for {} outputs", bs.len(), d.out);
                }
                Some(bs)
            }
            None => None,
        };
        Ok((
            CpuStorage::F32(d.forward(xs, ws, bs)),
            d.out_shape(x.1.shape()),
        ))
    }

    /// `dx`, `dW` and, with a bias, `db` from the output gradient.
    fn grads(
        x: &Tensor,
        w: &Tensor,
        with_bias: bool,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = grad.apply_op2_no_bwd(w, &GradInput)?.reshape(x.shape())?;
        let dw = grad.apply_op2_no_bwd(&x.contiguous()?, &GradWeight)?;
        let db = if with_bias {
            Some(grad.apply_op1_no_bwd(&ColumnSum)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Self::grads(x, w, false, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = Self::grads(x, w, true, grad)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// `dx = dy·W`: inputs `dy` `[.., out]` and `W` `[out, in]`, output `[rows, in]`.
struct GradInput;

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "fused-linear-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, out) = rows_of(l1.shape())?;
        let [w_out, inp] = l2.shape().dims() else {
            bail!(
                "{}: weight must be [out, in], got {:?}",
                self.name(),
                l2.shape()
            );
        };
        if *w_out != out {
            bail!(
                "{}: weight {:?} for gradients of {out}",
                self.name(),
                l2.shape()
            );
        }
        let (dy, w) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let mut dx = buffer(rows * inp);
        matmul(
            rows,
            *inp,
            out,
            &mut dx,
            false,
            dy,
            (1, out as isize),
            w,
            (1, *inp as isize),
        );
        Ok((CpuStorage::F32(dx), Shape::from((rows, *inp))))
    }
}

/// `dW = dyᵀ·x`: inputs `dy` `[.., out]` and `x` `[.., in]` with the same rows, output `[out, in]`.
struct GradWeight;

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "fused-linear-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, out) = rows_of(l1.shape())?;
        let (x_rows, inp) = rows_of(l2.shape())?;
        if x_rows != rows {
            bail!(
                "{}: {rows} gradient rows for {x_rows} input rows",
                self.name()
            );
        }
        let (dy, x) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let mut dw = buffer(out * inp);
        // lhs = dyᵀ, element (i, r) = dy[r, i]: column stride `out`, row stride 1.
        matmul(
            out,
            inp,
            rows,
            &mut dw,
            false,
            dy,
            (out as isize, 1),
            x,
            (1, inp as isize),
        );
        Ok((CpuStorage::F32(dw), Shape::from((out, inp))))
    }
}

/// `db = Σ_rows dy`: the column sums of `[.., out]`, output `[out]`.
struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "fused-linear-grad-bias"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, out) = rows_of(layout.shape())?;
        let dy = f32s(storage, layout, self.name())?;
        // Partial sums over blocks of rows in parallel, then the partials added in block order
        // (a fixed order: the result does not depend on the thread count's scheduling).
        let block = super::rows_per_task(out).max(64) * out;
        let partials: Vec<Vec<f32>> = dy
            .par_chunks(block)
            .map(|rows| {
                let mut acc = vec![0f32; out];
                for r in rows.chunks_exact(out) {
                    for (a, v) in acc.iter_mut().zip(r) {
                        *a += v;
                    }
                }
                acc
            })
            .collect();
        let mut db = vec![0f32; out];
        for p in &partials {
            for (a, v) in db.iter_mut().zip(p) {
                *a += v;
            }
        }
        Ok((CpuStorage::F32(db), Shape::from(out)))
    }
}

/// `x·Wᵀ + b` for contiguous f32 CPU tensors `x` `[.., in]`, `w` `[out, in]`, `b` `[out]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, Linear),
        None => x.apply_op2(&w, Linear),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_is_one_past_the_last_element_reached() {
        // Row-major 3×4: the last element is at 11.
        assert_eq!(span(3, 4, (1, 4)), 12);
        // The transpose of a row-major 4×3 seen as 3×4: element (2, 3) is at 3·3 + 2 = 11.
        assert_eq!(span(3, 4, (3, 1)), 12);
        assert_eq!(span(0, 4, (1, 4)), 0);
    }

    #[test]
    #[should_panic(expected = "too short")]
    fn a_short_operand_panics_instead_of_reaching_past_its_end() {
        let mut dst = vec![0f32; 4];
        matmul(
            2,
            2,
            3,
            &mut dst,
            false,
            &[1.0; 5],
            (1, 3),
            &[1.0; 6],
            (1, 2),
        );
    }
}
