//! Attention as one node of candle's graph, for devices where recycle has device kernels for the
//! parts but no fused attention kernel (CUDA). The forward runs as ordinary tensor ops on detached
//! inputs (head split, `QKᵀ`, the scaled masked softmax, dropout, `PV`); one custom op, whose output
//! is the head merge of that result, carries the hand-written backward.
//!
//! Why: candle's backward gives every node's input a zero-filled gradient and then adds to it
//! (`GradStore::or_insert`), three passes over the tensor per node. Composed, attention is about a
//! dozen nodes per layer over `[b, s, hidden]` and `[b, h, s, s]` tensors (reshapes, head splits, a
//! transpose, two products, softmax, dropout, the merge); here it is one, and the backward computes
//! each gradient once.
//!
//! What depends on the device is behind `Prims` (shared with `block_node`): dropout whose mask is a
//! function of a seed (so a backward applies the forward's mask again instead of storing it), the
//! backward passes of softmax, layer norm and GELU, and the fused kernels a device may have for
//! pieces the default methods compose (softmax with its dropout, dropout with the residual add,
//! the split and merge of q, k, v parts). `CpuPrims` exists so that the nodes' forward and backward
//! are tested on the CPU against autograd over composed ops; the CPU trains with its own fused
//! kernels (`kernels::attention` and the rest).

use crate::model::ops;
use candle_core::{
    bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor, Var, D,
};
use rand::{Rng, SeedableRng};

