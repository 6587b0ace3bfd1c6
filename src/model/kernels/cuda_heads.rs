//! Attention's per-head products on CUDA in place: each of the six (`colmajor::HeadProduct`) is one
//! cuBLAS batched product over every (batch, head) whose pointer arrays point where the fused
//! `[b, s, 3·hidden]` q/k/v product holds each head and where `[b, s, hidden]` holds its context,
//! so that nothing is split into heads or merged back (bf16; `Prims::heads_in_place`).
//!
//! Why (session 12's trace, roberta-base bf16 on an H200, batch 128): the split of q, k and v into
//! `[b, heads, s, d]`, the merge of the context, and the backward's split of the context's gradient
//! and merge of q's, k's and v's were 96 copy kernels a step, 1.35 ms of 30.8 busy. Strided batched
//! products cannot express these layouts (a head's offset is `b·per_b + h·per_h`, two strides);
//! pointer arrays can, for one small kernel (`batch_pointers` in kernels.cu) that writes them on
//! the device: one launch for each forward product, one for the backward's three q/k/v products.
//!
//! The mapping of each product to a GEMM is `colmajor::head_gemm`, checked on the CPU against
//! per-head attention; `Prims`'s tensor-op forms of the same products check the block node's use
//! of them against autograd; on a GPU, `gpu-check`'s block rows run this path (bf16), and an A/B row
//! times it against the split heads.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::sys as blas;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout,
    Result, Shape, Tensor,
};
use half::bf16;

use super::attention_node::heads_in_place_on;
use super::colmajor::{head_gemm, heads_aligned, HeadGemm, HeadProduct, Heads};

/// Whether the products here take attention over this `qkv` with `heads` heads: on, CUDA, bf16,
/// `[b, s, 3 · heads · d]` starting on a 16-byte boundary, and every head's matrix on one too
/// (`colmajor::heads_aligned`: `s` a multiple of 4 and `d` of 8; training batches on CUDA are
/// padded to a multiple of 8 tokens for this, `ops::train_pad_multiple`).
pub fn heads_in_place(qkv: &Tensor, heads: usize) -> bool {
    heads_in_place_on()
        && qkv.device().is_cuda()
        && qkv.dtype() == DType::BF16
        && heads > 0
        && (qkv.layout().start_offset() * 2).is_multiple_of(16)
        && matches!(qkv.dims(), &[b, s, w] if b > 0 && s > 0 && w > 0 && w % (3 * heads) == 0
            && heads_aligned(s, heads, w / (3 * heads), 2))
}

/// `Q·Kᵀ` of every head: `[b, heads, s, s]`.
pub fn head_scores(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1_no_bwd(&Scores { heads })
}

/// `P·V` of every head, merged: `[b, s, hidden]`.
pub fn head_context(p: &Tensor, qkv: &Tensor, heads: usize) -> Result<Tensor> {
    p.contiguous()?.apply_op2_no_bwd(
        &qkv.contiguous()?,
        &Pair {
            heads,
            product: HeadProduct::Context,
        },
    )
}

/// `G·Vᵀ` of every head: `[b, heads, s, s]`.
pub fn head_dprobs(dctx: &Tensor, qkv: &Tensor, heads: usize) -> Result<Tensor> {
    dctx.contiguous()?.apply_op2_no_bwd(
        &qkv.contiguous()?,
        &Pair {
            heads,
            product: HeadProduct::DProbs,
        },
    )
}

/// `[dS·K | dSᵀ·Q | Pᵀ·G]` of every head: the gradient of `qkv`, `[b, s, 3 · hidden]`.
pub fn head_grads(
    ds: &Tensor,
    p: &Tensor,
    dctx: &Tensor,
    qkv: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    ds.contiguous()?.apply_op3_no_bwd(
        &dctx.contiguous()?,
        &qkv.contiguous()?,
        &Grads {
            heads,
            p: p.contiguous()?,
        },
    )
}

/// Batch, sequence, heads and head size of attention over a `qkv` layout.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    s: usize,
    heads: usize,
    d: usize,
}

impl Dims {
    fn of(qkv: &Layout, heads: usize) -> Result<Self> {
        match qkv.dims() {
            &[b, s, w] if heads > 0 && w % (3 * heads) == 0 && w > 0 => Ok(Self {
                b,
                s,
                heads,
                d: w / (3 * heads),
            }),
            d => bail!("attention heads in place: qkv {d:?} does not split into 3 × {heads} heads"),
        }
    }

    fn hidden(&self) -> usize {
        self.heads * self.d
    }

