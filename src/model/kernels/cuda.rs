//! The CUDA side of the fused ops: candle custom ops over recycle's own kernels
//! (`kernels.cu`, compiled to PTX by build.rs), each with a backward, for f32 and bf16 tensors on
//! one CUDA device. `ops` sends an op here only when every operand is such a tensor (`Path::Cuda`);
//! the CPU entry points of these custom ops are never reached and say so.
//!
//! What each replaces, and why (the op-by-op profile of `recycle gpu-check`, roberta-base, H200):
//! composed layer norm (nine candle kernels forward, more backward) and the composed masked
//! softmax were a quarter and a fifth of a bf16 training step; a bias's gradient summed a
//! `[rows, n]` tensor down its columns with strided reads; candle's `index_add`, the backward of
//! an embedding lookup, loops over every token id in one thread per column; exact GELU's backward
//! is a chain of elementwise ops; dropout drew a float tensor, compared, cast and multiplied.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchArgs, LaunchConfig,
    PushKernelArg,
};
use candle_core::cuda_backend::DeviceId;
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout,
    Result, Shape, Tensor,
};
use half::bf16;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::geometry;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/recycle_kernels.ptx"));
const MODULE: &str = "recycle_kernels";

/// The largest last dimension the layer norm kernels take (16 columns per thread, 1024 threads).
pub const MAX_LAYER_NORM_DIM: usize = 16 * 1024;

/// Runs `$f::<T>(args)` for the dtype's element type.
macro_rules! by_dtype {
    ($dtype:expr, $f:ident ( $($arg:expr),* $(,)? )) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            other => bail!("recycle's CUDA kernels take f32 or bf16 tensors, not {other:?}"),
        }
    };
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        other => bail!("recycle's CUDA kernels take f32 or bf16 tensors, not {other:?}"),
    })
}

/// The kernel `name` for `dtype` (loading the module on first use).
macro_rules! func {
    ($dev:expr, $name:expr, $dtype:expr) => {
        load_kernel($dev, &format!("{}_{}", $name, suffix($dtype)?))
    };
}

/// One of recycle's kernels with the stream it launches on.
#[derive(Clone)]
struct Kernel {
    stream: Arc<CudaStream>,
    func: CudaFunction,
}

impl Kernel {
    fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

thread_local! {
    /// Kernels already looked up, by device and name. candle's `get_or_load_custom_func` takes a
    /// lock, builds a C string and asks the driver for the function on every call; a training
    /// step launches about a thousand kernels, from one thread.
    static KERNELS: RefCell<HashMap<DeviceId, HashMap<String, Kernel>>> =
        RefCell::new(HashMap::new());
}

/// The kernel `name` of recycle's module on `dev` (loading the module on first use).
fn load_kernel(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    KERNELS.with(|cache| {
        if let Some(k) = cache.borrow().get(&dev.id()).and_then(|m| m.get(name)) {
            return Ok(k.clone());
        }
        let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let k = Kernel {
            stream: dev.cuda_stream(),
            func: (*f).clone(),
        };
        cache
            .borrow_mut()
            .entry(dev.id())
            .or_default()
            .insert(name.to_string(), k.clone());
        Ok(k)
    })
}

/// The contiguous elements of a storage as `layout` sees them.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let slice: &CudaSlice<T> = s.as_cuda_slice()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => bail!("{what}: the CUDA kernel needs a contiguous input"),
    }
}

/// A grid-stride launch of about `n` threads (one per element, or per pack: `geometry::packs`).
fn elementwise(n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch with one block per row of `n` elements (`geometry::rows_launch`).
fn by_rows(rows: usize, n: usize) -> LaunchConfig {
    let (blocks, threads) = geometry::rows_launch(rows, n);
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads per block for a row of `n`: about four columns per thread, whole warps, at most 1024.
fn row_threads(n: usize) -> u32 {
    (n.div_ceil(4).div_ceil(32) * 32).clamp(32, 1024) as u32
}

fn last_dim(l: &Layout, what: &str) -> Result<(usize, usize)> {
    let n = match l.dims().last() {
        Some(&n) if n > 0 => n,
        _ => bail!("{what}: needs a non-empty last dimension"),
    };
    Ok((l.shape().elem_count() / n, n))
}

fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(s, dev.clone())
}

/// `[2, ..]` of a layout's shape: the shape of an op that writes two results of that shape into
/// one allocation (read back with `get(0)` and `get(1)`).
fn pair_shape(l: &Layout) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(l.dims());
    Shape::from(dims)
}

/// What a CUDA-only custom op's CPU forward answers.
pub(super) fn cpu_unreachable<T>(op: &str) -> Result<T> {
    bail!("{op}: a CUDA kernel, reached with CPU tensors")
}

// ---- layer norm ---------------------------------------------------------------------------------

struct LayerNorm {
    eps: f32,
}

/// Runs a layer norm kernel `name(a, b, c, out, n, eps)` with one block per row of `a` `[rows, n]`
/// (`b` and `c` as the kernel reads them) and returns `out`, shaped like `a`.
fn per_row<T: CudaDType + DeviceRepr>(
    name: &str,
    eps: f32,
    [(a, al), (b, bl), (c, cl)]: [(&CudaStorage, &Layout); 3],
) -> Result<CudaStorage> {
    let dev = a.device();
    let (rows, n) = last_dim(al, name)?;
    let (av, bv, cv) = (
        view::<T>(a, al, name)?,
        view::<T>(b, bl, name)?,
        view::<T>(c, cl, name)?,
    );
    let out = unsafe { dev.alloc::<T>(rows * n)? };
    let f = func!(dev, name, a.dtype())?;
    let mut l = f.builder();
    let n_i = n as i32;
    l.arg(&av).arg(&bv).arg(&cv).arg(&out).arg(&n_i).arg(&eps);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (row_threads(n), 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { l.launch(cfg) }.w()?;
    Ok(wrap(out, dev))
}

/// The longest row the warp-per-row layer norm kernels take (`LN_WARP_MAX_N` in kernels.cu).
const LN_WARP_MAX_N: usize = 1024;

/// `per_row` for the warp-per-row kernels (`name(a, b, c, out, rows, n, eps)`, rows of at most
/// `LN_WARP_MAX_N`): eight rows per block, each row read once into registers.
fn per_row_warp<T: CudaDType + DeviceRepr>(
    name: &str,
    eps: f32,
    [(a, al), (b, bl), (c, cl)]: [(&CudaStorage, &Layout); 3],
) -> Result<CudaStorage> {
    let dev = a.device();
    let (rows, n) = last_dim(al, name)?;
    if n > LN_WARP_MAX_N {
        bail!("{name}: rows of {n} exceed the warp kernel's {LN_WARP_MAX_N}");
    }
    let (av, bv, cv) = (
        view::<T>(a, al, name)?,
        view::<T>(b, bl, name)?,
        view::<T>(c, cl, name)?,
    );
    let out = unsafe { dev.alloc::<T>(rows * n)? };
    let f = func!(dev, name, a.dtype())?;
    let mut l = f.builder();
    let n_i = n as i32;
    l.arg(&av)
        .arg(&bv)
        .arg(&cv)
        .arg(&out)
        .arg(&rows)
        .arg(&n_i)
        .arg(&eps);
    unsafe { l.launch(warp_rows(rows)) }.w()?;
    Ok(wrap(out, dev))
}

/// Layer norm's forward on storages: the warp kernel for rows it takes, else a block per row.
fn layer_norm_rows(args: [(&CudaStorage, &Layout); 3], eps: f32) -> Result<CudaStorage> {
    let (x, xl) = args[0];
    let n = xl.dims().last().copied().unwrap_or(0);
    let elem = x.dtype().size_in_bytes();
    // The packed kernel where the rows are whole packs and every operand starts on one (their
    // buffers are allocations, aligned; the layouts' offsets decide).
    let packed = geometry::ln_vec_slots(elem, n) > 0
        && args
            .iter()
            .all(|(_, l)| (l.start_offset() * elem).is_multiple_of(16));
    if packed {
        by_dtype!(x.dtype(), per_row_warp("layer_norm_fwd_vec", eps, args))
    } else if n <= LN_WARP_MAX_N {
        by_dtype!(x.dtype(), per_row_warp("layer_norm_fwd_warp", eps, args))
    } else {
        by_dtype!(x.dtype(), per_row("layer_norm_fwd", eps, args))
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "recycle-cuda-layer-norm"
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
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = layer_norm_rows([(x, xl), (w, wl), (b, bl)], self.eps)?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, _, dw, db] = layer_norm_backward(x, w, grad, self.eps, None)?;
        Ok((
            Some(dx),
            Some(dw.to_dtype(x.dtype())?),
            Some(db.to_dtype(x.dtype())?),
        ))
    }
}

/// Whether layer norm's backward runs in one pass where its rows fit (on unless turned off).
static LN_ONE_PASS: AtomicBool = AtomicBool::new(true);

/// Turns the one-pass layer norm backward (`layer_norm_bwd_fused`) on or off; off, every row
/// takes the three kernels (row statistics, dx, dw and db with an atomic per column and block).
/// `gpu-check` times both.
pub fn set_layer_norm_one_pass(on: bool) {
    LN_ONE_PASS.store(on, Ordering::Relaxed);
}

/// Whether the one-pass layer norm backward is on.
pub fn layer_norm_one_pass() -> bool {
    LN_ONE_PASS.load(Ordering::Relaxed)
}

/// Whether layer norm's backward takes the packed kernels where its rows fit them (on unless
/// turned off).
static LN_PACKED: AtomicBool = AtomicBool::new(true);

/// Turns the packed layer norm backward (`layer_norm_bwd_vec`, then `layer_norm_dwdb_cols`) on or
/// off; off, rows take the one-pass kernel or the three kernels as before. `gpu-check` times both.
pub fn set_layer_norm_packed(on: bool) {
    LN_PACKED.store(on, Ordering::Relaxed);
}

/// Whether the packed layer norm backward is on.
pub fn layer_norm_packed() -> bool {
    LN_PACKED.load(Ordering::Relaxed)
}

/// The longest row the one-pass backward takes (`LN_FUSED_MAX_N` in kernels.cu).
const LN_FUSED_MAX_N: usize = 768;

/// Layer norm's backward over `x` `[.., n]` given `dy`: `[dx, dh, dw, db]`, where `dh` is `dx`
/// through the branch's dropout `drop` (`dx` itself without one) and `dw`, `db` are f32. In one
/// pass over `x` and `dy` where the switch is on and `n` is at most `LN_FUSED_MAX_N`, else the
/// three kernels.
fn layer_norm_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f32,
    drop: Option<Dropout>,
) -> Result<[Tensor; 4]> {
    let (x, w, dy) = (x.contiguous()?, w.contiguous()?, dy.contiguous()?);
    let n = x.dims().last().copied().unwrap_or(0);
    if layer_norm_packed() && geometry::ln_vec_slots(x.dtype().size_in_bytes(), n) > 0 {
        if let Some(out) = layer_norm_backward_packed(&x, &w, &dy, eps, drop.as_ref())? {
            return Ok(out);
        }
    }
    if layer_norm_one_pass() && n > 0 && n <= LN_FUSED_MAX_N {
        return layer_norm_backward_one_pass(&x, &w, &dy, eps, drop);
    }
    let [dw, db] = layer_norm_dwdb(&x, &dy, eps, DType::F32)?;
    match drop {
        None => {
            let dx = x.apply_op3_no_bwd(&w, &dy, &LayerNormDx { eps })?;
            Ok([dx.clone(), dx, dw, db])
        }
        Some(drop) => {
            let both = x.apply_op3_no_bwd(&w, &dy, &LayerNormDxDrop { eps, drop })?;
            Ok([both.get(0)?, both.get(1)?, dw, db])
        }
    }
}

/// The device address of `t`'s first element, f32 or bf16.
fn address(t: &Tensor, whole: bool, what: &str) -> Result<u64> {
    match t.dtype() {
        DType::F32 => device_address::<f32>(t, whole, what),
        DType::BF16 => device_address::<bf16>(t, whole, what),
        other => bail!("{what}: f32 or bf16, not {other:?}"),
    }
}

