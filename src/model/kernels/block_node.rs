//! The two residual blocks of a post-LN encoder layer (BERT, RoBERTa, XLM-R, DistilBERT), each as
//! one node of candle's graph with a hand-written backward:
//!
//! - attention: `LN(drop(attention(x·Wqᵀ + bq, x·Wkᵀ + bk, x·Wvᵀ + bv)·Woᵀ + bo) + x)`;
//! - feed-forward: `LN(drop(gelu(x·W1ᵀ + b1)·W2ᵀ + b2) + x)`.
//!
//! Why: candle's backward gives every node's input a zero-filled gradient and then adds the
//! incoming one to it (`GradStore::or_insert`). Composed, an attention block is about twenty nodes
//! over `[b, s, hidden]` tensors (three dense layers for q, k, v whose input gradients are summed
//! into `x`'s, the attention node, the output layer, dropout, the residual add, layer norm) and the
//! feed-forward block seven; as one node each, the backward computes each gradient once, and the
//! gradient of `x` through q, k and v is one product with the stacked `[3·hidden, hidden]` weight.
//!
//! A node can take at most three inputs, so a block's parameters reach it as one flat vector
//! (`pack`: a concatenation, whose backward hands each parameter its slice of the flat gradient),
//! laid out so that `Wq`, `Wk`, `Wv` and `bq`, `bk`, `bv` are each one contiguous stack. While a
//! `GradSink` is in scope and knows every parameter's master weight, the vector is packed from
//! detached parameters instead and the backward deposits each parameter's gradient in the sink
//! (`model::grad_sink` says why): the node then has `x` as its only input that records a gradient.
//!
//! The forward runs on detached tensors before the node is made; the node's own forward is the
//! final layer norm, computed from the saved residual sum on the device (`cuda_fwd`) so that the
//! output needs no extra copy. Device-specific parts are `attention_node::Prims`, so the node is
//! tested on the CPU against autograd over the composed ops (`parity`, the unit tests below).

use super::attention_node::{self as attn, maybe_drop, Core, Prims, SeededDropout};
use crate::model::grad_sink::GradSink;
use crate::model::ops;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor, Var};

/// A dense layer's parameters: `w` `[out, in]`, `b` `[out]`.
#[derive(Debug, Clone, Copy)]
pub struct Dense<'a> {
    pub w: &'a Tensor,
    pub b: &'a Tensor,
}

/// A layer norm's parameters.
#[derive(Debug, Clone, Copy)]
pub struct Norm<'a> {
    pub w: &'a Tensor,
    pub b: &'a Tensor,
    pub eps: f64,
}

/// An attention block's parameters.
#[derive(Debug, Clone, Copy)]
pub struct AttentionParams<'a> {
    pub q: Dense<'a>,
    pub k: Dense<'a>,
    pub v: Dense<'a>,
    pub out: Dense<'a>,
    pub norm: Norm<'a>,
    pub heads: usize,
}

/// A feed-forward block's parameters (exact GELU between the two dense layers).
#[derive(Debug, Clone, Copy)]
pub struct FfnParams<'a> {
    pub up: Dense<'a>,
    pub down: Dense<'a>,
    pub norm: Norm<'a>,
}

/// Where each parameter lies in the flat vector.
#[derive(Debug, Clone)]
struct Slots(Vec<(usize, Vec<usize>)>);

impl Slots {
    /// Parameter `i` as a view of `flat`, in its own shape.
    fn view(&self, flat: &Tensor, i: usize) -> Result<Tensor> {
        let (offset, dims) = &self.0[i];
        flat.narrow(0, *offset, dims.iter().product())?
            .reshape(dims.as_slice())
    }

    /// Parameters `first..=last` (adjacent in `flat`) as one view `[rows, cols]`.
    fn stacked(&self, flat: &Tensor, first: usize, last: usize, cols: usize) -> Result<Tensor> {
        let span = self.span(flat, first, last)?;
        let len = span.elem_count();
        span.reshape((len / cols, cols))
    }

    /// Parameters `first..=last` (adjacent in `flat`) as one flat view.
    fn span(&self, flat: &Tensor, first: usize, last: usize) -> Result<Tensor> {
        let start = self.0[first].0;
        let (end_offset, end_dims) = &self.0[last];
        flat.narrow(
            0,
            start,
            end_offset + end_dims.iter().product::<usize>() - start,
        )
    }

    #[cfg(feature = "cuda")]
    fn offset(&self, i: usize) -> usize {
        self.0[i].0
    }
}

/// The parameters as one flat vector of `dtype` (the activations') and where each lies in it.
/// Without a sink (`sink` `None`; the parameters then have `dtype`) a node whose backward slices
/// the gradient; with one, a copy outside the graph gathered from the f32 masters and cast on the
/// way (on CUDA, one launch for all of them: `Prims::concat_flat`), whether the parameters handed in
/// are casts of the masters or the masters themselves (`model::casting`).
fn pack<P: Prims>(
    prims: &P,
    parts: &[&Tensor],
    sink: &Option<Sink>,
    dtype: DType,
) -> Result<(Tensor, Slots)> {
    let mut slots = Vec::with_capacity(parts.len());
    let mut offset = 0;
    for p in parts {
        slots.push((offset, p.dims().to_vec()));
        offset += p.elem_count();
    }
    let flat = match sink {
        Some(sink) => {
            let masters: Vec<&Tensor> = sink.masters.iter().collect();
            prims.concat_flat(&masters, dtype)?
        }
        None => {
            if let Some(p) = parts.iter().find(|p| p.dtype() != dtype) {
                bail!(
                    "block node: a {:?} parameter with {dtype:?} activations and no gradient sink",
                    p.dtype()
                );
            }
            let flat = parts
                .iter()
                .map(|p| p.flatten_all())
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&flat, 0)?
        }
    };
    Ok((flat, Slots(slots)))
}

