//! Linear layers y = x W^T over GGUF weights, in one of these forms chosen at load:
//! - int8 (the default): the GGUF blocks repacked once into tiles (`QMatrix`), activations
//!   rounded to 8 bits per 32-value block, integer dot products: the GEMM in `qgemm/` for many
//!   rows (prefill), the GEMV in `qgemv/` for one row (decode). No f32 copy of the weights: every
//!   GGUF integer type (Q4_0 … Q8_0, the K-quants) keeps its integer form, float weights are
//!   rounded to Q8_0 at load (`qgemv::Kind`); a type without a kernel falls back to dense f32.
//! - dense: f32 weights dequantized once, candle's f32 GEMM (the gemm crate's AVX-512 kernels)
//!   for many rows, exact; one row (decode) reads the packed blocks through the GEMV.
//! - dense-f32: f32 weights and f32 arithmetic for any number of rows (the reference).
//! - quantized: candle's `QMatMul`, the arithmetic of candle's reference `quantized_llama`.
//!
//! `FusedLinear` stacks several layers over the same input (q/k/v, gate/up) into one packed
//! matrix: the activation is quantized once and the thread pool entered once.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use super::qgemv::QMatrix;
use super::{qgemm, with_f32};

/// Which form the linear layers keep their weights in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearMode {
    /// The GGUF blocks only (repacked), 8-bit activations, integer GEMM and GEMV: fastest, and
    /// about a quarter of dense's memory. Logits move by the activation rounding (NOTES.md).
    Int8,
    /// Dense f32 weights for prefill (exact), the int8 GEMV for decode: ~4.4x the memory of Q4_1.
    Dense,
    /// The GGUF's quantized weights through candle's QMatMul.
    Quantized,
    /// Dense f32 weights, and f32 arithmetic in decode too (no quantized GEMV): slower decode,
    /// the reference the int8 paths' rounding is measured against.
    #[serde(rename = "dense-f32")]
    DenseF32,
}

pub enum Linear {
    /// (out, in) f32 for many rows (prefill), and the quantized blocks for one row (decode)
    /// when the type has a GEMV here.
    Dense {
        weights: Tensor,
        decode: Option<QMatrix>,
    },
    Quantized(QMatMul),
    /// The packed GGUF blocks alone: the int8 GEMM for many rows, the GEMV for one row, and
    /// exact f32 arithmetic over the blocks in `forward_f32` (a prefill's head row).
    Packed(QMatrix),
}

impl Linear {
    /// A layer for one-row inputs (the head): the GGUF blocks only (no 113 MB f32 copy for the
    /// default model's head) when there is a kernel for their type and `mode` is int8 or dense
    /// (otherwise the same as [`Linear::new`]).
    pub fn one_row(weights: Arc<QTensor>, mode: LinearMode) -> candle_core::Result<Self> {
        match (mode, QMatrix::from_qtensor(&weights)?) {
            (LinearMode::Int8 | LinearMode::Dense, Some(q)) => Ok(Self::Packed(q)),
            _ => Self::new(weights, mode),
        }
    }

    pub fn new(weights: Arc<QTensor>, mode: LinearMode) -> candle_core::Result<Self> {
        Ok(match mode {
            LinearMode::Int8 => match QMatrix::from_qtensor(&weights)? {
                Some(q) => Self::Packed(q),
                None => Self::dense_without_decode(&weights)?,
            },
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

    /// x: (rows, in) -> (rows, out), without 8-bit activations: f32 activations even for one
    /// row (the head after a prefill, whose logits the oracle holds to f32 accuracy).
    pub fn forward_f32(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense { weights, .. } => x.matmul(&weights.t()?),
            Self::Quantized(q) => q.forward(x),
            Self::Packed(q) => rows_through(q, x, QMatrix::gemv_f32),
        }
    }

    /// x: (rows, in) -> (rows, out)
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense {
                decode: Some(q), ..
            } if x.dims2()?.0 == 1 => packed_forward(q, x),
            Self::Dense { weights, .. } => x.matmul(&weights.t()?),
            Self::Quantized(q) => q.forward(x),
            Self::Packed(q) => packed_forward(q, x),
        }
    }