    fn square(&self) -> [usize; 4] {
        [self.b, self.heads, self.s, self.s]
    }

    fn context(&self) -> [usize; 3] {
        [self.b, self.s, self.hidden()]
    }

    fn fused(&self) -> [usize; 3] {
        [self.b, self.s, 3 * self.hidden()]
    }

    /// An operand's check: contiguous bf16 of these dims.
    fn expect(&self, s: &CudaStorage, l: &Layout, dims: &[usize], what: &str) -> Result<()> {
        if s.dtype() != DType::BF16 || !l.is_contiguous() || l.dims() != dims {
            bail!(
                "attention heads in place: {what} {:?} {:?}, expected contiguous bf16 {dims:?}",
                l.dims(),
                s.dtype()
            );
        }
        Ok(())
    }
}

/// The device address of a contiguous bf16 operand's first element.
fn address(s: &CudaStorage, l: &Layout) -> Result<u64> {
    let slice: &CudaSlice<bf16> = s.as_cuda_slice()?;
    let stream = s.device().cuda_stream();
    let (ptr, _sync) = slice.device_ptr(&stream);
    Ok(ptr + (l.start_offset() * 2) as u64)
}

/// A fresh, uninitialised bf16 buffer of `dims` and its address.
fn fresh(dev: &CudaDevice, dims: &[usize]) -> Result<(CudaStorage, u64)> {
    let n: usize = dims.iter().product();
    let slice = unsafe { dev.alloc::<bf16>(n)? };
    let storage = CudaStorage::wrap_cuda_slice(slice, dev.clone());
    let at = address(&storage, &Layout::contiguous(n))?;
    Ok((storage, at))
}

