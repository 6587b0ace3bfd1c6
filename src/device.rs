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
                set_buffer_events(&device, false);
                Ok(device)
            }
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        set_buffer_events(&d, false);
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
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