/// The gradient sink a block's parameters go to, and their masters in slot order.
struct Sink {
    sink: GradSink,
    masters: Vec<Tensor>,
}

/// The sink in scope, when `x` records a gradient (so that the backward runs) and the sink knows
/// every parameter.
fn sink_for(x: &Tensor, parts: &[&Tensor]) -> Result<Option<Sink>> {
    // While a stack records (`kernels::stack`), `x` is detached and the stack takes its gradient.
    if !x.track_op() && !super::stack::recording() {
        return Ok(None);
    }
    let Some(sink) = GradSink::active() else {
        return Ok(None);
    };
    Ok(sink
        .masters_of(parts)?
        .map(|masters| Sink { sink, masters }))
}

impl Sink {
    /// Deposits `grads` (each covering one or more consecutive slots, in slot order), handed out
    /// slot by slot as views: of the gradients themselves where they have the masters' dtype, of
    /// one vector of all the others cast at once (`Prims::concat_flat`) elsewhere.
    fn deposit<P: Prims>(&self, prims: &P, slots: &Slots, grads: &[Tensor]) -> Result<()> {
        let dtype = self.masters.first().map_or(DType::F32, |m| m.dtype());
        let others: Vec<&Tensor> = grads.iter().filter(|g| g.dtype() != dtype).collect();
        let cast = if others.is_empty() {
            None
        } else {
            Some(prims.concat_flat(&others, dtype)?)
        };
        let mut cast_at = 0;
        let mut flat = Vec::with_capacity(grads.len());
        for g in grads {
            if g.dtype() == dtype {
                flat.push(g.flatten_all()?);
            } else if let Some(cast) = &cast {
                flat.push(cast.narrow(0, cast_at, g.elem_count())?);
                cast_at += g.elem_count();
            }
        }
        let mut slot = 0;
        for g in &flat {
            let mut at = 0;
            while at < g.elem_count() {
                let (Some(master), Some((_, dims))) = (self.masters.get(slot), slots.0.get(slot))
                else {
                    bail!("block node: more gradient elements than parameters");
                };
                let len: usize = dims.iter().product();
                self.sink.deposit(master, &g.narrow(0, at, len)?)?;
                (at, slot) = (at + len, slot + 1);
            }
        }
        if slot != self.masters.len() {
            bail!(
                "block node: gradients for {slot} of {} parameters",
                self.masters.len()
            );
        }
        Ok(())
    }
}

/// The gradients in slot order, flattened into one vector of `dtype`.
fn unpack_grads(grads: &[Tensor], dtype: DType) -> Result<Tensor> {
    let flat = grads
        .iter()
        .map(|g| g.to_dtype(dtype)?.flatten_all())
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&flat, 0)
}

/// `x·Wᵀ + b` on detached operands (no node).
fn dense(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    ops::linear(x, w, Some(b))
}

/// Whether a block node recorded into a stack runs its tail (the residual's dropout and add, and
/// the layer norm) in one pass where the device has one (`Prims::dropout_add_norm`): on by default,
/// `RECYCLE_ADD_NORM=0` or `set_add_norm(false)` off; `gpu-check` times both.
pub static ADD_NORM: super::EnvSwitch = super::EnvSwitch::new("RECYCLE_ADD_NORM");

/// Turns the one-pass tail on or off for the whole process.
pub fn set_add_norm(on: bool) {
    ADD_NORM.set(on);
}

/// Whether the one-pass tail is on (`set_add_norm`).
pub fn add_norm_on() -> bool {
    ADD_NORM.get()
}

thread_local! {
    /// Block tails this thread ran in one pass, for checks that must know it ran.
    static TAIL_ONE_PASS_RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many block tails this thread has run in one pass (`Prims::dropout_add_norm`).
pub fn tail_one_pass_runs() -> usize {
    TAIL_ONE_PASS_RUNS.with(|c| c.get())
}

/// What both blocks end with: `y = LN(s)`, `s = drop(h) + x`. Keeps `s` for the backward.
struct Tail {
    /// The residual sum, the layer norm's input.
    s: Tensor,
    /// The output, where the tail ran in one pass (`Tail::new`).
    y: Option<Tensor>,
    drop: Option<SeededDropout>,
    eps: f64,
    /// The layer norm's weight and bias slots.
    gamma: usize,
    beta: usize,
}

/// The tail's operands: the branch's output `h`, the block's input `x`, its dropout, the
/// parameters and the layer norm's.
struct TailInputs<'a> {
    h: &'a Tensor,
    x: &'a Tensor,
    drop: Option<SeededDropout>,
    flat: &'a Tensor,
    slots: &'a Slots,
    eps: f64,
    gamma: usize,
    beta: usize,
}