/// The device-specific parts of the attention and block nodes.
pub trait Prims: Send + Sync + 'static {
    /// `x` with each element dropped with probability `p` and the rest scaled by `1 / (1 - p)`,
    /// the mask a function of `seed` and the element's index: the same seed drops the same
    /// elements.
    fn dropout(&self, x: &Tensor, p: f32, seed: u64) -> Result<Tensor>;

    /// The gradient of the scores `s` given `dp`, that of `drop(p)` with
    /// `p = softmax(scale · s + bias)` (`drop` the identity when `None`): with `g = drop(dp)`
    /// (dropout is linear, so its backward is itself), `scale · p · (g − Σ g·p)` over the last
    /// dimension.
    fn softmax_backward(
        &self,
        p: &Tensor,
        dp: &Tensor,
        scale: f64,
        drop: Option<SeededDropout>,
    ) -> Result<Tensor>;

    /// `softmax(scale · scores + bias)` over the last dimension (as `ops::scaled_masked_softmax`),
    /// and that through `drop`; devices with a kernel that writes both in one pass override this.
    fn softmax_dropout(
        &self,
        scores: &Tensor,
        bias: &Tensor,
        scale: f64,
        drop: SeededDropout,
    ) -> Result<(Tensor, Tensor)> {
        let probs = ops::scaled_masked_softmax(scores, bias, scale)?;
        let dropped = drop.apply(self, &probs)?;
        Ok((probs, dropped))
    }

    /// The gradients of `x`, `w` and `b` of `layer_norm(x, w, b, eps)` over the last dimension,
    /// given that of its output `dy`; `x`'s in `x`'s dtype, `w`'s and `b`'s in `x`'s dtype or in
    /// f32 (CUDA keeps the f32 its kernel sums in, for the f32 master weights).
    fn layer_norm_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        eps: f64,
    ) -> Result<[Tensor; 3]>;

    /// `drop(h) + r`: a residual branch's dropout and the residual add (devices with a kernel
    /// that does both in one pass override this).
    fn dropout_add(&self, h: &Tensor, r: &Tensor, drop: Option<SeededDropout>) -> Result<Tensor> {
        maybe_drop(self, drop, h)? + r
    }

    /// `layer_norm_backward` followed by the gradient through the dropout before the residual
    /// add: the gradients of `x` and of the dropped-out branch `drop(dx)`, then those of `w` and
    /// `b` (devices with a kernel that writes both in one pass override this).
    fn layer_norm_backward_dropout(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        eps: f64,
        drop: Option<SeededDropout>,
    ) -> Result<[Tensor; 4]> {
        let [dx, dw, db] = self.layer_norm_backward(x, w, dy, eps)?;
        let dh = maybe_drop(self, drop, &dx)?;
        Ok([dx, dh, dw, db])
    }

    /// `u = y + b` (`b` over the last dimension) and `gelu(u)` (exact): a dense layer's bias and
    /// its activation, both kept for the backward (devices with a kernel that writes both in one
    /// pass override this).
    fn bias_gelu(&self, y: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        let u = y.broadcast_add(b)?;
        let g = ops::gelu(&u)?;
        Ok((u, g))
    }

    /// `u = x·Wᵀ + b` and `gelu(u)` for detached operands: the feed-forward block's first layer
    /// and its activation, both kept for the backward. Here the bare product and `bias_gelu`;
    /// a device whose product can add the bias itself overrides it (CUDA: cuBLASLt's `BIAS`
    /// epilogue, then GELU alone, one pass over `[rows, 4h]` fewer).
    fn dense_gelu(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        let product = ops::linear(x, w, None)?;
        self.bias_gelu(&product, b)
    }

    /// A block's tail, `s = drop(h) + x` and `y = LN(s)` with the layer norm's weight and bias
    /// `norm`, in one pass where the device has one (CUDA: the same bits as `dropout_add` and the
    /// layer norm); `None` where it has not, and the caller runs the two. Here `None`, or for
    /// tests on a thread that asked for it (`set_add_norm_on_cpu`) the two composed and handed
    /// back together, so that the block nodes' use of the one pass is checked on the CPU.
    fn dropout_add_norm(
        &self,
        h: &Tensor,
        x: &Tensor,
        drop: Option<SeededDropout>,
        norm: (&Tensor, &Tensor),
        eps: f64,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if !ADD_NORM_ON_CPU.with(|c| c.get()) {
            return Ok(None);
        }
        let s = self.dropout_add(h, x, drop)?;
        let y = ops::layer_norm(&s, norm.0, norm.1, eps)?;
        Ok(Some((s, y)))
    }

    /// Part `part` of `parts` side by side in the last dimension of `t` `[b, s, parts · heads · d]`,
    /// split into heads: `[b, heads, s, d]` (q, k or v from one product).
    fn split_part(&self, t: &Tensor, part: usize, parts: usize, heads: usize) -> Result<Tensor> {
        let (b, s, width) = t.dims3()?;
        let d = width / (parts * heads);
        ops::swap12(
            &t.narrow(2, part * heads * d, heads * d)?
                .reshape((b, s, heads, d))?,
        )
    }

    /// Three `[b, heads, s, d]` tensors merged side by side into `[b, s, 3 · heads · d]`.
    fn merge_parts(&self, parts: [&Tensor; 3]) -> Result<Tensor> {
        let (b, h, s, d) = parts[0].dims4()?;
        let merged = parts
            .iter()
            .map(|t| ops::swap12(t)?.reshape((b, s, h * d)))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&merged, 2)
    }

    /// The gradient of `x` of exact GELU given that of its output: `dy · (Φ(x) + x·φ(x))`.
    fn gelu_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor>;

    /// The sum over the rows of `g` `[rows, n]`: a bias's gradient, `[n]`.
    fn column_sum(&self, g: &Tensor) -> Result<Tensor>;

    /// A dense layer's input gradient outside the graph: `dy·W` (`dy` `[rows, out]`, `W`
    /// `[out, in]`).
    fn dense_input_grad(&self, dy: &Tensor, w: &Tensor) -> Result<Tensor> {
        dy.matmul(w)
    }

    /// `dy·W + plus` (`plus` `[rows, in]`): a block's input gradient through its branch plus the
    /// residual's, in one product where the device can add inside it.
    fn dense_input_grad_plus(&self, dy: &Tensor, w: &Tensor, plus: &Tensor) -> Result<Tensor> {
        self.add(&self.dense_input_grad(dy, w)?, plus)
    }

    /// `gelu_backward(u, dy·W)`: the gradient of GELU's input `u` (`[rows, in]`, kept from the
    /// forward) where GELU's output feeds a dense layer (`dy` `[rows, out]`, `W` `[out, in]`), in
    /// one product where the device has an epilogue for it (CUDA bf16: cuBLASLt's `DGELU`, whose
    /// derivative is the tanh form's, `kernels::cuda_lt`).
    fn dense_input_grad_gelu(&self, dy: &Tensor, w: &Tensor, u: &Tensor) -> Result<Tensor> {
        self.gelu_backward(u, &self.dense_input_grad(dy, w)?)
    }

    /// A dense layer's weight and bias gradients outside the graph: `dyᵀ·x` and the sum of `dy`
    /// over its rows (`dy` `[rows, out]`, `x` `[rows, in]`).
    fn dense_param_grads(&self, dy: &Tensor, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            super::weight_grad::weight_grad(dy, x)?,
            self.column_sum(dy)?,
        ))
    }

    /// `a + b` (one shape, one dtype) outside the graph: the residual's gradient added to the
    /// branch's in a block node's backward.
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        a + b
    }

    /// Attention over the q, k and v parts of one product `qkv` `[b, s, 3 · hidden]` (as
    /// `split_part` reads them) in one pass, where the device has such a kernel, it is on
    /// (`set_flash`; `set_flash_on_cpu` for `CpuPrims`) and `qkv` fits the kernel: the context
    /// `[b, s, hidden]` and the log-sum-exp of each row of scaled, masked scores, `[b, heads, s]`
    /// in f32, from which `flash_backward` recomputes the probabilities. `None`: attention runs
    /// on the heads (`Core`).
    fn flash_forward(
        &self,
        _qkv: &Tensor,
        _bias: &Tensor,
        _heads: usize,
        _scale: f64,
        _drop: Option<SeededDropout>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    /// The gradient of `qkv` (`[b, s, 3 · hidden]`) given `dctx`, that of the context, from what
    /// `flash_forward` returned for it.
    #[allow(clippy::too_many_arguments)]
    fn flash_backward(
        &self,
        _qkv: &Tensor,
        _bias: &Tensor,
        _ctx: &Tensor,
        _lse: &Tensor,
        _dctx: &Tensor,
        _heads: usize,
        _scale: f64,
        _drop: Option<SeededDropout>,
    ) -> Result<Tensor> {
        bail!("attention: no one-pass attention on this device")
    }

    /// Whether attention's per-head products over this `qkv` `[b, s, 3 · hidden]` run in place
    /// (`head_scores`, `head_context`, `head_dprobs`, `head_grads`: reading q, k and v where the
    /// fused product holds them, the context written merged) rather than on heads split out of
    /// it (`Core`). On by default where the device has them (CUDA, bf16; `set_heads_in_place`);
    /// `CpuPrims` only for tests (`set_heads_in_place_on_cpu`), through the tensor-op forms below.
    fn heads_in_place(&self, _qkv: &Tensor, _heads: usize) -> bool {
        HEADS_IN_PLACE_ON_CPU.with(|c| c.get())
    }

    /// `Q·Kᵀ` of every head of `qkv`: the unscaled scores, `[b, heads, s, s]`.
    fn head_scores(&self, qkv: &Tensor, heads: usize) -> Result<Tensor> {
        let q = self.split_part(qkv, 0, 3, heads)?;
        let k = self.split_part(qkv, 1, 3, heads)?;
        q.matmul(&k.t()?)
    }

    /// `P·V` of every head (`p` `[b, heads, s, s]`, v from `qkv`), merged: `[b, s, hidden]`.
    fn head_context(&self, p: &Tensor, qkv: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, s, width) = qkv.dims3()?;
        let v = self.split_part(qkv, 2, 3, heads)?;
        ops::swap12(&p.matmul(&v)?)?.reshape((b, s, width / 3))
    }

    /// `G·Vᵀ` of every head (`dctx` `[b, s, hidden]` the context's gradient): the gradient of the
    /// probabilities the context read, `[b, heads, s, s]`.
    fn head_dprobs(&self, dctx: &Tensor, qkv: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, s, hidden) = dctx.dims3()?;
        let g = ops::swap12(&dctx.reshape((b, s, heads, hidden / heads))?)?;
        let v = self.split_part(qkv, 2, 3, heads)?;
        g.matmul(&v.t()?)
    }

    /// The gradient of `qkv` given those of the scores (`ds`) and the context (`dctx`), `p` the
    /// probabilities the context read: `[dS·K | dSᵀ·Q | Pᵀ·G]` per head, `[b, s, 3 · hidden]`.
    fn head_grads(
        &self,
        ds: &Tensor,
        p: &Tensor,
        dctx: &Tensor,
        qkv: &Tensor,
        heads: usize,
    ) -> Result<Tensor> {
        let (b, s, hidden) = dctx.dims3()?;
        let g = ops::swap12(&dctx.reshape((b, s, heads, hidden / heads))?)?;
        let q = self.split_part(qkv, 0, 3, heads)?;
        let k = self.split_part(qkv, 1, 3, heads)?;
        let dq = ds.matmul(&k)?;
        let dk = ds.t()?.matmul(&q)?;
        let dv = p.t()?.matmul(&g)?;
        self.merge_parts([&dq, &dk, &dv])
    }

    /// `parts` flattened and laid end to end in one vector of `dtype` (a block node's packed
    /// weights, or its gradients cast for the master weights); no gradient flows through it.
    fn concat_flat(&self, parts: &[&Tensor], dtype: DType) -> Result<Tensor> {
        let flat = parts
            .iter()
            .map(|p| p.detach().to_dtype(dtype)?.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&flat, 0)
    }
}

