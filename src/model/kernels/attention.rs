//! Fused attention core on the CPU: `softmax(scale·QKᵀ + bias)` with dropout, times `V`, for every
//! (batch, head) pair in one rayon task, reading the heads straight out of the `[b, s, hidden]`
//! projections through gemm strides. The composed path splits the heads with three transposed
//! copies, keeps the scores, the probabilities and the dropped-out probabilities on the tape, and
//! copies the context back; this op keeps only the probabilities (and the dropout flags, one byte
//! each) for its hand-written backward.

use super::f32s;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    seq: usize,
    hidden: usize,
    heads: usize,
}

impl Dims {
    fn head_dim(self) -> usize {
        self.hidden / self.heads
    }
    /// Elements of one `[s, s]` probability block.
    fn block(self) -> usize {
        self.seq * self.seq
    }
    /// Offset of head `h` of batch row `b` in a `[b, s, hidden]` buffer.
    fn offset(self, b: usize, h: usize) -> usize {
        b * self.seq * self.hidden + h * self.head_dim()
    }
}

/// A pointer that rayon tasks may share: every task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: tasks write disjoint elements (distinct (batch, head) column blocks), and the buffer
// outlives the parallel loop.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// `dst[m×n] = beta · lhs[m×k] · rhs[k×n]` with explicit (column, row) strides, single-threaded
/// (the callers parallelise over heads).
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_strides: (isize, isize),
    lhs: *const f32,
    lhs_strides: (isize, isize),
    rhs: *const f32,
    rhs_strides: (isize, isize),
    beta: f32,
) {
    super::strided_gemm(
        (m, n, k),
        dst,
        dst_strides,
        false,
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
        beta,
        Parallelism::None,
    );
}

/// Dropout flags of the probabilities (`[b, h, s, s]` row-major) and the keep scale `1 / (1 - p)`.
#[derive(Debug, Clone)]
pub struct Keep {
    pub flags: Arc<Vec<u8>>,
    pub scale: f32,
}

struct Attention {
    heads: usize,
    scale: f32,
    /// The additive key bias per batch row, `[b, s]`.
    bias: Arc<Vec<f32>>,
    keep: Option<Keep>,
    /// Softmax probabilities before dropout, `[b, h, s, s]`, left by the forward for the backward.
    probs: Mutex<Option<Arc<Vec<f32>>>>,
}

impl Attention {
    fn dims(&self, layout: &Layout) -> Result<Dims> {
        let (batch, seq, hidden) = layout.shape().dims3()?;
        if self.heads == 0 || hidden % self.heads != 0 {
            bail!(
                "fused-attention: hidden {hidden} does not split into {} heads",
                self.heads
            );
        }
        if self.bias.len() != batch * seq {
            bail!(
                "fused-attention: bias of {} for {batch} × {seq}",
                self.bias.len()
            );
        }
        let d = Dims {
            batch,
            seq,
            hidden,
            heads: self.heads,
        };
        if let Some(k) = &self.keep {
            if k.flags.len() != batch * self.heads * d.block() {
                bail!(
                    "fused-attention: {} dropout flags for {batch}×{}×{seq}×{seq}",
                    k.flags.len(),
                    self.heads
                );
            }
        }
        Ok(d)
    }