/// `layer_norm_backward` in one pass (contiguous operands, `n` at most `LN_FUSED_MAX_N`):
/// `layer_norm_bwd_fused` writes dx (and dh) and each block's sums of dw and db, and
/// `layer_norm_dwdb_sum` adds the blocks in a fixed order.
fn layer_norm_backward_one_pass(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f32,
    drop: Option<Dropout>,
) -> Result<[Tensor; 4]> {
    let what = "layer norm backward";
    let dtype = x.dtype();
    let (rows, n) = ln_backward_dims(x, w, dy)?;
    let outputs = if drop.is_some() { 2 } else { 1 };
    let out = uninit(x, &[outputs, rows, n], dtype)?;
    let blocks = geometry::ln_fused_blocks(rows);
    let partial = uninit(x, &[blocks as usize, 2 * n], DType::F32)?;
    let dwdb = uninit(x, &[2, n], DType::F32)?;
    let (x_at, w_at, dy_at) = (
        address(x, false, what)?,
        address(w, false, what)?,
        address(dy, false, what)?,
    );
    let dx_at = address(&out, true, what)?;
    let dh_at = if drop.is_some() {
        dx_at + (rows * n * dtype.size_in_bytes()) as u64
    } else {
        0
    };
    let partial_at = f32_address(&partial, true, what)?;
    let (seed, threshold, scale) = drop
        .as_ref()
        .map_or((0, 0, 1.0), |d| (d.seed, d.threshold, d.scale));
    let n_i = n as i32;
    let dev = x.device().as_cuda_device()?;
    let f = func!(dev, "layer_norm_bwd_fused", dtype)?;
    let mut a = f.builder();
    a.arg(&x_at)
        .arg(&w_at)
        .arg(&dy_at)
        .arg(&dx_at)
        .arg(&dh_at)
        .arg(&partial_at)
        .arg(&rows)
        .arg(&n_i)
        .arg(&eps)
        .arg(&seed)
        .arg(&threshold)
        .arg(&scale);
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (32, geometry::LN_FUSED_WARPS as u32, 1),
        shared_mem_bytes: 0,
    };
    unsafe { a.launch(cfg) }.w()?;
    ln_backward_finish(
        dev,
        x,
        &out,
        drop.is_some(),
        (partial_at, blocks as usize),
        &dwdb,
    )
}

/// Checks a layer norm backward's operands (`x` and `dy` of one shape, `w` of its last dimension,
/// one dtype) and gives `(rows, n)`.
fn ln_backward_dims(x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(usize, usize)> {
    let dtype = x.dtype();
    let n = x.dims().last().copied().unwrap_or(0);
    if dy.dims() != x.dims() || w.dims() != [n] || dy.dtype() != dtype || w.dtype() != dtype {
        bail!(
            "layer norm backward: x {:?} {dtype:?}, w {:?} {:?}, dy {:?} {:?}",
            x.dims(),
            w.dims(),
            w.dtype(),
            dy.dims(),
            dy.dtype()
        );
    }
    Ok((x.elem_count() / n.max(1), n))
}

/// The end of a layer norm backward in kernels: `layer_norm_dwdb_sum` adds the `parts` rows of
/// partial sums at `partial_at` (`[parts, 2n]` f32) into `dwdb` (`[2, n]`) in order, and the four
/// gradients come out of `out` (`[1 or 2, rows, n]`: dx, then dh where there is dropout) and
/// `dwdb`.
fn ln_backward_finish(
    dev: &candle_core::CudaDevice,
    x: &Tensor,
    out: &Tensor,
    dropout: bool,
    (partial_at, parts): (u64, usize),
    dwdb: &Tensor,
) -> Result<[Tensor; 4]> {
    let n = x.dims().last().copied().unwrap_or(0);
    let dwdb_at = f32_address(dwdb, true, "layer norm backward")?;
    let (parts_i, n2) = (parts as i32, 2 * n as i32);
    let f = load_kernel(dev, "layer_norm_dwdb_sum")?;
    let mut a = f.builder();
    a.arg(&partial_at).arg(&dwdb_at).arg(&parts_i).arg(&n2);
    let cfg = LaunchConfig {
        grid_dim: ((2 * n).div_ceil(32) as u32, 1, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    unsafe { a.launch(cfg) }.w()?;
    let dx = out.get(0)?.reshape(x.shape())?;
    let dh = if dropout {
        out.get(1)?.reshape(x.shape())?
    } else {
        dx.clone()
    };
    Ok([dx, dh, dwdb.get(0)?, dwdb.get(1)?])
}

/// `layer_norm_backward` with the packed kernels (contiguous operands, rows that
/// `geometry::ln_vec_slots` takes): `layer_norm_bwd_vec` writes dx (and dh) and each row's mean and
/// rstd, `layer_norm_dwdb_cols` each chunk of rows' sums of dw and db, and `layer_norm_dwdb_sum`
/// adds the chunks in a fixed order. `None` where an operand is not 16-byte aligned (a view at an
/// odd offset): the caller takes another path.
fn layer_norm_backward_packed(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: f32,
    drop: Option<&Dropout>,
) -> Result<Option<[Tensor; 4]>> {
    let what = "layer norm backward";
    let dtype = x.dtype();
    let (rows, n) = ln_backward_dims(x, w, dy)?;
    let (x_at, w_at, dy_at) = (
        address(x, false, what)?,
        address(w, false, what)?,
        address(dy, false, what)?,
    );
    if [x_at, w_at, dy_at].iter().any(|a| a % 16 != 0) {
        return Ok(None);
    }
    let outputs = if drop.is_some() { 2 } else { 1 };
    let out = uninit(x, &[outputs, rows, n], dtype)?;
    let chunk = geometry::ln_col_chunk(rows);
    let chunks = rows.div_ceil(chunk).max(1);
    let stats = uninit(x, &[rows, 2], DType::F32)?;
    let partial = uninit(x, &[chunks, 2 * n], DType::F32)?;
    let dwdb = uninit(x, &[2, n], DType::F32)?;
    let dx_at = address(&out, true, what)?;
    let dh_at = if drop.is_some() {
        dx_at + (rows * n * dtype.size_in_bytes()) as u64
    } else {
        0
    };
    let (stats_at, partial_at) = (
        f32_address(&stats, true, what)?,
        f32_address(&partial, true, what)?,
    );
    let (seed, threshold, scale) = drop.map_or((0, 0, 1.0), |d| (d.seed, d.threshold, d.scale));
    let n_i = n as i32;
    let dev = x.device().as_cuda_device()?;
    let f = func!(dev, "layer_norm_bwd_vec", dtype)?;
    let mut a = f.builder();
    a.arg(&x_at)
        .arg(&w_at)
        .arg(&dy_at)
        .arg(&dx_at)
        .arg(&dh_at)
        .arg(&stats_at)
        .arg(&rows)
        .arg(&n_i)
        .arg(&eps)
        .arg(&seed)
        .arg(&threshold)
        .arg(&scale);
    unsafe { a.launch(warp_rows(rows)) }.w()?;
    let packs = n / (16 / dtype.size_in_bytes());
    let chunk_i = chunk as i32;
    let f = func!(dev, "layer_norm_dwdb_cols", dtype)?;
    let mut a = f.builder();
    a.arg(&x_at)
        .arg(&dy_at)
        .arg(&stats_at)
        .arg(&partial_at)
        .arg(&rows)
        .arg(&n_i)
        .arg(&chunk_i);
    let cfg = LaunchConfig {
        grid_dim: (packs.div_ceil(32) as u32, chunks as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    unsafe { a.launch(cfg) }.w()?;
    ln_backward_finish(dev, x, &out, drop.is_some(), (partial_at, chunks), &dwdb).map(Some)
}

/// The weight and bias gradients of layer norm over `x` given `dy` (contiguous), in `dtype` (the
/// kernel sums in f32).
fn layer_norm_dwdb(x: &Tensor, dy: &Tensor, eps: f32, dtype: DType) -> Result<[Tensor; 2]> {
    let dwdb = x.apply_op2_no_bwd(dy, &LayerNormDwDb { eps })?;
    Ok([dwdb.get(0)?.to_dtype(dtype)?, dwdb.get(1)?.to_dtype(dtype)?])
}

struct LayerNormDx {
    eps: f32,
}

impl CustomOp3 for LayerNormDx {
    fn name(&self) -> &'static str {
        "recycle-cuda-layer-norm-dx"
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
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let args = [(x, xl), (w, wl), (g, gl)];
        let n = xl.dims().last().copied().unwrap_or(0);
        let out = if n <= LN_WARP_MAX_N {
            by_dtype!(
                x.dtype(),
                per_row_warp("layer_norm_bwd_dx_warp", self.eps, args)
            )?
        } else {
            by_dtype!(x.dtype(), per_row("layer_norm_bwd_dx", self.eps, args))?
        };
        Ok((out, xl.shape().clone()))
    }
}

/// Layer norm's `dx` and, in the same pass, `dx` through the dropout that preceded the residual
/// add (`drop`): the result `[2, rows, n]` holds `dx`, then the dropped-out branch's gradient.
struct LayerNormDxDrop {
    eps: f32,
    drop: Dropout,
}

impl CustomOp3 for LayerNormDxDrop {
    fn name(&self) -> &'static str {
        "recycle-cuda-layer-norm-dx-dropout"
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
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &LayerNormDxDrop,
            [(x, xl), (w, wl), (g, gl)]: [(&CudaStorage, &Layout); 3],
        ) -> Result<CudaStorage> {
            let dev = x.device();
            let what = "layer norm backward";
            let (rows, n) = last_dim(xl, what)?;
            let (xv, wv, gv) = (
                view::<T>(x, xl, what)?,
                view::<T>(w, wl, what)?,
                view::<T>(g, gl, what)?,
            );
            let out = unsafe { dev.alloc::<T>(2 * rows * n)? };
            let (dx, dh) = (out.slice(0..rows * n), out.slice(rows * n..2 * rows * n));
            let n_i = n as i32;
            if n <= LN_WARP_MAX_N {
                let f = func!(dev, "layer_norm_bwd_dx_drop_warp", x.dtype())?;
                let mut a = f.builder();
                a.arg(&xv)
                    .arg(&wv)
                    .arg(&gv)
                    .arg(&dx)
                    .arg(&dh)
                    .arg(&rows)
                    .arg(&n_i)
                    .arg(&op.eps)
                    .arg(&op.drop.seed)
                    .arg(&op.drop.threshold)
                    .arg(&op.drop.scale);
                unsafe { a.launch(warp_rows(rows)) }.w()?;
                return Ok(wrap(out, dev));
            }
            let f = func!(dev, "layer_norm_bwd_dx_drop", x.dtype())?;
            let mut a = f.builder();
            a.arg(&xv)
                .arg(&wv)
                .arg(&gv)
                .arg(&dx)
                .arg(&dh)
                .arg(&n_i)
                .arg(&op.eps)
                .arg(&op.drop.seed)
                .arg(&op.drop.threshold)
                .arg(&op.drop.scale);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (row_threads(n), 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { a.launch(cfg) }.w()?;
            Ok(wrap(out, dev))
        }
        let args = [(x, xl), (w, wl), (g, gl)];
        let out = by_dtype!(x.dtype(), run(self, args))?;
        Ok((out, pair_shape(xl)))
    }
}

struct LayerNormDwDb {
    eps: f32,
}

impl CustomOp2 for LayerNormDwDb {
    fn name(&self) -> &'static str {
        "recycle-cuda-layer-norm-dwdb"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            eps: f32,
            x: &CudaStorage,
            xl: &Layout,
            g: &CudaStorage,
            gl: &Layout,
        ) -> Result<CudaStorage> {
            let dev = x.device();
            let (rows, n) = last_dim(xl, "layer norm backward")?;
            let (xv, gv) = (
                view::<T>(x, xl, "layer norm backward")?,
                view::<T>(g, gl, "layer norm backward")?,
            );
            let n_i = n as i32;
            // Each row's mean and rstd, one warp per row, so that the gradient kernel below
            // streams over the rows instead of reducing each one with a whole block.
            let stats = unsafe { dev.alloc::<f32>(2 * rows)? };
            let f = func!(dev, "layer_norm_stats", x.dtype())?;
            let mut a = f.builder();
            a.arg(&xv).arg(&stats).arg(&rows).arg(&n_i).arg(&eps);
            unsafe { a.launch(warp_rows(rows)) }.w()?;
            let dwdb = dev.alloc_zeros::<f32>(2 * n)?;
            let threads = (n.div_ceil(16).div_ceil(32) * 32).clamp(128, 1024) as u32;
            let f = func!(dev, "layer_norm_bwd_dwdb", x.dtype())?;
            let mut a = f.builder();
            a.arg(&xv)
                .arg(&gv)
                .arg(&stats)
                .arg(&dwdb)
                .arg(&rows)
                .arg(&n_i);
            let cfg = LaunchConfig {
                grid_dim: (rows.clamp(1, 1024) as u32, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { a.launch(cfg) }.w()?;
            Ok(wrap(dwdb, dev))
        }
        let n = last_dim(xl, "layer norm backward")?.1;
        let out = by_dtype!(x.dtype(), run(self.eps, x, xl, g, gl))?;
        Ok((out, Shape::from((2, n))))
    }
}

/// Layer norm over the last dimension (`w`, `b` of that size, all of one dtype), with a backward.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.dims().last().copied().unwrap_or(0);
    if n == 0 || n > MAX_LAYER_NORM_DIM {
        bail!("layer norm: the CUDA kernel takes a last dimension of 1 to {MAX_LAYER_NORM_DIM}, got {n}");
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

// ---- scaled masked softmax -----------------------------------------------------------------

/// The softmax forward kernel over scores `s` `[b, .., k]` with `bias` `[b, 1, 1, k]`; with `drop`,
/// the kernel that also writes the dropped-out probabilities, and the result is `[2, rows · k]`:
/// the probabilities, then them through the mask.
fn softmax_fwd<T: CudaDType + DeviceRepr>(
    scale: f32,
    drop: Option<&Dropout>,
    s: &CudaStorage,
    sl: &Layout,
    bias: &CudaStorage,
    bl: &Layout,
) -> Result<CudaStorage> {
    let dev = s.device();
    let (rows, k) = last_dim(sl, "masked softmax")?;
    let batch = sl.dims()[0];
    let (sv, bv) = (
        view::<T>(s, sl, "masked softmax")?,
        view::<T>(bias, bl, "attention bias")?,
    );
    let (k_i, rows_per_batch) = (k as i32, rows / batch);
    let n = rows * k;
    let out = unsafe { dev.alloc::<T>(if drop.is_some() { 2 * n } else { n })? };
    // The chunked kernels where the rows fit them and the inputs start on a chunk (the output is a
    // fresh allocation, and its dropped half starts n elements in, a whole number of rows).
    let elem = std::mem::size_of::<T>();
    let width = geometry::softmax_vec_width(elem, k);
    let chunked = width > 0
        && [sl.start_offset(), bl.start_offset()]
            .iter()
            .all(|o| (o * elem).is_multiple_of(width * elem));
    let name = |base: &str| {
        if chunked {
            format!("{base}_vec")
        } else {
            base.to_string()
        }
    };
    match drop {
        None => {
            let f = func!(dev, name("softmax_fwd"), s.dtype())?;
            let mut a = f.builder();
            a.arg(&sv)
                .arg(&bv)
                .arg(&out)
                .arg(&rows)
                .arg(&k_i)
                .arg(&rows_per_batch)
                .arg(&scale);
            unsafe { a.launch(warp_rows(rows)) }.w()?;
        }
        Some(d) => {
            let (p, dropped) = (out.slice(0..n), out.slice(n..2 * n));
            let f = func!(dev, name("softmax_drop_fwd"), s.dtype())?;
            let mut a = f.builder();
            a.arg(&sv)
                .arg(&bv)
                .arg(&p)
                .arg(&dropped)
                .arg(&rows)
                .arg(&k_i)
                .arg(&rows_per_batch)
                .arg(&scale)
                .arg(&d.seed)
                .arg(&d.threshold)
                .arg(&d.scale);
            unsafe { a.launch(warp_rows(rows)) }.w()?;
        }
    }
    Ok(wrap(out, dev))
}

/// The softmax and the dropout after it in one pass, no backward (for nodes that write their own):
/// the result `[2, ..]` holds the probabilities, then them dropped out.
struct SoftmaxDropFwd {
    scale: f32,
    drop: Dropout,
}

impl CustomOp2 for SoftmaxDropFwd {
    fn name(&self) -> &'static str {
        "recycle-cuda-masked-softmax-dropout"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        sl: &Layout,
        bias: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let drop = Some(&self.drop);
        let out = by_dtype!(s.dtype(), softmax_fwd(self.scale, drop, s, sl, bias, bl))?;
        Ok((out, pair_shape(sl)))
    }
}

struct Softmax {
    scale: f32,
}

impl CustomOp2 for Softmax {
    fn name(&self) -> &'static str {
        "recycle-cuda-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        sl: &Layout,
        bias: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = by_dtype!(s.dtype(), softmax_fwd(self.scale, None, s, sl, bias, bl))?;
        Ok((out, sl.shape().clone()))
    }

    fn bwd(
        &self,
        _s: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = res.apply_op2_no_bwd(
            &grad.contiguous()?,
            &SoftmaxBwd {
                scale: self.scale,
                drop: None,
            },
        )?;
        Ok((Some(ds), None))
    }
}

/// One warp per row, eight rows per block.
fn warp_rows(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

/// The softmax backward; `drop` is the dropout that followed the softmax in the forward (the
/// incoming gradient is read through its mask), or `None`.
struct SoftmaxBwd {
    scale: f32,
    drop: Option<Dropout>,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "recycle-cuda-masked-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        p: &CudaStorage,
        pl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &SoftmaxBwd,
            p: &CudaStorage,
            pl: &Layout,
            g: &CudaStorage,
            gl: &Layout,
        ) -> Result<CudaStorage> {
            let dev = p.device();
            let (rows, k) = last_dim(pl, "masked softmax backward")?;
            // Threshold 0 keeps every element; a scale of 1 leaves it as it is.
            let (seed, threshold, drop_scale) = op
                .drop
                .as_ref()
                .map_or((0u64, 0u32, 1f32), |d| (d.seed, d.threshold, d.scale));
            let (pv, gv) = (
                view::<T>(p, pl, "masked softmax backward")?,
                view::<T>(g, gl, "masked softmax backward")?,
            );
            let ds = unsafe { dev.alloc::<T>(rows * k)? };
            let f = func!(dev, "softmax_bwd", p.dtype())?;
            let mut a = f.builder();
            let k_i = k as i32;
            a.arg(&pv)
                .arg(&gv)
                .arg(&ds)
                .arg(&rows)
                .arg(&k_i)
                .arg(&op.scale)
                .arg(&seed)
                .arg(&threshold)
                .arg(&drop_scale);
            unsafe { a.launch(warp_rows(rows)) }.w()?;
            Ok(wrap(ds, dev))
        }
        let out = by_dtype!(p.dtype(), run(self, p, pl, g, gl))?;
        Ok((out, pl.shape().clone()))
    }
}

/// `softmax(scale · scores + bias)` over the last dimension: scores `[b, h, q, k]`, `bias`
/// `[b, 1, 1, k]` (from `ops::attention_bias`), one dtype; the gradient reaches `scores` only.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op2(
        &bias.contiguous()?,
        Softmax {
            scale: scale as f32,
        },
    )
}