/// Products over every (batch, head), each `(p, [l, r, y])`: `l`, `r` and `y` the addresses of
/// the buffers holding its `L`, `R` and `Y` (`colmajor::head_gemm` places each head in them).
/// One launch fills every product's pointer arrays, then one cuBLAS batched product each.
fn batched(dev: &CudaDevice, dims: &Dims, products: &[(HeadProduct, [u64; 3])]) -> Result<()> {
    let count = dims.b * dims.heads;
    // Every head's matrix on a 16-byte boundary (`heads_in_place` admits only such shapes; the
    // buffers here are fresh or checked): an error rather than a misaligned access on the device.
    if !heads_aligned(dims.s, dims.heads, dims.d, 2)
        || products
            .iter()
            .any(|(_, at)| at.iter().any(|a| !a.is_multiple_of(16)))
    {
        bail!(
            "attention heads in place: a head's matrix would start off a 16-byte boundary \
             (s {}, head size {})",
            dims.s,
            dims.d
        );
    }
    let gemms: Vec<HeadGemm> = products
        .iter()
        .map(|&(p, _)| head_gemm(p, dims.s, dims.heads, dims.d))
        .collect();
    let mut arrays = Vec::with_capacity(3 * products.len());
    for (hg, &(p, [l, r, y])) in gemms.iter().zip(products) {
        let g = &hg.gemm;
        g.validate()?;
        if [g.m, g.n, g.k, g.lda, g.ldb, g.ldc, count]
            .iter()
            .any(|&v| v > i32::MAX as usize)
        {
            bail!("attention heads in place: {p:?} too large for cuBLAS's 32-bit sizes");
        }
        let bytes = |base: u64, h: Heads| {
            (
                base + 2 * h.base as u64,
                2 * h.per_b as u64,
                2 * h.per_h as u64,
            )
        };
        // cuBLAS's A is the product's R and its B is L (`colmajor::row_major`).
        arrays.extend([bytes(r, hg.r), bytes(l, hg.l), bytes(y, hg.y)]);
    }
    let ptrs = unsafe { dev.alloc::<u64>(arrays.len() * count)? };
    super::cuda::batch_pointers(dev, &ptrs, count, dims.heads, &arrays)?;
    let stream = dev.cuda_stream();
    let (at, _sync) = ptrs.device_ptr(&stream);
    let op = |t: bool| {
        if t {
            blas::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (one, zero) = (1f32, 0f32);
    let array = |i: usize| (at + (8 * count * i) as u64) as *const std::ffi::c_void;
    let handle = dev.cublas_handle();
    for (j, (hg, &(p, _))) in gemms.iter().zip(products).enumerate() {
        let g = &hg.gemm;
        let status = unsafe {
            blas::cublasGemmBatchedEx(
                *handle.handle(),
                op(g.transa),
                op(g.transb),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                &one as *const f32 as *const _,
                array(3 * j) as *const *const std::ffi::c_void,
                blas::cudaDataType_t::CUDA_R_16BF,
                g.lda as i32,
                array(3 * j + 1) as *const *const std::ffi::c_void,
                blas::cudaDataType_t::CUDA_R_16BF,
                g.ldb as i32,
                &zero as *const f32 as *const _,
                array(3 * j + 2) as *const *mut std::ffi::c_void,
                blas::cudaDataType_t::CUDA_R_16BF,
                g.ldc as i32,
                count as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        };
        if status != blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            bail!("attention heads in place: cuBLAS's batched product {p:?} failed: {status:?}");
        }
    }
    // `ptrs` is freed in stream order (after the products have read it).
    Ok(())
}

struct Scores {
    heads: usize,
}

impl CustomOp1 for Scores {
    fn name(&self) -> &'static str {
        "recycle-cuda-head-scores"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        super::cuda::cpu_unreachable(self.name())
    }

    fn cuda_fwd(&self, qkv: &CudaStorage, ql: &Layout) -> Result<(CudaStorage, Shape)> {
        let dims = Dims::of(ql, self.heads)?;
        dims.expect(qkv, ql, &dims.fused(), "qkv")?;
        let dev = qkv.device();
        let (out, y) = fresh(dev, &dims.square())?;
        let q = address(qkv, ql)?;
        batched(dev, &dims, &[(HeadProduct::Scores, [q, q, y])])?;
        Ok((out, Shape::from(dims.square().to_vec())))
    }
}

/// `Context` (`L` the probabilities) or `DProbs` (`L` the context's gradient), `R` v from `qkv`.
struct Pair {
    heads: usize,
    product: HeadProduct,
}

impl CustomOp2 for Pair {
    fn name(&self) -> &'static str {
        match self.product {
            HeadProduct::Context => "recycle-cuda-head-context",
            _ => "recycle-cuda-head-dprobs",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        super::cuda::cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        l: &CudaStorage,
        ll: &Layout,
        qkv: &CudaStorage,
        ql: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dims = Dims::of(ql, self.heads)?;
        dims.expect(qkv, ql, &dims.fused(), "qkv")?;
        let out_dims: Vec<usize> = match self.product {
            HeadProduct::Context => {
                dims.expect(l, ll, &dims.square(), "probabilities")?;
                dims.context().to_vec()
            }
            HeadProduct::DProbs => {
                dims.expect(l, ll, &dims.context(), "the context's gradient")?;
                dims.square().to_vec()
            }
            p => bail!("attention heads in place: {p:?} is no pair product"),
        };
        let dev = qkv.device();
        let (out, y) = fresh(dev, &out_dims)?;
        batched(
            dev,
            &dims,
            &[(self.product, [address(l, ll)?, address(qkv, ql)?, y])],
        )?;
        Ok((out, Shape::from(out_dims)))
    }
}

/// The gradient of `qkv` from those of the scores and the context, `p` the probabilities.
struct Grads {
    heads: usize,
    p: Tensor,
}

impl CustomOp3 for Grads {
    fn name(&self) -> &'static str {
        "recycle-cuda-head-grads"
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
        super::cuda::cpu_unreachable(self.name())
    }

    fn cuda_fwd(
        &self,
        ds: &CudaStorage,
        dsl: &Layout,
        dctx: &CudaStorage,
        gl: &Layout,
        qkv: &CudaStorage,
        ql: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dims = Dims::of(ql, self.heads)?;
        dims.expect(qkv, ql, &dims.fused(), "qkv")?;
        dims.expect(ds, dsl, &dims.square(), "the scores' gradient")?;
        dims.expect(dctx, gl, &dims.context(), "the context's gradient")?;
        let (p_storage, pl) = self.p.storage_and_layout();
        let candle_core::Storage::Cuda(p) = &*p_storage else {
            bail!("attention heads in place: the probabilities are not on a CUDA device")
        };
        dims.expect(p, pl, &dims.square(), "probabilities")?;
        let dev = qkv.device();
        let (out, y) = fresh(dev, &dims.fused())?;
        let (s, g, q) = (address(ds, dsl)?, address(dctx, gl)?, address(qkv, ql)?);
        batched(
            dev,
            &dims,
            &[
                (HeadProduct::DQ, [s, q, y]),
                (HeadProduct::DK, [s, q, y]),
                (HeadProduct::DV, [address(p, pl)?, g, y]),
            ],
        )?;
        Ok((out, Shape::from(dims.fused().to_vec())))
    }
}