/// One-pass attention's switch: off by default (`RECYCLE_FLASH=1` on).
pub static FLASH: super::EnvSwitch = super::EnvSwitch::off_by_default("RECYCLE_FLASH");

thread_local! {
    /// Attention blocks this thread ran in one pass (`Prims::flash_forward`), for checks that must
    /// know it ran.
    static FLASH_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// See `set_flash_on_cpu`.
    static FLASH_ON_CPU: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// See `set_heads_in_place_on_cpu`.
    static HEADS_IN_PLACE_ON_CPU: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Attention blocks this thread ran with their heads in place, for checks that must know.
    static IN_PLACE_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// See `set_add_norm_on_cpu`.
    static ADD_NORM_ON_CPU: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// For tests, on the calling thread only: `Prims::dropout_add_norm`'s default hands back the
/// residual sum and the layer norm together (composed), as a device with the one pass would.
pub fn set_add_norm_on_cpu(on: bool) {
    ADD_NORM_ON_CPU.with(|c| c.set(on));
}

pub static HEADS_IN_PLACE: super::EnvSwitch = super::EnvSwitch::new("RECYCLE_HEADS_IN_PLACE");

/// Turns attention's per-head products in place (`Prims::heads_in_place`) on or off for the whole
/// process, on devices that have them (on by default, `RECYCLE_HEADS_IN_PLACE=0` off;
/// `gpu-check` times both).
pub fn set_heads_in_place(on: bool) {
    HEADS_IN_PLACE.set(on);
}

/// Whether the per-head products in place are on (`set_heads_in_place`).
pub fn heads_in_place_on() -> bool {
    HEADS_IN_PLACE.get()
}

/// For tests, on the calling thread only: `CpuPrims` runs attention blocks with their heads in
/// place (the tensor-op forms of `Prims::head_scores` and the rest).
pub fn set_heads_in_place_on_cpu(on: bool) {
    HEADS_IN_PLACE_ON_CPU.with(|c| c.set(on));
}

/// How many attention blocks this thread has run with their heads in place.
pub fn in_place_runs() -> usize {
    IN_PLACE_RUNS.with(|c| c.get())
}

/// Counts one attention block run with its heads in place on this thread.
pub fn count_in_place_run() {
    IN_PLACE_RUNS.with(|c| c.set(c.get() + 1));
}

/// Attention's probabilities from the scores, as every path takes them: the masked softmax, and
/// with dropout also its dropped-out copy (the one the context reads).
pub fn probabilities<P: Prims>(
    prims: &P,
    scores: &Tensor,
    bias: &Tensor,
    scale: f64,
    drop: Option<SeededDropout>,
) -> Result<(Tensor, Option<Tensor>)> {
    Ok(match drop {
        Some(dr) => {
            let (probs, dropped) = prims.softmax_dropout(scores, &bias.detach(), scale, dr)?;
            (probs, Some(dropped))
        }
        None => (
            ops::scaled_masked_softmax(scores, &bias.detach(), scale)?,
            None,
        ),
    })
}

/// For tests, on the calling thread only: `CpuPrims` runs attention blocks in one pass (its
/// tensor-op form of the contract), whatever `set_flash` says.
pub fn set_flash_on_cpu(on: bool) {
    FLASH_ON_CPU.with(|c| c.set(on));
}

/// Turns one-pass attention (`Prims::flash_forward`) in the attention block nodes on or off for
/// the whole process. Off by default (`RECYCLE_FLASH=1` turns it on): on CUDA it runs on the GPU
/// under `recycle gpu-check` (its parity rows and an A/B row), and in the run's last stages where
/// those rows say it wins, until a GPU run has measured it.
pub fn set_flash(on: bool) {
    FLASH.set(on);
}

/// Whether one-pass attention is on (`set_flash`).
pub fn flash_on() -> bool {
    FLASH.get()
}

/// How many attention blocks this thread has run in one pass.
pub fn flash_runs() -> usize {
    FLASH_RUNS.with(|c| c.get())
}

/// Counts one attention block run in one pass on this thread.
pub fn count_flash_run() {
    FLASH_RUNS.with(|c| c.set(c.get() + 1));
}

/// Dropout whose mask is a function of a seed: its probability and the seed.
#[derive(Debug, Clone, Copy)]
pub struct SeededDropout {
    pub p: f32,
    pub seed: u64,
}

impl SeededDropout {
    /// `x` through this dropout (the same mask every time).
    pub fn apply<P: Prims + ?Sized>(&self, prims: &P, x: &Tensor) -> Result<Tensor> {
        prims.dropout(x, self.p, self.seed)
    }
}

/// `x` through `drop` where there is one, `x` itself otherwise.
pub fn maybe_drop<P: Prims + ?Sized>(
    prims: &P,
    drop: Option<SeededDropout>,
    x: &Tensor,
) -> Result<Tensor> {
    match drop {
        Some(d) => d.apply(prims, x),
        None => Ok(x.clone()),
    }
}

/// `softmax(scale · QKᵀ + bias)·V` per head, with `drop` on the probabilities: `q`, `k`, `v`
/// `[b, s, hidden]`, `bias` `[b, 1, 1, s]` (from `ops::attention_bias`), returning the context
/// `[b, s, hidden]`. When none of `q`, `k`, `v` records a gradient, no node is made.
#[allow(clippy::too_many_arguments)]
pub fn attention<P: Prims>(
    prims: P,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    scale: f64,
    drop: Option<SeededDropout>,
) -> Result<Tensor> {
    let core = Core::forward(&prims, q, k, v, bias, heads, scale, drop)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return core.context();
    }
    q.apply_op3(k, v, Node { prims, core })
}