// ---- elementwise: GELU, bias add, dropout ---------------------------------------------------------

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "recycle-cuda-gelu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(x: &CudaStorage, xl: &Layout) -> Result<CudaStorage> {
            let dev = x.device();
            let n = xl.shape().elem_count();
            let xv = view::<T>(x, xl, "gelu")?;
            let y = unsafe { dev.alloc::<T>(n)? };
            let f = func!(dev, "gelu_fwd", x.dtype())?;
            let mut a = f.builder();
            a.arg(&xv).arg(&y).arg(&n);
            unsafe { a.launch(elementwise(geometry::packs(n, std::mem::size_of::<T>()))) }.w()?;
            Ok(wrap(y, dev))
        }
        let out = by_dtype!(x.dtype(), run(x, xl))?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBwd)?))
    }
}

/// `x + y` for two contiguous tensors of one shape and dtype, in 16-byte packs (`add` in
/// kernels.cu), no backward (for nodes that write their own).
struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "recycle-cuda-add"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        y: &CudaStorage,
        yl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if xl.dims() != yl.dims() || x.dtype() != y.dtype() {
            bail!(
                "add: {:?} {:?} and {:?} {:?}",
                xl.dims(),
                x.dtype(),
                yl.dims(),
                y.dtype()
            );
        }
        fn run<T: CudaDType + DeviceRepr>(
            x: &CudaStorage,
            xl: &Layout,
            y: &CudaStorage,
            yl: &Layout,
        ) -> Result<CudaStorage> {
            let dev = x.device();
            let n = xl.shape().elem_count();
            let (xv, yv) = (view::<T>(x, xl, "add")?, view::<T>(y, yl, "add")?);
            let z = unsafe { dev.alloc::<T>(n)? };
            let f = func!(dev, "add", x.dtype())?;
            let mut a = f.builder();
            a.arg(&xv).arg(&yv).arg(&z).arg(&n);
            unsafe { a.launch(elementwise(geometry::packs(n, std::mem::size_of::<T>()))) }.w()?;
            Ok(wrap(z, dev))
        }
        let out = by_dtype!(x.dtype(), run(x, xl, y, yl))?;
        Ok((out, xl.shape().clone()))
    }
}

/// `x + y` on storages (one shape, one dtype): recycle's packed add (`Add`), for ops that add
/// inside their own forward.
pub(super) fn add_storage(
    (x, xl): (&CudaStorage, &Layout),
    (y, yl): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    Ok(Add.cuda_fwd(x, xl, y, yl)?.0)
}

/// Exact GELU's backward on storages, `dy · gelu'(x)` (one shape, one dtype), for ops that
/// apply it inside their own forward.
pub(super) fn gelu_backward_storage(
    (x, xl): (&CudaStorage, &Layout),
    (dy, dyl): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    Ok(GeluBwd.cuda_fwd(x, xl, dy, dyl)?.0)
}

struct GeluBwd;

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "recycle-cuda-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            x: &CudaStorage,
            xl: &Layout,
            g: &CudaStorage,
            gl: &Layout,
        ) -> Result<CudaStorage> {
            let dev = x.device();
            let n = xl.shape().elem_count();
            let (xv, gv) = (
                view::<T>(x, xl, "gelu backward")?,
                view::<T>(g, gl, "gelu backward")?,
            );
            let dx = unsafe { dev.alloc::<T>(n)? };
            let f = func!(dev, "gelu_bwd", x.dtype())?;
            let mut a = f.builder();
            a.arg(&xv).arg(&gv).arg(&dx).arg(&n);
            unsafe { a.launch(elementwise(geometry::packs(n, std::mem::size_of::<T>()))) }.w()?;
            Ok(wrap(dx, dev))
        }
        let out = by_dtype!(x.dtype(), run(x, xl, g, gl))?;
        Ok((out, xl.shape().clone()))
    }
}

/// Exact (erf) GELU with its derivative.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

/// `y = x + b` over rows of `n` (`b` broadcast; `x` and `y` may be one buffer) with the bias
/// kernel: 16-byte packs of columns where the row length and the offsets (elements into their
/// buffers; `y` is a fresh allocation) allow, one column per thread otherwise. `like` gives the
/// device and dtype.
fn launch_bias_add<T: CudaDType + DeviceRepr>(
    like: &CudaStorage,
    (x, x_offset): (&CudaView<T>, usize),
    (b, b_offset): (&CudaView<T>, usize),
    y: &CudaView<T>,
    rows: usize,
    n: usize,
) -> Result<()> {
    let dev = like.device();
    let f = func!(dev, "bias_add", like.dtype())?;
    let per_thread =
        geometry::bias_columns_per_thread(std::mem::size_of::<T>(), n, &[x_offset, b_offset]);
    let (n_i, packed) = (n as i32, per_thread > 1);
    let mut a = f.builder();
    a.arg(x).arg(b).arg(y).arg(&rows).arg(&n_i).arg(&packed);
    unsafe { a.launch(bias_launch(rows, n, per_thread)) }.w()?;
    Ok(())
}

/// The bias kernels' grid: a thread per column or pack of columns, blocks striding the rows.
fn bias_launch(rows: usize, n: usize, per_thread: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            (n / per_thread).div_ceil(256) as u32,
            rows.clamp(1, 65_535) as u32,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `u = x + b` and `g = gelu(u)` in one pass over rows of `n` (the feed-forward block's first
/// layer and its activation), into one fresh `[2, rows, n]` result: `u`, then `g`. No backward
/// (the block node writes its own).
struct BiasGelu;

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "recycle-cuda-bias-gelu"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, n) = last_dim(xl, "bias gelu")?;
        if bl.dims() != [n] {
            bail!("bias gelu: input {:?}, bias {:?}", xl.dims(), bl.dims());
        }
        fn run<T: CudaDType + DeviceRepr>(
            x: &CudaStorage,
            xl: &Layout,
            b: &CudaStorage,
            bl: &Layout,
            (rows, n): (usize, usize),
        ) -> Result<CudaStorage> {
            let dev = x.device();
            let (xv, bv) = (view::<T>(x, xl, "bias gelu")?, view::<T>(b, bl, "bias")?);
            let out = unsafe { dev.alloc::<T>(2 * rows * n)? };
            let (u, g) = (out.slice(0..rows * n), out.slice(rows * n..));
            let offsets = [xl.start_offset(), bl.start_offset(), rows * n];
            let per_thread =
                geometry::bias_columns_per_thread(std::mem::size_of::<T>(), n, &offsets);
            let (n_i, packed) = (n as i32, per_thread > 1);
            let f = func!(dev, "bias_gelu", x.dtype())?;
            let mut a = f.builder();
            a.arg(&xv)
                .arg(&bv)
                .arg(&u)
                .arg(&g)
                .arg(&rows)
                .arg(&n_i)
                .arg(&packed);
            unsafe { a.launch(bias_launch(rows, n, per_thread)) }.w()?;
            Ok(wrap(out, dev))
        }
        let out = by_dtype!(x.dtype(), run(x, xl, b, bl, (rows, n)))?;
        Ok((out, pair_shape(xl)))
    }
}

struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "recycle-cuda-bias-add"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            x: &CudaStorage,
            xl: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> Result<CudaStorage> {
            let dev = x.device();
            let (rows, n) = last_dim(xl, "bias add")?;
            let (xv, bv) = (view::<T>(x, xl, "bias add")?, view::<T>(b, bl, "bias")?);
            let y = unsafe { dev.alloc::<T>(rows * n)? };
            let xo = (&xv, xl.start_offset());
            launch_bias_add(x, xo, (&bv, bl.start_offset()), &y.slice(..), rows, n)?;
            Ok(wrap(y, dev))
        }
        let out = by_dtype!(x.dtype(), run(x, xl, b, bl))?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The column sums as a [1, rows]·[rows, n] product: cuBLAS reads the gradient at full
        // bandwidth and accumulates in f32 (a column-sum kernel would read it down strided columns).
        let n = b.dim(0)?;
        let rows = grad.elem_count() / n;
        let ones = Tensor::ones((1, rows), grad.dtype(), grad.device())?;
        let db = ones
            .matmul(&grad.contiguous()?.reshape((rows, n))?)?
            .reshape(n)?
            .to_dtype(b.dtype())?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

