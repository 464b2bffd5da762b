//! Linear layers y = x W^T over GGUF weights, in one of two forms chosen at load:
//! dense (f32 weights dequantized once, candle's f32 GEMM with the gemm crate's AVX-512
//! kernels, several times faster on this CPU than candle's quantized matmul, whose Q4_1 dot is
//! scalar; one-row inputs, i.e. decode, read the quantized blocks instead through our GEMV,
//! which streams ~6x fewer bytes; see bench/NOTES.md) or quantized only (candle's `QMatMul`,
//! the arithmetic of candle's reference `quantized_llama`, 4-5x less memory).

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::qgemv::QMatrix;
use super::with_f32;

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
    /// (out, in) f32 for many rows (prefill), and the quantized blocks for one row (decode)
    /// when the type has a GEMV here (Q4_1, Q8_0).
    Dense {
        weights: Tensor,
        decode: Option<QMatrix>,
    },
    Quantized(QMatMul),
}

impl Linear {
    pub fn new(weights: Arc<QTensor>, mode: LinearMode) -> candle_core::Result<Self> {
        Ok(match mode {
            LinearMode::Dense => Self::Dense {
                weights: weights.dequantize(&Device::Cpu)?,
                decode: QMatrix::from_qtensor(&weights)?,
            },
            LinearMode::Quantized => Self::Quantized(QMatMul::from_arc(weights)?),
        })
    }

    /// x: (rows, in) -> (rows, out)
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense {
                decode: Some(q), ..
            } if x.dims2()?.0 == 1 => {
                let mut out = vec![0.0f32; q.rows()];
                with_f32(&x.contiguous()?, |x| q.gemv(x, &mut out))?;
                Tensor::from_vec(out, (1, q.rows()), &Device::Cpu)
            }
            Self::Dense { weights, .. } => x.matmul(&weights.t()?),
            Self::Quantized(q) => q.forward(x),
        }
    }

    /// Bytes of weights this layer holds in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense { weights, decode } => {
                weights.elem_count() * 4 + decode.as_ref().map_or(0, QMatrix::bytes)
            }
            Self::Quantized(QMatMul::QTensor(t)) => t.storage_size_in_bytes(),
            Self::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }
}
