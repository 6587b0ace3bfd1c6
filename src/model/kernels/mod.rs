//! Fused CPU kernels with hand-written backward passes, so that a training step spends its time in
//! matmuls rather than in the chains of broadcast temporaries the composed ops in `ops` record.
//!
//! Each op here takes contiguous f32 CPU tensors (the callers in `ops` check and fall back to the
//! composed ops otherwise) and computes row by row, rows split over rayon's pool. The backward of
//! each op is itself a graph-less custom op, so the tape records one node per fused op.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

mod attention;
pub mod attention_node;
pub mod block_node;
pub mod colmajor;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_heads;
#[cfg(feature = "cuda")]
pub mod cuda_lt;
pub mod embedding_node;
pub mod geometry;
mod linear;
pub mod stack;
mod vecmath;
pub mod weight_grad;
pub use attention::{attention, Keep};
pub use linear::linear;

/// An on/off switch of the whole process for a lever of the kernels: the last `set` wins, else
/// the environment variable named, read once (`1`, `on`, `true` turn it on; `0`, `off`, `false`
/// off; anything else keeps the default, with a warning naming the variable), else the default.
/// For levers a GPU session must be able to turn on or off from its script without a rebuild.
#[derive(Debug)]
pub struct EnvSwitch {
    /// 0: not yet read from the environment; 1 on; 2 off.
    state: std::sync::atomic::AtomicU8,
    var: &'static str,
    default_on: bool,
}

impl EnvSwitch {
    /// A switch on by default.
    pub const fn new(var: &'static str) -> Self {
        Self {
            state: std::sync::atomic::AtomicU8::new(0),
            var,
            default_on: true,
        }
    }

    /// A switch off by default: on only where its variable says so.
    pub const fn off_by_default(var: &'static str) -> Self {
        Self {
            default_on: false,
            ..Self::new(var)
        }
    }

    /// The environment variable that sets it.
    pub fn var(&self) -> &'static str {
        self.var
    }

    /// Whether it is on where nothing sets it.
    pub fn default_on(&self) -> bool {
        self.default_on
    }

    pub fn set(&self, on: bool) {
        use std::sync::atomic::Ordering;
        self.state.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        use std::sync::atomic::Ordering;
        match self.state.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let on = match std::env::var(self.var) {
                    Err(_) => self.default_on,
                    Ok(v) => switch_word(&v).unwrap_or_else(|| {
                        eprintln!(
                            "warning: {}={v:?} is neither on (1, on, true) nor off (0, off, \
                             false); it stays {}",
                            self.var,
                            if self.default_on { "on" } else { "off" }
                        );
                        self.default_on
                    }),
                };
                self.set(on);
                on
            }
        }
    }
}

/// What an environment variable's value says of a switch: on, off, or (`None`) neither.
pub fn switch_word(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "true" => Some(true),
        "0" | "off" | "false" => Some(false),
        _ => None,
    }
}

/// Rows handed to one rayon task: large enough that scheduling costs nothing next to the work.
const MIN_ELEMS_PER_TASK: usize = 16 * 1024;

/// The contiguous f32 elements of a storage as its layout sees them.
fn f32s<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(v) => v.as_slice(),
        other => bail!("{op}: fused kernel needs f32, got {:?}", other.dtype()),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: fused kernel needs a contiguous input"),
    }
}

/// `dst[m×n] = (acc ? dst : 0) + beta · lhs[m×k]·rhs[k×n]`, each operand given by a pointer and
/// its (column, row) strides: the one place the kernels call gemm.
///
/// # Safety
/// Every element the sizes and strides reach lies inside its buffer, and `dst` overlaps neither
/// `lhs` nor `rhs`.
#[allow(clippy::too_many_arguments)]
unsafe fn strided_gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_strides: (isize, isize),
    acc: bool,
    lhs: *const f32,
    lhs_strides: (isize, isize),
    rhs: *const f32,
    rhs_strides: (isize, isize),
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_strides.0,
        dst_strides.1,
        acc,
        lhs,
        lhs_strides.0,
        lhs_strides.1,
        rhs,
        rhs_strides.0,
        rhs_strides.1,
        if acc { 1.0 } else { 0.0 },
        beta,
        false,
        false,
        false,
        parallelism,
    )
}

/// Rows per rayon task for rows of `width` elements.
fn rows_per_task(width: usize) -> usize {
    MIN_ELEMS_PER_TASK.div_ceil(width.max(1)).max(1)
}