impl Tail {
    /// `s = drop(h) + x`, and with it `y = LN(s)` in one pass where the output is wanted at once
    /// (`one_pass`: the block is recorded into a stack, whose `finish` asks for the output now)
    /// and the device has one; else `y` waits for `output`.
    fn new<P: Prims>(prims: &P, t: TailInputs, one_pass: bool) -> Result<Self> {
        let fused = if one_pass && add_norm_on() {
            let norm = (
                &t.slots.view(t.flat, t.gamma)?,
                &t.slots.view(t.flat, t.beta)?,
            );
            prims.dropout_add_norm(t.h, t.x, t.drop, norm, t.eps)?
        } else {
            None
        };
        let (s, y) = match fused {
            Some((s, y)) => {
                TAIL_ONE_PASS_RUNS.with(|c| c.set(c.get() + 1));
                (s, Some(y))
            }
            None => (prims.dropout_add(t.h, t.x, t.drop)?, None),
        };
        Ok(Self {
            s,
            y,
            drop: t.drop,
            eps: t.eps,
            gamma: t.gamma,
            beta: t.beta,
        })
    }

    fn output(&self, flat: &Tensor, slots: &Slots) -> Result<Tensor> {
        if let Some(y) = &self.y {
            return Ok(y.clone());
        }
        ops::layer_norm(
            &self.s,
            &slots.view(flat, self.gamma)?,
            &slots.view(flat, self.beta)?,
            self.eps,
        )
    }

    /// The gradients of `s` (the residual input's), of `h` (the block's branch), and of the
    /// layer norm's weight and bias.
    fn backward<P: Prims>(
        &self,
        prims: &P,
        flat: &Tensor,
        slots: &Slots,
        dy: &Tensor,
    ) -> Result<[Tensor; 4]> {
        let gamma = slots.view(flat, self.gamma)?;
        prims.layer_norm_backward_dropout(&self.s, &gamma, dy, self.eps, self.drop)
    }

    #[cfg(feature = "cuda")]
    fn cuda_output(
        &self,
        flat: &candle_core::CudaStorage,
        fl: &Layout,
        slots: &Slots,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::Storage;
        let (storage, layout) = self.s.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            bail!("block node: the residual sum is not on a CUDA device")
        };
        let n = layout.dims().last().copied().unwrap_or(0);
        let at = |i: usize| Layout::contiguous_with_offset(n, fl.start_offset() + slots.offset(i));
        let (gl, bl) = (at(self.gamma), at(self.beta));
        let y = super::cuda::layer_norm_storage((s, layout), (flat, &gl), (flat, &bl), self.eps)?;
        Ok((y, layout.shape().clone()))
    }
}

/// Rows of a `[.., n]` tensor as `[rows, n]`.
fn rows(t: &Tensor) -> Result<Tensor> {
    let n = t.dims().last().copied().unwrap_or(1);
    t.reshape((t.elem_count() / n.max(1), n))
}

// ---- the node ------------------------------------------------------------------------------------

/// A block's branch (what lies between `x` and the tail's dropout): what it keeps for the
/// backward, and the backward.
trait Branch: Send + Sync + 'static {
    const NAME: &'static str;

    /// Given the gradient of the branch's output `dh` `[rows, hidden]` and that of `x` through
    /// the residual `ds` `[rows, hidden]`: the whole gradient of `x` (the branch's plus `ds`,
    /// added by the branch's last product where the device can: `Prims::dense_input_grad_plus`),
    /// `[rows, hidden]`, and those of the branch's parameters in slot order (the layer norm's come
    /// after them).
    fn backward<P: Prims>(
        &self,
        prims: &P,
        x: &Tensor,
        flat: &Tensor,
        slots: &Slots,
        dh: &Tensor,
        ds: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)>;
}

/// One block as a graph node over `x` and the flat parameters: the forward's output is the tail's
/// layer norm, the backward the tail's then the branch's.
struct Node<P, B> {
    prims: P,
    slots: Slots,
    /// The flat parameters, detached (the CPU forward reads the layer norm's from it).
    flat: Tensor,
    tail: Tail,
    branch: B,
    /// Where the parameters' gradients go instead of the flat vector's, if anywhere.
    sink: Option<Sink>,
}

/// Whether `finish` will record the block into a stack (and so want its output at once): a stack is
/// recording and the parameters' gradients have a sink (without one they need the graph).
fn recorded(sink: &Option<Sink>) -> bool {
    super::stack::recording() && sink.is_some()
}

/// The block's output, as a node when `x` or a parameter records a gradient.
fn finish<P: Prims, B: Branch>(x: &Tensor, flat: &Tensor, node: Node<P, B>) -> Result<Tensor> {
    // Recording a stack: the output now, the node kept for the stack's backward.
    if recorded(&node.sink) {
        let out = node.tail.output(&node.flat, &node.slots)?;
        super::stack::push(x, &out, Box::new(node));
        return Ok(out);
    }
    if !(x.track_op() || flat.track_op()) {
        return node.tail.output(&node.flat, &node.slots);
    }
    x.apply_op2(flat, node)
}

impl<P: Prims, B: Branch> CustomOp2 for Node<P, B> {
    fn name(&self) -> &'static str {
        B::NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        attn::cpu_storage_of(&self.tail.output(&self.flat, &self.slots)?, self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        flat: &candle_core::CudaStorage,
        fl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.tail.cuda_output(flat, fl, &self.slots)
    }

