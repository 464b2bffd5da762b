//! The ops forward's weights: a model file's tensors prepared by the backend (on a GPU expanded
//! to bf16 by a kernel; on the CPU engine's backend kept in their blocks for its int8 GEMMs),
//! fused as the forward reads them (q|k|v, gate|up), or drawn at random for a named shape; and
//! the RoPE tables.

use candle_core::quantized::QTensor;

use super::LlamaShape;
use crate::backend::cpu_ops::rope_tables;
use crate::backend::ops::{Ops, WeightUse, WeightValues};
use crate::model::gguf::{GgufFile, ModelSpec};
use crate::{Error, Result};

pub(super) struct LayerWeights<O: Ops> {
    /// (hidden)
    pub(super) attn_norm: O::Weight,
    /// (q_dim + 2 * kv_dim, hidden): q, k, v
    pub(super) wqkv: O::Weight,
    /// (q_dim + 2 * kv_dim): the q, k and v biases (Qwen2), zeros for one the file lacks
    pub(super) bqkv: Option<O::Weight>,
    /// (head_dim) each: the per-head RMSNorm weights of q and k (Qwen3)
    pub(super) qk_norm: Option<(O::Weight, O::Weight)>,
    /// (hidden, q_dim)
    pub(super) wo: O::Weight,
    /// (hidden)
    pub(super) mlp_norm: O::Weight,
    /// (2 * intermediate, hidden): gate, up
    pub(super) w_gate_up: O::Weight,
    /// (hidden, intermediate)
    pub(super) w_down: O::Weight,
}

/// The model's weights as the backend prepared them ([`Ops::weight`]), plus the RoPE tables.
pub struct Weights<O: Ops> {
    pub(super) layers: Vec<LayerWeights<O>>,
    /// (vocab, hidden); the head too when it is tied to the embedding
    pub(super) embed: O::Weight,
    /// (hidden)
    pub(super) final_norm: O::Weight,
    /// (vocab, hidden); None when the head is tied to the embedding
    pub(super) head: Option<O::Weight>,
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
        let mut fill = |use_, rows: usize, cols: usize, scale: f32| -> Result<O::Weight> {
            next = next.wrapping_add(0x1234_5678_9abc_def1);
            let values = WeightValues::Uniform { seed: next, scale };
            ops.weight(values, use_, rows, cols)
        };
        let ones = |n: usize| ops.weight(WeightValues::Ones, WeightUse::Vector, 1, n);
        let (h, inter, qd) = (shape.hidden, shape.intermediate, shape.heads.q_dim());
        // uniform(-a, a) has variance a^2 / 3: a = sqrt(3 / fan_in) keeps unit variance
        let scale = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
        let linear = WeightUse::Linear;
        let mut layers = Vec::with_capacity(shape.n_layers);
        for _ in 0..shape.n_layers {
            layers.push(LayerWeights {
                attn_norm: ones(h)?,
                wqkv: fill(linear, shape.qkv_dim(), h, scale(h))?,
                bqkv: None,
                qk_norm: None,
                wo: fill(linear, h, qd, scale(qd) * 0.5)?,
                mlp_norm: ones(h)?,
                w_gate_up: fill(linear, 2 * inter, h, scale(h))?,
                w_down: fill(linear, h, inter, scale(inter) * 0.5)?,
            });
        }
        let (cos, sin) = rope_tables(&shape.rope, None, max_positions);
        Ok(Self {
            layers,
            embed: fill(WeightUse::Embedding, shape.vocab, h, 1.0)?,
            final_norm: ones(h)?,
            head: Some(fill(WeightUse::Head, shape.vocab, h, scale(h))?),
            cos: ops.upload_f32(&cos)?,
            sin: ops.upload_f32(&sin)?,
            max_positions,
        })
    }

    /// A model file's weights, prepared by the backend (a device expands each tensor's GGUF
    /// blocks to bf16, [`Ops::dequant_bf16`]); q/k/v and gate/up stacked into one matrix each,
    /// as the forward multiplies them.
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
                let mut parts = Vec::with_capacity(3);
                for (name, width) in biases.iter().zip([qd, kvd, kvd]) {
                    let part = match f.has_tensor(&t(name)) {
                        true => Some(tensor(f, &t(name), width)?),
                        false => None,
                    };
                    parts.push((part, width));
                }
                Some(ops.weight(
                    WeightValues::Gguf(parts),
                    WeightUse::Vector,
                    1,
                    qd + 2 * kvd,
                )?)
            } else {
                None
            };
            let vector = |f: &mut GgufFile, name: &str, n: usize| {
                stacked(ops, f, WeightUse::Vector, &[(name.to_string(), n)], 1, n)
            };
            let qk_norm = if f.has_tensor(&t("attn_q_norm.weight")) {
                let hd = shape.heads.head_dim;
                Some((
                    vector(f, &t("attn_q_norm.weight"), hd)?,
                    vector(f, &t("attn_k_norm.weight"), hd)?,
                ))
            } else {
                None
            };
            let linear = |f: &mut GgufFile, parts: &[(String, usize)], cols: usize| {
                let rows = parts.iter().map(|(_, n)| n / cols).sum();
                stacked(ops, f, WeightUse::Linear, parts, rows, cols)
            };
            layers.push(LayerWeights {
                qk_norm,
                attn_norm: vector(f, &t("attn_norm.weight"), h)?,
                wqkv: linear(
                    f,
                    &[
                        (t("attn_q.weight"), qd * h),
                        (t("attn_k.weight"), kvd * h),
                        (t("attn_v.weight"), kvd * h),
                    ],
                    h,
                )?,
                bqkv,
                wo: linear(f, &[(t("attn_output.weight"), h * qd)], qd)?,
                mlp_norm: vector(f, &t("ffn_norm.weight"), h)?,
                w_gate_up: linear(
                    f,
                    &[
                        (t("ffn_gate.weight"), inter * h),
                        (t("ffn_up.weight"), inter * h),
                    ],
                    h,
                )?,
                w_down: linear(f, &[(t("ffn_down.weight"), h * inter)], inter)?,
            });
        }
        let (vocab, n) = (shape.vocab, shape.vocab * h);
        let tied = !f.has_tensor("output.weight");
        let embed_use = match tied {
            true => WeightUse::TiedEmbedding,
            false => WeightUse::Embedding,
        };
        let embed = stacked(
            ops,
            f,
            embed_use,
            &[("token_embd.weight".into(), n)],
            vocab,
            h,
        )?;
        let head = match tied {
            true => None,
            false => Some(stacked(
                ops,
                f,
                WeightUse::Head,
                &[("output.weight".into(), n)],
                vocab,
                h,
            )?),
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
        let final_norm = [("output_norm.weight".into(), h)];
        Ok(Self {
            layers,
            embed,
            final_norm: stacked(ops, f, WeightUse::Vector, &final_norm, 1, h)?,
            head,
            cos: ops.upload_f32(&cos)?,
            sin: ops.upload_f32(&sin)?,
            max_positions,
        })
    }

    /// The head's matrix: its own, or the embedding's when tied.
    pub(super) fn head(&self) -> &O::Weight {
        self.head.as_ref().unwrap_or(&self.embed)
    }
}