/// Last dimension of a shape (the row width) and the number of rows.
fn rows_of(shape: &Shape) -> Result<(usize, usize)> {
    let width = *shape.dims().last().unwrap_or(&1);
    if width == 0 {
        bail!("fused kernel: empty last dimension in {shape:?}");
    }
    Ok((shape.elem_count() / width, width))
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension; inputs `x`, `w`, `b`.
struct LayerNorm {
    eps: f32,
}

/// Mean and 1/std of one row.
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let (x, w, b) = (
            f32s(s1, l1, self.name())?,
            f32s(s2, l2, self.name())?,
            f32s(s3, l3, self.name())?,
        );
        let (_, dim) = rows_of(l1.shape())?;
        if w.len() != dim || b.len() != dim {
            bail!(
                "fused-layer-norm: weight/bias of {} for rows of {dim}",
                w.len()
            );
        }
        let mut y = vec![0f32; x.len()];
        let step = rows_per_task(dim) * dim;
        y.par_chunks_mut(step)
            .zip(x.par_chunks(step))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_exact_mut(dim).zip(xc.chunks_exact(dim)) {
                    let (mean, rstd) = moments(xr, self.eps);
                    for i in 0..dim {
                        yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dim = w.elem_count();
        let rows = x.elem_count() / dim;
        let grad = grad.contiguous()?;
        // One op returns dx stacked on dw and db: `[rows + 2, dim]`.
        let all = x.apply_op3_no_bwd(w, &grad, &LayerNormBwd { eps: self.eps })?;
        let dx = all.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = all.narrow(0, rows, 1)?.reshape(w.shape())?;
        let db = all.narrow(0, rows + 1, 1)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Backward of `LayerNorm`: inputs `x`, `w`, `dy`; output `[rows + 2, dim]` = dx, then dw, db.
struct LayerNormBwd {
    eps: f32,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-bwd"
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
        let (x, w, dy) = (
            f32s(s1, l1, self.name())?,
            f32s(s2, l2, self.name())?,
            f32s(s3, l3, self.name())?,
        );
        let (rows, dim) = rows_of(l1.shape())?;
        if w.len() != dim || dy.len() != x.len() {
            bail!("fused-layer-norm-bwd: mismatched shapes");
        }
        let mut out = vec![0f32; (rows + 2) * dim];
        let (dx, _) = out.split_at_mut(rows * dim);
        let step = rows_per_task(dim) * dim;
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(step)
            .zip(x.par_chunks(step).zip(dy.par_chunks(step)))
            .map(|(dxc, (xc, dyc))| {
                let mut acc = vec![0f32; 2 * dim];
                let mut g = vec![0f32; dim];
                let mut xhat = vec![0f32; dim];
                for ((dxr, xr), dyr) in dxc
                    .chunks_exact_mut(dim)
                    .zip(xc.chunks_exact(dim))
                    .zip(dyc.chunks_exact(dim))
                {
                    let (mean, rstd) = moments(xr, self.eps);
                    let (mut mean_g, mut mean_gx) = (0f32, 0f32);
                    for i in 0..dim {
                        xhat[i] = (xr[i] - mean) * rstd;
                        g[i] = dyr[i] * w[i];
                        mean_g += g[i];
                        mean_gx += g[i] * xhat[i];
                        acc[i] += dyr[i] * xhat[i];
                        acc[dim + i] += dyr[i];
                    }
                    mean_g /= dim as f32;
                    mean_gx /= dim as f32;
                    for i in 0..dim {
                        dxr[i] = rstd * (g[i] - mean_g - xhat[i] * mean_gx);
                    }
                }
                acc
            })
            .collect();
        let sums = &mut out[rows * dim..];
        for p in partials {
            for (s, v) in sums.iter_mut().zip(p) {
                *s += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, dim))))
    }
}

/// Fused layer norm of contiguous f32 CPU tensors `x` `[.., dim]`, `w` and `b` `[dim]`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

// ---------------------------------------------------------------------------------------------
// Softmax of scaled, masked attention scores

/// `softmax(scale * scores + bias)` over the last dimension, scores `[b, h, q, k]`, bias
/// `[b, 1, 1, k]` (one row of bias per batch element, shared by heads and queries).
struct MaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, bias) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let (rows, k) = rows_of(l1.shape())?;
        let batch = bias.len() / k;
        if batch == 0 || bias.len() != batch * k || rows % batch != 0 {
            bail!(
                "fused-masked-softmax: bias {:?} for scores {:?}",
                l2.shape(),
                l1.shape()
            );
        }
        let rows_per_batch = rows / batch;
        let mut y = vec![0f32; x.len()];
        let per_task = rows_per_task(k);
        y.par_chunks_mut(per_task * k)
            .zip(x.par_chunks(per_task * k))
            .enumerate()
            .for_each(|(t, (yc, xc))| {
                for (j, (yr, xr)) in yc.chunks_exact_mut(k).zip(xc.chunks_exact(k)).enumerate() {
                    let row = t * per_task + j;
                    let br = &bias[(row / rows_per_batch) * k..][..k];
                    for i in 0..k {
                        yr[i] = xr[i] * self.scale + br[i];
                    }
                    vecmath::softmax_in_place(yr);
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = res
            .contiguous()?
            .apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd { scale: self.scale })?;
        // The bias comes from the padding mask and is not trained.
        Ok((Some(dx), None))
    }
}