/// `x + b` with `b` broadcast over the leading dimensions of `x` (`b`'s one dimension is the last of
/// `x`); the bias's gradient is a column sum, computed as a product with a row of ones.
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)
}

#[derive(Clone)]
struct Dropout {
    seed: u64,
    threshold: u32,
    scale: f32,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "recycle-cuda-dropout"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &Dropout,
            x: &CudaStorage,
            xl: &Layout,
        ) -> Result<CudaStorage> {
            let dev = x.device();
            let n = xl.shape().elem_count();
            let xv = view::<T>(x, xl, "dropout")?;
            let y = unsafe { dev.alloc::<T>(n)? };
            let f = func!(dev, "dropout", x.dtype())?;
            let mut a = f.builder();
            a.arg(&xv)
                .arg(&y)
                .arg(&n)
                .arg(&op.seed)
                .arg(&op.threshold)
                .arg(&op.scale);
            unsafe { a.launch(elementwise(geometry::packs(n, std::mem::size_of::<T>()))) }.w()?;
            Ok(wrap(y, dev))
        }
        let out = by_dtype!(x.dtype(), run(self, x, xl))?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The mask is a function of (seed, index): the same op on the gradient applies it again.
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// A residual branch's dropout and the residual add in one pass, no backward (for nodes that
/// write their own): `s = drop(x) + r`.
struct DropoutAdd(Dropout);

impl CustomOp2 for DropoutAdd {
    fn name(&self) -> &'static str {
        "recycle-cuda-dropout-add"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        r: &CudaStorage,
        rl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &Dropout,
            x: &CudaStorage,
            xl: &Layout,
            r: &CudaStorage,
            rl: &Layout,
        ) -> Result<CudaStorage> {
            let dev = x.device();
            let n = xl.shape().elem_count();
            if rl.shape().elem_count() != n {
                bail!("dropout add: {:?} and {:?} differ", xl.dims(), rl.dims());
            }
            let (xv, rv) = (
                view::<T>(x, xl, "dropout add")?,
                view::<T>(r, rl, "dropout add")?,
            );
            let s = unsafe { dev.alloc::<T>(n)? };
            let f = func!(dev, "dropout_add", x.dtype())?;
            let mut a = f.builder();
            a.arg(&xv)
                .arg(&rv)
                .arg(&s)
                .arg(&n)
                .arg(&op.seed)
                .arg(&op.threshold)
                .arg(&op.scale);
            unsafe { a.launch(elementwise(geometry::packs(n, std::mem::size_of::<T>()))) }.w()?;
            Ok(wrap(s, dev))
        }
        let out = by_dtype!(x.dtype(), run(&self.0, x, xl, r, rl))?;
        Ok((out, xl.shape().clone()))
    }
}

/// `s = drop(h) + x` and `y = LN(s)` (`DropoutAddNorm`'s operands beside `h` and `x`).
struct DropoutAddNorm {
    gamma: Tensor,
    beta: Tensor,
    eps: f32,
    drop: Dropout,
}

impl CustomOp2 for DropoutAddNorm {
    fn name(&self) -> &'static str {
        "recycle-cuda-dropout-add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        h: &CudaStorage,
        hl: &Layout,
        x: &CudaStorage,
        xl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, n) = last_dim(hl, "dropout add layer norm")?;
        if xl.dims() != hl.dims() {
            bail!(
                "dropout add layer norm: {:?} and {:?} differ",
                hl.dims(),
                xl.dims()
            );
        }
        fn run<T: CudaDType + DeviceRepr>(
            op: &DropoutAddNorm,
            (h, hl): (&CudaStorage, &Layout),
            (x, xl): (&CudaStorage, &Layout),
            (rows, n): (usize, usize),
        ) -> Result<CudaStorage> {
            use candle_core::Storage;
            let dev = h.device();
            let (gs, gl) = op.gamma.storage_and_layout();
            let (bs, bl) = op.beta.storage_and_layout();
            let (Storage::Cuda(g), Storage::Cuda(b)) = (&*gs, &*bs) else {
                bail!("dropout add layer norm: the layer norm's parameters are not on the device")
            };
            let what = "dropout add layer norm";
            let (hv, xv) = (view::<T>(h, hl, what)?, view::<T>(x, xl, what)?);
            let (gv, bv) = (view::<T>(g, gl, what)?, view::<T>(b, bl, what)?);
            let out = unsafe { dev.alloc::<T>(2 * rows * n)? };
            let (sv, yv) = (out.slice(0..rows * n), out.slice(rows * n..));
            let n_i = n as i32;
            let f = func!(dev, "dropout_add_layer_norm_fwd_vec", h.dtype())?;
            let mut a = f.builder();
            a.arg(&hv)
                .arg(&xv)
                .arg(&gv)
                .arg(&bv)
                .arg(&sv)
                .arg(&yv)
                .arg(&rows)
                .arg(&n_i)
                .arg(&op.eps)
                .arg(&op.drop.seed)
                .arg(&op.drop.threshold)
                .arg(&op.drop.scale);
            unsafe { a.launch(warp_rows(rows)) }.w()?;
            Ok(wrap(out, dev))
        }
        let out = by_dtype!(h.dtype(), run(self, (h, hl), (x, xl), (rows, n)))?;
        Ok((out, pair_shape(hl)))
    }
}

/// A block's tail in one launch: `s = drop(h) + x` and `y = LN(s)` with the layer norm's weight
/// and bias `gamma`, `beta` (`[n]`), both written by `dropout_add_layer_norm_fwd_vec`: the bits of
/// `dropout_add` and then the packed layer norm (the emulator checks it), with one read of `s`
/// fewer. `None` where that kernel does not take the operands (not f32 or bf16 on one CUDA device,
/// not contiguous, rows that are no whole number of 16-byte packs, an operand off a 16-byte
/// boundary): the caller runs the two.
pub fn dropout_add_layer_norm(
    h: &Tensor,
    x: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    eps: f64,
    drop: Option<super::attention_node::SeededDropout>,
) -> Result<Option<(Tensor, Tensor)>> {
    let dtype = h.dtype();
    let n = h.dims().last().copied().unwrap_or(0);
    let fits = h.device().is_cuda()
        && matches!(dtype, DType::F32 | DType::BF16)
        && [x, gamma, beta]
            .iter()
            .all(|t| t.dtype() == dtype && t.device().same_device(h.device()))
        && x.dims() == h.dims()
        && gamma.dims() == [n]
        && beta.dims() == [n]
        && [h, x, gamma, beta].iter().all(|t| t.is_contiguous())
        && geometry::ln_vec_slots(dtype.size_in_bytes(), n) > 0;
    if !fits {
        return Ok(None);
    }
    for t in [h, x, gamma, beta] {
        if address(t, false, "dropout add layer norm")? % 16 != 0 {
            return Ok(None);
        }
    }
    let drop = drop.map_or(
        Dropout {
            seed: 0,
            threshold: 0,
            scale: 1.0,
        },
        |d| Dropout::new(d.p, d.seed),
    );
    let op = DropoutAddNorm {
        gamma: gamma.clone(),
        beta: beta.clone(),
        eps: eps as f32,
        drop,
    };
    let both = h.apply_op2_no_bwd(x, &op)?;
    Ok(Some((both.get(0)?, both.get(1)?)))
}

/// Inverted dropout with probability `p` (0 < p < 1): element `i` is kept by a hash of
/// `(seed, i)`, so the backward needs no stored mask.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Dropout::new(p, seed))
}

impl Dropout {
    /// The kernels' form of dropout `p` with `seed`: the keep threshold on 24 bits and the scale.
    fn new(p: f32, seed: u64) -> Self {
        Self {
            seed,
            threshold: (f64::from(p) * f64::from(1u32 << 24)).ceil() as u32,
            scale: 1.0 / (1.0 - p),
        }
    }
}

// ---- dense layer ------------------------------------------------------------------------------------

/// `x·Wᵀ + b` as one node of the graph: in bf16 one cuBLASLt product with the bias in its epilogue
/// (`cuda_lt`), else candle's CUDA matmul on the storages and the bias added in place; the backward
/// is three products (dx = g·W, dW = gᵀ·x, db = 1ᵀ·g; in bf16 two, db from dW's epilogue) with no
/// transposed gradient to copy and none of the reshape, transpose and
/// broadcast nodes of the composed form, each of which costs candle's backward a zero-filled
/// gradient and an add.
struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "recycle-cuda-linear"
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
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (y, shape, _) = linear_fwd((x, xl), (w, wl), Some((b, bl)), Fallback::InPlace)?;
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = linear_bwd(x, w, grad)?;
        Ok((Some(dx), Some(dw), Some(db.to_dtype(b.dtype())?)))
    }
}

/// `x·Wᵀ + b` with the bias added by cuBLASLt's epilogue, else `x·Wᵀ` alone, detached: which one
/// ran is left in `biased` (the caller adds the bias itself where it is false). For the
/// feed-forward block, which follows the product with GELU: with the bias in the product, GELU
/// alone reads and writes `[rows, 4h]` once; without it, the bias and GELU share a pass
/// (`BiasGelu`) rather than the bias being added in place and GELU after.
#[derive(Default)]
struct LinearBiasInProduct {
    biased: std::sync::atomic::AtomicBool,
}

impl CustomOp3 for LinearBiasInProduct {
    fn name(&self) -> &'static str {
        "recycle-cuda-linear-bias-in-product"
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
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (y, shape, biased) = linear_fwd((x, xl), (w, wl), Some((b, bl)), Fallback::Leave)?;
        self.biased
            .store(biased, std::sync::atomic::Ordering::Relaxed);
        Ok((y, shape))
    }
}

/// `Linear` without a bias: `x·Wᵀ`.
struct LinearNoBias;

impl CustomOp2 for LinearNoBias {
    fn name(&self) -> &'static str {
        "recycle-cuda-linear-no-bias"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (y, shape, _) = linear_fwd((x, xl), (w, wl), None, Fallback::InPlace)?;
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = linear_bwd(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// What `linear_fwd` does with the bias where cuBLASLt's epilogue does not add it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fallback {
    /// Adds it in place after candle's product.
    InPlace,
    /// Leaves it to the caller (`LinearBiasInProduct`).
    Leave,
}

/// `x·Wᵀ (+ b)`: one cuBLASLt product with the bias in its epilogue (`cuda_lt`, bf16), else
/// candle's product and, by `fallback`, the bias added in place or left out; with whether the
/// bias was added.
fn linear_fwd(
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    b: Option<(&CudaStorage, &Layout)>,
    fallback: Fallback,
) -> Result<(CudaStorage, Shape, bool)> {
    let (rows, k) = last_dim(xl, "linear")?;
    let &[out, w_in] = wl.dims() else {
        bail!("linear: the weight must be [out, in], got {:?}", wl.dims())
    };
    if w_in != k || b.is_some_and(|(_, bl)| bl.dims() != [out]) {
        bail!(
            "linear: input {:?}, weight {:?}, bias {:?} do not fit",
            xl.dims(),
            wl.dims(),
            b.map(|(_, bl)| bl.dims())
        );
    }
    if !xl.is_contiguous() || !wl.is_contiguous() || b.is_some_and(|(_, bl)| !bl.is_contiguous()) {
        bail!("linear: the CUDA path needs contiguous operands");
    }
    let mut dims = xl.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    let x2 = Layout::contiguous_with_offset((rows, k), xl.start_offset());
    let w2 = Layout::contiguous_with_offset((out, k), wl.start_offset());
    if let Some(y) = super::cuda_lt::linear((x, &x2), (w, &w2), b, (rows, k, out))? {
        return Ok((y, Shape::from(dims), b.is_some()));
    }
    let y = x.matmul(w, (1, rows, out, k), &x2, &w2.transpose(0, 1)?)?;
    fn add_bias<T: CudaDType + DeviceRepr>(
        y: &CudaStorage,
        b: &CudaStorage,
        bl: &Layout,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        let ys: &CudaSlice<T> = y.as_cuda_slice()?;
        let yv = ys.slice(0..rows * n);
        let bv = view::<T>(b, bl, "bias")?;
        // In place: each element is read and written by the same thread.
        launch_bias_add(y, (&yv, 0), (&bv, bl.start_offset()), &yv, rows, n)
    }
    let biased = match b {
        Some((b, bl)) if fallback == Fallback::InPlace => {
            by_dtype!(y.dtype(), add_bias(&y, b, bl, rows, out))?;
            true
        }
        _ => false,
    };
    Ok((y, Shape::from(dims), biased))
}

/// The gradients of `x`, `W` and `b` of `x·Wᵀ + b` given the output's: three products (cuBLASLt's
/// where it takes them, the bias's gradient then in the weight gradient's epilogue).
fn linear_bwd(x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (out, k) = w.dims2()?;
    let rows = x.elem_count() / k;
    let g = grad.contiguous()?.reshape((rows, out))?;
    let (x2, w) = (x.detach().reshape((rows, k))?, w.detach());
    let dx = match super::cuda_lt::dense_input_grad(&g, &w, None)? {
        Some(dx) => dx,
        None => g.matmul(&w)?,
    }
    .reshape(x.shape())?;
    let (dw, db) = match super::cuda_lt::dense_param_grads(&g, &x2)? {
        // In f32 where cuBLASLt gives them so; the graph wants the weight's own dtype.
        Some((dw, db)) => (dw.to_dtype(w.dtype())?, db),
        None => {
            let dw = super::weight_grad::weight_grad(&g, &x2)?;
            let ones = Tensor::ones((1, rows), g.dtype(), g.device())?;
            (dw, ones.matmul(&g)?.reshape(out)?)
        }
    };
    Ok((dx, dw, db))
}

/// `x·Wᵀ + b` over the last dimension of `x` (`w` `[out, in]`, `b` `[out]`, one dtype), one node
/// with a backward of three products.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Linear)
}