/// Tensors `parts` (name, values) of a model file, one after another, as a (rows, cols) weight
/// for `use_`.
fn stacked<O: Ops>(
    ops: &O,
    f: &mut GgufFile,
    use_: WeightUse,
    parts: &[(String, usize)],
    rows: usize,
    cols: usize,
) -> Result<O::Weight> {
    let mut tensors = Vec::with_capacity(parts.len());
    for (name, n) in parts {
        tensors.push((Some(tensor(f, name, *n)?), *n));
    }
    ops.weight(WeightValues::Gguf(tensors), use_, rows, cols)
}

/// Tensor `name` of a model file, which must hold `n` values.
fn tensor(f: &mut GgufFile, name: &str, n: usize) -> Result<QTensor> {
    let t: QTensor = f.tensor(name)?;
    let have = t.shape().elem_count();
    if have != n {
        return Err(Error::ModelLoad(format!(
            "tensor {name} has {have} values, the model's dimensions need {n}"
        )));
    }
    Ok(t)
}

/// Tensors that would change the forward but that it has no place for (fused q/k/v, output
/// and MLP biases, experts, long-context RoPE factors): refuse the file rather than run it wrong.
const UNSUPPORTED_TENSORS: &[&str] = &[
    "attn_qkv.weight",
    "attn_output.bias",
    "ffn_gate.bias",
    "ffn_up.bias",
    "ffn_down.bias",
    "ffn_gate_inp.weight",
    "output.bias",
    "rope_factors_long.weight",
    "rope_factors_short.weight",
];

pub(super) fn check_tensors_are_known(f: &GgufFile, spec: &ModelSpec) -> Result<()> {
    let mut names: Vec<&String> = f.content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        // "blk.3.attn_output.bias" -> "attn_output.bias"
        let base = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split_once('.'))
            .map_or(name.as_str(), |(_, base)| base);
        if UNSUPPORTED_TENSORS.contains(&base) {
            return Err(Error::ModelLoad(format!(
                "{}: tensor {name} is not supported by slimchat's {} forward",
                f.path.display(),
                spec.arch
            )));
        }
    }
    Ok(())
}
