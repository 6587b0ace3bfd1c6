//! Differentiable building blocks: candle's fused layer norm and softmax record no gradient, so the
//! encoders are built from these ops. On the CPU with f32 tensors they run as fused kernels with
//! hand-written backward passes (`kernels`); on CUDA, in a build with the `cuda` feature, with f32
//! or bf16 tensors, as recycle's own CUDA kernels, each with a backward (`kernels::cuda`); elsewhere
//! as composed candle ops, except off the CPU where no operand records a gradient (inference
//! models): there layer norm and softmax run as candle's fused forward kernels.

use super::grad_sink::GradSink;
use super::kernels;
use super::Mode;
use candle_core::{DType, Device, DeviceLocation, Result, Tensor, D};
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the fused kernels may be used (on by default; the benches and tests turn them off to
/// measure and check the composed ops).
static FUSED: AtomicBool = AtomicBool::new(true);

/// The implementation behind the ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Fused kernels where the tensors allow (see `path_for`), composed ops elsewhere.
    Fused,
    /// Composed candle ops everywhere.
    Composed,
}

/// Selects the implementation for the whole process.
pub fn set_kernels(k: Kernels) {
    FUSED.store(k == Kernels::Fused, Ordering::Relaxed);
}

/// Whether `fused_attention` may fuse (on by default, `RECYCLE_FUSED_ATTENTION=0` off):
/// `gpu-check` turns it off to measure training with the composed attention in the same run, and
/// for the rest of its run where the attention node fails its check (the switch lets
/// scripts/gpu/run.sh keep it off in the stages after).
pub static FUSED_ATTENTION: kernels::EnvSwitch = kernels::EnvSwitch::new("RECYCLE_FUSED_ATTENTION");

/// Turns the fused attention (the CPU kernel, the CUDA node) on or off for the whole process.
pub fn set_fused_attention(on: bool) {
    FUSED_ATTENTION.set(on);
}

/// Whether the fused attention is on (`set_fused_attention`).
pub fn fused_attention_on() -> bool {
    FUSED_ATTENTION.get()
}

/// Whether the residual blocks of the post-LN encoders may run as single graph nodes (on by
/// default, `RECYCLE_BLOCK_NODES=0` off; `kernels::block_node`): `gpu-check` turns it off to
/// measure training without them in the same run, and for the rest of its run where they fail
/// their check.
pub static FUSED_BLOCKS: kernels::EnvSwitch = kernels::EnvSwitch::new("RECYCLE_BLOCK_NODES");

/// Turns the block nodes on or off for the whole process.
pub fn set_fused_blocks(on: bool) {
    FUSED_BLOCKS.set(on);
}

/// Whether the block nodes are on (`set_fused_blocks`).
pub fn fused_blocks() -> bool {
    FUSED_BLOCKS.get()
}

/// The multiple of tokens training batches on `device` are padded to: on CUDA, 16 where one-pass
/// attention is on (`attention_node::set_flash`), since its kernels take whole tiles of 16, and 8
/// where attention's per-head products run in place (`attention_node::set_heads_in_place`), which
/// want every head's `[s, s]` matrix on a 16-byte boundary (`colmajor::heads_aligned`); else 1
/// (to the longest example). Padding is masked out; only the dropout masks, drawn over the padded
/// width, differ.
pub fn train_pad_multiple(device: &Device) -> usize {
    use super::kernels::attention_node::{flash_on, heads_in_place_on};
    pad_multiple_for(device.is_cuda(), flash_on(), heads_in_place_on())
}

/// `train_pad_multiple`'s rule.
fn pad_multiple_for(cuda: bool, flash: bool, heads_in_place: bool) -> usize {
    match (cuda, flash, heads_in_place) {
        (false, _, _) => 1,
        (true, true, _) => 16,
        (true, false, true) => 8,
        (true, false, false) => 1,
    }
}

thread_local! {
    /// See `set_blocks_on_cpu`.
    static BLOCKS_ON_CPU: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Block nodes made on this thread, for tests that must know the nodes ran.
    static BLOCK_NODES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// For tests, on the calling thread only: the block nodes, which train on CUDA, also run on the
/// CPU (with `attention_node::CpuPrims`; the CPU otherwise trains with its fused kernels), so that
/// the encoders' use of them is checked against transformers without a GPU.
pub fn set_blocks_on_cpu(on: bool) {
    BLOCKS_ON_CPU.with(|c| c.set(on));
}

/// How many block nodes this thread has made.
pub fn block_nodes_made() -> usize {
    BLOCK_NODES.with(|c| c.get())
}

/// Which implementation runs one op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The hand-written CPU kernels of `kernels` (f32, CPU memory only).
    Fused,
    /// candle's fused forward kernels (layer norm, softmax; any device): they record no gradient,
    /// so only for operands that record none either.
    ForwardOnly,
    /// candle ops, which run on every device and dtype with candle's own backward.
    Composed,
    /// recycle's CUDA kernels (`kernels::cuda`: f32 and bf16 on a CUDA device, with a backward),
    /// in builds with the `cuda` feature.
    Cuda,
}

/// Whether this build has recycle's CUDA kernels.
pub const CUDA_KERNELS: bool = cfg!(feature = "cuda");

/// One operand as the dispatch rule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operand {
    pub location: DeviceLocation,
    pub dtype: DType,
    /// Whether a backward pass could need a gradient through it (candle's `track_op`).
    pub tracks_grad: bool,
}

impl Operand {
    fn of(t: &Tensor) -> Self {
        Self {
            location: t.device().location(),
            dtype: t.dtype(),
            tracks_grad: t.track_op(),
        }
    }
}

/// The dispatch rule, pure: the fused kernels read and write f32 CPU buffers, so they run only
/// when they are selected and every operand is an f32 tensor on the CPU. When every operand is an
/// f32 or bf16 tensor on CUDA and the build has the CUDA kernels (`cuda_kernels`), those, with or
/// without gradients. Otherwise off the CPU, when nothing records a gradient and the dtype is f32,
/// bf16 or f16, candle's forward-only kernels; else the composed ops. CUDA tensors, bf16 and other
/// dtypes never reach the CPU kernels, nor CPU tensors the CUDA ones.
pub fn path_for(selected: Kernels, operands: &[Operand], cuda_kernels: bool) -> Path {
    let cpu_f32 = operands
        .iter()
        .all(|o| matches!(o.location, DeviceLocation::Cpu) && o.dtype == DType::F32);
    let cuda = cuda_kernels
        && operands.iter().all(|o| {
            matches!(o.location, DeviceLocation::Cuda { .. })
                && matches!(o.dtype, DType::F32 | DType::BF16)
        });
    // candle's forward kernels cover these dtypes. They exist here to save GPU launches; on the CPU
    // (bf16 is all that reaches them there) they measured slower than the composed ops.
    let candle_kernels = operands.iter().all(|o| {
        !o.tracks_grad
            && !matches!(o.location, DeviceLocation::Cpu)
            && matches!(o.dtype, DType::F32 | DType::BF16 | DType::F16)
    });
    match selected {
        Kernels::Composed => Path::Composed,
        Kernels::Fused if cpu_f32 => Path::Fused,
        Kernels::Fused if cuda => Path::Cuda,
        Kernels::Fused if candle_kernels => Path::ForwardOnly,
        Kernels::Fused => Path::Composed,
    }
}

