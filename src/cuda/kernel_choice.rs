//! Which kernel, and how launched, where the backend has more than one for an op: gpu-check
//! times them on the device and runs the fastest that passed its checks; the defaults are what
//! that measured on an H200 (bench/NOTES.md).

use crate::backend::kv_format::KvDtype;

/// Decode attention's kernels at head sizes 64 and 128 (decode_attention_warps.cu; the tree
/// kernel of decode_attention.cu runs the others).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum DecodeKernel {
    /// A warp per stream of keys, the next chunk's rows loaded into registers ahead.
    Warps,
    /// The same, each head's values right after its scores (head size 128, groups up to 4;
    /// the plain kernel elsewhere).
    WarpsFused,
    /// Rows staged through `stages` shared-memory buffers a warp by cp.async, scores summed by
    /// one reduce-scatter a chunk. `stages` is 2, 3 or 4 at head size 128 with groups up to 4
    /// (the 8B shape), 3 elsewhere.
    Staged { stages: u8 },
}

impl DecodeKernel {
    /// The entry point at `head_dim` (64 or 128) and a group of `group` query heads.
    pub fn entry(self, head_dim: usize, group: usize) -> String {
        let g = if group <= 4 { 4 } else { 8 };
        let narrow = head_dim == 128 && group <= 4;
        match self {
            Self::Warps => format!("decode_attention_warps_hd{head_dim}_g{g}_bf16"),
            Self::WarpsFused if narrow => "decode_attention_warps_hd128_g4_fused_bf16".into(),
            Self::WarpsFused => Self::Warps.entry(head_dim, group),
            Self::Staged { stages } => {
                let s = if narrow { stages.clamp(2, 4) } else { 3 };
                format!("decode_attention_staged_hd{head_dim}_g{g}_s{s}_bf16")
            }
        }
    }

    /// The entry point for a pool of `kv` elements: [`Self::entry`] for bf16; the other types
    /// have the plain warp kernel only (their rows widened in registers).
    pub fn entry_for(self, head_dim: usize, group: usize, kv: KvDtype) -> String {
        let g = if group <= 4 { 4 } else { 8 };
        match kv {
            KvDtype::Bf16 => self.entry(head_dim, group),
            KvDtype::F16 => format!("decode_attention_warps_hd{head_dim}_g{g}_kvf16_bf16"),
            KvDtype::Q8 => format!("decode_attention_warps_hd{head_dim}_g{g}_kvq8_bf16"),
        }
    }

    /// [`Self::shared_bytes`] of [`Self::entry_for`]'s kernel.
    pub fn shared_bytes_for(self, head_dim: usize, group: usize, kv: KvDtype) -> usize {
        match kv {
            KvDtype::Bf16 => self.shared_bytes(head_dim, group),
            _ => 0,
        }
    }

    /// Dynamic shared memory the entry at `head_dim` and `group` launches with: the staged
    /// kernel's buffers (DS_STAGE_BYTES a chunk, DW_WARPS warps), or its warps' outputs for
    /// the merge where those are larger.
    pub fn shared_bytes(self, head_dim: usize, group: usize) -> usize {
        const WARPS: usize = 4; // DW_WARPS
        const CHUNK: usize = 8; // DS_CHUNK
        let Self::Staged { stages } = self else {
            return 0;
        };
        let narrow = head_dim == 128 && group <= 4;
        let stages = if narrow { stages.clamp(2, 4) } else { 3 } as usize;
        let g = if group <= 4 { 4 } else { 8 };
        let stage = 2 * CHUNK * head_dim * 2 + CHUNK * 4;
        (WARPS * stages * stage).max(WARPS * g * head_dim * 4)
    }

    /// How gpu-check's log names it.
    pub fn name(self) -> String {
        match self {
            Self::Warps => "warps".into(),
            Self::WarpsFused => "warps, fused".into(),
            Self::Staged { stages } => format!("staged, {stages} buffers"),
        }
    }
}

/// Decode attention's launch at head sizes 64 and 128: the CTAs a multiprocessor it aims at
/// (splits of the key range times KV heads) and the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DecodeTuning {
    pub ctas_per_sm: usize,
    pub kernel: DecodeKernel,
}

impl DecodeTuning {
    /// Every setting gpu-check's sweep times, the default among them.
    pub fn sweep() -> Vec<DecodeTuning> {
        let kernels = [DecodeKernel::Warps, DecodeKernel::WarpsFused]
            .into_iter()
            .chain([2, 3, 4].map(|stages| DecodeKernel::Staged { stages }));
        kernels
            .flat_map(|kernel| {
                [1, 2, 3, 4].map(|ctas_per_sm| DecodeTuning {
                    ctas_per_sm,
                    kernel,
                })
            })
            .collect()
    }
}

impl Default for DecodeTuning {
    fn default() -> Self {
        // the fastest of gpu-check's sweep on an H200 (one 8B layer at 32k keys, fused: 104 us,
        // 1.29 TB/s; plain 114 us; 3 or 4 CTAs 122-151 us): the registers let two reside
        Self {
            ctas_per_sm: 2,
            kernel: DecodeKernel::WarpsFused,
        }
    }
}

/// One-row linear layers (decode's GEMVs): cuBLAS, or kernels/gemv.cu with `rows` rows and
/// `warps` warps a CTA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum OneRowLinear {
    Cublas,
    Gemv { rows: u8, warps: u8 },
}

impl OneRowLinear {
    /// Every setting gpu-check times, the default first.
    pub const ALL: [Self; 5] = [
        Self::Gemv { rows: 4, warps: 8 },
        Self::Gemv { rows: 2, warps: 8 },
        Self::Gemv { rows: 4, warps: 4 },
        Self::Gemv { rows: 8, warps: 8 },
        Self::Cublas,
    ];

    /// The kernel's entry point (f32 or bf16 out); None for cuBLAS.
    pub fn entry(self, f32_out: bool) -> Option<String> {
        match self {
            Self::Cublas => None,
            Self::Gemv { rows, warps } => {
                let out = if f32_out { "f32" } else { "bf16" };
                Some(format!("gemv_r{rows}_w{warps}_{out}"))
            }
        }
    }

    /// How gpu-check's log names it.
    pub fn name(self) -> String {
        match self {
            Self::Cublas => "cuBLAS".into(),
            Self::Gemv { rows, warps } => format!("gemv.cu, {rows} rows x {warps} warps a CTA"),
        }
    }
}

impl Default for OneRowLinear {
    fn default() -> Self {
        // measured on an H200 against cuBLAS at the 8B shape's four layers (bench/NOTES.md)
        Self::Gemv { rows: 4, warps: 8 }
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