/// The attention core's forward on detached inputs, with what its backward needs: the heads of
/// `q`, `k`, `v`, the probabilities before and after dropout, and the context per head. Keeping
/// the dropped-out probabilities (a second `[b, h, s, s]` tensor per layer, 50 MB at batch 128 in
/// bf16 for roberta-base, where PyTorch keeps a byte mask of the same count) saves the backward
/// the pass that would recompute them from the seed; the softmax backward reads its incoming
/// gradient through the mask itself (`Prims::softmax_backward`), saving another.
pub struct Core {
    /// `[b, s, heads, head_dim]`.
    dims: [usize; 4],
    scale: f64,
    drop: Option<SeededDropout>,
    /// `[b, h, s, d]`: the context per head, before the merge (until `take_context`).
    ctx_heads: Option<Tensor>,
    qh: Tensor,
    kh: Tensor,
    vh: Tensor,
    /// The probabilities before dropout, `[b, h, s, s]`.
    probs: Tensor,
    /// The probabilities after dropout (`None` without dropout: they are `probs`).
    dropped: Option<Tensor>,
}

impl Core {
    /// Runs the forward (see `attention`) and keeps what the backward needs.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<P: Prims>(
        prims: &P,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        heads: usize,
        scale: f64,
        drop: Option<SeededDropout>,
    ) -> Result<Self> {
        let (b, s, hidden) = q.dims3()?;
        if heads == 0 || hidden % heads != 0 || k.dims() != q.dims() || v.dims() != q.dims() {
            bail!(
                "attention: q {:?}, k {:?}, v {:?} with {heads} heads",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        let d = hidden / heads;
        let split = |t: &Tensor| ops::swap12(&t.detach().reshape((b, s, heads, d))?);
        let (qh, kh, vh) = (split(q)?, split(k)?, split(v)?);
        Self::from_heads(prims, qh, kh, vh, bias, scale, drop)
    }

    /// The forward (see `attention`) from `q`, `k`, `v` already split into heads, `[b, h, s, d]`
    /// each, detached.
    pub fn from_heads<P: Prims>(
        prims: &P,
        qh: Tensor,
        kh: Tensor,
        vh: Tensor,
        bias: &Tensor,
        scale: f64,
        drop: Option<SeededDropout>,
    ) -> Result<Self> {
        let (b, heads, s, d) = qh.dims4()?;
        if kh.dims() != qh.dims() || vh.dims() != qh.dims() {
            bail!(
                "attention: heads of q {:?}, k {:?}, v {:?} differ",
                qh.dims(),
                kh.dims(),
                vh.dims()
            );
        }
        let scores = qh.matmul(&kh.t()?)?;
        let (probs, dropped) = probabilities(prims, &scores, bias, scale, drop)?;
        let ctx_heads = dropped.as_ref().unwrap_or(&probs).matmul(&vh)?;
        Ok(Self {
            dims: [b, s, heads, d],
            scale,
            drop,
            ctx_heads: Some(ctx_heads),
            qh,
            kh,
            vh,
            probs,
            dropped,
        })
    }

    /// The context per head, `[b, h, s, d]`.
    fn ctx_heads(&self) -> Result<&Tensor> {
        self.ctx_heads
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("attention: the context was taken".into()))
    }

    /// The context `[b, s, hidden]` (the heads merged).
    pub fn context(&self) -> Result<Tensor> {
        ops::swap12(self.ctx_heads()?)?.reshape(self.out_shape())
    }

    /// The context `[b, s, hidden]`, no longer kept here (the backward does not need it): for a
    /// caller that keeps the merged context itself.
    pub fn take_context(&mut self) -> Result<Tensor> {
        let ctx = self.context()?;
        self.ctx_heads = None;
        Ok(ctx)
    }

    fn out_shape(&self) -> Shape {
        let [b, s, h, d] = self.dims;
        Shape::from((b, s, h * d))
    }

    /// The gradients of `q`, `k`, `v` (each `[b, s, hidden]`) given that of the context.
    pub fn backward<P: Prims>(&self, prims: &P, grad: &Tensor) -> Result<[Tensor; 3]> {
        let [b, s, h, d] = self.dims;
        let merge = |t: &Tensor| ops::swap12(t)?.reshape((b, s, h * d));
        let [dqh, dkh, dvh] = self.backward_heads(prims, grad)?;
        Ok([merge(&dqh)?, merge(&dkh)?, merge(&dvh)?])
    }

    /// The gradients of `q`, `k`, `v` split into heads (each `[b, h, s, d]`) given that of the
    /// context `[b, s, hidden]`.
    pub fn backward_heads<P: Prims>(&self, prims: &P, grad: &Tensor) -> Result<[Tensor; 3]> {
        let [b, s, h, d] = self.dims;
        let gh = ops::swap12(&grad.reshape((b, s, h, d))?)?;
        let dropped = self.dropped.as_ref().unwrap_or(&self.probs);
        let dvh = dropped.t()?.matmul(&gh)?;
        // The gradient of the dropped-out probabilities; the softmax backward reads it through
        // the forward's mask.
        let ddropped = gh.matmul(&self.vh.t()?)?;
        let dscores = prims.softmax_backward(&self.probs, &ddropped, self.scale, self.drop)?;
        let dqh = dscores.matmul(&self.kh)?;
        let dkh = dscores.t()?.matmul(&self.qh)?;
        Ok([dqh, dkh, dvh])
    }
}