/// The process-wide selection.
fn selected() -> Kernels {
    if FUSED.load(Ordering::Relaxed) {
        Kernels::Fused
    } else {
        Kernels::Composed
    }
}

/// The path for an op over `ts`.
fn path(ts: &[&Tensor]) -> Path {
    let operands: Vec<_> = ts.iter().map(|t| Operand::of(t)).collect();
    path_for(selected(), &operands, CUDA_KERNELS)
}

thread_local! {
    /// Host RNG for dropout masks on the CPU, whose candle RNG cannot be seeded (and for the
    /// seeds of CUDA's masks). One per thread: a job seeds it at load and draws from it on the
    /// thread that trains, so jobs (and tests) on other threads cannot shift its draws.
    static HOST_RNG: std::cell::RefCell<Option<rand::rngs::StdRng>> =
        const { std::cell::RefCell::new(None) };
}

/// Seeds dropout: the device RNG where candle can seed it (CUDA), the host RNG used for CPU masks
/// (this thread's).
pub fn seed(device: &Device, seed: u64) -> Result<()> {
    if !device.is_cpu() {
        device.set_seed(seed)?;
    }
    HOST_RNG.with(|r| *r.borrow_mut() = Some(rand::rngs::StdRng::seed_from_u64(seed)));
    Ok(())
}

/// Runs `f` with this thread's host RNG (seeded with 0 if `seed` never ran here).
fn with_host_rng<T>(f: impl FnOnce(&mut rand::rngs::StdRng) -> T) -> T {
    HOST_RNG.with(|r| {
        let mut r = r.borrow_mut();
        f(r.get_or_insert_with(|| rand::rngs::StdRng::seed_from_u64(0)))
    })
}

/// `n` dropout keep flags (1 = kept, with probability `1 - p`) from the host RNG: the one draw
/// sequence every CPU dropout path uses, so fused and composed paths drop the same elements.
fn keep_flags(n: usize, p: f32) -> Result<Vec<u8>> {
    Ok(with_host_rng(|rng| flags_from(rng, n, p)))
}

/// `x.transpose(1, 2).contiguous()` for a four-dimensional `x`: attention's split into heads and
/// the merge back.
pub fn swap12(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.rank() == 4 && path(&[x]) == Path::Cuda {
        return kernels::cuda::swap12(x);
    }
    x.transpose(1, 2)?.contiguous()
}

/// A seed for one dropout mask that is a function of a seed (CUDA's), from the host RNG `seed`
/// sets.
fn host_seed() -> Result<u64> {
    Ok(with_host_rng(|rng| rng.random()))
}

/// Rows `ids` of the embedding table `table` `[vocab, n]`, shaped `[ids.., n]`, in `dtype` (the
/// table's own, or the compute dtype of a mixed-precision forward handed the f32 master).
pub fn embedding(table: &Tensor, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    let node_route = match path(&[table]) {
        #[cfg(feature = "cuda")]
        Path::Cuda => true,
        _ => BLOCKS_ON_CPU.with(|c| c.get()) && table.device().is_cpu(),
    };
    if node_route
        && ids.dtype() == DType::U32
        && ids.device().same_device(table.device())
        && table.rank() == 2
    {
        // While training with a gradient sink: gathered from the f32 master, its gradient
        // deposited with the sink (`kernels::embedding_node`).
        if let Some(rows) = kernels::embedding_node::lookup(table, ids, dtype)? {
            return Ok(rows);
        }
        #[cfg(feature = "cuda")]
        if table.device().is_cuda() {
            return kernels::cuda::embedding(table, ids)?.to_dtype(dtype);
        }
    }
    let mut out_dims = ids.dims().to_vec();
    out_dims.push(table.dim(D::Minus1)?);
    table
        .index_select(&ids.flatten_all()?, 0)?
        .reshape(out_dims)?
        .to_dtype(dtype)
}

/// The embeddings node's switch (`RECYCLE_EMBEDDINGS_SUM=0` off).
pub static EMBEDDINGS_SUM: kernels::EnvSwitch = kernels::EnvSwitch::new("RECYCLE_EMBEDDINGS_SUM");

/// Turns the embeddings' one node (`embeddings_sum`) on or off for the whole process (on by
/// default, `RECYCLE_EMBEDDINGS_SUM=0` off; `gpu-check` times both).
pub fn set_embeddings_sum(on: bool) {
    EMBEDDINGS_SUM.set(on);
}

/// Whether the embeddings' one node is on (`set_embeddings_sum`).
pub fn embeddings_sum_on() -> bool {
    EMBEDDINGS_SUM.get()
}

/// The sum of lookups `tables[k]` rows `ids[k]` (two or three, one shape of ids), in `dtype`: an
/// encoder's word, position and token-type embeddings. While training with a gradient sink on the
/// device that takes the block nodes, one node (`kernels::embedding_node::lookup_sum`, the same
/// bits); elsewhere the lookups (`embedding`) added in order.
pub fn embeddings_sum(tables: &[&Tensor], ids: &[&Tensor], dtype: DType) -> Result<Tensor> {
    if tables.is_empty() || tables.len() != ids.len() {
        candle_core::bail!("embeddings sum: each table needs its ids");
    }
    let node_route = match path(&[tables[0]]) {
        #[cfg(feature = "cuda")]
        Path::Cuda => true,
        _ => BLOCKS_ON_CPU.with(|c| c.get()) && tables[0].device().is_cpu(),
    };
    if node_route && embeddings_sum_on() && (2..=3).contains(&tables.len()) {
        if let Some(rows) = kernels::embedding_node::lookup_sum(tables, ids, dtype)? {
            return Ok(rows);
        }
    }
    let mut sum = embedding(tables[0], ids[0], dtype)?;
    for (t, i) in tables.iter().zip(ids).skip(1) {
        sum = sum.add(&embedding(t, i, dtype)?)?;
    }
    Ok(sum)
}

