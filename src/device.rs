//! Which device runs the model: `--device cuda|cpu|cpu-seam|auto` and `[model] device`. CUDA
//! needs the `cuda` feature and a driver; anything else falls back to the CPU with one line
//! saying why. `cpu-seam` is the CPU through the one forward written against the ops seam, with
//! the engine's numerics (the same answers as `cpu`, token for token) and the KV manager of the
//! devices: what `cpu` becomes once it holds every `cpu` feature (bench/NOTES.md).

use serde::{Deserialize, Serialize};

/// What the person asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when this build has it and a driver is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The CPU through the ops seam's forward.
    #[serde(rename = "cpu-seam")]
    CpuSeam,
    Cuda,
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "cpu" => Some(Self::Cpu),
            "cpu-seam" => Some(Self::CpuSeam),
            "cuda" => Some(Self::Cuda),
            _ => None,
        }
    }
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    CpuSeam,
    Cuda,
}

/// Resolve a choice. Returns the device and, when CUDA was asked for explicitly but cannot be
/// used, the one line to show.
pub fn resolve(choice: DeviceChoice) -> (Device, Option<String>) {
    match (choice, cuda_available()) {
        (DeviceChoice::Cpu, _) => (Device::Cpu, None),
        (DeviceChoice::CpuSeam, _) => (Device::CpuSeam, None),
        (_, Ok(())) => (Device::Cuda, None),
        (DeviceChoice::Auto, Err(_)) => (Device::Cpu, None),
        (DeviceChoice::Cuda, Err(why)) => (
            Device::Cpu,
            Some(format!(
                "slimchat: CUDA unavailable ({why}); running on the CPU"
            )),
        ),
    }
}

/// Whether this build can use a GPU here, and if not, why.
pub fn cuda_available() -> Result<(), String> {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::probe::probe()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("this build has no CUDA backend; rebuild with --features cuda".into())
    }
}