/// The graph node: its forward output is the merge of the context per head (computed before the
/// node was made), its backward the gradients of `q`, `k` and `v`.
struct Node<P> {
    prims: P,
    core: Core,
}

impl<P: Prims> CustomOp3 for Node<P> {
    fn name(&self) -> &'static str {
        "recycle-attention-node"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_storage_of(&self.core.context()?, "attention node")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (storage, layout) = self.core.ctx_heads()?.storage_and_layout();
        let Storage::Cuda(c) = &*storage else {
            bail!("attention node: the context is not on a CUDA device")
        };
        let merged = super::cuda::swap12_storage(c, layout)?;
        Ok((merged, self.core.out_shape()))
    }

    fn bwd(
        &self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dq, dk, dv] = self.core.backward(&self.prims, grad)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// A copy of a CPU tensor's elements as one storage holding exactly them, with its shape: how a
/// node whose output was computed before the node was made hands it over on the CPU.
pub fn cpu_storage_of(t: &Tensor, what: &str) -> Result<(CpuStorage, Shape)> {
    let whole = |t: &Tensor| {
        let (_, layout) = t.storage_and_layout();
        layout.contiguous_offsets() == Some((0, t.elem_count()))
    };
    // A view into a larger buffer (or a strided one) is copied out first.
    let t = if whole(t) { t.clone() } else { t.copy()? };
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(c) => Ok((c.clone(), t.shape().clone())),
        _ => bail!("{what}: the output is not a CPU tensor"),
    }
}

