//! Linear layers y = x W^T over GGUF weights, in one of two forms chosen at load:
//! dense f32 (dequantized once; candle's f32 GEMM, runtime-dispatched AVX-512/AVX2, is several
//! times faster on this CPU than candle's quantized matmul, whose Q4_1 dot is scalar; see
//! bench/NOTES.md) or the quantized blocks themselves (4-5x less memory; candle's `QMatMul`,
//! the arithmetic of candle's reference `quantized_llama`).

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

/// Which form the linear layers keep their weights in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearMode {
    /// Dense f32 weights: fastest today, ~4.4x the memory of Q4_1.
    Dense,
    /// The GGUF's quantized weights through candle's QMatMul.
    Quantized,
}

pub enum Linear {
    /// (out, in) f32
    Dense(Tensor),
    Quantized(QMatMul),
}

impl Linear {
    pub fn new(weights: Arc<QTensor>, mode: LinearMode) -> candle_core::Result<Self> {
        Ok(match mode {
            LinearMode::Dense => Self::Dense(weights.dequantize(&Device::Cpu)?),
            LinearMode::Quantized => Self::Quantized(QMatMul::from_arc(weights)?),
        })
    }

    /// x: (rows, in) -> (rows, out)
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => x.matmul(&w.t()?),
            Self::Quantized(q) => q.forward(x),
        }
    }

    /// Bytes of weights this layer holds in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.elem_count() * 4,
            Self::Quantized(QMatMul::QTensor(t)) => t.storage_size_in_bytes(),
            Self::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }
}