    /// `forward` of rows given as a slice, (rows, cols) row-major: the packed blocks read it
    /// where it lies (the other forms copy it into a tensor first).
    pub fn forward_slice(&self, x: &[f32], cols: usize) -> candle_core::Result<Tensor> {
        let rows = x.len() / cols;
        match self {
            Self::Packed(q) => {
                Tensor::from_vec(packed_slice(q, x, rows), (rows, q.rows()), &Device::Cpu)
            }
            _ => self.forward(&Tensor::from_slice(x, (rows, cols), &Device::Cpu)?),
        }
    }

    /// `forward_slice` into a plain (rows, out) buffer (the packed blocks' output as it is).
    pub fn forward_vec(&self, x: &[f32], cols: usize) -> candle_core::Result<Vec<f32>> {
        match self {
            Self::Packed(q) => Ok(packed_slice(q, x, x.len() / cols)),
            _ => self.forward_slice(x, cols)?.flatten_all()?.to_vec1::<f32>(),
        }
    }

    /// Rows `ids` of the weight matrix as (ids, in) f32, when the layer holds only packed blocks
    /// (a tied head doubling as the token embedding); None for the other forms.
    pub fn weight_rows(&self, ids: &[u32]) -> Option<Tensor> {
        let Self::Packed(q) = self else { return None };
        if ids.iter().any(|&i| i as usize >= q.rows()) {
            return None;
        }
        let mut out = vec![0.0f32; ids.len() * q.cols()];
        for (&i, row) in ids.iter().zip(out.chunks_exact_mut(q.cols())) {
            q.row_f32(i as usize, row);
        }
        Tensor::from_vec(out, (ids.len(), q.cols()), &Device::Cpu).ok()
    }

    /// Bytes of weights this layer holds in memory.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense { weights, decode } => {
                weights.elem_count() * 4 + decode.as_ref().map_or(0, QMatrix::bytes)
            }
            Self::Packed(q) => q.bytes(),
            Self::Quantized(QMatMul::QTensor(t)) => t.storage_size_in_bytes(),
            Self::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }
}

/// x: (rows, in) -> (rows, out) through the packed blocks: the GEMV for one row, the GEMM for
/// more.
fn packed_forward(q: &QMatrix, x: &Tensor) -> candle_core::Result<Tensor> {
    let rows = x.dims2()?.0;
    Tensor::from_vec(packed_rows(q, x)?, (rows, q.rows()), &Device::Cpu)
}

/// `packed_forward` as a plain (rows, out) buffer.
fn packed_rows(q: &QMatrix, x: &Tensor) -> candle_core::Result<Vec<f32>> {
    let rows = x.dims2()?.0;
    with_f32(&x.contiguous()?, |x| packed_slice(q, x, rows))
}