/// The CPU's `Prims`, for testing the node: a mask from a generator seeded with `seed`, and the
/// softmax backward as tensor ops.
#[derive(Debug, Clone, Copy)]
pub struct CpuPrims;

impl CpuPrims {
    /// q, k and v of `qkv` split into heads, and the scaled, masked scores `scale · QKᵀ + bias`
    /// (the one-pass contract's forward and backward both start here).
    fn flash_scores(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        heads: usize,
        scale: f64,
    ) -> Result<([Tensor; 3], Tensor)> {
        let split = |part| self.split_part(qkv, part, 3, heads);
        let (qh, kh, vh) = (split(0)?, split(1)?, split(2)?);
        let z = (qh.matmul(&kh.t()?)? * scale)?.broadcast_add(bias)?;
        Ok(([qh, kh, vh], z))
    }
}

impl Prims for CpuPrims {
    fn dropout(&self, x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let scale = 1.0 / (1.0 - p);
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random::<f32>() >= p { scale } else { 0.0 })
            .collect();
        x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
    }

    fn softmax_backward(
        &self,
        p: &Tensor,
        dp: &Tensor,
        scale: f64,
        drop: Option<SeededDropout>,
    ) -> Result<Tensor> {
        let g = maybe_drop(self, drop, dp)?;
        let dot = (&g * p)?.sum_keepdim(D::Minus1)?;
        (g.broadcast_sub(&dot)? * p)? * scale
    }

    /// The one-pass contract as tensor ops, so that the block node's use of it is tested on the
    /// CPU: the log-sum-exp kept, the probabilities recomputed from it in the backward.
    fn flash_forward(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        heads: usize,
        scale: f64,
        drop: Option<SeededDropout>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if !FLASH_ON_CPU.with(|c| c.get()) {
            return Ok(None);
        }
        let (b, s, width) = qkv.dims3()?;
        let ([_, _, vh], z) = self.flash_scores(qkv, bias, heads, scale)?;
        let m = z.max_keepdim(D::Minus1)?;
        let lse = (z.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?;
        let probs = z.broadcast_sub(&lse)?.exp()?;
        let ctx = maybe_drop(self, drop, &probs)?.matmul(&vh)?;
        let ctx = ops::swap12(&ctx)?.reshape((b, s, width / 3))?;
        Ok(Some((ctx, lse.squeeze(D::Minus1)?)))
    }

    fn flash_backward(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        _ctx: &Tensor,
        lse: &Tensor,
        dctx: &Tensor,
        heads: usize,
        scale: f64,
        drop: Option<SeededDropout>,
    ) -> Result<Tensor> {
        let (b, s, width) = qkv.dims3()?;
        let d = width / (3 * heads);
        let ([qh, kh, vh], z) = self.flash_scores(qkv, bias, heads, scale)?;
        let probs = z.broadcast_sub(&lse.unsqueeze(D::Minus1)?)?.exp()?;
        let gh = ops::swap12(&dctx.reshape((b, s, heads, d))?)?;
        let dvh = maybe_drop(self, drop, &probs)?.t()?.matmul(&gh)?;
        let ddropped = gh.matmul(&vh.t()?)?;
        let dscores = self.softmax_backward(&probs, &ddropped, scale, drop)?;
        let dqh = dscores.matmul(&kh)?;
        let dkh = dscores.t()?.matmul(&qh)?;
        self.merge_parts([&dqh, &dkh, &dvh])
    }

    fn layer_norm_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        eps: f64,
    ) -> Result<[Tensor; 3]> {
        let n = x.dim(D::Minus1)?;
        let rows = x.elem_count() / n;
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let (x2, dy2) = (f(x)?.reshape((rows, n))?, f(dy)?.reshape((rows, n))?);
        let mean = x2.mean_keepdim(1)?;
        let centred = x2.broadcast_sub(&mean)?;
        let rstd = ((centred.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip())?;
        let xhat = centred.broadcast_mul(&rstd)?;
        let g = dy2.broadcast_mul(&f(w)?)?;
        let g_mean = g.mean_keepdim(1)?;
        let gx_mean = (&g * &xhat)?.mean_keepdim(1)?;
        let dx = g
            .broadcast_sub(&g_mean)?
            .sub(&xhat.broadcast_mul(&gx_mean)?)?
            .broadcast_mul(&rstd)?;
        let dw = (&dy2 * &xhat)?.sum(0)?;
        let db = dy2.sum(0)?;
        let dt = x.dtype();
        Ok([
            dx.reshape(x.shape())?.to_dtype(dt)?,
            dw.to_dtype(dt)?,
            db.to_dtype(dt)?,
        ])
    }

    fn gelu_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let cdf = (((&xf * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
        let pdf = ((xf.sqr()? * -0.5)?.exp()?
            * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
        let d = (cdf + (xf * pdf)?)?;
        (dy.to_dtype(DType::F32)? * d)?.to_dtype(x.dtype())
    }

    fn column_sum(&self, g: &Tensor) -> Result<Tensor> {
        g.sum(0)
    }
}

/// How far the node is from autograd over composed ops (`composed`, with the same `prims` for
/// the dropout mask), each the largest difference over the reference's largest magnitude.
#[derive(Debug, Clone, Copy)]
pub struct Parity {
    pub context: f32,
    /// The gradients of q, k and v (of the sum of the context times fixed random weights).
    pub grads: [f32; 3],
}

/// The node against the composed reference on `device` in `dtype`: a batch of two, the second
/// sequence padded, four heads, dropout `drop` on the probabilities.
pub fn parity<P: Prims + Clone>(
    prims: P,
    device: &Device,
    dtype: DType,
    drop: Option<SeededDropout>,
) -> Result<Parity> {
    let (b, s, hidden, heads) = (2, 16, 64, 4);
    let scale = 1.0 / 4.0;
    let var = || -> Result<Var> {
        Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, s, hidden), device)?.to_dtype(dtype)?)
    };
    let (q, k, v) = (var()?, var()?, var()?);
    let weights = var()?.as_tensor().detach();
    let mut mask = vec![1u32; b * s];
    mask[b * s - 5..].fill(0);
    let mask = Tensor::from_vec(mask, (b, s), device)?;
    let bias = ops::attention_bias(&mask, dtype)?;
    let grads = |out: &Tensor| -> Result<Vec<Tensor>> {
        let g = (out * &weights)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .backward()?;
        [&q, &k, &v]
            .iter()
            .map(|t| {
                g.get(t.as_tensor())
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg("attention: no gradient".into()))
            })
            .collect()
    };
    let ours = attention(prims.clone(), &q, &k, &v, &bias, heads, scale, drop)?;
    let reference = composed(&prims, &q, &k, &v, &bias, heads, scale, drop)?;
    let (ga, gr) = (grads(&ours)?, grads(&reference)?);
    Ok(Parity {
        context: rel_diff(&ours, &reference)?,
        grads: [
            rel_diff(&ga[0], &gr[0])?,
            rel_diff(&ga[1], &gr[1])?,
            rel_diff(&ga[2], &gr[2])?,
        ],
    })
}

