//! The CPU engine's weights behind the seam: a model file's tensors (or a random shape's draws,
//! rounded to Q8_0) kept as the engine's linear layers keep them, in the form each use reads.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::backend::cpu_ops::{to_bf16, uniform};
use crate::backend::linear::{FusedLinear, Linear, LinearMode};
use crate::backend::ops::{WeightUse, WeightValues};
use crate::{Error, Result};

/// A weight as the engine keeps it.
pub enum EngineWeight {
    /// A norm's weight or a bias, f32.
    Vector(Vec<f32>),
    /// One linear layer's matrix.
    Linear(Linear),
    /// Several layers over one input (q|k|v, gate|up), their outputs side by side in each row.
    Fused(FusedLinear),
    /// The token embedding's blocks: rows are dequantized when looked up.
    Table(Arc<QTensor>),
    /// The output head; when the embedding is tied to it, its rows come from the head's own
    /// blocks, or from `table` when the head's form cannot give them (one copy, not two, where
    /// it can).
    Head {
        linear: Linear,
        table: Option<Arc<QTensor>>,
    },
}

/// [`crate::backend::ops::Ops::weight`] for the engine's linear layers in `mode`.
pub(super) fn prepare(
    mode: LinearMode,
    values: WeightValues,
    use_: WeightUse,
    rows: usize,
    cols: usize,
) -> Result<EngineWeight> {
    if use_ == WeightUse::Vector {
        return Ok(EngineWeight::Vector(vector_values(values, rows * cols)?));
    }
    let mut parts = matrix_blocks(values, rows, cols)?;
    let one = |parts: &mut Vec<Arc<QTensor>>| match parts.len() {
        1 => Ok(parts.remove(0)),
        n => Err(Error::ModelLoad(format!("a {use_:?} weight in {n} parts"))),
    };
    Ok(match use_ {
        WeightUse::Vector => unreachable!("returned above"),
        WeightUse::Linear if parts.len() > 1 => EngineWeight::Fused(FusedLinear::new(parts, mode)?),
        WeightUse::Linear => EngineWeight::Linear(Linear::new(one(&mut parts)?, mode)?),
        WeightUse::Embedding => EngineWeight::Table(one(&mut parts)?),
        WeightUse::Head => EngineWeight::Head {
            linear: Linear::one_row(one(&mut parts)?, mode)?,
            table: None,
        },
        WeightUse::TiedEmbedding => {
            let blocks = one(&mut parts)?;
            let linear = Linear::one_row(blocks.clone(), mode)?;
            let table = linear.weight_rows(&[0]).is_none().then_some(blocks);
            EngineWeight::Head { linear, table }
        }
    })
}

/// `n` values uniform in [-scale, scale), rounded to bf16 as the devices' `fill_uniform` draws
/// them, so that a random model is the same model on every backend (up to the int8 blocks).
fn uniform_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..n)
        .into_par_iter()
        .map(|i| {
            let x = (2.0 * uniform(seed, i as u64) - 1.0) * scale;
            f32::from_bits((to_bf16(&[x])[0] as u32) << 16)
        })
        .collect()
}

/// x (rows, cols) through a linear layer: (rows, out).
pub(super) fn linear_rows(w: &EngineWeight, x: &[f32], cols: usize) -> Result<Vec<f32>> {
    Ok(match w {
        EngineWeight::Linear(l) | EngineWeight::Head { linear: l, .. } => l.forward_vec(x, cols)?,
        EngineWeight::Fused(f) => f.forward_slice(x, cols)?,
        _ => {
            return Err(Error::Engine(
                "engine ops: matmul by a vector or table".into(),
            ))
        }
    })
}

/// A weight's f32 values (a vector's).
fn vector_values(values: WeightValues, n: usize) -> Result<Vec<f32>> {
    let v = match values {
        WeightValues::Gguf(parts) => {
            let mut v = Vec::with_capacity(n);
            for (t, len) in parts {
                match t {
                    Some(t) => v.extend(
                        t.dequantize(&Device::Cpu)?
                            .flatten_all()?
                            .to_vec1::<f32>()?,
                    ),
                    None => v.resize(v.len() + len, 0.0),
                }
            }
            v
        }
        WeightValues::Uniform { seed, scale } => uniform_values(n, seed, scale),
        WeightValues::Ones => vec![1.0; n],
    };
    if v.len() != n {
        return Err(Error::ModelLoad(format!(
            "a weight of {} values where the model's dimensions need {n}",
            v.len()
        )));
    }
    Ok(v)
}

/// A matrix's blocks, one tensor per part: the file's, or random values rounded to Q8_0.
fn matrix_blocks(values: WeightValues, rows: usize, cols: usize) -> Result<Vec<Arc<QTensor>>> {
    match values {
        WeightValues::Gguf(parts) => (parts.into_iter())
            .map(|(t, _)| {
                let t = t.ok_or_else(|| {
                    Error::ModelLoad("a matrix with a part the file lacks".into())
                })?;
                match t.shape().dims() {
                    [_, c] if *c == cols => Ok(Arc::new(t)),
                    dims => Err(Error::ModelLoad(format!(
                        "a matrix part of shape {dims:?}, expected (_, {cols})"
                    ))),
                }
            })
            .collect(),
        WeightValues::Uniform { seed, scale } => {
            let v = uniform_values(rows * cols, seed, scale);
            let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu)?;
            Ok(vec![Arc::new(QTensor::quantize(&t, GgmlDType::Q8_0)?)])
        }
        WeightValues::Ones => Err(Error::Engine("engine ops: a matrix of ones".into())),
    }
}

/// The head (or a tied embedding's) layer: x (rows, k) -> (rows, n) f32 into out.
pub(super) fn head_forward(
    l: &Linear,
    x: &[f32],
    rows: usize,
    k: usize,
    exact: bool,
) -> Result<Tensor> {
    let t = Tensor::from_slice(x, (rows, k), &Device::Cpu)?;
    Ok(match exact {
        true => l.forward_f32(&t)?,
        false => l.forward(&t)?,
    })
}