/// `packed_rows` of a (rows, in) slice.
fn packed_slice(q: &QMatrix, x: &[f32], rows: usize) -> Vec<f32> {
    if rows == 1 {
        let mut out = vec![0.0f32; q.rows()];
        q.gemv(x, &mut out);
        out
    } else {
        qgemm::gemm(q, x)
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

/// Several layers over the same input. int8: their packed rows stacked into one matrix, for
/// any number of rows (one GEMM or GEMV, then the output split by columns), or, when their types
/// take different tile formats, each its own matrix with the activation quantized once. dense:
/// each its own f32 layer for many rows, the stacked blocks for one row (decode). Other modes:
/// separate layers.
pub struct FusedLinear {
    /// output width of each part
    widths: Vec<usize>,
    /// the separate layers, for many rows; empty when `packed` serves every input
    parts: Vec<Linear>,
    /// the stacked blocks: one-row inputs (int8 and dense), and many rows when `parts` is empty
    packed: Option<QMatrix>,
}

impl FusedLinear {
    pub fn new(weights: Vec<Arc<QTensor>>, mode: LinearMode) -> candle_core::Result<Self> {
        let widths = weights
            .iter()
            .map(|w| w.shape().dims2().map(|d| d.0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let refs: Vec<&QTensor> = weights.iter().map(|w| &**w).collect();
        let packed = match mode {
            LinearMode::Int8 | LinearMode::Dense => QMatrix::stacked(&refs)?,
            LinearMode::Quantized | LinearMode::DenseF32 => None,
        };
        let parts = match (mode, &packed) {
            (LinearMode::Int8, Some(_)) => Vec::new(),
            (_, Some(_)) => weights
                .iter()
                .map(|w| Linear::dense_without_decode(w))
                .collect::<candle_core::Result<Vec<_>>>()?,
            (_, None) => weights
                .iter()
                .map(|w| Linear::new(w.clone(), mode))
                .collect::<candle_core::Result<Vec<_>>>()?,
        };
        Ok(Self {
            widths,
            parts,
            packed,
        })
    }

    /// x: (rows, in) -> (rows, Σ out_i): each row holds the parts' outputs side by side.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<f32>> {
        let rows = x.dims2()?.0;
        let packed_parts: Option<Vec<&QMatrix>> = self
            .parts
            .iter()
            .map(|p| match p {
                Linear::Packed(q) => Some(q),
                _ => None,
            })
            .collect();
        match (&self.packed, packed_parts) {
            (Some(q), _) if rows == 1 || self.parts.is_empty() => packed_rows(q, x),
            (None, Some(parts)) => parts_rows(&parts, x, &self.widths),
            _ => {
                let parts = self
                    .parts
                    .iter()
                    .map(|p| p.forward(x)?.flatten_all()?.to_vec1::<f32>())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok(join_columns(&parts, &self.widths, rows))
            }
        }
    }

    /// `forward` of rows given as a slice, (rows, cols) row-major: the stacked blocks read it
    /// where it lies.
    pub fn forward_slice(&self, x: &[f32], cols: usize) -> candle_core::Result<Vec<f32>> {
        let rows = x.len() / cols;
        match &self.packed {
            Some(q) if rows == 1 || self.parts.is_empty() => Ok(packed_slice(q, x, rows)),
            _ => self.forward(&Tensor::from_slice(x, (rows, cols), &Device::Cpu)?),
        }
    }

    /// Output width of each part.
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }

    pub fn bytes(&self) -> usize {
        self.parts.iter().map(Linear::bytes).sum::<usize>()
            + self.packed.as_ref().map_or(0, QMatrix::bytes)
    }
}

/// x: (rows, in) through several packed matrices (types of different tile formats, which do not
/// stack) -> (rows, Σ out_i): the activation quantized once, and for one row every part's GEMV
/// in one parallel section.
fn parts_rows(parts: &[&QMatrix], x: &Tensor, widths: &[usize]) -> candle_core::Result<Vec<f32>> {
    let rows = x.dims2()?.0;
    let outs = with_f32(&x.contiguous()?, |x| {
        if rows == 1 {
            let mut outs: Vec<Vec<f32>> = widths.iter().map(|&w| vec![0.0f32; w]).collect();
            let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
            QMatrix::gemv_each(parts, x, &mut slices);
            outs
        } else {
            let xq = qgemm::activation::Q8Rows::quantize(x, parts[0].cols());
            let kernel = crate::backend::qgemv::kernels::Kernel::best();
            parts
                .iter()
                .map(|m| qgemm::gemm_quantized(kernel, m, &xq))
                .collect()
        }
    })?;
    Ok(join_columns(&outs, widths, rows))
}

/// One (rows, width) buffer per part -> (rows, Σ widths), the parts side by side.
fn join_columns(parts: &[Vec<f32>], widths: &[usize], rows: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * widths.iter().sum::<usize>());
    for r in 0..rows {
        for (p, &w) in parts.iter().zip(widths) {
            out.extend_from_slice(&p[r * w..][..w]);
        }
    }
    out
}