    fn bwd(
        &self,
        x: &Tensor,
        flat: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (prims, slots) = (&self.prims, &self.slots);
        let (x, flat) = (x.detach(), flat.detach());
        let [ds, dh, dgamma, dbeta] = self.tail.backward(prims, &flat, slots, grad)?;
        let (dx, mut grads) =
            self.branch
                .backward(prims, &x, &flat, slots, &rows(&dh)?, &rows(&ds)?)?;
        grads.extend([dgamma, dbeta]);
        let dx = dx.reshape(x.shape())?;
        let dflat = match &self.sink {
            Some(sink) => {
                sink.deposit(prims, slots, &grads)?;
                None
            }
            None => Some(unpack_grads(&grads, flat.dtype())?),
        };
        Ok((Some(dx), dflat))
    }
}

impl<P: Prims, B: Branch> super::stack::ChainBackward for Node<P, B> {
    fn backward(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        match CustomOp2::bwd(self, x, &self.flat, grad, grad)? {
            (Some(dx), None) => Ok(dx),
            _ => bail!("block node: a stacked block must give its input's gradient and deposit its parameters'"),
        }
    }
}

// ---- attention block ---------------------------------------------------------------------------

// Slots of the attention block's flat vector: Wq, Wk, Wv, bq, bk, bv, Wo, bo, γ, β (k's are
// reached only as the middle of the q, k, v stacks).
const WQ: usize = 0;
const WV: usize = 2;
const BQ: usize = 3;
const BV: usize = 5;
const WO: usize = 6;
const BO: usize = 7;
const A_GAMMA: usize = 8;
const A_BETA: usize = 9;

/// The attention block (see the module's documentation) over `x` `[b, s, hidden]` with `bias`
/// `[b, 1, 1, s]` from `ops::attention_bias`: `probs_drop` on the attention probabilities,
/// `out_drop` on the output layer's result. When neither `x` nor a parameter records a gradient,
/// no node is made.
pub fn attention_block<P: Prims>(
    prims: P,
    x: &Tensor,
    bias: &Tensor,
    params: &AttentionParams,
    probs_drop: Option<SeededDropout>,
    out_drop: Option<SeededDropout>,
) -> Result<Tensor> {
    let p = params;
    let parts = [
        p.q.w, p.k.w, p.v.w, p.q.b, p.k.b, p.v.b, p.out.w, p.out.b, p.norm.w, p.norm.b,
    ];
    let sink = sink_for(x, &parts)?;
    let (flat, slots) = pack(&prims, &parts, &sink, x.dtype())?;
    let (xd, fd) = (x.detach(), flat.detach());
    let hidden = x.dim(candle_core::D::Minus1)?;
    if p.heads == 0 || hidden % p.heads != 0 {
        bail!(
            "attention block: {hidden} features do not split into {} heads",
            p.heads
        );
    }
    let scale = 1.0 / ((hidden / p.heads) as f64).sqrt();
    // q, k and v as one product with the stacked weight, `[b, s, 3 · hidden]`; attention over it
    // in one pass where the device can, else split into heads.
    let qkv = dense(
        &xd,
        &slots.stacked(&fd, WQ, WV, hidden)?,
        &slots.span(&fd, BQ, BV)?,
    )?;
    let bias = bias.detach();
    let (attn, ctx) = match prims.flash_forward(&qkv, &bias, p.heads, scale, probs_drop)? {
        Some((ctx, lse)) => {
            attn::count_flash_run();
            let flash = Flash {
                qkv,
                bias,
                lse,
                heads: p.heads,
                scale,
                drop: probs_drop,
            };
            (Attn::Flash(flash), ctx)
        }
        None if prims.heads_in_place(&qkv, p.heads) => {
            attn::count_in_place_run();
            let scores = prims.head_scores(&qkv, p.heads)?;
            let (probs, dropped) = attn::probabilities(&prims, &scores, &bias, scale, probs_drop)?;
            drop(scores);
            let ctx = prims.head_context(dropped.as_ref().unwrap_or(&probs), &qkv, p.heads)?;
            let in_place = InPlace {
                qkv,
                probs,
                dropped,
                heads: p.heads,
                scale,
                drop: probs_drop,
            };
            (Attn::InPlace(in_place), ctx)
        }
        None => {
            let split = |part: usize| prims.split_part(&qkv, part, 3, p.heads);
            let (qh, kh, vh) = (split(0)?, split(1)?, split(2)?);
            drop(qkv);
            let mut core = Core::from_heads(&prims, qh, kh, vh, &bias, scale, probs_drop)?;
            let ctx = core.take_context()?;
            (Attn::Heads(core), ctx)
        }
    };
    let h = dense(&ctx, &slots.view(&fd, WO)?, &slots.view(&fd, BO)?)?;
    let inputs = TailInputs {
        h: &h,
        x: &xd,
        drop: out_drop,
        flat: &fd,
        slots: &slots,
        eps: p.norm.eps,
        gamma: A_GAMMA,
        beta: A_BETA,
    };
    let tail = Tail::new(&prims, inputs, recorded(&sink))?;
    let branch = AttentionBranch { attn, ctx };
    finish(
        x,
        &flat,
        Node {
            prims,
            slots,
            flat: fd,
            tail,
            branch,
            sink,
        },
    )
}

