//! Which device computations run on: `--device cpu|cuda[:N]|auto`.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::str::FromStr;

/// The user's device request, parsed from `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// CUDA when this build has it and a GPU is present, the CPU otherwise.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => Ok(Self::Cuda(n.parse().with_context(|| {
                    format!("--device {other}: the CUDA ordinal must be a number")
                })?)),
                None => bail!("--device {other}: expected cpu, cuda, cuda:N or auto"),
            },
        }
    }
}

impl DeviceRequest {
    /// Opens the device. Asking for CUDA in a CPU-only build is an error, never a silent fall-back.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    bail!("--device cuda:{n}: this build of recycle has no CUDA support (rebuild with `--features cuda`)");
                }
                let device = Device::new_cuda(n)
                    .with_context(|| format!("--device cuda:{n}: cannot open the GPU"))?;
                Ok(settled(device))
            }
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(settled(d));
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// An opened CUDA device with recycle's settings: no events per buffer, freed memory kept in the
/// pool (a failure to set the pool is only slower, so it is said and not fatal).
fn settled(device: Device) -> Device {
    set_buffer_events(&device, false);
    if let Err(e) = set_pool_keep(&device, POOL_KEEP.get()) {
        eprintln!(
            "warning: {}: the memory pool's release threshold: {e:#}",
            describe(&device)
        );
    }
    device
}

/// Whether an opened CUDA device's memory pool keeps the memory freed in it (on by default,
/// `RECYCLE_POOL_KEEP=0` off; `gpu-check` times both).
pub static POOL_KEEP: crate::model::kernels::EnvSwitch =
    crate::model::kernels::EnvSwitch::new("RECYCLE_POOL_KEEP");

/// Whether opened CUDA devices keep freed memory in their pool (the last `set_pool_keep`, else
/// `RECYCLE_POOL_KEEP`).
pub fn pool_keep_on() -> bool {
    POOL_KEEP.get()
}

/// Sets whether the device's CUDA memory pool keeps memory freed in it (`keep`) or hands it back
/// to the driver; returns whether it keeps it after the call (false off CUDA, or where the device
/// has no memory pools). cudarc allocates every buffer from the device's current pool
/// (`cuMemAllocAsync`), whose release threshold is 0 by default: at every synchronisation (a
/// training step reads its loss back) the driver unmaps all the memory freed since, and the next
/// step maps it again, on the host thread that launches the kernels. Keeping it is what PyTorch's
/// caching allocator does. A keeping pool keeps at most half the device's memory unused (beyond
/// that, it hands memory back at a synchronisation as before, so steps whose shapes vary cannot
/// make it hoard the device), and `release_pool` hands it all back between jobs.
pub fn set_pool_keep(device: &Device, keep: bool) -> Result<bool> {
    #[cfg(feature = "cuda")]
    if let (Some(pool), Device::Cuda(cuda)) = (memory_pool(device)?, device) {
        use candle_core::cuda_backend::cudarc::driver::{result::mem_pool, sys};
        let total = cuda
            .cuda_stream()
            .context()
            .total_mem()
            .context("cuDeviceTotalMem")?;
        // At most half the device kept unused: a roberta-base step at batch 256 and 128 tokens
        // needs far less, and another process on the device (a shard) is not starved by memory
        // this one holds without using.
        let mut threshold: u64 = if keep { total as u64 / 2 } else { 0 };
        // SAFETY: `pool` is the device's current pool; the attribute takes a `cuuint64_t`.
        unsafe {
            mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        }
        .context("cuMemPoolSetAttribute(RELEASE_THRESHOLD)")?;
        // The switch says what the pool does: set once the pool took it.
        POOL_KEEP.set(keep);
        return Ok(keep);
    }
    POOL_KEEP.set(keep);
    let _ = device;
    Ok(false)
}

/// The bytes the device's memory pool holds now and at most since it was opened (`None` off CUDA
/// or without memory pools): what keeping freed memory costs.
pub fn pool_reserved(device: &Device) -> Result<Option<(u64, u64)>> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = memory_pool(device)? {
        use candle_core::cuda_backend::cudarc::driver::{result::mem_pool, sys};
        use sys::CUmemPool_attribute::{
            CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT as NOW, CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH as HIGH,
        };
        let read = |attribute| -> Result<u64> {
            let mut v: u64 = 0;
            // SAFETY: both attributes are `cuuint64_t`s of the device's current pool.
            unsafe { mem_pool::get_attribute(pool, attribute, (&mut v as *mut u64).cast()) }
                .context("cuMemPoolGetAttribute")?;
            Ok(v)
        };
        return Ok(Some((read(NOW)?, read(HIGH)?)));
    }
    let _ = device;
    Ok(None)
}

