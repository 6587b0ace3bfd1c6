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
                Device::new_cuda(n)
                    .with_context(|| format!("--device cuda:{n}: cannot open the GPU"))
            }
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// A short human-readable name of a device, recorded in results ("cpu", "cuda:0").
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}
