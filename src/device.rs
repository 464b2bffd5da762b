//! Which device runs the model: `--device cuda|cpu|auto` and `[model] device`. CUDA needs the
//! `cuda` feature and a driver; anything else falls back to the CPU with one line saying why.

use serde::{Deserialize, Serialize};

/// What the person asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when this build has it and a driver is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "cpu" => Some(Self::Cpu),
            "cuda" => Some(Self::Cuda),
            _ => None,
        }
    }
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// Resolve a choice. Returns the device and, when CUDA was asked for explicitly but cannot be
/// used, the one line to show.
pub fn resolve(choice: DeviceChoice) -> (Device, Option<String>) {
    match (choice, cuda_available()) {
        (DeviceChoice::Cpu, _) => (Device::Cpu, None),
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