/// Attention as composed candle ops (differentiated by candle), the mask from `prims`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn composed<P: Prims>(
    prims: &P,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    scale: f64,
    drop: Option<SeededDropout>,
) -> Result<Tensor> {
    let (b, s, hidden) = q.dims3()?;
    let d = hidden / heads;
    let split = |t: &Tensor| t.reshape((b, s, heads, d))?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let z = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?
        .broadcast_add(&bias.to_dtype(DType::F32)?)?;
    let e = z
        .broadcast_sub(&z.max_keepdim(D::Minus1)?.detach())?
        .exp()?;
    let mut p = e
        .broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .to_dtype(q.dtype())?;
    if let Some(dr) = drop {
        p = prims.dropout(&p, dr.p, dr.seed)?;
    }
    p.matmul(&v)?.transpose(1, 2)?.reshape((b, s, hidden))
}

/// The largest |a − b| over the largest |b| (at least 1e-12), in f32.
pub(crate) fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let largest = |t: &Tensor| -> Result<f32> { t.abs()?.flatten_all()?.max(0)?.to_scalar() };
    Ok(largest(&(&a - &b)?)? / largest(&b)?.max(1e-12))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node's output and the gradients of q, k, v against the composed reference.
    fn check(drop: Option<SeededDropout>) {
        let p = parity(CpuPrims, &Device::Cpu, DType::F32, drop).unwrap();
        assert!(p.context < 1e-5, "{p:?}");
        for (name, g) in ["q", "k", "v"].iter().zip(p.grads) {
            assert!(g < 1e-5, "gradient of {name}: {p:?}");
        }
    }

    #[test]
    fn node_matches_autograd_over_composed_ops() {
        check(None);
    }

    #[test]
    fn node_matches_autograd_with_dropout_on_the_probabilities() {
        check(Some(SeededDropout { p: 0.3, seed: 17 }));
    }

    #[test]
    fn no_node_without_gradients() {
        let x = Tensor::randn(0f32, 1.0, (2, 4, 8), &Device::Cpu).unwrap();
        let bias = ops::attention_bias(
            &Tensor::ones((2, 4), DType::U32, &Device::Cpu).unwrap(),
            DType::F32,
        )
        .unwrap();
        let out = attention(CpuPrims, &x, &x, &x, &bias, 2, 0.5, None).unwrap();
        assert!(!out.track_op());
        assert_eq!(out.dims(), &[2, 4, 8]);
    }

    #[test]
    fn the_same_seed_drops_the_same_elements() {
        let x = Tensor::ones((4, 50), DType::F32, &Device::Cpu).unwrap();
        let a = CpuPrims.dropout(&x, 0.5, 3).unwrap();
        let b = CpuPrims.dropout(&x, 0.5, 3).unwrap();
        let c = CpuPrims.dropout(&x, 0.5, 4).unwrap();
        assert_eq!(rel_diff(&a, &b).unwrap(), 0.0);
        assert!(rel_diff(&a, &c).unwrap() > 0.0);
    }
}