/// Backward of `MaskedSoftmax`: inputs `p` (the output), `dy`; `scale * p * (dy - Σ dy·p)`.
struct SoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (p, dy) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let (_, k) = rows_of(l1.shape())?;
        if p.len() != dy.len() {
            bail!("fused-softmax-bwd: mismatched shapes");
        }
        let mut dx = vec![0f32; p.len()];
        let step = rows_per_task(k) * k;
        dx.par_chunks_mut(step)
            .zip(p.par_chunks(step).zip(dy.par_chunks(step)))
            .for_each(|(dxc, (pc, dyc))| {
                for ((dxr, pr), dyr) in dxc
                    .chunks_exact_mut(k)
                    .zip(pc.chunks_exact(k))
                    .zip(dyc.chunks_exact(k))
                {
                    let dot: f32 = pr.iter().zip(dyr).map(|(a, b)| a * b).sum();
                    for i in 0..k {
                        dxr[i] = self.scale * pr[i] * (dyr[i] - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Fused `softmax(scale * scores + bias)` of contiguous f32 CPU tensors, scores `[b, h, q, k]`
/// and bias `[b, 1, 1, k]`.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op2(
        &bias.contiguous()?,
        MaskedSoftmax {
            scale: scale as f32,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// GELU (erf)

/// Exact GELU `x Φ(x)`.
struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(storage, layout, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(MIN_ELEMS_PER_TASK)
            .zip(x.par_chunks(MIN_ELEMS_PER_TASK))
            .for_each(|(yc, xc)| vecmath::gelu(xc, yc));
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &GeluBwd)?,
        ))
    }
}

/// Backward of `Gelu`: inputs `x`, `dy`; `dy (Φ(x) + x φ(x))`.
struct GeluBwd;

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "fused-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        if x.len() != dy.len() {
            bail!("fused-gelu-bwd: mismatched shapes");
        }
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(MIN_ELEMS_PER_TASK)
            .zip(
                x.par_chunks(MIN_ELEMS_PER_TASK)
                    .zip(dy.par_chunks(MIN_ELEMS_PER_TASK)),
            )
            .for_each(|(dxc, (xc, dyc))| vecmath::gelu_bwd(xc, dyc, dxc));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Fused exact GELU of a contiguous f32 CPU tensor.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

// ---------------------------------------------------------------------------------------------
// Dropout

/// Inverted dropout with a precomputed keep mask: `x * keep * scale`. The mask lives in the op
/// (one byte per element, shared with the backward), not as an f32 tensor on the tape.
struct Dropout {
    keep: std::sync::Arc<Vec<u8>>,
    scale: f32,
}

impl Dropout {
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(MIN_ELEMS_PER_TASK)
            .zip(
                x.par_chunks(MIN_ELEMS_PER_TASK)
                    .zip(self.keep.par_chunks(MIN_ELEMS_PER_TASK)),
            )
            .for_each(|(yc, (xc, kc))| {
                for ((y, &x), &k) in yc.iter_mut().zip(xc).zip(kc) {
                    *y = if k != 0 { x * self.scale } else { 0.0 };
                }
            });
        y
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(storage, layout, self.name())?;
        if x.len() != self.keep.len() {
            bail!(
                "fused-dropout: mask of {} for {} elements",
                self.keep.len(),
                x.len()
            );
        }
        Ok((CpuStorage::F32(self.apply(x)), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let same = Dropout {
            keep: self.keep.clone(),
            scale: self.scale,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&same)?))
    }
}

/// Fused inverted dropout of a contiguous f32 CPU tensor with keep flags `keep` (1 = kept, one
/// per element in row-major order) and `scale = 1 / (1 - p)`.
pub fn dropout(x: &Tensor, keep: Vec<u8>, scale: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Dropout {
        keep: std::sync::Arc::new(keep),
        scale,
    })
}

#[cfg(test)]
mod switch_tests {
    use super::*;

    #[test]
    fn an_env_switch_reads_its_variable_once_and_set_overrides() {
        for (v, says) in [
            ("0", Some(false)),
            ("off", Some(false)),
            (" False ", Some(false)),
            ("1", Some(true)),
            ("ON", Some(true)),
            ("true", Some(true)),
            ("yes", None),
            ("", None),
        ] {
            assert_eq!(switch_word(v), says, "{v:?}");
        }
        static S: EnvSwitch = EnvSwitch::new("RECYCLE_TEST_SWITCH_NEVER_SET");
        assert!(S.get());
        S.set(false);
        assert!(!S.get());
        S.set(true);
        assert!(S.get());
        static OFF: EnvSwitch = EnvSwitch::off_by_default("RECYCLE_TEST_SWITCH_NEVER_SET");
        assert!(!OFF.default_on() && !OFF.get());
        OFF.set(true);
        assert!(OFF.get());
    }
}