struct AttentionBranch {
    attn: Attn,
    /// The merged context, the output layer's input.
    ctx: Tensor,
}

/// What the attention core keeps for its backward.
enum Attn {
    /// Split into heads, the probabilities kept.
    Heads(Core),
    /// In one pass (`Prims::flash_forward`): the product it read and the log-sum-exp of each row.
    Flash(Flash),
    /// The heads' products in place (`Prims::heads_in_place`): the product they read and the
    /// probabilities.
    InPlace(InPlace),
}

struct InPlace {
    qkv: Tensor,
    probs: Tensor,
    /// The probabilities after dropout (what the context read), with dropout on.
    dropped: Option<Tensor>,
    heads: usize,
    scale: f64,
    drop: Option<SeededDropout>,
}

struct Flash {
    qkv: Tensor,
    bias: Tensor,
    lse: Tensor,
    heads: usize,
    scale: f64,
    drop: Option<SeededDropout>,
}

impl Branch for AttentionBranch {
    const NAME: &'static str = "recycle-attention-block";

    fn backward<P: Prims>(
        &self,
        prims: &P,
        x: &Tensor,
        flat: &Tensor,
        slots: &Slots,
        dh: &Tensor,
        ds: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let hidden = x.dim(candle_core::D::Minus1)?;
        let (dwo, dbo) = prims.dense_param_grads(dh, &rows(&self.ctx)?)?;
        let dctx = prims
            .dense_input_grad(dh, &slots.view(flat, WO)?)?
            .reshape(x.shape())?;
        // q, k and v side by side: one product each for the input's and the weights' gradients.
        let dqkv = match &self.attn {
            Attn::Heads(core) => {
                let [dqh, dkh, dvh] = core.backward_heads(prims, &dctx)?;
                prims.merge_parts([&dqh, &dkh, &dvh])?
            }
            Attn::InPlace(a) => {
                let p = a.dropped.as_ref().unwrap_or(&a.probs);
                let dp = prims.head_dprobs(&dctx, &a.qkv, a.heads)?;
                let dscores = prims.softmax_backward(&a.probs, &dp, a.scale, a.drop)?;
                drop(dp);
                prims.head_grads(&dscores, p, &dctx, &a.qkv, a.heads)?
            }
            Attn::Flash(f) => prims.flash_backward(
                &f.qkv, &f.bias, &self.ctx, &f.lse, &dctx, f.heads, f.scale, f.drop,
            )?,
        };
        let dqkv = rows(&dqkv)?;
        let dx = prims.dense_input_grad_plus(&dqkv, &slots.stacked(flat, WQ, WV, hidden)?, ds)?;
        let (dwqkv, dbqkv) = prims.dense_param_grads(&dqkv, &rows(x)?)?;
        Ok((dx, vec![dwqkv, dbqkv, dwo, dbo]))
    }
}

// ---- feed-forward block --------------------------------------------------------------------------

const W1: usize = 0;
const B1: usize = 1;
const W2: usize = 2;
const B2: usize = 3;
const F_GAMMA: usize = 4;
const F_BETA: usize = 5;

/// The feed-forward block (see the module's documentation) over `x` `[.., hidden]`, `drop` on the
/// second dense layer's result. When neither `x` nor a parameter records a gradient, no node is
/// made.
pub fn ffn_block<P: Prims>(
    prims: P,
    x: &Tensor,
    params: &FfnParams,
    drop: Option<SeededDropout>,
) -> Result<Tensor> {
    let p = params;
    let parts = [p.up.w, p.up.b, p.down.w, p.down.b, p.norm.w, p.norm.b];
    let sink = sink_for(x, &parts)?;
    let (flat, slots) = pack(&prims, &parts, &sink, x.dtype())?;
    let (xd, fd) = (x.detach(), flat.detach());
    // The first layer and GELU (its output with the bias and GELU's, both kept for the backward).
    let (u, g) = prims.dense_gelu(&xd, &slots.view(&fd, W1)?, &slots.view(&fd, B1)?)?;
    let h = dense(&g, &slots.view(&fd, W2)?, &slots.view(&fd, B2)?)?;
    let inputs = TailInputs {
        h: &h,
        x: &xd,
        drop,
        flat: &fd,
        slots: &slots,
        eps: p.norm.eps,
        gamma: F_GAMMA,
        beta: F_BETA,
    };
    let tail = Tail::new(&prims, inputs, recorded(&sink))?;
    let branch = FfnBranch { u, g };
    finish(
        x,
        &flat,
        Node {
            prims,
            slots,
            flat: fd,
            tail,
            branch,
            sink,
        },
    )
}

struct FfnBranch {
    /// The first dense layer's output (GELU's input) and GELU's output.
    u: Tensor,
    g: Tensor,
}

impl Branch for FfnBranch {
    const NAME: &'static str = "recycle-ffn-block";