/// `x·Wᵀ` over the last dimension of `x`, one node (`linear` without the bias).
pub fn linear_no_bias(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, LinearNoBias)
}

// ---- pointer arrays of batched products -----------------------------------------------------------

/// The most pointer arrays one `batch_pointers` launch fills (three products' A, B and C).
pub(super) const BATCH_ARRAYS: usize = 9;

/// `batch_pointers`'s table, by value (kernels.cu's `PointerPlan`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PointerPlan {
    base: [u64; BATCH_ARRAYS],
    per_b: [u64; BATCH_ARRAYS],
    per_h: [u64; BATCH_ARRAYS],
}

// SAFETY: plain old data of the kernel parameter's C layout (`#[repr(C)]`, u64 arrays only).
unsafe impl DeviceRepr for PointerPlan {}

/// Fills the pointer arrays of batched products over `count` (batch, head) indices (`cuda_heads`):
/// `out` `[arrays.len() · count]`, array `a` holding `base + b·per_b + h·per_h` bytes for index
/// `b·heads + h` (`arrays[a]`: those three numbers), up to `BATCH_ARRAYS` arrays in one launch.
pub(super) fn batch_pointers(
    dev: &CudaDevice,
    out: &CudaSlice<u64>,
    count: usize,
    heads: usize,
    arrays: &[(u64, u64, u64)],
) -> Result<()> {
    if arrays.len() > BATCH_ARRAYS || out.len() < arrays.len() * count {
        bail!(
            "batch pointers: {} arrays of {count} into {} words",
            arrays.len(),
            out.len()
        );
    }
    let mut plan = PointerPlan::default();
    for (i, &(base, per_b, per_h)) in arrays.iter().enumerate() {
        (plan.base[i], plan.per_b[i], plan.per_h[i]) = (base, per_b, per_h);
    }
    let (count32, heads32, arrays32) = (count as u32, heads as u32, arrays.len() as u32);
    let f = load_kernel(dev, "batch_pointers")?;
    let mut l = f.builder();
    l.arg(out)
        .arg(&count32)
        .arg(&heads32)
        .arg(&arrays32)
        .arg(&plan);
    unsafe { l.launch(elementwise(count)) }.w()?;
    Ok(())
}

// ---- swapping the middle dimensions --------------------------------------------------------------

/// One launch of the swap kernel: `y [a, c, b, d]` from `x [a, b, c, d]` (sizes in elements) with
/// rows of `x_row` and `y_row` elements, starting `x_offset` and `y_offset` elements into the
/// buffers (`geometry::swap_plan`).
fn launch_swap<T: CudaDType + DeviceRepr>(
    like: &CudaStorage,
    x: &CudaSlice<T>,
    y: &CudaSlice<T>,
    dims: [usize; 4],
    rows: (usize, usize),
    offsets: (usize, usize),
) -> Result<()> {
    let dev = like.device();
    let elem = std::mem::size_of::<T>();
    let Some(plan) = geometry::swap_plan(elem, dims, rows, offsets) else {
        bail!("swap12: {dims:?} with rows {rows:?} is past the kernel's 32-bit indexing");
    };
    let [a, b, c, _] = dims;
    let per = plan.unit / elem;
    // The kernel sees both buffers from the offsets on (as units).
    let (xv, yv) = (
        x.slice(plan.x_offset * per..),
        y.slice(plan.y_offset * per..),
    );
    let f = load_kernel(dev, &format!("swap12_u{}", plan.unit * 8))?;
    let mut l = f.builder();
    let (a32, b32, c32) = (a as u32, b as u32, c as u32);
    l.arg(&xv)
        .arg(&yv)
        .arg(&a32)
        .arg(&b32)
        .arg(&c32)
        .arg(&plan.d)
        .arg(&plan.x_row)
        .arg(&plan.y_row);
    let (grid_dim, threads) = geometry::swap_launch(a, b, c, plan.d as usize);
    let cfg = LaunchConfig {
        grid_dim,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { l.launch(cfg) }.w()?;
    Ok(())
}

struct Swap12;

impl CustomOp1 for Swap12 {
    fn name(&self) -> &'static str {
        "recycle-cuda-swap12"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(x: &CudaStorage, xl: &Layout) -> Result<CudaStorage> {
            let dev = x.device();
            let &[a, b, c, d] = xl.dims() else {
                bail!("swap12: needs four dimensions, got {:?}", xl.dims())
            };
            if !xl.is_contiguous() {
                bail!("swap12: the CUDA kernel needs a contiguous input");
            }
            let xs: &CudaSlice<T> = x.as_cuda_slice()?;
            let y = unsafe { dev.alloc::<T>(a * b * c * d)? };
            let rows = (c * d, b * d);
            launch_swap(x, xs, &y, [a, b, c, d], rows, (xl.start_offset(), 0))?;
            Ok(wrap(y, dev))
        }
        let &[a, b, c, d] = xl.dims() else {
            bail!("swap12: needs four dimensions, got {:?}", xl.dims())
        };
        let out = by_dtype!(x.dtype(), run(x, xl))?;
        Ok((out, Shape::from((a, c, b, d))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Its own inverse.
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Swap12)?))
    }
}

/// Part `part` of `parts` side by side in the last dimension of `t` `[b, s, parts · heads · d]`,
/// split into heads: `[b, heads, s, d]` (q, k or v from one product), no backward.
struct SplitPart {
    part: usize,
    parts: usize,
    heads: usize,
}

impl CustomOp1 for SplitPart {
    fn name(&self) -> &'static str {
        "recycle-cuda-split-part"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let &[b, s, width] = xl.dims() else {
            bail!("split part: needs [b, s, width], got {:?}", xl.dims())
        };
        let h = self.heads;
        if !xl.is_contiguous() || h == 0 || width % (self.parts * h) != 0 || self.part >= self.parts
        {
            bail!(
                "split part: part {} of {} in {h} heads from {:?}",
                self.part,
                self.parts,
                xl.dims()
            );
        }
        let d = width / (self.parts * h);
        fn run<T: CudaDType + DeviceRepr>(
            op: &SplitPart,
            x: &CudaStorage,
            xl: &Layout,
            [b, s, h, d]: [usize; 4],
        ) -> Result<CudaStorage> {
            let dev = x.device();
            let xs: &CudaSlice<T> = x.as_cuda_slice()?;
            let y = unsafe { dev.alloc::<T>(b * s * h * d)? };
            let x_offset = xl.start_offset() + op.part * h * d;
            let rows = (op.parts * h * d, s * d);
            launch_swap(x, xs, &y, [b, s, h, d], rows, (x_offset, 0))?;
            Ok(wrap(y, dev))
        }
        let out = by_dtype!(x.dtype(), run(self, x, xl, [b, s, h, d]))?;
        Ok((out, Shape::from((b, h, s, d))))
    }
}

/// Three `[b, heads, s, d]` tensors merged side by side into `[b, s, 3 · heads · d]` (the
/// gradients of q, k and v as one, for one product with the stacked weight), no backward.
struct MergeParts;

impl CustomOp3 for MergeParts {
    fn name(&self) -> &'static str {
        "recycle-cuda-merge-parts"
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
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let &[b, h, s, d] = ql.dims() else {
            bail!("merge parts: needs [b, heads, s, d], got {:?}", ql.dims())
        };
        if kl.dims() != ql.dims() || vl.dims() != ql.dims() {
            bail!(
                "merge parts: {:?}, {:?}, {:?} differ",
                ql.dims(),
                kl.dims(),
                vl.dims()
            );
        }
        fn run<T: CudaDType + DeviceRepr>(
            parts: [(&CudaStorage, &Layout); 3],
            [b, h, s, d]: [usize; 4],
        ) -> Result<CudaStorage> {
            let dev = parts[0].0.device();
            let y = unsafe { dev.alloc::<T>(3 * b * s * h * d)? };
            for (j, (x, xl)) in parts.into_iter().enumerate() {
                if !xl.is_contiguous() {
                    bail!("merge parts: the CUDA kernel needs contiguous inputs");
                }
                let xs: &CudaSlice<T> = x.as_cuda_slice()?;
                let rows = (s * d, 3 * h * d);
                let offsets = (xl.start_offset(), j * h * d);
                launch_swap(x, xs, &y, [b, h, s, d], rows, offsets)?;
            }
            Ok(wrap(y, dev))
        }
        let parts = [(q, ql), (k, kl), (v, vl)];
        let out = by_dtype!(q.dtype(), run(parts, [b, h, s, d]))?;
        Ok((out, Shape::from((b, s, 3 * h * d))))
    }
}

/// `x.transpose(1, 2).contiguous()` of a four-dimensional tensor, as one copy kernel whose backward
/// is itself.
pub fn swap12(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Swap12)
}

/// The swap kernel on a storage (`[a, b, c, d]` → `[a, c, b, d]`), for ops that produce their
/// output from a tensor they computed beforehand (`attention_node`).
pub fn swap12_storage(x: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    if !l.is_contiguous() {
        bail!("swap12: the CUDA kernel needs a contiguous input");
    }
    Ok(Swap12.cuda_fwd(x, l)?.0)
}

/// `attention_node`'s device parts on CUDA: the counter-hash dropout and the softmax backward
/// kernel.
#[derive(Debug, Clone, Copy)]
pub struct CudaPrims;

use super::attention_node::SeededDropout;

impl super::attention_node::Prims for CudaPrims {
    fn dropout(&self, x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
        dropout(x, p, seed)
    }

    fn flash_forward(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        heads: usize,
        scale: f64,
        drop: Option<super::attention_node::SeededDropout>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if !super::attention_node::flash_on() || !flash_fits(qkv, bias, heads) {
            return Ok(None);
        }
        flash_forward(qkv, bias, heads, scale, drop).map(Some)
    }

    fn flash_backward(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        ctx: &Tensor,
        lse: &Tensor,
        dctx: &Tensor,
        heads: usize,
        scale: f64,
        drop: Option<super::attention_node::SeededDropout>,
    ) -> Result<Tensor> {
        flash_backward(qkv, bias, ctx, lse, dctx, heads, scale, drop)
    }

    fn concat_flat(&self, parts: &[&Tensor], dtype: DType) -> Result<Tensor> {
        let parts = parts
            .iter()
            .map(|p| p.contiguous())
            .collect::<Result<Vec<_>>>()?;
        gather(&parts.iter().collect::<Vec<_>>(), dtype)
    }

    fn softmax_backward(
        &self,
        p: &Tensor,
        dp: &Tensor,
        scale: f64,
        drop: Option<SeededDropout>,
    ) -> Result<Tensor> {
        p.contiguous()?.apply_op2_no_bwd(
            &dp.contiguous()?,
            &SoftmaxBwd {
                scale: scale as f32,
                drop: drop.map(|d| Dropout::new(d.p, d.seed)),
            },
        )
    }

    fn softmax_dropout(
        &self,
        scores: &Tensor,
        bias: &Tensor,
        scale: f64,
        drop: SeededDropout,
    ) -> Result<(Tensor, Tensor)> {
        let both = scores.contiguous()?.apply_op2_no_bwd(
            &bias.contiguous()?,
            &SoftmaxDropFwd {
                scale: scale as f32,
                drop: Dropout::new(drop.p, drop.seed),
            },
        )?;
        Ok((both.get(0)?, both.get(1)?))
    }

