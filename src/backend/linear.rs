//! Linear layers y = x W^T over GGUF weights, in one of two forms chosen at load:
//! dense (f32 weights dequantized once, candle's f32 GEMM with the gemm crate's AVX-512
//! kernels, several times faster on this CPU than candle's quantized matmul, whose Q4_1 dot is
//! scalar; one-row inputs, i.e. decode, read the quantized blocks instead through our GEMV,
//! which streams ~6x fewer bytes; see bench/NOTES.md) or quantized only (candle's `QMatMul`,
//! the arithmetic of candle's reference `quantized_llama`, 4-5x less memory). `FusedLinear`
//! stacks several layers over the same input (q/k/v, gate/up) into one decode GEMV.

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
    /// Dense f32 weights, and f32 arithmetic in decode too (no quantized GEMV): slower decode,
    /// the reference the decode GEMV's Q8 rounding is measured against.
    #[serde(rename = "dense-f32")]
    DenseF32,
}

pub enum Linear {
    /// (out, in) f32 for many rows (prefill), and the quantized blocks for one row (decode)
    /// when the type has a GEMV here (Q4_1, Q8_0).
    Dense {
        weights: Tensor,
        decode: Option<QMatrix>,
    },
    Quantized(QMatMul),
    /// A layer that only ever sees one row (the head): the quantized blocks alone, no f32
    /// copy (113 MB for the default model's head). Q8-activation GEMV in `forward`, exact f32
    /// arithmetic over the blocks in `forward_f32`.
    OneRow(QMatrix),
}

impl Linear {
    /// A layer for one-row inputs: the GGUF blocks only, when there is a GEMV for their type
    /// and `mode` is `Dense` (otherwise the same as [`Linear::new`]).
    pub fn one_row(weights: Arc<QTensor>, mode: LinearMode) -> candle_core::Result<Self> {
        match (mode, QMatrix::from_qtensor(&weights)?) {
            (LinearMode::Dense, Some(q)) => Ok(Self::OneRow(q)),
            _ => Self::new(weights, mode),
        }
    }

    pub fn new(weights: Arc<QTensor>, mode: LinearMode) -> candle_core::Result<Self> {
        Ok(match mode {
            LinearMode::Dense => Self::Dense {
                weights: weights.dequantize(&Device::Cpu)?,
                decode: QMatrix::from_qtensor(&weights)?,
            },
            LinearMode::Quantized => Self::Quantized(QMatMul::from_arc(weights)?),
            LinearMode::DenseF32 => Self::dense_without_decode(&weights)?,
        })
    }

    /// Dense f32 weights only; one-row inputs go through the f32 GEMM too (or a `FusedLinear`).
    fn dense_without_decode(weights: &QTensor) -> candle_core::Result<Self> {
        Ok(Self::Dense {
            weights: weights.dequantize(&Device::Cpu)?,
            decode: None,
        })
    }

    /// x: (rows, in) -> (rows, out), without the decode GEMV: f32 activations even for one row
    /// (the head after a prefill, whose logits the oracle holds to f32 accuracy).
    pub fn forward_f32(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense { weights, .. } => x.matmul(&weights.t()?),
            Self::Quantized(q) => q.forward(x),
            Self::OneRow(q) => rows_through(q, x, QMatrix::gemv_f32),
        }
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
            Self::OneRow(q) => rows_through(q, x, QMatrix::gemv),
        }
    }

    /// Bytes of weights this layer holds in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense { weights, decode } => {
                weights.elem_count() * 4 + decode.as_ref().map_or(0, QMatrix::bytes)
            }
            Self::OneRow(q) => q.bytes(),
            Self::Quantized(QMatMul::QTensor(t)) => t.storage_size_in_bytes(),
            Self::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }
}

/// x: (rows, in) -> (rows, out), one `gemv` per row.
fn rows_through(
    q: &QMatrix,
    x: &Tensor,
    gemv: fn(&QMatrix, &[f32], &mut [f32]),
) -> candle_core::Result<Tensor> {
    let rows = x.dims2()?.0;
    let mut out = vec![0.0f32; rows * q.rows()];
    with_f32(&x.contiguous()?, |x| {
        for (xr, or) in x.chunks_exact(q.cols()).zip(out.chunks_exact_mut(q.rows())) {
            gemv(q, xr, or);
        }
    })?;
    Tensor::from_vec(out, (rows, q.rows()), &Device::Cpu)
}

/// Several layers over the same input, each its own `Linear` for many rows; for one row (decode)
/// their quantized rows stacked into one GEMV: the activation is quantized once and the thread
/// pool entered once.
pub struct FusedLinear {
    parts: Vec<Linear>,
    /// output width of each part
    widths: Vec<usize>,
    decode: Option<QMatrix>,
}

impl FusedLinear {
    pub fn new(weights: Vec<Arc<QTensor>>, mode: LinearMode) -> candle_core::Result<Self> {
        let widths = weights
            .iter()
            .map(|w| w.shape().dims2().map(|d| d.0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let refs: Vec<&QTensor> = weights.iter().map(|w| &**w).collect();
        let decode = match mode {
            LinearMode::Dense => QMatrix::stacked(&refs)?,
            LinearMode::Quantized | LinearMode::DenseF32 => None,
        };
        let parts = weights
            .iter()
            .map(|w| match decode {
                Some(_) => Linear::dense_without_decode(w),
                None => Linear::new(w.clone(), mode),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            parts,
            widths,
            decode,
        })
    }

    /// x: (rows, in) -> one (rows, out_i) per part
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        match &self.decode {
            Some(q) if x.dims2()?.0 == 1 => {
                let mut out = vec![0.0f32; q.rows()];
                with_f32(&x.contiguous()?, |x| q.gemv(x, &mut out))?;
                let mut start = 0;
                self.widths
                    .iter()
                    .map(|&w| {
                        let part = out[start..start + w].to_vec();
                        start += w;
                        Tensor::from_vec(part, (1, w), &Device::Cpu)
                    })
                    .collect()
            }
            _ => self.parts.iter().map(|p| p.forward(x)).collect(),
        }
    }

    pub fn bytes(&self) -> usize {
        self.parts.iter().map(Linear::bytes).sum::<usize>()
            + self.decode.as_ref().map_or(0, QMatrix::bytes)
    }
}