/// The keep flags of `n` draws `u ~ U[0, 1)` kept where `u >= p`, exactly as `rng.random::<f32>()`
/// would draw them, but from words filled in bulk. rand's f32 is `(w >> 8) · 2⁻²⁴` for one 32-bit
/// word `w`, so `u >= p` is the integer test `w >> 8 >= ⌈p · 2²⁴⌉`; and filling a `[u32]` consumes
/// the generator's words in the same order as one `next_u32` per draw. Same flags, same stream
/// position afterwards (a test checks both), several times faster.
fn flags_from(rng: &mut impl Rng, n: usize, p: f32) -> Vec<u8> {
    let threshold = (f64::from(p) * f64::from(1u32 << 24)).ceil() as u32;
    let mut flags = vec![0u8; n];
    let mut words = [0u32; 1024];
    for chunk in flags.chunks_mut(words.len()) {
        let words = &mut words[..chunk.len()];
        rng.fill(words);
        for (f, &w) in chunk.iter_mut().zip(words.iter()) {
            *f = u8::from(w >> 8 >= threshold);
        }
    }
    flags
}

/// Layer normalisation over the last dimension, `(x - mean) / sqrt(var + eps) * w + b`, computed in
/// f32 for half-precision inputs.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = x.dims().last().copied().unwrap_or(0);
    let fits = dim > 0 && w.dims() == [dim] && b.dims() == [dim];
    let same_dtype = w.dtype() == x.dtype() && b.dtype() == x.dtype();
    match path(&[x, w, b]) {
        Path::Fused if fits => kernels::layer_norm(x, w, b, eps),
        #[cfg(feature = "cuda")]
        Path::Cuda if fits && same_dtype && dim <= kernels::cuda::MAX_LAYER_NORM_DIM => {
            kernels::cuda::layer_norm(x, w, b, eps)
        }
        Path::ForwardOnly if fits && same_dtype => forward_only_layer_norm(x, w, b, eps),
        _ => composed_layer_norm(x, w, b, eps),
    }
}

/// candle's layer norm kernel: statistics in f32 for every dtype, one pass (`E[x²] - mean²`), no
/// gradient.
fn forward_only_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    candle_nn::ops::layer_norm(
        &x.contiguous()?,
        &w.contiguous()?,
        &b.contiguous()?,
        eps as f32,
    )
}

fn composed_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = match dtype {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    };
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centred = xf.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(w)?.broadcast_add(b)
}

/// A dense layer `x·Wᵀ + b` over the last dimension of `x` (`w` `[out, in]`, `b` `[out]`): one
/// fused op with a hand-written backward on the CPU, composed candle ops elsewhere.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let mut operands = vec![x, w];
    operands.extend(b);
    let shapes_fit = match (x.dims().last(), w.dims(), b.map(|b| b.dims())) {
        (Some(inp), [out, w_in], bias) => {
            inp == w_in && *out > 0 && bias.is_none_or(|d| d == [*out])
        }
        _ => false,
    };
    if shapes_fit && x.rank() >= 2 {
        match path(&operands) {
            Path::Fused => return kernels::linear(x, w, b),
            #[cfg(feature = "cuda")]
            Path::Cuda => match b {
                Some(b) if b.dtype() == x.dtype() && w.dtype() == x.dtype() => {
                    return kernels::cuda::linear(x, w, b)
                }
                None if w.dtype() == x.dtype() => return kernels::cuda::linear_no_bias(x, w),
                _ => {}
            },
            _ => {}
        }
    }
    composed_linear(x, w, b)
}

/// `linear` from candle ops: one `[rows, in]·[in, out]` matmul over every leading dimension (a
/// weight broadcast over the batch would run `batch` small matmuls and, backwards, materialise
/// `batch` copies of the weight's gradient), then the bias.
fn composed_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = match x.dims() {
        [] => candle_core::bail!("linear: a scalar input has no features"),
        [_] => x.unsqueeze(0)?.matmul(&w.t()?)?.squeeze(0)?,
        [.., last] => {
            let mut out_dims = x.dims().to_vec();
            let rows = x.elem_count() / last;
            if let Some(d) = out_dims.last_mut() {
                *d = w.dim(0)?;
            }
            x.reshape((rows, *last))?
                .matmul(&w.t()?)?
                .reshape(out_dims)?
        }
    };
    match b {
        Some(b) => bias_add(&y, b),
        None => Ok(y),
    }
}

/// `y + b`, `b` `[n]` broadcast over the leading dimensions of `y` `[.., n]`.
fn bias_add(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if path(&[y, b]) == Path::Cuda
        && y.dtype() == b.dtype()
        && b.rank() == 1
        && y.dims().last() == Some(&b.dim(0)?)
    {
        return kernels::cuda::bias_add(y, b);
    }
    y.broadcast_add(b)
}

/// Additive attention bias `[batch, 1, 1, seq]` from a `[batch, seq]` 0/1 mask: 0 where attended,
/// a large negative where padded. Computed once per forward and shared by every layer.
pub fn attention_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?;
    bias.reshape((b, 1, 1, s))?.to_dtype(dtype)
}

/// Softmax over the last dimension of `scores + bias`, where `bias` comes from `attention_bias`.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor) -> Result<Tensor> {
    scaled_masked_softmax(scores, bias, 1.0)
}

/// Softmax over the last dimension of `scale * scores + bias`, scores `[b, h, q, k]` and `bias`
/// from `attention_bias` (`[b, 1, 1, k]`): attention probabilities in one pass on the CPU.
pub fn scaled_masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let shapes_fit = matches!(
        (scores.dims(), bias.dims()),
        ([b, _, _, k], [bb, 1, 1, bk]) if b == bb && k == bk
    );
    if shapes_fit {
        match path(&[scores, bias]) {
            Path::Fused => return kernels::masked_softmax(scores, bias, scale),
            #[cfg(feature = "cuda")]
            Path::Cuda if scores.dtype() == bias.dtype() => {
                return kernels::cuda::masked_softmax(scores, bias, scale)
            }
            _ => {}
        }
    }
    composed_scaled_masked_softmax(scores, bias, scale)
}

fn composed_scaled_masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let dtype = scores.dtype();
    if matches!(dtype, DType::F16 | DType::BF16) {
        // Scale, mask and normalise in f32: bf16's 8-bit mantissa would round the scores first.
        let p = composed_scaled_masked_softmax(
            &scores.to_dtype(DType::F32)?,
            &bias.to_dtype(DType::F32)?,
            scale,
        )?;
        return p.to_dtype(dtype);
    }
    let scaled = if scale == 1.0 {
        scores.clone()
    } else {
        (scores * scale)?
    };
    softmax(&scaled.broadcast_add(bias)?)
}

/// Softmax over the last dimension; half-precision inputs are exponentiated and summed in f32 and
/// the probabilities cast back.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    if matches!(dtype, DType::F16 | DType::BF16) {
        return softmax(&x.to_dtype(DType::F32)?)?.to_dtype(dtype);
    }
    if path(&[x]) == Path::ForwardOnly {
        return forward_only_softmax(x);
    }
    // The shift is a constant for the gradient: softmax is invariant to it.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// candle's softmax kernel over the last dimension (max-shifted, no gradient).