    fn backward<P: Prims>(
        &self,
        prims: &P,
        x: &Tensor,
        flat: &Tensor,
        slots: &Slots,
        dh: &Tensor,
        ds: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (dw2, db2) = prims.dense_param_grads(dh, &rows(&self.g)?)?;
        let du = prims.dense_input_grad_gelu(dh, &slots.view(flat, W2)?, &rows(&self.u)?)?;
        let (dw1, db1) = prims.dense_param_grads(&du, &rows(x)?)?;
        let dx = prims.dense_input_grad_plus(&du, &slots.view(flat, W1)?, ds)?;
        Ok((dx, vec![dw1, db1, dw2, db2]))
    }
}

// ---- parity -------------------------------------------------------------------------------------

/// How far the block nodes are from autograd over the composed ops (the same `prims` for the
/// dropout masks), each the largest difference over the reference's largest magnitude.
#[derive(Debug, Clone, Copy)]
pub struct Parity {
    pub output: f32,
    /// The gradient of the block's input.
    pub input_grad: f32,
    /// The largest difference over the parameters' gradients, over the largest of them.
    pub param_grads: f32,
}

/// Which block `parity` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    Attention,
    FeedForward,
}

/// A block node against the composed reference on `device` in `dtype`: a batch of two, the second
/// sequence padded, hidden 64 in four heads, feed-forward width 128; `drop` (if any) with seeds
/// 11 and 12 on every dropout the block has.
pub fn parity<P: Prims + Clone>(
    prims: P,
    device: &Device,
    dtype: DType,
    block: Block,
    drop: Option<f32>,
) -> Result<Parity> {
    parity_with(prims, device, dtype, block, drop, ParityDims::default())
}

/// The sizes of a `parity_with` check.
#[derive(Debug, Clone, Copy)]
pub struct ParityDims {
    pub batch: usize,
    pub seq: usize,
    pub hidden: usize,
    pub heads: usize,
    pub inner: usize,
}

impl ParityDims {
    /// The sizes the one-pass attention checks use (its kernels take heads of 64 and sequences a
    /// multiple of 16): the CPU test and `gpu-check`'s rows on the device. 144 tokens make every
    /// loop of the kernels end on a partial tile: the forward's keys in tiles of 64 (64, 64, 16)
    /// and its query blocks of 64, the backward's blocks of 128 keys (128, 16: dQ summed in f32
    /// between them) and its steps of 32 queries (four and 16).
    pub const ONE_PASS: ParityDims = ParityDims {
        batch: 2,
        seq: 144,
        hidden: 128,
        heads: 2,
        inner: 256,
    };
}

impl Default for ParityDims {
    fn default() -> Self {
        Self {
            batch: 2,
            seq: 16,
            hidden: 64,
            heads: 4,
            inner: 128,
        }
    }
}

/// `parity` at other sizes (one-pass attention needs heads of 64).
pub fn parity_with<P: Prims + Clone>(
    prims: P,
    device: &Device,
    dtype: DType,
    block: Block,
    drop: Option<f32>,
    dims: ParityDims,
) -> Result<Parity> {
    let ParityDims {
        batch: b,
        seq: s,
        hidden,
        heads,
        inner,
    } = dims;
    let var = |dims: &[usize], std: f64, mean: f64| -> Result<Var> {
        Var::from_tensor(
            &Tensor::randn(0f32, 1.0, dims, device)?
                .affine(std, mean)?
                .to_dtype(dtype)?,
        )
    };
    let x = var(&[b, s, hidden], 1.0, 0.0)?;
    let weights = var(&[b, s, hidden], 1.0, 0.0)?.as_tensor().detach();
    let mut mask = vec![1u32; b * s];
    mask[b * s - 5..].fill(0);
    let bias = ops::attention_bias(&Tensor::from_vec(mask, (b, s), device)?, dtype)?;
    let seeded = |seed: u64| drop.map(|p| SeededDropout { p, seed });
    let dense_vars = |out: usize, inp: usize| -> Result<[Var; 2]> {
        let std = 1.0 / (inp as f64).sqrt();
        Ok([var(&[out, inp], std, 0.0)?, var(&[out], 0.1, 0.0)?])
    };
    let mut vars: Vec<Var> = Vec::new();
    let (ours, reference) = match block {
        Block::Attention => {
            for _ in 0..4 {
                vars.extend(dense_vars(hidden, hidden)?);
            }
            vars.extend([var(&[hidden], 0.1, 1.0)?, var(&[hidden], 0.1, 0.0)?]);
            let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            let d = |i: usize| Dense {
                w: t[i],
                b: t[i + 1],
            };
            let params = AttentionParams {
                q: d(0),
                k: d(2),
                v: d(4),
                out: d(6),
                norm: Norm {
                    w: t[8],
                    b: t[9],
                    eps: 1e-5,
                },
                heads,
            };
            let ours = attention_block(prims.clone(), &x, &bias, &params, seeded(11), seeded(12))?;
            let reference = composed_attention(&prims, &x, &bias, &params, seeded(11), seeded(12))?;
            (ours, reference)
        }
        Block::FeedForward => {
            vars.extend(dense_vars(inner, hidden)?);
            vars.extend(dense_vars(hidden, inner)?);
            vars.extend([var(&[hidden], 0.1, 1.0)?, var(&[hidden], 0.1, 0.0)?]);
            let t: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            let params = FfnParams {
                up: Dense { w: t[0], b: t[1] },
                down: Dense { w: t[2], b: t[3] },
                norm: Norm {
                    w: t[4],
                    b: t[5],
                    eps: 1e-5,
                },
            };
            let ours = ffn_block(prims.clone(), &x, &params, seeded(11))?;
            let reference = composed_ffn(&prims, &x, &params, seeded(11))?;
            (ours, reference)
        }
    };
    let grads = |out: &Tensor| -> Result<Vec<Tensor>> {
        let g = (out * &weights)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .backward()?;
        std::iter::once(&x)
            .chain(vars.iter())
            .map(|v| {
                g.get(v.as_tensor())
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg("block: a missing gradient".into()))
            })
            .collect()
    };
    let (ga, gr) = (grads(&ours)?, grads(&reference)?);
    // Over the largest gradient of any parameter: some are zero in exact arithmetic (`bk`'s, as
    // softmax ignores a shift shared by a row), where a ratio to their own size measures noise.
    let largest = |t: &Tensor| -> Result<f32> {
        t.to_dtype(DType::F32)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar()
    };
    let (mut diff, mut scale) = (0f32, 1e-12f32);
    for (a, r) in ga.iter().zip(&gr).skip(1) {
        diff = diff.max(largest(
            &(a.to_dtype(DType::F32)? - r.to_dtype(DType::F32)?)?,
        )?);
        scale = scale.max(largest(r)?);
    }
    let param_grads = diff / scale;
    Ok(Parity {
        output: attn::rel_diff(&ours, &reference)?,
        input_grad: attn::rel_diff(&ga[0], &gr[0])?,
        param_grads,
    })
}