    /// The dropped-out probabilities of block `t` into `out` (a copy of `p` without dropout).
    fn dropped(&self, t: usize, p: &[f32], out: &mut [f32]) {
        match &self.keep {
            Some(k) => {
                let flags = &k.flags[t * p.len()..(t + 1) * p.len()];
                for ((o, &v), &f) in out.iter_mut().zip(p).zip(flags) {
                    *o = if f != 0 { v * k.scale } else { 0.0 };
                }
            }
            None => out.copy_from_slice(p),
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let (q, k, v) = (
            f32s(s1, l1, self.name())?,
            f32s(s2, l2, self.name())?,
            f32s(s3, l3, self.name())?,
        );
        if l2.shape() != l1.shape() || l3.shape() != l1.shape() {
            bail!("fused-attention: q, k, v shapes differ");
        }
        let d = self.dims(l1)?;
        let (s, hd, hid) = (d.seq, d.head_dim(), d.hidden as isize);
        let mut probs = vec![0f32; d.batch * d.heads * d.block()];
        let mut out = vec![0f32; q.len()];
        let out_ptr = Shared(out.as_mut_ptr());
        probs.par_chunks_mut(d.block()).enumerate().for_each_init(
            || vec![0f32; d.block()],
            |scratch, (t, p)| {
                let (b, h) = (t / d.heads, t % d.heads);
                let off = d.offset(b, h);
                // SAFETY: every pointer stays inside its buffer: rows of `s` at stride
                // `hidden` from a head's offset, `hd` columns.
                unsafe {
                    // scores = scale · Q Kᵀ
                    mm(
                        s,
                        s,
                        hd,
                        p.as_mut_ptr(),
                        (1, s as isize),
                        q[off..].as_ptr(),
                        (1, hid),
                        k[off..].as_ptr(),
                        (hid, 1),
                        self.scale,
                    );
                }
                let bias = &self.bias[b * s..(b + 1) * s];
                for row in p.chunks_exact_mut(s) {
                    for (x, &bb) in row.iter_mut().zip(bias) {
                        *x += bb;
                    }
                    super::vecmath::softmax_in_place(row);
                }
                self.dropped(t, p, scratch);
                let o = out_ptr;
                // SAFETY: head `h` of batch `b` owns these output elements.
                unsafe {
                    mm(
                        s,
                        hd,
                        s,
                        o.0.add(off),
                        (1, hid),
                        scratch.as_ptr(),
                        (1, s as isize),
                        v[off..].as_ptr(),
                        (1, hid),
                        1.0,
                    );
                }
            },
        );
        let mut saved = self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused-attention: lock poisoned".into()))?;
        *saved = Some(Arc::new(probs));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let probs = self
            .probs
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused-attention: lock poisoned".into()))?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("fused-attention: backward before forward".into())
            })?;
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (dout, q, k, v) = (
            cpu_f32(&gs, gl)?,
            cpu_f32(&qs, ql)?,
            cpu_f32(&ks, kl)?,
            cpu_f32(&vs, vl)?,
        );
        let d = self.dims(ql)?;
        let (s, hd, hid) = (d.seq, d.head_dim(), d.hidden as isize);
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f32; q.len()];
        let mut dv = vec![0f32; q.len()];
        let (dqp, dkp, dvp) = (
            Shared(dq.as_mut_ptr()),
            Shared(dk.as_mut_ptr()),
            Shared(dv.as_mut_ptr()),
        );
        probs.par_chunks(d.block()).enumerate().for_each_init(
            || (vec![0f32; d.block()], vec![0f32; d.block()]),
            |(pd, dp), (t, p)| {
                let (b, h) = (t / d.heads, t % d.heads);
                let off = d.offset(b, h);
                let (dqp, dkp, dvp) = (dqp, dkp, dvp);
                self.dropped(t, p, pd);
                // SAFETY: as in the forward; head `h` of batch `b` owns its gradient columns.
                unsafe {
                    // dV = Pdᵀ dO
                    mm(
                        s,
                        hd,
                        s,
                        dvp.0.add(off),
                        (1, hid),
                        pd.as_ptr(),
                        (s as isize, 1),
                        dout[off..].as_ptr(),
                        (1, hid),
                        1.0,
                    );
                    // dPd = dO Vᵀ
                    mm(
                        s,
                        s,
                        hd,
                        dp.as_mut_ptr(),
                        (1, s as isize),
                        dout[off..].as_ptr(),
                        (1, hid),
                        v[off..].as_ptr(),
                        (hid, 1),
                        1.0,
                    );
                }
                if let Some(keep) = &self.keep {
                    let flags = &keep.flags[t * p.len()..(t + 1) * p.len()];
                    for (g, &f) in dp.iter_mut().zip(flags) {
                        *g = if f != 0 { *g * keep.scale } else { 0.0 };
                    }
                }
                // Softmax backward, in place: dZ = P ⊙ (dP − Σ dP ⊙ P) per row.
                for (g, pr) in dp.chunks_exact_mut(s).zip(p.chunks_exact(s)) {
                    let dot: f32 = g.iter().zip(pr).map(|(a, b)| a * b).sum();
                    for (gi, &pi) in g.iter_mut().zip(pr) {
                        *gi = pi * (*gi - dot);
                    }
                }
                unsafe {
                    // dQ = scale · dZ K, dK = scale · dZᵀ Q
                    mm(
                        s,
                        hd,
                        s,
                        dqp.0.add(off),
                        (1, hid),
                        dp.as_ptr(),
                        (1, s as isize),
                        k[off..].as_ptr(),
                        (1, hid),
                        self.scale,
                    );
                    mm(
                        s,
                        hd,
                        s,
                        dkp.0.add(off),
                        (1, hid),
                        dp.as_ptr(),
                        (s as isize, 1),
                        q[off..].as_ptr(),
                        (1, hid),
                        self.scale,
                    );
                }
            },
        );
        let shape = ql.shape().clone();
        let dev = candle_core::Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dq, shape.clone(), &dev)?),
            Some(Tensor::from_vec(dk, shape.clone(), &dev)?),
            Some(Tensor::from_vec(dv, shape, &dev)?),
        ))
    }
}

/// The contiguous f32 elements of a CPU storage (the backward reads its inputs in place).
fn cpu_f32<'a>(storage: &'a candle_core::Storage, layout: &Layout) -> Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(c) => f32s(c, layout, "fused-attention-bwd"),
        _ => bail!("fused-attention: backward on a non-CPU tensor"),
    }
}

/// `softmax(scale · Q Kᵀ + bias)` (with dropout when `keep` is given) times `V`, per head, for
/// contiguous f32 CPU projections `q`, `k`, `v` of shape `[b, s, hidden]` and `bias` `[b, 1, 1, s]`
/// from `ops::attention_bias`. Returns the context `[b, s, hidden]` (heads side by side).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    scale: f32,
    keep: Option<Keep>,
) -> Result<Tensor> {
    let bias: Vec<f32> = bias.flatten_all()?.to_vec1()?;
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        Attention {
            heads,
            scale,
            bias: Arc::new(bias),
            keep,
            probs: Mutex::new(None),
        },
    )
}