    fn layer_norm_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        eps: f64,
    ) -> Result<[Tensor; 3]> {
        let [dx, _, dw, db] = layer_norm_backward(x, w, dy, eps as f32, None)?;
        Ok([dx, dw, db])
    }

    fn dropout_add(&self, h: &Tensor, r: &Tensor, drop: Option<SeededDropout>) -> Result<Tensor> {
        match drop {
            Some(d) => h
                .contiguous()?
                .apply_op2_no_bwd(&r.contiguous()?, &DropoutAdd(Dropout::new(d.p, d.seed))),
            None => self.add(h, r),
        }
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        if a.dims() != b.dims() || a.dtype() != b.dtype() {
            return a + b;
        }
        a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add)
    }

    fn layer_norm_backward_dropout(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        eps: f64,
        drop: Option<SeededDropout>,
    ) -> Result<[Tensor; 4]> {
        let drop = drop.map(|d| Dropout::new(d.p, d.seed));
        layer_norm_backward(x, w, dy, eps as f32, drop)
    }

    fn bias_gelu(&self, y: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        let both = y
            .contiguous()?
            .apply_op2_no_bwd(&b.contiguous()?, &BiasGelu)?;
        Ok((both.get(0)?, both.get(1)?))
    }

    fn dense_gelu(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
        let op = LinearBiasInProduct::default();
        let y = x.apply_op3_no_bwd(&w, &b, &op)?;
        if op.biased.load(std::sync::atomic::Ordering::Relaxed) {
            let g = y.apply_op1_no_bwd(&Gelu)?;
            return Ok((y, g));
        }
        self.bias_gelu(&y, &b)
    }

    fn dropout_add_norm(
        &self,
        h: &Tensor,
        x: &Tensor,
        drop: Option<SeededDropout>,
        norm: (&Tensor, &Tensor),
        eps: f64,
    ) -> Result<Option<(Tensor, Tensor)>> {
        dropout_add_layer_norm(h, x, norm, eps, drop)
    }

    fn split_part(&self, t: &Tensor, part: usize, parts: usize, heads: usize) -> Result<Tensor> {
        t.contiguous()?
            .apply_op1_no_bwd(&SplitPart { part, parts, heads })
    }

    fn merge_parts(&self, [q, k, v]: [&Tensor; 3]) -> Result<Tensor> {
        q.contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &MergeParts)
    }

    fn gelu_backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        x.contiguous()?
            .apply_op2_no_bwd(&dy.contiguous()?, &GeluBwd)
    }

    fn heads_in_place(&self, qkv: &Tensor, heads: usize) -> bool {
        super::cuda_heads::heads_in_place(qkv, heads)
    }

    fn head_scores(&self, qkv: &Tensor, heads: usize) -> Result<Tensor> {
        super::cuda_heads::head_scores(qkv, heads)
    }

    fn head_context(&self, p: &Tensor, qkv: &Tensor, heads: usize) -> Result<Tensor> {
        super::cuda_heads::head_context(p, qkv, heads)
    }

    fn head_dprobs(&self, dctx: &Tensor, qkv: &Tensor, heads: usize) -> Result<Tensor> {
        super::cuda_heads::head_dprobs(dctx, qkv, heads)
    }

    fn head_grads(
        &self,
        ds: &Tensor,
        p: &Tensor,
        dctx: &Tensor,
        qkv: &Tensor,
        heads: usize,
    ) -> Result<Tensor> {
        super::cuda_heads::head_grads(ds, p, dctx, qkv, heads)
    }

    fn dense_input_grad(&self, dy: &Tensor, w: &Tensor) -> Result<Tensor> {
        match super::cuda_lt::dense_input_grad(dy, w, None)? {
            Some(dx) => Ok(dx),
            None => dy.matmul(w),
        }
    }

    fn dense_input_grad_plus(&self, dy: &Tensor, w: &Tensor, plus: &Tensor) -> Result<Tensor> {
        match super::cuda_lt::dense_input_grad(dy, w, Some(plus))? {
            Some(dx) => Ok(dx),
            None => self.add(&self.dense_input_grad(dy, w)?, plus),
        }
    }

    fn dense_input_grad_gelu(&self, dy: &Tensor, w: &Tensor, u: &Tensor) -> Result<Tensor> {
        match super::cuda_lt::dense_input_grad_gelu(dy, w, u)? {
            Some(du) => Ok(du),
            None => self.gelu_backward(u, &self.dense_input_grad(dy, w)?),
        }
    }

    fn dense_param_grads(&self, dy: &Tensor, x: &Tensor) -> Result<(Tensor, Tensor)> {
        match super::cuda_lt::dense_param_grads(dy, x)? {
            Some(both) => Ok(both),
            None => Ok((
                super::weight_grad::weight_grad(dy, x)?,
                self.column_sum(dy)?,
            )),
        }
    }

    fn column_sum(&self, g: &Tensor) -> Result<Tensor> {
        // A product with a row of ones: cuBLAS, where candle's sum over the rows is a strided
        // column reduction.
        let (rows, n) = g.dims2()?;
        let ones = Tensor::ones((1, rows), g.dtype(), g.device())?;
        ones.matmul(&g.contiguous()?)?.reshape(n)
    }
}

/// Layer norm's forward kernel on storages (`x` `[rows, n]` contiguous; `w`, `b` `[n]`): for
/// nodes that produce their output from tensors they computed beforehand (`block_node`).
pub fn layer_norm_storage(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    eps: f64,
) -> Result<CudaStorage> {
    let n = x.1.dims().last().copied().unwrap_or(0);
    if n == 0 || n > MAX_LAYER_NORM_DIM || w.1.dims() != [n] || b.1.dims() != [n] {
        bail!(
            "layer norm: input {:?}, weight {:?}, bias {:?} do not fit the CUDA kernel",
            x.1.dims(),
            w.1.dims(),
            b.1.dims()
        );
    }
    if !(x.1.is_contiguous() && w.1.is_contiguous() && b.1.is_contiguous()) {
        bail!("layer norm: the CUDA kernel needs contiguous operands");
    }
    layer_norm_rows([x, w, b], eps as f32)
}

// ---- embedding ----------------------------------------------------------------------------------

struct Embedding;

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "recycle-cuda-embedding"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        table: &CudaStorage,
        tl: &Layout,
        ids: &CudaStorage,
        il: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            table: &CudaStorage,
            tl: &Layout,
            ids: &CudaStorage,
            il: &Layout,
        ) -> Result<CudaStorage> {
            let dev = table.device();
            let n = last_dim(tl, "embedding")?.1;
            let vocab = tl.dims()[0] as u32;
            let rows = il.shape().elem_count();
            let (tv, iv) = (
                view::<T>(table, tl, "embedding table")?,
                view::<u32>(ids, il, "token ids")?,
            );
            let out = unsafe { dev.alloc::<T>(rows * n)? };
            let f = func!(dev, "embedding_fwd", table.dtype())?;
            let mut a = f.builder();
            let n_i = n as i32;
            a.arg(&tv)
                .arg(&iv)
                .arg(&out)
                .arg(&rows)
                .arg(&n_i)
                .arg(&vocab);
            unsafe { a.launch(by_rows(rows, n)) }.w()?;
            Ok(wrap(out, dev))
        }
        let n = last_dim(tl, "embedding")?.1;
        let rows = il.shape().elem_count();
        let out = by_dtype!(table.dtype(), run(table, tl, ids, il))?;
        Ok((out, Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let vocab = table.dim(0)?;
        let g = grad
            .contiguous()?
            .apply_op2_no_bwd(ids, &EmbeddingBwd { vocab })?
            .to_dtype(table.dtype())?;
        Ok((Some(g), None))
    }
}

struct EmbeddingBwd {
    vocab: usize,
}

impl CustomOp2 for EmbeddingBwd {
    fn name(&self) -> &'static str {
        "recycle-cuda-embedding-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        gl: &Layout,
        ids: &CudaStorage,
        il: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            vocab: usize,
            g: &CudaStorage,
            gl: &Layout,
            ids: &CudaStorage,
            il: &Layout,
        ) -> Result<CudaStorage> {
            let dev = g.device();
            let (rows, n) = last_dim(gl, "embedding backward")?;
            let (gv, iv) = (
                view::<T>(g, gl, "embedding backward")?,
                view::<u32>(ids, il, "token ids")?,
            );
            let out = dev.alloc_zeros::<f32>(vocab * n)?;
            let f = func!(dev, "embedding_bwd", g.dtype())?;
            let mut a = f.builder();
            let n_i = n as i32;
            a.arg(&gv).arg(&iv).arg(&out).arg(&rows).arg(&n_i);
            unsafe { a.launch(by_rows(rows, n)) }.w()?;
            Ok(wrap(out, dev))
        }
        let n = last_dim(gl, "embedding backward")?.1;
        let out = by_dtype!(g.dtype(), run(self.vocab, g, gl, ids, il))?;
        Ok((out, Shape::from((self.vocab, n))))
    }
}

/// The gather kernel on storages: rows `ids` (u32, flat, contiguous) of `table` `[vocab, n]`
/// (f32 or bf16, contiguous), as `[ids, n]` (for `embedding_node`).
pub fn embedding_storage(
    table: &CudaStorage,
    tl: &Layout,
    ids: &CudaStorage,
    il: &Layout,
) -> Result<(CudaStorage, Shape)> {
    Embedding.cuda_fwd(table, tl, ids, il)
}

/// The rows of two or three f32 tables summed (`[rows, n]` in `dtype`, f32 or bf16): `tables` the
/// tables' storages and layouts (`[vocab, n]` each), `ids` their u32 ids (flat, `rows` each).
pub fn embedding_sum_storage(
    tables: &[(&CudaStorage, &Layout)],
    ids: &[(&CudaStorage, &Layout)],
    dtype: DType,
) -> Result<(CudaStorage, Shape)> {
    let what = "embedding sum";
    if !(2..=3).contains(&tables.len()) || ids.len() != tables.len() {
        bail!("{what}: two or three tables, each with its ids");
    }
    let n = last_dim(tables[0].1, what)?.1;
    let rows = ids[0].1.shape().elem_count();
    let mut tv = Vec::new();
    let mut vocab = [0u32; 3];
    for (k, &(t, l)) in tables.iter().enumerate() {
        if l.dims().len() != 2 || l.dims()[1] != n {
            bail!("{what}: table {k} is {:?}, not [vocab, {n}]", l.dims());
        }
        vocab[k] = l.dims()[0] as u32;
        tv.push(view::<f32>(t, l, "embedding table")?);
    }
    let mut iv = Vec::new();
    for (k, &(s, l)) in ids.iter().enumerate() {
        if l.shape().elem_count() != rows {
            bail!(
                "{what}: ids {k} has {} rows, not {rows}",
                l.shape().elem_count()
            );
        }
        iv.push(view::<u32>(s, l, "token ids")?);
    }
    let dev = tables[0].0.device();
    // The third table and ids where there are only two: the first's (never read).
    let (t2, i2) = (tv.get(2).unwrap_or(&tv[0]), iv.get(2).unwrap_or(&iv[0]));
    let count = tables.len() as u32;
    let n_i = n as i32;
    fn run<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        t: [&CudaView<'_, f32>; 3],
        i: [&CudaView<'_, u32>; 3],
        (rows, n_i, vocab, count, dtype): (usize, i32, [u32; 3], u32, DType),
    ) -> Result<CudaStorage> {
        let out = unsafe { dev.alloc::<T>(rows * n_i as usize)? };
        let f = func!(dev, "embedding_sum_fwd", dtype)?;
        let mut a = f.builder();
        a.arg(t[0])
            .arg(t[1])
            .arg(t[2])
            .arg(i[0])
            .arg(i[1])
            .arg(i[2])
            .arg(&out)
            .arg(&rows)
            .arg(&n_i)
            .arg(&vocab[0])
            .arg(&vocab[1])
            .arg(&vocab[2])
            .arg(&count);
        unsafe { a.launch(by_rows(rows, n_i as usize)) }.w()?;
        Ok(wrap(out, dev))
    }
    let args = (rows, n_i, vocab, count, dtype);
    let t = [&tv[0], &tv[1], t2];
    let i = [&iv[0], &iv[1], i2];
    let out = match dtype {
        DType::F32 => run::<f32>(dev, t, i, args)?,
        DType::BF16 => run::<bf16>(dev, t, i, args)?,
        other => bail!("{what}: rows in f32 or bf16, not {other:?}"),
    };
    Ok((out, Shape::from((rows, n))))
}

/// `embedding_storage` with the rows written in `dtype`: an f32 table's rows straight into bf16
/// (`embedding_fwd_f32_to_bf16`, rounded as a cast rounds), else in the table's own dtype.
pub fn embedding_storage_as(
    table: &CudaStorage,
    tl: &Layout,
    ids: &CudaStorage,
    il: &Layout,
    dtype: DType,
) -> Result<(CudaStorage, Shape)> {
    if table.dtype() != DType::F32 || dtype != DType::BF16 {
        return embedding_storage(table, tl, ids, il);
    }
    let dev = table.device();
    let n = last_dim(tl, "embedding")?.1;
    let vocab = tl.dims()[0] as u32;
    let rows = il.shape().elem_count();
    let (tv, iv) = (
        view::<f32>(table, tl, "embedding table")?,
        view::<u32>(ids, il, "token ids")?,
    );
    let out = unsafe { dev.alloc::<bf16>(rows * n)? };
    let f = load_kernel(dev, "embedding_fwd_f32_to_bf16")?;
    let mut a = f.builder();
    let n_i = n as i32;
    a.arg(&tv)
        .arg(&iv)
        .arg(&out)
        .arg(&rows)
        .arg(&n_i)
        .arg(&vocab);
    unsafe { a.launch(by_rows(rows, n)) }.w()?;
    Ok((wrap(out, dev), Shape::from((rows, n))))
}

/// The gradient `[vocab, n]` (f32) of an embedding table whose rows `ids` (u32, flat) received
/// `grad` `[ids, n]`: the scatter kernel, atomic adds in f32.
pub fn embedding_table_grad(grad: &Tensor, ids: &Tensor, vocab: usize) -> Result<Tensor> {
    grad.contiguous()?
        .apply_op2_no_bwd(&ids.contiguous()?, &EmbeddingBwd { vocab })
}

/// Rows `ids` (u32, any shape) of `table` `[vocab, n]`, shaped `[ids.., n]`; the table's gradient
/// is scattered back with atomic adds in f32. An id past the table fails the kernel, reported as a
/// CUDA error at the next synchronisation.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let mut dims = ids.dims().to_vec();
    dims.push(table.dim(1)?);
    table
        .contiguous()?
        .apply_op2(&ids.flatten_all()?.contiguous()?, Embedding)?
        .reshape(dims)
}