/// Hands the memory the device's pool keeps back to the driver, once the device's work is done:
/// between jobs, so that one job's peak is not held through the next (which may be another model).
/// Nothing to do off CUDA.
pub fn release_pool(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = memory_pool(device)? {
        use candle_core::cuda_backend::cudarc::driver::result::mem_pool;
        device.synchronize()?;
        // SAFETY: the device's current pool; its buffers in use are not touched by a trim.
        unsafe { mem_pool::trim_to(pool, 0) }.context("cuMemPoolTrimTo")?;
    }
    let _ = device;
    Ok(())
}

/// The CUDA device's current memory pool, the one cudarc's stream-ordered allocations come from
/// (`None` for the CPU, or a device without memory pools, where cudarc calls `cuMemAlloc`).
#[cfg(feature = "cuda")]
fn memory_pool(
    device: &Device,
) -> Result<Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool>> {
    let Device::Cuda(cuda) = device else {
        return Ok(None);
    };
    let context = cuda.cuda_stream().context().clone();
    if !context.has_async_alloc() {
        return Ok(None);
    }
    // SAFETY: the device of an opened context.
    let pool = unsafe {
        candle_core::cuda_backend::cudarc::driver::result::device::get_mem_pool(context.cu_device())
    }
    .context("cuDeviceGetMemPool")?;
    Ok(Some(pool))
}

/// Whether CUDA buffers allocated from now on carry cudarc's read and write events; returns
/// whether they do after the call. cudarc creates two events with every buffer and destroys them
/// with it (four driver calls, and as many context checks, per tensor: a training step allocates
/// hundreds), and uses them only to order work between streams of one context. recycle drives
/// one stream a device (candle's per-thread stream) from one thread, so an opened device turns
/// them off; where the context already has more streams they stay on. `gpu-check` turns them back
/// on to time what they cost. Not CUDA: nothing to do (false).
pub fn set_buffer_events(device: &Device, on: bool) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let context = cuda.cuda_stream().context().clone();
        if on {
            // SAFETY: buffers with events order themselves against every stream; those without
            // (allocated while off) are used on this device's one stream only.
            unsafe { context.enable_event_tracking() };
        } else if !context.is_in_multi_stream_mode() {
            // SAFETY: one stream in this context, so no buffer is used on another stream.
            unsafe { context.disable_event_tracking() };
        }
        return context.is_event_tracking();
    }
    let _ = (device, on);
    false
}

/// A short human-readable name of a device, recorded in results ("cpu", "cuda:0").
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

/// The CUDA driver's errors after which a context is lost: a fault in a kernel (an illegal or
/// misaligned address, a failed launch, a device-side assertion, ...) leaves the context in a
/// state where every later call returns the same error, so a process that meets one cannot
/// measure or compute anything more on that device.
const CONTEXT_LOST: [&str; 10] = [
    "CUDA_ERROR_ILLEGAL_ADDRESS",
    "CUDA_ERROR_MISALIGNED_ADDRESS",
    "CUDA_ERROR_LAUNCH_FAILED",
    "CUDA_ERROR_ASSERT",
    "CUDA_ERROR_HARDWARE_STACK_ERROR",
    "CUDA_ERROR_ILLEGAL_INSTRUCTION",
    "CUDA_ERROR_INVALID_ADDRESS_SPACE",
    "CUDA_ERROR_INVALID_PC",
    "CUDA_ERROR_LAUNCH_TIMEOUT",
    "CUDA_ERROR_ECC_UNCORRECTABLE",
];

/// Whether an error's text (`{e:#}`, which holds cudarc's `DriverError(CUDA_ERROR_..., ...)`)
/// says the CUDA context is lost (`CONTEXT_LOST`).
pub fn context_lost(error_text: &str) -> bool {
    CONTEXT_LOST.iter().any(|code| {
        error_text
            .match_indices(code)
            // Not a longer code that begins with this one.
            .any(|(at, _)| {
                !error_text[at + code.len()..]
                    .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_fault_loses_the_context_and_other_errors_do_not() {
        let lost = "bench roberta-base: DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \
                    \"an illegal memory access was encountered\")";
        assert!(context_lost(lost));
        assert!(context_lost(
            "DriverError(CUDA_ERROR_MISALIGNED_ADDRESS, \"misaligned address\")"
        ));
        assert!(context_lost("x: CUDA_ERROR_LAUNCH_FAILED"));
        for fine in [
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "DriverError(CUDA_ERROR_INVALID_VALUE, \"invalid argument\")",
            "cuBLASLt: CUBLAS_STATUS_NOT_SUPPORTED",
            "CUDA_ERROR_LAUNCH_FAILED_SOMETHING_ELSE",
            "",
        ] {
            assert!(!context_lost(fine), "{fine}");
        }
    }
}