fn forward_only_softmax(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax_last_dim(&x.contiguous()?)
}

/// The attention core of the BERT-family encoders, fused: `q`, `k`, `v` `[b, s, hidden]`, `bias`
/// `[b, 1, 1, s]` from `attention_bias`; dropout `p` on the probabilities in `Mode::Train`. On the
/// CPU (f32) the fused kernel (the same RNG draws, in the same order, as `dropout` on `[b, h, s, s]`
/// probabilities); on CUDA with recycle's kernels one graph node over them
/// (`kernels::attention_node`, the mask from one host seed). Returns `None` where the composed path
/// must run (other devices or dtypes, other shapes, or the fused kernels turned off).
#[allow(clippy::too_many_arguments)]
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    scale: f64,
    p: f32,
    mode: Mode,
) -> Result<Option<Tensor>> {
    let route = path(&[q, k, v, bias]);
    if !matches!(route, Path::Fused | Path::Cuda) || p >= 1.0 || !FUSED_ATTENTION.get() {
        return Ok(None);
    }
    let ([b, s, hidden], [bb, 1, 1, bs]) = (q.dims(), bias.dims()) else {
        return Ok(None);
    };
    if k.dims() != q.dims()
        || v.dims() != q.dims()
        || b != bb
        || s != bs
        || heads == 0
        || hidden % heads != 0
    {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    if route == Path::Cuda {
        let drop = seeded_dropout(p, mode)?;
        let cuda = kernels::cuda::CudaPrims;
        return kernels::attention_node::attention(cuda, q, k, v, bias, heads, scale, drop)
            .map(Some);
    }
    if route != Path::Fused {
        return Ok(None);
    }
    let keep = if mode == Mode::Train && p > 0.0 {
        let flags = keep_flags(b * heads * s * s, p)?;
        Some(kernels::Keep {
            flags: std::sync::Arc::new(flags),
            scale: 1.0 / (1.0 - p),
        })
    } else {
        None
    };
    kernels::attention(q, k, v, bias, heads, scale as f32, keep).map(Some)
}

/// The prims a block node runs with, where one may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockRoute {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda,
}

/// Where the block nodes run: only where something records a gradient (without one, the ordinary
/// ops make no nodes either), over activations of one dtype and parameters of that dtype or uncast
/// masters that the gradient sink in scope knows (a mixed-precision forward hands those over,
/// `model::casting`; the node gathers them cast), on CUDA with recycle's kernels (or on the CPU's
/// fused path for a test thread that asked, `set_blocks_on_cpu`).
fn block_route(acts: &[&Tensor], params: &[&Tensor]) -> Result<Option<BlockRoute>> {
    let Some(x) = acts.first() else {
        return Ok(None);
    };
    let dtype = x.dtype();
    let all = || acts.iter().chain(params.iter());
    // While a stack records, the input is detached and the stack takes its gradient.
    let stacking = kernels::stack::recording();
    if !FUSED_BLOCKS.get()
        || !(stacking || all().any(|t| t.track_op()))
        || acts.iter().any(|t| t.dtype() != dtype)
    {
        return Ok(None);
    }
    let uncast: Vec<&Tensor> = params
        .iter()
        .copied()
        .filter(|t| t.dtype() != dtype)
        .collect();
    if !uncast.is_empty() {
        // The node packs from the sink's masters only when its input records a gradient.
        let known = match GradSink::active() {
            Some(sink) if x.track_op() || stacking => sink.masters_of(&uncast)?.is_some(),
            _ => false,
        };
        if !known {
            return Ok(None);
        }
    }
    let tensors: Vec<&Tensor> = all().copied().collect();
    Ok(match path(&tensors) {
        #[cfg(feature = "cuda")]
        Path::Cuda => Some(BlockRoute::Cuda),
        Path::Fused if BLOCKS_ON_CPU.with(|c| c.get()) => Some(BlockRoute::Cpu),
        // A test thread's blocks in bf16 on the CPU, where the fused kernels take only f32.
        Path::Composed
            if BLOCKS_ON_CPU.with(|c| c.get())
                && selected() == Kernels::Fused
                && tensors.iter().all(|t| t.device().is_cpu()) =>
        {
            Some(BlockRoute::Cpu)
        }
        _ => None,
    })
}

/// Whether the block nodes would take layers over `x` on its device (the device and dtype part of
/// `block_route`): on CUDA with recycle's kernels, or on the CPU for a test thread that asked.
/// `kernels::stack::run` asks before stacking an encoder's layers.
pub fn blocks_expected(x: &Tensor) -> bool {
    if !FUSED_BLOCKS.get() {
        return false;
    }
    match path(&[x]) {
        #[cfg(feature = "cuda")]
        Path::Cuda => true,
        Path::Fused | Path::Composed => BLOCKS_ON_CPU.with(|c| c.get()) && x.device().is_cpu(),
        _ => false,
    }
}

/// Dropout `p` of one node's call (attention, a block) with a fresh seed, where it drops anything.
fn seeded_dropout(p: f32, mode: Mode) -> Result<Option<kernels::attention_node::SeededDropout>> {
    if mode == Mode::Train && p > 0.0 {
        Ok(Some(kernels::attention_node::SeededDropout {
            p,
            seed: host_seed()?,
        }))
    } else {
        Ok(None)
    }
}

/// Whether a dense layer is `[out, inp]` with a bias.
fn dense_fits(d: &kernels::block_node::Dense, out: usize, inp: usize) -> bool {
    d.w.dims() == [out, inp] && d.b.dims() == [out]
}

/// Whether a layer norm is over `n` features within the kernels' limit.
fn norm_fits(n: &kernels::block_node::Norm, dim: usize) -> bool {
    #[cfg(feature = "cuda")]
    let limit = kernels::cuda::MAX_LAYER_NORM_DIM;
    #[cfg(not(feature = "cuda"))]
    let limit = usize::MAX;
    n.w.dims() == [dim] && n.b.dims() == [dim] && dim <= limit
}