// ---- AdamW and the gradient norm (f32) -------------------------------------------------------------

fn f32_view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    if s.dtype() != DType::F32 {
        bail!("{what}: f32 only, got {:?}", s.dtype());
    }
    view::<f32>(s, l, what)
}

/// The mutable f32 elements of a contiguous storage that starts at offset 0 and covers it whole
/// (the optimizer's own tensors and `Var`s are such).
fn f32_whole_mut<'a>(
    s: &'a mut CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a mut CudaSlice<f32>> {
    let n = l.shape().elem_count();
    match l.contiguous_offsets() {
        Some((0, end)) if end == n => {}
        _ => bail!("{what}: needs a whole contiguous buffer"),
    }
    let slice: &mut CudaSlice<f32> = s.as_cuda_slice_mut()?;
    if slice.len() != n {
        bail!("{what}: a view into a larger buffer");
    }
    Ok(slice)
}

/// AdamW's moment update in place on `state` (`[m; v]`, 2n f32) from the gradient `g` (n f32).
#[allow(clippy::too_many_arguments)]
pub fn adamw_moments(
    state: &mut CudaStorage,
    sl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    beta1: f32,
    beta2: f32,
    grad_scale: f32,
) -> Result<()> {
    let dev = state.device().clone();
    let gv = f32_view(g, gl, "adamw gradient")?;
    let n = gl.shape().elem_count();
    if sl.shape().elem_count() != 2 * n {
        bail!(
            "adamw: {} moments for {n} gradients",
            sl.shape().elem_count()
        );
    }
    let st = f32_whole_mut(state, sl, "adamw moments")?;
    let f = load_kernel(&dev, "adamw_moments")?;
    let mut a = f.builder();
    let (one_b1, one_b2) = (1.0 - beta1, 1.0 - beta2);
    a.arg(st)
        .arg(&gv)
        .arg(&n)
        .arg(&beta1)
        .arg(&beta2)
        .arg(&one_b1)
        .arg(&one_b2)
        .arg(&grad_scale);
    unsafe { a.launch(elementwise(n)) }.w()?;
    Ok(())
}

/// AdamW's weight update in place on `w` (n f32) from `state` (`[m; v]`, 2n f32).
#[allow(clippy::too_many_arguments)]
pub fn adamw_weights(
    w: &mut CudaStorage,
    wl: &Layout,
    state: &CudaStorage,
    sl: &Layout,
    decay: f32,
    step: f32,
    inv_bc2: f32,
    eps: f32,
) -> Result<()> {
    let dev = w.device().clone();
    let sv = f32_view(state, sl, "adamw moments")?;
    let n = wl.shape().elem_count();
    if sl.shape().elem_count() != 2 * n {
        bail!("adamw: {} moments for {n} weights", sl.shape().elem_count());
    }
    let wv = f32_whole_mut(w, wl, "adamw weights")?;
    let f = load_kernel(&dev, "adamw_weights")?;
    let mut a = f.builder();
    a.arg(wv)
        .arg(&sv)
        .arg(&n)
        .arg(&decay)
        .arg(&step)
        .arg(&inv_bc2)
        .arg(&eps);
    unsafe { a.launch(elementwise(n)) }.w()?;
    Ok(())
}

// ---- many parameters in one launch (kernels.cu: "many parameters in one launch") ---------------

/// Elements per block of the multi-parameter kernels (`MULTI_CHUNK` in kernels.cu).
const MULTI_CHUNK: usize = 4096;

/// The device address of the first element `t`'s layout sees (contiguous, of `T`, on CUDA); with
/// `whole`, the layout must also cover its buffer from offset 0 (what a kernel writes in place:
/// the optimizer's moments and the weights of `Var`s are such).
pub(super) fn device_address<T: CudaDType>(t: &Tensor, whole: bool, what: &str) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*storage else {
        bail!("{what}: not on a CUDA device")
    };
    let slice: &CudaSlice<T> = s.as_cuda_slice()?;
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{what}: the CUDA kernel needs a contiguous input")
    };
    if whole && (start != 0 || end != slice.len()) {
        bail!("{what}: a view into a larger buffer");
    }
    let stream = s.device().cuda_stream();
    let (ptr, _sync) = slice.device_ptr(&stream);
    Ok(ptr + (start * std::mem::size_of::<T>()) as u64)
}

fn f32_address(t: &Tensor, whole: bool, what: &str) -> Result<u64> {
    if t.dtype() != DType::F32 {
        bail!("{what}: f32 only, got {:?}", t.dtype());
    }
    device_address::<f32>(t, whole, what)
}

/// The table of a multi-parameter launch: `entries` (each `words - 1` words, for a parameter of
/// `n` elements) with each one's first block appended (an entry of no elements owns no blocks,
/// and the kernels pass it over). Returns the table, its entries and the blocks to launch (none:
/// launch nothing).
fn multi_table(entries: Vec<(Vec<u64>, usize)>) -> (Vec<u64>, u32, u64) {
    let (mut table, mut blocks) = (Vec::new(), 0u64);
    let count = entries.len() as u32;
    for (words, n) in entries {
        table.extend(words);
        table.push(blocks);
        blocks += n.div_ceil(MULTI_CHUNK) as u64;
    }
    (table, count, blocks)
}

fn multi_launch(blocks: u64) -> Result<LaunchConfig> {
    let Ok(blocks) = u32::try_from(blocks) else {
        bail!("{blocks} blocks of {MULTI_CHUNK} elements exceed one launch");
    };
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One parameter of `adamw_multi`: its weight (written in place), its moments `[m; v]` (2n f32,
/// written in place), its gradient, and its decay factor `1 - lr · weight_decay`.
pub struct AdamwItem<'a> {
    pub w: &'a Tensor,
    pub state: &'a Tensor,
    pub g: &'a Tensor,
    pub decay: f32,
}

/// What one AdamW step shares over its parameters (`adamw_moments`'s and `adamw_weights`'s scalars).
#[derive(Debug, Clone, Copy)]
pub struct AdamwScalars {
    pub beta1: f32,
    pub beta2: f32,
    pub grad_scale: f32,
    pub step: f32,
    pub inv_bc2: f32,
    pub eps: f32,
}

/// One AdamW step over every item in one launch (f32, one CUDA device): the arithmetic of
/// `adamw_moments` and then `adamw_weights`, element by element. The kernel writes the weights and
/// moments through their device addresses; the caller owns both and nothing reads them meanwhile
/// (the launch is ordered on the device's one stream).
///
/// `scale` (an f64 `[coefficient, ..]` from `clip_on_device`), where given, replaces
/// `c.grad_scale`: the kernel reads it from the device.
pub fn adamw_multi(items: &[AdamwItem], c: AdamwScalars, scale: Option<&Tensor>) -> Result<()> {
    let Some(first) = items.first() else {
        return Ok(());
    };
    let dev = first.w.device().as_cuda_device()?.clone();
    let mut entries = Vec::with_capacity(items.len());
    for it in items {
        let n = it.w.elem_count();
        if it.g.elem_count() != n || it.state.elem_count() != 2 * n {
            bail!(
                "adamw: a weight of {n}, a gradient of {} and {} moments",
                it.g.elem_count(),
                it.state.elem_count()
            );
        }
        let words = vec![
            f32_address(it.w, true, "adamw weight")?,
            f32_address(it.state, true, "adamw moments")?,
            f32_address(it.g, false, "adamw gradient")?,
            n as u64,
            u64::from(it.decay.to_bits()),
        ];
        entries.push((words, n));
    }
    let (table, count, blocks) = multi_table(entries);
    if blocks == 0 {
        return Ok(());
    }
    let scale_at = match scale {
        Some(t) if t.dtype() == DType::F64 && t.elem_count() >= 1 => {
            device_address::<f64>(t, false, "adamw gradient scale")?
        }
        Some(t) => bail!(
            "adamw: the gradient scale on the device must be f64, got {:?} {:?}",
            t.dtype(),
            t.dims()
        ),
        None => 0u64,
    };
    let table = dev.clone_htod(&table)?;
    let (one_b1, one_b2) = (1.0 - c.beta1, 1.0 - c.beta2);
    let f = load_kernel(&dev, "adamw_multi")?;
    let mut a = f.builder();
    a.arg(&table)
        .arg(&count)
        .arg(&c.beta1)
        .arg(&c.beta2)
        .arg(&one_b1)
        .arg(&one_b2)
        .arg(&c.grad_scale)
        .arg(&c.step)
        .arg(&c.inv_bc2)
        .arg(&c.eps)
        .arg(&scale_at);
    unsafe { a.launch(multi_launch(blocks)?) }.w()?;
    Ok(())
}

/// The table of `sum_squares_multi` over `grads` (f32, contiguous, on one CUDA device), with the
/// contiguous copies it points into (kept alive by the caller until the launch is queued).
fn squares_table(grads: &[&Tensor]) -> Result<(Vec<Tensor>, Vec<u64>, u32, u64)> {
    let grads: Vec<Tensor> = grads
        .iter()
        .map(|g| g.contiguous())
        .collect::<Result<_>>()?;
    let mut entries = Vec::with_capacity(grads.len());
    for g in &grads {
        let n = g.elem_count();
        entries.push((vec![f32_address(g, false, "gradient")?, n as u64], n));
    }
    let (table, count, blocks) = multi_table(entries);
    Ok((grads, table, count, blocks))
}

/// Launches `sum_squares_multi` into a fresh, zeroed vector of one sum per gradient.
fn launch_sums(dev: &CudaDevice, table: &[u64], count: u32, blocks: u64) -> Result<CudaSlice<f32>> {
    let sums = dev.alloc_zeros::<f32>(count as usize)?;
    if blocks > 0 {
        let table = dev.clone_htod(table)?;
        let f = load_kernel(dev, "sum_squares_multi")?;
        let mut a = f.builder();
        a.arg(&table).arg(&count).arg(&sums);
        unsafe { a.launch(multi_launch(blocks)?) }.w()?;
    }
    Ok(sums)
}

/// The sum of squares of each of `grads` (f32, contiguous, on one CUDA device): one launch and one
/// transfer back for all.
pub fn sums_of_squares(grads: &[&Tensor]) -> Result<Vec<f32>> {
    let Some(first) = grads.first() else {
        return Ok(Vec::new());
    };
    let dev = first.device().as_cuda_device()?.clone();
    let (_keep, table, count, blocks) = squares_table(grads)?;
    if blocks == 0 {
        return Ok(vec![0f32; count as usize]);
    }
    dev.clone_dtoh(&launch_sums(&dev, &table, count, blocks)?)
}

/// The global norm of `grads` (f32, on one CUDA device) and the clipping coefficient for
/// `max_norm` (none where it is not positive), left on the device as an f64 `[coefficient, norm]`
/// for `adamw_multi` to read: two launches and no transfer back, so the host need not wait for the
/// backward to finish. The same bits as `sums_of_squares` summed and clipped on the host
/// (`clip_scale` in kernels.cu follows the host's arithmetic).
pub fn clip_on_device(grads: &[&Tensor], max_norm: f64) -> Result<Tensor> {
    let Some(first) = grads.first() else {
        bail!("clip on the device: no gradients");
    };
    let (keep, table, count, blocks) = squares_table(grads)?;
    let out = first.apply_op1_no_bwd(&ClipScale {
        table,
        count,
        blocks,
        max_norm,
    })?;
    drop(keep);
    Ok(out)
}

/// `clip_on_device`'s op: its input only places it on the device.
struct ClipScale {
    table: Vec<u64>,
    count: u32,
    blocks: u64,
    max_norm: f64,
}

impl CustomOp1 for ClipScale {
    fn name(&self) -> &'static str {
        "recycle-cuda-clip-scale"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(&self, like: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = like.device().clone();
        let sums = launch_sums(&dev, &self.table, self.count, self.blocks)?;
        let out = unsafe { dev.alloc::<f64>(2) }?;
        let f = load_kernel(&dev, "clip_scale")?;
        let mut a = f.builder();
        a.arg(&sums).arg(&self.count).arg(&self.max_norm).arg(&out);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { a.launch(cfg) }.w()?;
        Ok((wrap(out, &dev), Shape::from(2)))
    }
}

/// Which `gather` kernel: the parts' dtype and the output's.
#[derive(Debug, Clone, Copy)]
enum GatherKind {
    F32,
    Bf16,
    Bf16ToF32,
    F32ToBf16,
}

/// The parts' elements end to end in one new vector (`gather`): the table is built on the host
/// before the op runs; the op's input is only the first part, which places it on its device.
struct Gather {
    kind: GatherKind,
    table: Vec<u64>,
    count: u32,
    blocks: u64,
    total: usize,
}

impl CustomOp1 for Gather {
    fn name(&self) -> &'static str {
        "recycle-cuda-gather"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(&self, like: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = like.device().clone();
        let (table, count, blocks) = (&self.table[..], self.count, self.blocks);
        // Every element is written: the parts cover the output end to end.
        let out = match self.kind {
            GatherKind::F32 => {
                let out = unsafe { dev.alloc::<f32>(self.total) }?;
                launch_gather("gather_f32", &dev, table, count, blocks, &out)?;
                wrap(out, &dev)
            }
            GatherKind::Bf16 => {
                let out = unsafe { dev.alloc::<bf16>(self.total) }?;
                launch_gather("gather_bf16", &dev, table, count, blocks, &out)?;
                wrap(out, &dev)
            }
            GatherKind::Bf16ToF32 => {
                let out = unsafe { dev.alloc::<f32>(self.total) }?;
                launch_gather("gather_bf16_to_f32", &dev, table, count, blocks, &out)?;
                wrap(out, &dev)
            }
            GatherKind::F32ToBf16 => {
                let out = unsafe { dev.alloc::<bf16>(self.total) }?;
                launch_gather("gather_f32_to_bf16", &dev, table, count, blocks, &out)?;
                wrap(out, &dev)
            }
        };
        Ok((out, Shape::from(self.total)))
    }
}

fn launch_gather<T: DeviceRepr>(
    kernel: &str,
    dev: &CudaDevice,
    table: &[u64],
    count: u32,
    blocks: u64,
    out: &CudaSlice<T>,
) -> Result<()> {
    if blocks == 0 {
        return Ok(());
    }
    let table = dev.clone_htod(table)?;
    let f = load_kernel(dev, kernel)?;
    let mut a = f.builder();
    a.arg(&table).arg(&count).arg(out);
    unsafe { a.launch(multi_launch(blocks)?) }.w()?;
    Ok(())
}

/// `parts` (contiguous tensors of one dtype, f32 or bf16, on one CUDA device) flattened and laid
/// end to end in one new vector of `dtype` (theirs, f32 from bf16, or bf16 from f32), in one
/// launch. Nothing records a gradient through it.
pub fn gather(parts: &[&Tensor], dtype: DType) -> Result<Tensor> {
    let Some(first) = parts.first() else {
        bail!("gather: no parts")
    };
    let src = first.dtype();
    let kind = match (src, dtype) {
        (DType::F32, DType::F32) => GatherKind::F32,
        (DType::BF16, DType::BF16) => GatherKind::Bf16,
        (DType::BF16, DType::F32) => GatherKind::Bf16ToF32,
        (DType::F32, DType::BF16) => GatherKind::F32ToBf16,
        other => bail!("gather: no kernel takes {:?} to {:?}", other.0, other.1),
    };
    let mut entries = Vec::with_capacity(parts.len());
    let mut total = 0usize;
    for p in parts {
        if p.dtype() != src || !p.device().same_device(first.device()) {
            bail!("gather: parts of different dtypes or devices");
        }
        let n = p.elem_count();
        let address = match src {
            DType::F32 => device_address::<f32>(p, false, "gather part")?,
            _ => device_address::<bf16>(p, false, "gather part")?,
        };
        entries.push((vec![address, n as u64, total as u64], n));
        total += n;
    }
    let (table, count, blocks) = multi_table(entries);
    first.apply_op1_no_bwd(&Gather {
        kind,
        table,
        count,
        blocks,
        total,
    })
}

// ---- split-K: adding the partial products of a weight gradient ----------------------------------

/// `[parts, ..]` summed over the first dimension (`weight_grad`), accumulated in f32.
struct SplitSum;

impl CustomOp1 for SplitSum {
    fn name(&self) -> &'static str {
        "recycle-cuda-split-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            x: &CudaStorage,
            xl: &Layout,
            parts: usize,
        ) -> Result<CudaStorage> {
            let dev = x.device();
            let n = xl.shape().elem_count() / parts;
            let xv = view::<T>(x, xl, "split sum")?;
            let out = unsafe { dev.alloc::<T>(n)? };
            let f = func!(dev, "split_sum", x.dtype())?;
            let mut a = f.builder();
            let parts = parts as u32;
            a.arg(&xv).arg(&out).arg(&n).arg(&parts);
            unsafe { a.launch(elementwise(n)) }.w()?;
            Ok(wrap(out, dev))
        }
        let (parts, rest) = match xl.dims() {
            [parts, rest @ ..] if *parts > 0 && u32::try_from(*parts).is_ok() => (*parts, rest),
            dims => bail!("split sum: needs a first dimension of parts, got {dims:?}"),
        };
        let out = by_dtype!(x.dtype(), run(x, xl, parts))?;
        Ok((out, Shape::from(rest.to_vec())))
    }
}

