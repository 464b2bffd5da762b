//! The ops forward's weights: a model file's tensors expanded to bf16 by the backend (on a GPU
//! by a kernel), fused as the forward reads them (q|k|v, gate|up), or drawn at random for a
//! named shape; and the RoPE tables.

use candle_core::quantized::QTensor;

use super::LlamaShape;
use crate::backend::cpu_ops::rope_tables;
use crate::backend::ops::Ops;
use crate::model::gguf::GgufFile;
use crate::{Error, Result};

pub(super) struct LayerWeights<O: Ops> {
    /// (hidden)
    pub(super) attn_norm: O::Bf16,
    /// (q_dim + 2 * kv_dim, hidden): q, k, v
    pub(super) wqkv: O::Bf16,
    /// (q_dim + 2 * kv_dim): the q, k and v biases (Qwen2), zeros for one the file lacks
    pub(super) bqkv: Option<O::Bf16>,
    /// (head_dim) each: the per-head RMSNorm weights of q and k (Qwen3)
    pub(super) qk_norm: Option<(O::Bf16, O::Bf16)>,
    /// (hidden, q_dim)
    pub(super) wo: O::Bf16,
    /// (hidden)
    pub(super) mlp_norm: O::Bf16,
    /// (2 * intermediate, hidden): gate, up
    pub(super) w_gate_up: O::Bf16,
    /// (hidden, intermediate)
    pub(super) w_down: O::Bf16,
}

/// The model's weights in bf16 on the backend, plus the RoPE tables.
pub struct Weights<O: Ops> {
    pub(super) layers: Vec<LayerWeights<O>>,
    /// (vocab, hidden)
    pub(super) embed: O::Bf16,
    /// (hidden)
    pub(super) final_norm: O::Bf16,
    /// (vocab, hidden); None when the head is tied to the embedding
    pub(super) head: Option<O::Bf16>,
    /// (max_positions, head_dim / 2)
    pub(super) cos: O::F32,
    pub(super) sin: O::F32,
    pub(super) max_positions: usize,
}

impl<O: Ops> Weights<O> {
    /// Weights drawn uniformly at random (scaled like a trained model's, so activations stay in
    /// range).
    pub fn random(ops: &O, shape: &LlamaShape, max_positions: usize, seed: u64) -> Result<Self> {
        let mut next = seed;
        let mut fill = |n: usize, scale: f32| -> Result<O::Bf16> {
            let mut b = ops.zeros_bf16(n)?;
            next = next.wrapping_add(0x1234_5678_9abc_def1);
            ops.fill_uniform(&mut b, next, scale)?;
            Ok(b)
        };
        let ones = |n: usize| ops.upload_bf16(&vec![0x3f80u16; n]); // bf16 1.0
        let (h, inter) = (shape.hidden, shape.intermediate);
        // uniform(-a, a) has variance a^2 / 3: a = sqrt(3 / fan_in) keeps unit variance
        let scale = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
        let mut layers = Vec::with_capacity(shape.n_layers);
        for _ in 0..shape.n_layers {
            layers.push(LayerWeights {
                attn_norm: ones(h)?,
                wqkv: fill(shape.qkv_dim() * h, scale(h))?,
                bqkv: None,
                qk_norm: None,
                wo: fill(h * shape.heads.q_dim(), scale(shape.heads.q_dim()) * 0.5)?,
                mlp_norm: ones(h)?,
                w_gate_up: fill(2 * inter * h, scale(h))?,
                w_down: fill(h * inter, scale(inter) * 0.5)?,
            });
        }
        let (cos, sin) = rope_tables(&shape.rope, None, max_positions);
        Ok(Self {
            layers,
            embed: fill(shape.vocab * h, 1.0)?,
            final_norm: ones(h)?,
            head: Some(fill(shape.vocab * h, scale(h))?),
            cos: ops.upload_f32(&cos)?,
            sin: ops.upload_f32(&sin)?,
            max_positions,
        })
    }