/// A post-LN attention block `LN(drop(attention(x)·Woᵀ + bo) + x)` as one graph node
/// (`kernels::block_node`) where one may run (see `block_route`): `x` `[b, s, hidden]`, `bias`
/// from `attention_bias`, dropout `probs_p` on the attention probabilities and `out_p` on the
/// output layer's result in `Mode::Train`. `None` where the caller must compose the block.
pub fn attention_block(
    x: &Tensor,
    bias: &Tensor,
    params: &kernels::block_node::AttentionParams,
    probs_p: f32,
    out_p: f32,
    mode: Mode,
) -> Result<Option<Tensor>> {
    let p = params;
    let ([b, s, hidden], [bb, 1, 1, bs]) = (x.dims(), bias.dims()) else {
        return Ok(None);
    };
    let (b, s, hidden) = (*b, *s, *hidden);
    let fits = b == *bb
        && s == *bs
        && p.heads > 0
        && hidden % p.heads == 0
        && [p.q, p.k, p.v, p.out]
            .iter()
            .all(|d| dense_fits(d, hidden, hidden))
        && norm_fits(&p.norm, hidden)
        && probs_p < 1.0
        && out_p < 1.0;
    let params = [
        p.q.w, p.q.b, p.k.w, p.k.b, p.v.w, p.v.b, p.out.w, p.out.b, p.norm.w, p.norm.b,
    ];
    let Some(route) = block_route(&[x, bias], &params)?.filter(|_| fits) else {
        return Ok(None);
    };
    let (probs_drop, out_drop) = (seeded_dropout(probs_p, mode)?, seeded_dropout(out_p, mode)?);
    BLOCK_NODES.with(|c| c.set(c.get() + 1));
    use kernels::block_node::attention_block as block;
    match route {
        BlockRoute::Cpu => {
            let prims = kernels::attention_node::CpuPrims;
            block(prims, x, bias, p, probs_drop, out_drop).map(Some)
        }
        #[cfg(feature = "cuda")]
        BlockRoute::Cuda => {
            let prims = kernels::cuda::CudaPrims;
            block(prims, x, bias, p, probs_drop, out_drop).map(Some)
        }
    }
}

/// A post-LN feed-forward block `LN(drop(gelu(x·W1ᵀ + b1)·W2ᵀ + b2) + x)` (exact GELU) as one
/// graph node where one may run (see `block_route`); `None` where the caller must compose it.
pub fn ffn_block(
    x: &Tensor,
    params: &kernels::block_node::FfnParams,
    p: f32,
    mode: Mode,
) -> Result<Option<Tensor>> {
    let prm = params;
    let (Some(&hidden), Some(&inner)) = (x.dims().last(), prm.up.b.dims().first()) else {
        return Ok(None);
    };
    let fits = x.rank() >= 2
        && dense_fits(&prm.up, inner, hidden)
        && dense_fits(&prm.down, hidden, inner)
        && norm_fits(&prm.norm, hidden)
        && p < 1.0;
    let params = [
        prm.up.w, prm.up.b, prm.down.w, prm.down.b, prm.norm.w, prm.norm.b,
    ];
    let Some(route) = block_route(&[x], &params)?.filter(|_| fits) else {
        return Ok(None);
    };
    let drop = seeded_dropout(p, mode)?;
    BLOCK_NODES.with(|c| c.set(c.get() + 1));
    use kernels::block_node::ffn_block as block;
    match route {
        BlockRoute::Cpu => block(kernels::attention_node::CpuPrims, x, prm, drop).map(Some),
        #[cfg(feature = "cuda")]
        BlockRoute::Cuda => block(kernels::cuda::CudaPrims, x, prm, drop).map(Some),
    }
}

/// Exact (erf) GELU, transformers' "gelu"; candle's `gelu_erf` has a backward.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    match path(&[x]) {
        Path::Fused => kernels::gelu(x),
        #[cfg(feature = "cuda")]
        Path::Cuda => kernels::cuda::gelu(x),
        _ => x.gelu_erf(),
    }
}

/// Inverted dropout: in `Mode::Train` zeroes each element with probability `p` and scales the rest
/// by `1 / (1 - p)`; the identity in `Mode::Eval` or when `p` is 0.
pub fn dropout(x: &Tensor, p: f32, mode: Mode) -> Result<Tensor> {
    if mode == Mode::Eval || p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    match path(&[x]) {
        // The same draws as the composed mask below, kept as one byte per element.
        Path::Fused => kernels::dropout(x, keep_flags(x.elem_count(), p)?, 1.0 / (1.0 - p)),
        // The mask is a hash of (seed, element): one seed per call from the seeded host RNG.
        #[cfg(feature = "cuda")]
        Path::Cuda => kernels::cuda::dropout(x, p, host_seed()?),
        _ => composed_dropout(x, p),
    }
}

/// Dropout as a multiplication by an f32 mask tensor (`0 < p < 1`).
fn composed_dropout(x: &Tensor, p: f32) -> Result<Tensor> {
    let keep = if x.device().is_cpu() {
        let scale = 1.0 / (1.0 - p);
        let v: Vec<f32> = keep_flags(x.elem_count(), p)?
            .into_iter()
            .map(|k| f32::from(k) * scale)
            .collect();
        Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())?
    } else {
        let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
        (u.ge(f64::from(p))?.to_dtype(DType::F32)? * (1.0 / (1.0 - f64::from(p))))?
            .to_dtype(x.dtype())?
    };
    x.mul(&keep)
}