/// `partial` (`[parts, ..]`, f32 or bf16) summed over its first dimension in one launch, added in
/// f32 and rounded once to its dtype. Nothing records a gradient through it.
pub fn split_sum(partial: &Tensor) -> Result<Tensor> {
    partial.contiguous()?.apply_op1_no_bwd(&SplitSum)
}

// ---- attention in one pass ("flash") ------------------------------------------------------------

/// The head size the one-pass kernels take.
pub const FLASH_HEAD_DIM: usize = 64;
/// The longest sequence their backward takes (`FA_BWD_MAX_S` in kernels.cu).
pub const FLASH_MAX_SEQ: usize = 512;
/// Keys one backward block takes (`FA_BWD_KEYS`); a longer sequence spreads a head's keys over
/// several blocks, which add their dQ in f32.
const FLASH_BWD_KEYS: usize = 128;

/// Whether the one-pass kernels take attention over `qkv` `[b, s, 3 · heads · 64]` with `bias`
/// `[b, 1, 1, s]`: both bf16 on one CUDA device, heads of 64, `s` a multiple of 16 up to
/// `FLASH_MAX_SEQ`, `qkv` contiguous from a 32-byte boundary (the tensor cores' tiles read it in
/// place).
pub fn flash_fits(qkv: &Tensor, bias: &Tensor, heads: usize) -> bool {
    let Ok((b, s, width)) = qkv.dims3() else {
        return false;
    };
    let aligned = device_address::<bf16>(qkv, false, "flash").is_ok_and(|a| a % 32 == 0);
    qkv.device().is_cuda()
        && bias.device().same_device(qkv.device())
        && qkv.dtype() == DType::BF16
        && bias.dtype() == DType::BF16
        && bias.elem_count() == b * s
        && heads > 0
        && width == 3 * heads * FLASH_HEAD_DIM
        && s > 0
        && s % 16 == 0
        && s <= FLASH_MAX_SEQ
        && aligned
}

/// A new tensor of `dims` and `dtype` on `like`'s CUDA device whose elements a kernel is about to
/// write, every one of them (no fill).
struct Uninit {
    dims: Vec<usize>,
    dtype: DType,
}

impl CustomOp1 for Uninit {
    fn name(&self) -> &'static str {
        "recycle-cuda-uninit"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_unreachable(self.name())
    }

    fn cuda_fwd(&self, like: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = like.device();
        let n = self.dims.iter().product::<usize>();
        let out = match self.dtype {
            DType::F32 => wrap(unsafe { dev.alloc::<f32>(n)? }, dev),
            DType::BF16 => wrap(unsafe { dev.alloc::<bf16>(n)? }, dev),
            other => bail!("uninit: f32 or bf16, not {other:?}"),
        };
        Ok((out, Shape::from(self.dims.clone())))
    }
}

fn uninit(like: &Tensor, dims: &[usize], dtype: DType) -> Result<Tensor> {
    like.apply_op1_no_bwd(&Uninit {
        dims: dims.to_vec(),
        dtype,
    })
}

/// The kernels' (seed, threshold, scale) of `drop`; no dropout keeps every element at scale 1.
fn flash_dropout(drop: Option<super::attention_node::SeededDropout>) -> (u64, u32, f32) {
    drop.map_or((0, 0, 1.0), |d| {
        let k = Dropout::new(d.p, d.seed);
        (k.seed, k.threshold, k.scale)
    })
}

/// Attention over `qkv` in one launch (`flash_fwd_bf16`; `flash_fits` must hold): the context
/// `[b, s, heads · 64]` and the log-sum-exp of each row of scores `[b, heads, s]` (f32).
pub fn flash_forward(
    qkv: &Tensor,
    bias: &Tensor,
    heads: usize,
    scale: f64,
    drop: Option<super::attention_node::SeededDropout>,
) -> Result<(Tensor, Tensor)> {
    let (b, s, width) = qkv.dims3()?;
    let bias = bias.contiguous()?;
    let ctx = uninit(qkv, &[b, s, width / 3], DType::BF16)?;
    let lse = uninit(qkv, &[b, heads, s], DType::F32)?;
    let (q_at, bias_at) = (
        device_address::<bf16>(qkv, false, "flash qkv")?,
        device_address::<bf16>(&bias, false, "flash bias")?,
    );
    let (ctx_at, lse_at) = (
        device_address::<bf16>(&ctx, true, "flash context")?,
        device_address::<f32>(&lse, true, "flash log-sum-exp")?,
    );
    let (seed, threshold, drop_scale) = flash_dropout(drop);
    let (s32, heads32, scale) = (s as i32, heads as i32, scale as f32);
    let dev = qkv.device().as_cuda_device()?;
    let f = load_kernel(dev, "flash_fwd_bf16")?;
    let mut a = f.builder();
    a.arg(&q_at)
        .arg(&bias_at)
        .arg(&ctx_at)
        .arg(&lse_at)
        .arg(&s32)
        .arg(&heads32)
        .arg(&scale)
        .arg(&seed)
        .arg(&threshold)
        .arg(&drop_scale);
    let cfg = LaunchConfig {
        grid_dim: (s.div_ceil(64) as u32, heads as u32, b as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { a.launch(cfg) }.w()?;
    Ok((ctx, lse))
}

/// The gradient of `qkv` (`[b, s, 3 · heads · 64]`) given `dctx`, that of the context `ctx` which
/// `flash_forward` returned with `lse`, in one launch (`flash_bwd_bf16`).
#[allow(clippy::too_many_arguments)]
pub fn flash_backward(
    qkv: &Tensor,
    bias: &Tensor,
    ctx: &Tensor,
    lse: &Tensor,
    dctx: &Tensor,
    heads: usize,
    scale: f64,
    drop: Option<super::attention_node::SeededDropout>,
) -> Result<Tensor> {
    let (b, s, width) = qkv.dims3()?;
    if !flash_fits(qkv, bias, heads) || ctx.dims() != [b, s, width / 3] || dctx.dims() != ctx.dims()
    {
        bail!(
            "flash backward: qkv {:?}, context {:?}, its gradient {:?} with {heads} heads",
            qkv.dims(),
            ctx.dims(),
            dctx.dims()
        );
    }
    let (bias, dctx) = (
        bias.contiguous()?,
        dctx.contiguous()?.to_dtype(DType::BF16)?,
    );
    let dqkv = uninit(qkv, &[b, s, width], DType::BF16)?;
    // Several blocks of keys add their dQ into an f32 buffer (zeroed), written out after.
    let chunks = s.div_ceil(FLASH_BWD_KEYS);
    let hidden = width / 3;
    let dq_acc = if chunks > 1 {
        Some(Tensor::zeros((b * s, hidden), DType::F32, qkv.device())?)
    } else {
        None
    };
    let dq_acc_at = match &dq_acc {
        Some(t) => device_address::<f32>(t, true, "flash dq sum")?,
        None => 0u64,
    };
    let (q_at, bias_at, ctx_at) = (
        device_address::<bf16>(qkv, false, "flash qkv")?,
        device_address::<bf16>(&bias, false, "flash bias")?,
        device_address::<bf16>(ctx, false, "flash context")?,
    );
    let (dctx_at, lse_at, dqkv_at) = (
        device_address::<bf16>(&dctx, false, "flash context gradient")?,
        device_address::<f32>(lse, false, "flash log-sum-exp")?,
        device_address::<bf16>(&dqkv, true, "flash qkv gradient")?,
    );
    let (seed, threshold, drop_scale) = flash_dropout(drop);
    let (s32, heads32, scale) = (s as i32, heads as i32, scale as f32);
    let dev = qkv.device().as_cuda_device()?;
    let f = load_kernel(dev, "flash_bwd_bf16")?;
    let mut a = f.builder();
    a.arg(&q_at)
        .arg(&bias_at)
        .arg(&ctx_at)
        .arg(&dctx_at)
        .arg(&lse_at)
        .arg(&dqkv_at)
        .arg(&dq_acc_at)
        .arg(&s32)
        .arg(&heads32)
        .arg(&scale)
        .arg(&seed)
        .arg(&threshold)
        .arg(&drop_scale);
    let cfg = LaunchConfig {
        grid_dim: (heads as u32, b as u32, chunks as u32),
        block_dim: (32 * (s.min(FLASH_BWD_KEYS) / 16) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { a.launch(cfg) }.w()?;
    if dq_acc.is_some() {
        let rows = b * s;
        let hidden32 = hidden as i32;
        let f = load_kernel(dev, "flash_dq_bf16")?;
        let mut a = f.builder();
        a.arg(&dq_acc_at).arg(&dqkv_at).arg(&rows).arg(&hidden32);
        unsafe { a.launch(elementwise(rows * hidden)) }.w()?;
    }
    Ok(dqkv)
}
