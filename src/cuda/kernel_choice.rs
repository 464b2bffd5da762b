//! Which kernel, and how launched, where the backend has more than one for an op: gpu-check
//! times them on the device and runs the fastest that passed its checks; the defaults are what
//! that measured on an H200 (bench/NOTES.md).

/// The decode attention warp kernel's launch: the CTAs a multiprocessor it aims at (splits of
/// the key range times KV heads) and the kernel variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DecodeTuning {
    pub ctas_per_sm: usize,
    /// Head size 128, groups up to 4: each head's values right after its scores (fewer
    /// registers), or every head's scores first.
    pub fused: bool,
}

impl Default for DecodeTuning {
    fn default() -> Self {
        // the fastest of gpu-check's sweep on an H200 (one 8B layer at 32k keys, fused: 104 us,
        // 1.29 TB/s; plain 114 us; 3 or 4 CTAs 122-151 us): the registers let two reside
        Self {
            ctas_per_sm: 2,
            fused: true,
        }
    }
}

/// The kernels of prefill attention. A tensor-core kernel runs where its shapes allow (head
/// sizes 64 and 128, GQA groups up to 8; see [`super::prefill_attention`]); other shapes fall
/// back from the pipelined kernel to the plain one, then to FMA units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillKernel {
    /// attention.cu: FMA units, every shape.
    Fma,
    /// attention_mma.cu: tensor cores (mma.sync), K/V loaded synchronously a tile at a time.
    Mma,
    /// attention_mma_pipelined.cu: tensor cores, K/V tiles double-buffered by cp.async,
    /// fragments read by ldmatrix.
    MmaPipelined,
}

impl PrefillKernel {
    /// Every kernel, the default first.
    pub const ALL: [PrefillKernel; 3] = [Self::MmaPipelined, Self::Mma, Self::Fma];

    /// The name in gpu-check's report and log.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fma => "fma",
            Self::Mma => "tensor cores",
            Self::MmaPipelined => "tensor cores, pipelined",
        }
    }

    /// The prefix of the kernel checks' op names for this kernel's prefill cases: the checks
    /// of a tensor-core kernel are named `<prefix>_hd<head size> ...`
    /// (`attention_mma_pipelined_hd128 prefill`).
    pub fn check_prefix(self) -> &'static str {
        match self {
            Self::Fma => "attention_bf16",
            Self::Mma => "attention_mma",
            Self::MmaPipelined => "attention_mma_pipelined",
        }
    }

    /// Whether the kernel check named `op` checks this tensor-core kernel (never for
    /// [`Self::Fma`]: its cases are not gated).
    pub fn checked_by(self, op: &str) -> bool {
        self != Self::Fma && op.starts_with(&format!("{}_hd", self.check_prefix()))
    }
}

/// A tensor-core prefill kernel as the device runs it at one head shape (gpu-check logs it
/// next to the kernel's rate): the driver's occupancy at its launch shape and the registers
/// and local (spilled) bytes of the code the driver made from its PTX.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PrefillFootprint {
    pub kernel: String,
    pub ctas_per_sm: u32,
    pub threads: usize,
    pub dynamic_shared_bytes: usize,
    pub registers: i32,
    pub local_bytes: i32,
}