/// The activations the supported configs name (`hidden_act` / `activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Activation {
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation ("gelu_new", "gelu_pytorch_tanh").
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
    #[serde(rename = "tanh")]
    Tanh,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => gelu(x),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
            Self::Tanh => x.tanh(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// Only CUDA pads for one-pass attention: the CPU has no such kernel, whatever the switch says.
    #[test]
    fn the_cpu_never_pads_training_batches_for_one_pass_attention() {
        let flash = crate::model::kernels::attention_node::flash_on();
        crate::model::kernels::attention_node::set_flash(true);
        let on = train_pad_multiple(&Device::Cpu);
        crate::model::kernels::attention_node::set_flash(flash);
        assert_eq!(on, 1);
        assert_eq!(train_pad_multiple(&Device::Cpu), 1);
    }

    /// CUDA pads to whole tiles for one-pass attention, to whole 16-byte head matrices for the
    /// heads in place, and not at all with neither; the CPU never.
    #[test]
    fn training_batches_are_padded_for_the_cuda_attention_paths_only() {
        assert_eq!(pad_multiple_for(true, true, true), 16);
        assert_eq!(pad_multiple_for(true, true, false), 16);
        assert_eq!(pad_multiple_for(true, false, true), 8);
        assert_eq!(pad_multiple_for(true, false, false), 1);
        for (flash, heads) in [(true, true), (false, true), (true, false), (false, false)] {
            assert_eq!(pad_multiple_for(false, flash, heads), 1);
        }
    }

    /// `|a - b| <= tol * max(1, |b|)` elementwise.
    fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= tol * y.abs().max(1.0),
                "{what}[{i}]: fused {x} vs composed {y}"
            );
        }
    }

    fn randn(shape: &[usize], std: f64, seed: u64) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                // Sum of uniforms: roughly normal, deterministic per seed.
                let u: f32 = (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0;
                u * std as f32
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Gradients of `sum(f(inputs) * r)` for a fixed random `r`, and the output.
    fn grads(
        inputs: &[Tensor],
        f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) -> (Tensor, Vec<Option<Tensor>>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        let r = randn(y.dims(), 1.0, 99);
        let store = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g = ts.iter().map(|t| store.get(t).cloned()).collect();
        (y, g)
    }

    fn compare(
        inputs: &[Tensor],
        trained: &[bool],
        fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        composed: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        what: &str,
    ) {
        let (yf, gf) = grads(inputs, fused);
        let (yc, gc) = grads(inputs, composed);
        assert_close(&yf, &yc, 1e-5, &format!("{what} forward"));
        for (i, ((a, b), &t)) in gf.iter().zip(&gc).zip(trained).enumerate() {
            if !t {
                continue;
            }
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            assert_close(a, b, 1e-5, &format!("{what} grad of input {i}"));
        }
    }

    #[test]
    fn fused_layer_norm_matches_the_composed_op_forward_and_backward() {
        let x = (randn(&[3, 5, 48], 2.0, 1) + 0.7).unwrap();
        let w = (randn(&[48], 0.3, 2) + 1.0).unwrap();
        let b = randn(&[48], 0.3, 3);
        compare(
            &[x, w, b],
            &[true, true, true],
            &|t| kernels::layer_norm(&t[0], &t[1], &t[2], 1e-12),
            &|t| composed_layer_norm(&t[0], &t[1], &t[2], 1e-12),
            "layer_norm",
        );
    }

    #[test]
    fn fused_masked_softmax_matches_the_composed_op_forward_and_backward() {
        let scores = randn(&[2, 3, 7, 7], 3.0, 4);
        let mask = Tensor::new(
            &[[1u32, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]],
            &Device::Cpu,
        )
        .unwrap();
        let bias = attention_bias(&mask, DType::F32).unwrap();
        compare(
            &[scores, bias],
            &[true, false],
            &|t| kernels::masked_softmax(&t[0], &t[1], 0.125),
            &|t| composed_scaled_masked_softmax(&t[0], &t[1], 0.125),
            "masked_softmax",
        );
    }

    #[test]
    fn bulk_keep_flags_are_the_per_draw_flags_and_leave_the_stream_in_the_same_place() {
        for (n, p, skip) in [
            (5000, 0.1f32, 0),
            (3, 0.5, 7),
            (2049, 0.9, 13),
            (100, 0.0, 1),
        ] {
            let mut a = rand::rngs::StdRng::seed_from_u64(42);
            let mut b = rand::rngs::StdRng::seed_from_u64(42);
            // Start mid-block, as after an earlier dropout of odd size.
            for _ in 0..skip {
                let _: u32 = a.random();
                let _: u32 = b.random();
            }
            let per_draw: Vec<u8> = (0..n).map(|_| u8::from(a.random::<f32>() >= p)).collect();
            let bulk = flags_from(&mut b, n, p);
            assert_eq!(per_draw, bulk, "n {n}, p {p}");
            assert_eq!(
                a.random::<u64>(),
                b.random::<u64>(),
                "stream position after n {n}"
            );
        }
        // Thresholds right at a representable draw: u = p exactly is kept (`u >= p`).
        let mut a = rand::rngs::StdRng::seed_from_u64(3);
        let draws: Vec<f32> = (0..64).map(|_| a.random::<f32>()).collect();
        for &u in &draws {
            let mut b = rand::rngs::StdRng::seed_from_u64(3);
            let flags = flags_from(&mut b, draws.len(), u);
            let expect: Vec<u8> = draws.iter().map(|&d| u8::from(d >= u)).collect();
            assert_eq!(flags, expect, "threshold {u}");
        }
    }

    #[test]
    fn fused_linear_matches_the_composed_op_forward_and_backward() {
        // Odd sizes (no multiple of a SIMD width) and a size large enough for gemm to split the
        // work over threads and for the bias gradient to be summed in several row blocks.
        for (shape, out, seed) in [(vec![3, 5, 13], 7, 20), (vec![4, 129, 96], 200, 30)] {
            let inp = *shape.last().unwrap();
            let x = randn(&shape, 1.0, seed);
            let w = randn(&[out, inp], 0.2, seed + 1);
            let b = randn(&[out], 0.5, seed + 2);
            compare(
                &[x.clone(), w.clone(), b],
                &[true, true, true],
                &|t| kernels::linear(&t[0], &t[1], Some(&t[2])),
                &|t| composed_linear(&t[0], &t[1], Some(&t[2])),
                &format!("linear {shape:?}→{out}"),
            );
            compare(
                &[x, w],
                &[true, true],
                &|t| kernels::linear(&t[0], &t[1], None),
                &|t| composed_linear(&t[0], &t[1], None),
                &format!("linear without bias {shape:?}→{out}"),
            );
        }
    }

    #[test]
    fn linear_dispatch_takes_the_fused_op_only_where_its_shapes_fit() {
        let x = randn(&[2, 3, 4], 1.0, 40);
        let w = randn(&[5, 4], 1.0, 41);
        let b = randn(&[5], 1.0, 42);
        let y = linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.dims(), [2, 3, 5]);
        // A weight whose input width does not match is an error from the composed matmul, not a
        // fused kernel reading out of bounds.
        let bad = randn(&[5, 3], 1.0, 43);
        assert!(linear(&x, &bad, Some(&b)).is_err());
        // A one-dimensional input takes the composed path and still gives `[out]`.
        let v = randn(&[4], 1.0, 44);
        assert_eq!(linear(&v, &w, None).unwrap().dims(), [5]);
    }

    #[test]
    fn fused_gelu_matches_the_composed_op_forward_and_backward() {
        let x = randn(&[4, 9, 33], 3.0, 5);
        compare(
            &[x],
            &[true],
            &|t| kernels::gelu(&t[0]),
            &|t| t[0].gelu_erf(),
            "gelu",
        );
    }

    #[test]
    fn fused_dropout_matches_the_composed_op_forward_and_backward() {
        // The same keep flags drive the kernel and a composed multiplication by an f32 mask.
        let x = randn(&[3, 40, 17], 1.0, 7);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let keep: Vec<u8> = (0..x.elem_count())
            .map(|_| u8::from(rng.random::<f32>() >= 0.1))
            .collect();
        assert!(keep.contains(&0) && keep.contains(&1));
        let scale = 1.0 / 0.9;
        let mask: Vec<f32> = keep.iter().map(|&k| f32::from(k) * scale).collect();
        let mask = Tensor::from_vec(mask, x.shape(), &Device::Cpu).unwrap();
        compare(
            &[x],
            &[true],
            &|t| kernels::dropout(&t[0], keep.clone(), scale),
            &|t| t[0].mul(&mask),
            "dropout",
        );
    }

    /// The attention core from composed ops: heads split by copies, softmax, an optional f32
    /// dropout mask `[b, h, s, s]`, heads merged.
    fn composed_attention(t: &[Tensor], heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, s, hidden) = t[0].dims3()?;
        let hd = hidden / heads;
        let split = |x: &Tensor| x.reshape((b, s, heads, hd))?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (split(&t[0])?, split(&t[1])?, split(&t[2])?);
        let scores = q.matmul(&k.t()?.contiguous()?)?;
        let mut probs = composed_scaled_masked_softmax(&scores, &t[3], 1.0 / (hd as f64).sqrt())?;
        if let Some(m) = mask {
            probs = probs.mul(m)?;
        }
        probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, hidden))
    }

    #[test]
    fn fused_attention_matches_the_composed_ops_forward_and_backward() {
        let (b, s, hidden, heads) = (2, 9, 24, 3);
        let q = randn(&[b, s, hidden], 1.5, 21);
        let k = randn(&[b, s, hidden], 1.5, 22);
        let v = randn(&[b, s, hidden], 1.0, 23);
        let mask = Tensor::new(
            &[[1u32, 1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]],
            &Device::Cpu,
        )
        .unwrap();
        let bias = attention_bias(&mask, DType::F32).unwrap();
        let scale = 1.0 / ((hidden / heads) as f32).sqrt();
        // Without dropout.
        compare(
            &[q.clone(), k.clone(), v.clone(), bias.clone()],
            &[true, true, true, false],
            &|t| kernels::attention(&t[0], &t[1], &t[2], &t[3], heads, scale, None),
            &|t| composed_attention(t, heads, None),
            "attention",
        );
        // With dropout: the same keep flags as an f32 mask.
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let flags: Vec<u8> = (0..b * heads * s * s)
            .map(|_| u8::from(rng.random::<f32>() >= 0.2))
            .collect();
        assert!(flags.contains(&0) && flags.contains(&1));
        let keep_scale = 1.0 / 0.8;
        let m: Vec<f32> = flags.iter().map(|&f| f32::from(f) * keep_scale).collect();
        let m = Tensor::from_vec(m, (b, heads, s, s), &Device::Cpu).unwrap();
        let keep = kernels::Keep {
            flags: std::sync::Arc::new(flags),
            scale: keep_scale,
        };
        compare(
            &[q, k, v, bias],
            &[true, true, true, false],
            &|t| kernels::attention(&t[0], &t[1], &t[2], &t[3], heads, scale, Some(keep.clone())),
            &|t| composed_attention(t, heads, Some(&m)),
            "attention with dropout",
        );
    }

    #[test]
    fn fused_attention_draws_dropout_in_the_composed_paths_order() {
        // `fused_attention` in training mode draws one flag per probability, `[b, h, s, s]`
        // row-major, from the seeded host RNG — the order `dropout` on the probabilities used.
        let (b, s, hidden, heads, p) = (2, 6, 16, 2, 0.3f32);
        let q = randn(&[b, s, hidden], 1.0, 31);
        let k = randn(&[b, s, hidden], 1.0, 32);
        let v = randn(&[b, s, hidden], 1.0, 33);
        let mask = Tensor::ones((b, s), DType::U32, &Device::Cpu).unwrap();
        let bias = attention_bias(&mask, DType::F32).unwrap();
        let scale = 1.0 / ((hidden / heads) as f64).sqrt();
        seed(&Device::Cpu, 5).unwrap();
        let fused = fused_attention(&q, &k, &v, &bias, heads, scale, p, Mode::Train)
            .unwrap()
            .expect("f32 CPU tensors take the fused path");
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let m: Vec<f32> = (0..b * heads * s * s)
            .map(|_| {
                if rng.random::<f32>() >= p {
                    1.0 / (1.0 - p)
                } else {
                    0.0
                }
            })
            .collect();
        let m = Tensor::from_vec(m, (b, heads, s, s), &Device::Cpu).unwrap();
        let composed = composed_attention(&[q, k, v, bias], heads, Some(&m)).unwrap();
        assert_close(&fused, &composed, 1e-5, "attention with seeded dropout");
    }

    /// The rule as a build without the CUDA kernels applies it.
    fn path_for_here(selected: Kernels, operands: &[Operand]) -> Path {
        path_for(selected, operands, false)
    }

    #[test]
    fn with_cuda_kernels_f32_and_bf16_cuda_operands_take_them_gradients_or_not() {
        use candle_core::DeviceLocation::{Cpu, Cuda};
        let cuda = Cuda { gpu_id: 0 };
        let op = |location, dtype, tracks_grad| Operand {
            location,
            dtype,
            tracks_grad,
        };
        for tracks_grad in [true, false] {
            for dtype in [DType::F32, DType::BF16] {
                let o = op(cuda, dtype, tracks_grad);
                assert_eq!(path_for(Kernels::Fused, &[o, o], true), Path::Cuda);
                assert_eq!(path_for(Kernels::Composed, &[o], true), Path::Composed);
            }
            // f16 and f64 are not among the kernels' types.
            assert_eq!(
                path_for(Kernels::Fused, &[op(cuda, DType::F16, tracks_grad)], true),
                if tracks_grad {
                    Path::Composed
                } else {
                    Path::ForwardOnly
                }
            );
            assert_eq!(
                path_for(Kernels::Fused, &[op(cuda, DType::F64, tracks_grad)], true),
                Path::Composed
            );
            // A CPU operand among CUDA ones: never the CUDA kernels.
            assert_eq!(
                path_for(
                    Kernels::Fused,
                    &[
                        op(cuda, DType::F32, tracks_grad),
                        op(Cpu, DType::F32, tracks_grad)
                    ],
                    true
                ),
                Path::Composed
            );
            // CPU f32 keeps the CPU kernels in a CUDA build.
            assert_eq!(
                path_for(Kernels::Fused, &[op(Cpu, DType::F32, tracks_grad)], true),
                Path::Fused
            );
        }
    }

    #[test]
    fn dispatch_rule_sends_only_cpu_f32_to_the_fused_kernels() {
        use candle_core::DeviceLocation::{Cpu, Cuda};
        let cuda = Cuda { gpu_id: 0 };
        let op = |location, dtype, tracks_grad| Operand {
            location,
            dtype,
            tracks_grad,
        };
        let f32_cpu = op(Cpu, DType::F32, true);
        assert_eq!(path_for_here(Kernels::Fused, &[f32_cpu]), Path::Fused);
        assert_eq!(
            path_for_here(Kernels::Fused, &[f32_cpu, f32_cpu]),
            Path::Fused
        );
        // Without gradients too: CPU f32 keeps its own kernels.
        assert_eq!(
            path_for_here(Kernels::Fused, &[op(Cpu, DType::F32, false)]),
            Path::Fused
        );
        for tracks_grad in [true, false] {
            // CUDA never reaches the CPU kernels: composed ops when a gradient may be needed,
            // candle's forward kernels when none can be.
            let off_cpu_kernels = if tracks_grad {
                Path::Composed
            } else {
                Path::ForwardOnly
            };
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                assert_eq!(
                    path_for_here(Kernels::Fused, &[op(cuda, dtype, tracks_grad)]),
                    off_cpu_kernels
                );
            }
            // bf16 on the CPU, and a mix with one bf16 or CUDA operand, take the composed ops.
            assert_eq!(
                path_for_here(Kernels::Fused, &[op(Cpu, DType::BF16, tracks_grad)]),
                Path::Composed
            );
            assert_eq!(
                path_for_here(
                    Kernels::Fused,
                    &[
                        op(Cpu, DType::F32, false),
                        op(Cpu, DType::BF16, tracks_grad)
                    ]
                ),
                Path::Composed
            );
            assert_eq!(
                path_for_here(
                    Kernels::Fused,
                    &[
                        op(Cpu, DType::F32, false),
                        op(cuda, DType::F32, tracks_grad)
                    ]
                ),
                Path::Composed
            );
            // Deselected: composed everywhere.
            for o in [
                op(Cpu, DType::F32, tracks_grad),
                op(cuda, DType::BF16, tracks_grad),
            ] {
                assert_eq!(path_for_here(Kernels::Composed, &[o]), Path::Composed);
            }
        }
        // candle's forward kernels have no f64 on the CPU.
        for location in [Cpu, cuda] {
            assert_eq!(
                path_for_here(Kernels::Fused, &[op(location, DType::F64, false)]),
                Path::Composed
            );
        }
        // One operand that records a gradient is enough to need the composed ops.
        assert_eq!(
            path_for_here(
                Kernels::Fused,
                &[op(cuda, DType::F32, false), op(cuda, DType::F32, true)]
            ),
            Path::Composed
        );
    }

    #[test]
    fn forward_only_kernels_match_the_composed_ops() {
        let x = (randn(&[3, 5, 48], 1.3, 41) + 0.7).unwrap();
        let w = (randn(&[48], 0.2, 42) + 1.0).unwrap();
        let b = randn(&[48], 0.1, 43);
        let want = composed_layer_norm(&x, &w, &b, 1e-5).unwrap();
        let got = forward_only_layer_norm(&x, &w, &b, 1e-5).unwrap();
        assert_close(&got, &want, 1e-5, "f32 layer_norm");
        // Non-contiguous input (a transposed view) is made contiguous first.
        let xt = x.transpose(0, 1).unwrap();
        let got = forward_only_layer_norm(&xt, &w, &b, 1e-5).unwrap();
        let want = composed_layer_norm(&xt, &w, &b, 1e-5).unwrap();
        assert_close(&got, &want, 1e-5, "f32 layer_norm, transposed input");
        let scores = randn(&[2, 3, 7, 7], 3.0, 44);
        let want = {
            let max = scores.max_keepdim(D::Minus1).unwrap();
            let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
            e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
        };
        assert_close(
            &forward_only_softmax(&scores).unwrap(),
            &want,
            1e-6,
            "f32 softmax",
        );
        // bf16 (what CUDA inference feeds it): statistics in f32, so within bf16's rounding of
        // the inputs and the output of the f32 composed op.
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let got = forward_only_layer_norm(&bf(&x), &bf(&w), &bf(&b), 1e-5).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let want = composed_layer_norm(&x, &w, &b, 1e-5).unwrap();
        assert_close(
            &got.to_dtype(DType::F32).unwrap(),
            &want,
            0.05,
            "bf16 layer_norm",
        );
    }

    #[test]
    fn bf16_softmax_and_layer_norm_keep_f32_statistics() {
        // Scores whose softmax needs more than bf16's mantissa in the sum: the result must be the
        // f32 softmax rounded once to bf16 (relative error <= 2^-8), and rows must sum to 1.
        let scores = randn(&[2, 3, 5, 64], 4.0, 21);
        let mask = Tensor::ones((2, 64), DType::U32, &Device::Cpu).unwrap();
        let bias = attention_bias(&mask, DType::F32).unwrap();
        let want = composed_scaled_masked_softmax(&scores, &bias, 0.125).unwrap();
        let got = scaled_masked_softmax(
            &scores.to_dtype(DType::BF16).unwrap(),
            &bias.to_dtype(DType::BF16).unwrap(),
            0.125,
        )
        .unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let got = got.to_dtype(DType::F32).unwrap();
        // Inputs were rounded to bf16 too (|scores| up to ~8, scaled by 1/8): allow 2^-7 relative
        // plus a small absolute term for tiny probabilities.
        let (g, w) = (
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            assert!(
                (a - b).abs() <= b.abs() / 128.0 + 1e-4,
                "softmax[{i}]: {a} vs {b}"
            );
        }
        let sums = got.sum_keepdim(D::Minus1).unwrap().flatten_all().unwrap();
        for s in sums.to_vec1::<f32>().unwrap() {
            assert!((s - 1.0).abs() < 0.02, "row sum {s}");
        }
        let x = (randn(&[4, 96], 1.0, 22) + 50.0).unwrap();
        let w = Tensor::ones(96, DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(96, DType::F32, &Device::Cpu).unwrap();
        let want = composed_layer_norm(&x, &w, &b, 1e-5).unwrap();
        let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let got = layer_norm(&bf(&x), &bf(&w), &bf(&b), 1e-5)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        // Offset 50 with unit spread: bf16 rounds the input to 0.25 steps, so the normalised
        // values move by up to ~0.25 / std; statistics in bf16 would be far worse (variance of
        // values quantised around 50).
        assert_close(&got, &want, 0.3, "bf16 layer_norm");
    }

    #[test]
    fn dispatch_uses_composed_ops_off_the_fused_dtype() {
        // f64 takes the composed path: same values as the f32 fused op within f32 precision.
        let x = randn(&[2, 16], 1.0, 6);
        let w = Tensor::ones(16, DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap();
        let fused = layer_norm(&x, &w, &b, 1e-5).unwrap();
        let f64s = layer_norm(
            &x.to_dtype(DType::F64).unwrap(),
            &w.to_dtype(DType::F64).unwrap(),
            &b.to_dtype(DType::F64).unwrap(),
            1e-5,
        )
        .unwrap();
        assert_eq!(f64s.dtype(), DType::F64);
        assert_close(
            &fused,
            &f64s.to_dtype(DType::F32).unwrap(),
            1e-5,
            "f64 path",
        );
    }
}
