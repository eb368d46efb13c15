//! Choosing the compute device.

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// Which compute device to train on.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// CUDA when built with it and a GPU is present, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// Why the requested device cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device.kind = \"cuda\" but this build has no CUDA support; rebuild with `cargo build --release --features cuda` or set device.kind = \"cpu\"")]
    NoCudaSupport,
    #[error("cannot open CUDA device {ordinal}: {reason}")]
    Cuda { ordinal: usize, reason: String },
}

/// Opens the device `kind` asks for.
pub fn select(kind: DeviceKind, ordinal: usize) -> Result<Device, DeviceError> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => open_cuda(ordinal),
        DeviceKind::Auto => {
            if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                // A CUDA build on a machine whose driver or GPU is not usable
                // trains on the CPU; the log says why.
                open_cuda(ordinal).or_else(|e| {
                    tracing::warn!("device.kind = \"auto\": {e}; training on the CPU");
                    Ok(Device::Cpu)
                })
            } else {
                Ok(Device::Cpu)
            }
        }
    }
}

fn open_cuda(ordinal: usize) -> Result<Device, DeviceError> {
    if !cfg!(feature = "cuda") {
        return Err(DeviceError::NoCudaSupport);
    }
    Device::new_cuda(ordinal).map_err(|e| DeviceError::Cuda {
        ordinal,
        reason: e.to_string(),
    })
}

/// A short name for logs and summaries (`cpu`, `cuda:0`).
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_auto_work_everywhere() {
        assert!(select(DeviceKind::Cpu, 0).unwrap().is_cpu());
        assert!(select(DeviceKind::Auto, 0).is_ok());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let e = select(DeviceKind::Cuda, 0).unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