/// The attention block as composed ops (each with its own backward), the masks from `prims`.
fn composed_attention<P: Prims>(
    prims: &P,
    x: &Tensor,
    bias: &Tensor,
    p: &AttentionParams,
    probs_drop: Option<SeededDropout>,
    out_drop: Option<SeededDropout>,
) -> Result<Tensor> {
    let lin = |t: &Tensor, d: Dense| ops::linear(t, d.w, Some(d.b));
    let hidden = x.dim(candle_core::D::Minus1)?;
    let scale = 1.0 / ((hidden / p.heads) as f64).sqrt();
    let ctx = attn::composed(
        prims,
        &lin(x, p.q)?,
        &lin(x, p.k)?,
        &lin(x, p.v)?,
        bias,
        p.heads,
        scale,
        probs_drop,
    )?;
    let h = maybe_drop(prims, out_drop, &lin(&ctx, p.out)?)?;
    ops::layer_norm(&(h + x)?, p.norm.w, p.norm.b, p.norm.eps)
}

/// The feed-forward block as composed ops, the mask from `prims`.
fn composed_ffn<P: Prims>(
    prims: &P,
    x: &Tensor,
    p: &FfnParams,
    drop: Option<SeededDropout>,
) -> Result<Tensor> {
    let u = ops::linear(x, p.up.w, Some(p.up.b))?;
    let h = ops::linear(&ops::gelu(&u)?, p.down.w, Some(p.down.b))?;
    let h = maybe_drop(prims, drop, &h)?;
    ops::layer_norm(&(h + x)?, p.norm.w, p.norm.b, p.norm.eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use attn::CpuPrims;

    fn check(block: Block, drop: Option<f32>) {
        let p = parity(CpuPrims, &Device::Cpu, DType::F32, block, drop).unwrap();
        assert!(p.output < 1e-5, "{block:?}: {p:?}");
        assert!(p.input_grad < 1e-4, "{block:?}: {p:?}");
        assert!(p.param_grads < 1e-4, "{block:?}: {p:?}");
    }

    #[test]
    fn attention_block_matches_autograd_over_composed_ops() {
        check(Block::Attention, None);
    }

    #[test]
    fn attention_block_matches_autograd_with_dropout() {
        check(Block::Attention, Some(0.3));
    }

    #[test]
    fn ffn_block_matches_autograd_over_composed_ops() {
        check(Block::FeedForward, None);
    }

    #[test]
    fn ffn_block_matches_autograd_with_dropout() {
        check(Block::FeedForward, Some(0.3));
    }

    /// The blocks' weight gradients split over the rows (`weight_grad::set_split`), as a GPU run
    /// may choose: the same gradients. The only test that turns the split on; others running
    /// meanwhile may split too, which changes nothing they check.
    #[test]
    fn blocks_with_split_weight_gradients_match_autograd() {
        let before = super::super::weight_grad::splits_made();
        super::super::weight_grad::set_split(4);
        for block in [Block::Attention, Block::FeedForward] {
            check(block, Some(0.3));
        }
        super::super::weight_grad::set_split(1);
        // Two weight gradients per block were split (b × s = 32 rows, in four).
        assert_eq!(super::super::weight_grad::splits_made() - before, 4);
    }

    /// One-pass attention (`Prims::flash_forward`, here `CpuPrims`' tensor-op form of it) inside
    /// the attention block: the same output and gradients as the composed reference, and it ran.
    #[test]
    fn attention_block_in_one_pass_matches_autograd() {
        let dims = ParityDims::ONE_PASS;
        let before = attn::flash_runs();
        attn::set_flash_on_cpu(true);
        let p = parity_with(
            CpuPrims,
            &Device::Cpu,
            DType::F32,
            Block::Attention,
            Some(0.3),
            dims,
        );
        attn::set_flash_on_cpu(false);
        let p = p.unwrap();
        assert_eq!(attn::flash_runs() - before, 1);
        assert!(p.output < 1e-5, "{p:?}");
        assert!(p.input_grad < 1e-4, "{p:?}");
        assert!(p.param_grads < 1e-4, "{p:?}");
    }

    #[test]
    fn attention_block_with_its_heads_in_place_matches_autograd() {
        for (dtype, drop) in [
            (DType::F32, Some(0.3)),
            (DType::F32, None),
            (DType::BF16, Some(0.1)),
        ] {
            let before = attn::in_place_runs();
            attn::set_heads_in_place_on_cpu(true);
            let p = parity(CpuPrims, &Device::Cpu, dtype, Block::Attention, drop);
            attn::set_heads_in_place_on_cpu(false);
            let p = p.unwrap();
            assert_eq!(attn::in_place_runs() - before, 1);
            let tol = if dtype == DType::F32 {
                1e-4
            } else {
                1.0 / 16.0
            };
            assert!(p.output < tol / 10.0, "{dtype:?} {drop:?}: {p:?}");
            assert!(p.input_grad < tol, "{dtype:?} {drop:?}: {p:?}");
            assert!(p.param_grads < tol, "{dtype:?} {drop:?}: {p:?}");
        }
    }

    #[test]
    fn cpu_prims_backward_helpers_match_autograd() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 12), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&(Tensor::randn(0f32, 0.2, 12, &dev).unwrap() + 1.0).unwrap())
            .unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, 12, &dev).unwrap()).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (5, 12), &dev).unwrap();
        // Layer norm: the composed ops' gradients.
        ops::set_kernels(ops::Kernels::Fused);
        let y = ops::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let [dx, dw, db] = CpuPrims
            .layer_norm_backward(x.as_tensor(), w.as_tensor(), &dy, 1e-5)
            .unwrap();
        for (ours, var) in [(dx, &x), (dw, &w), (db, &b)] {
            let reference = g.get(var.as_tensor()).unwrap();
            assert!(attn::rel_diff(&ours, reference).unwrap() < 1e-5);
        }
        // GELU.
        let y = ops::gelu(x.as_tensor()).unwrap();
        let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let ours = CpuPrims.gelu_backward(x.as_tensor(), &dy).unwrap();
        assert!(attn::rel_diff(&ours, g.get(x.as_tensor()).unwrap()).unwrap() < 1e-5);
    }

    /// A block's gradients of another dtype than the masters' are cast (all at once), those of
    /// the masters' dtype are handed on as they are, each slot to its master, added to what the
    /// graph gives.
    #[test]
    fn deposit_casts_other_dtypes_and_hands_each_slot_to_its_master() {
        let dev = Device::Cpu;
        let masters: Vec<Var> = [3usize, 2, 4, 1]
            .iter()
            .map(|&n| Var::zeros(n, DType::F32, &dev).unwrap())
            .collect();
        let sink = GradSink::for_masters(masters.iter().map(|m| m.as_tensor())).unwrap();
        let block = Sink {
            sink: sink.clone(),
            masters: masters.iter().map(|m| m.as_tensor().clone()).collect(),
        };
        let slots = Slots(vec![(0, vec![3]), (3, vec![2]), (5, vec![4]), (9, vec![1])]);
        let t = |v: &[f32]| Tensor::new(v, &dev).unwrap();
        let bf16 = |v: &[f32]| t(v).to_dtype(DType::BF16).unwrap();
        // The first gradient covers the first two slots, as a stacked gradient does.
        let grads = [
            bf16(&[1., 2., 3., 4., 5.]),
            t(&[6., 7., 8., 9.]),
            bf16(&[10.]),
        ];
        block.deposit(&CpuPrims, &slots, &grads).unwrap();
        let loss = masters
            .iter()
            .map(|m| m.as_tensor().sum_all().unwrap())
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
        let store = sink.backward(&loss).unwrap();
        let got: Vec<Vec<f32>> = masters
            .iter()
            .map(|m| store.get(m.as_tensor()).unwrap().to_vec1().unwrap())
            .collect();
        assert_eq!(
            got,
            vec![
                vec![2., 3., 4.],
                vec![5., 6.],
                vec![7., 8., 9., 10.],
                vec![11.]
            ]
        );
    }

    #[test]
    fn no_node_without_gradients() {
        let dev = Device::Cpu;
        let t = |dims: &[usize]| Tensor::randn(0f32, 0.5, dims, &dev).unwrap();
        let (x, w1, b1, w2, b2, gw, gb) = (
            t(&[2, 3, 8]),
            t(&[16, 8]),
            t(&[16]),
            t(&[8, 16]),
            t(&[8]),
            t(&[8]),
            t(&[8]),
        );
        let params = FfnParams {
            up: Dense { w: &w1, b: &b1 },
            down: Dense { w: &w2, b: &b2 },
            norm: Norm {
                w: &gw,
                b: &gb,
                eps: 1e-5,
            },
        };
        let y = ffn_block(CpuPrims, &x, &params, None).unwrap();
        assert!(!y.track_op());
        let reference = composed_ffn(&CpuPrims, &x, &params, None).unwrap();
        assert!(attn::rel_diff(&y, &reference).unwrap() < 1e-5);
    }
}