    /// A model file's weights, each tensor's GGUF blocks expanded to bf16 by the backend
    /// (`Ops::dequant_bf16`); q/k/v and gate/up stacked into one matrix each, as the forward
    /// multiplies them.
    pub fn from_gguf(
        ops: &O,
        f: &mut GgufFile,
        shape: &LlamaShape,
        max_positions: usize,
    ) -> Result<Self> {
        let (h, inter, qd, kvd) = (
            shape.hidden,
            shape.intermediate,
            shape.heads.q_dim(),
            shape.heads.kv_dim(),
        );
        let mut layers = Vec::with_capacity(shape.n_layers);
        for i in 0..shape.n_layers {
            let t = |p: &str| format!("blk.{i}.{p}");
            let biases = ["attn_q.bias", "attn_k.bias", "attn_v.bias"];
            let bqkv = if biases.iter().any(|b| f.has_tensor(&t(b))) {
                let mut b = ops.zeros_bf16(qd + 2 * kvd)?;
                let mut at = 0;
                for (name, width) in biases.iter().zip([qd, kvd, kvd]) {
                    if f.has_tensor(&t(name)) {
                        expand(ops, f, &t(name), width, &mut b, at)?;
                    }
                    at += width;
                }
                Some(b)
            } else {
                None
            };
            let qk_norm = if f.has_tensor(&t("attn_q_norm.weight")) {
                let hd = shape.heads.head_dim;
                Some((
                    stacked(ops, f, &[(t("attn_q_norm.weight"), hd)])?,
                    stacked(ops, f, &[(t("attn_k_norm.weight"), hd)])?,
                ))
            } else {
                None
            };
            layers.push(LayerWeights {
                qk_norm,
                attn_norm: stacked(ops, f, &[(t("attn_norm.weight"), h)])?,
                wqkv: stacked(
                    ops,
                    f,
                    &[
                        (t("attn_q.weight"), qd * h),
                        (t("attn_k.weight"), kvd * h),
                        (t("attn_v.weight"), kvd * h),
                    ],
                )?,
                bqkv,
                wo: stacked(ops, f, &[(t("attn_output.weight"), h * qd)])?,
                mlp_norm: stacked(ops, f, &[(t("ffn_norm.weight"), h)])?,
                w_gate_up: stacked(
                    ops,
                    f,
                    &[
                        (t("ffn_gate.weight"), inter * h),
                        (t("ffn_up.weight"), inter * h),
                    ],
                )?,
                w_down: stacked(ops, f, &[(t("ffn_down.weight"), h * inter)])?,
            });
        }
        let vocab_by_hidden = shape.vocab * h;
        let embed = stacked(ops, f, &[("token_embd.weight".into(), vocab_by_hidden)])?;
        let head = if f.has_tensor("output.weight") {
            Some(stacked(
                ops,
                f,
                &[("output.weight".into(), vocab_by_hidden)],
            )?)
        } else {
            None // tied to the embedding
        };
        // Llama 3.1's per-frequency divisors of the RoPE angles, one per rotated pair
        let factors = if f.has_tensor("rope_freqs.weight") {
            let t = f.tensor("rope_freqs.weight")?;
            Some(
                t.dequantize(&candle_core::Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            )
        } else {
            None
        };
        let (cos, sin) = rope_tables(&shape.rope, factors.as_deref(), max_positions);
        Ok(Self {
            layers,
            embed,
            final_norm: stacked(ops, f, &[("output_norm.weight".into(), h)])?,
            head,
            cos: ops.upload_f32(&cos)?,
            sin: ops.upload_f32(&sin)?,
            max_positions,
        })
    }

    /// The head's matrix: its own, or the embedding's when tied.
    pub(super) fn head(&self) -> &O::Bf16 {
        self.head.as_ref().unwrap_or(&self.embed)
    }
}

/// Tensors `parts` (name, values) of a model file, expanded one after another into one buffer.
fn stacked<O: Ops>(ops: &O, f: &mut GgufFile, parts: &[(String, usize)]) -> Result<O::Bf16> {
    let mut out = ops.zeros_bf16(parts.iter().map(|(_, n)| n).sum())?;
    let mut at = 0;
    for (name, n) in parts {
        expand(ops, f, name, *n, &mut out, at)?;
        at += n;
    }
    Ok(out)
}

/// Tensor `name` (`n` values) expanded into out[at ..].
fn expand<O: Ops>(
    ops: &O,
    f: &mut GgufFile,
    name: &str,
    n: usize,
    out: &mut O::Bf16,
    at: usize,
) -> Result<()> {
    let t: QTensor = f.tensor(name)?;
    let have = t.shape().elem_count();
    if have != n {
        return Err(Error::ModelLoad(format!(
            "tensor {name} has {have} values, the model's dimensions need {n}"
        )));
    }
    ops.dequant_bf16(&t.data()?, t.dtype(), n, out, at)
}
