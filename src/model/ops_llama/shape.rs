//! The dimensions of a LLaMA-family decoder as the ops forward runs it, from a GGUF's metadata
//! or a named shape of `--model random:`, and the work they imply (the GPU run's floor counts
//! it).

use crate::backend::cpu_ops::plain_rope;
use crate::backend::ops::{Heads, RopeLayout};
use crate::backend::rowwise::RopeParams;
use crate::model::gguf::{ModelSpec, RopeScaling, RopeStyle};
use crate::model::random;
use crate::{Error, Result};

/// The dimensions of a LLaMA-family decoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlamaShape {
    pub n_layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: Heads,
    pub vocab: usize,
    pub rope: RopeParams,
    pub rms_eps: f32,
}

impl LlamaShape {
    /// The dimensions of a named shape of `--model random:` (`crate::model::random::SHAPES`,
    /// the one list of real models' shapes); its biases and RoPE scaling are not modelled by
    /// [`Weights::random`] (a GGUF of the shape, `random:` on the engine, has them).
    pub fn of(shape: &random::Shape) -> Self {
        Self {
            n_layers: shape.n_layers,
            hidden: shape.hidden,
            intermediate: shape.intermediate,
            heads: Heads {
                n_heads: shape.n_heads,
                n_kv_heads: shape.n_kv_heads,
                head_dim: shape.head_dim,
            },
            vocab: shape.vocab,
            rope: plain_rope(shape.rope_theta, shape.head_dim, RopeLayout::Normal),
            rms_eps: shape.rms_eps,
        }
    }

    /// The dimensions of a model file's hyper-parameters. Refused with a one-line error: a
    /// partial rotation, which this forward lacks.
    pub fn from_spec(spec: &ModelSpec) -> Result<Self> {
        if spec.rope_dim != spec.head_dim {
            return Err(Error::ModelLoad(format!(
                "the ops forward rotates whole heads; this model rotates {} of {}",
                spec.rope_dim, spec.head_dim
            )));
        }
        Ok(Self {
            n_layers: spec.n_layers,
            hidden: spec.hidden,
            intermediate: spec.intermediate,
            heads: Heads {
                n_heads: spec.n_heads,
                n_kv_heads: spec.n_kv_heads,
                head_dim: spec.head_dim,
            },
            vocab: spec.vocab_size,
            rope: rope_params(spec),
            rms_eps: spec.rms_eps,
        })
    }

    /// Llama-3.1-8B: 32 layers, hidden 4096, 32 heads, 8 KV heads of 128, MLP 14336.
    pub fn llama31_8b() -> Self {
        Self::of(random::shape("llama3.1-8b").expect("a known shape"))
    }

    /// A small shape with the same structure (GQA 2:1, head_dim 32), for tests.
    pub fn tiny(n_layers: usize) -> Self {
        Self {
            n_layers,
            hidden: 128,
            intermediate: 256,
            heads: Heads {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 32,
            },
            vocab: 300,
            rope: plain_rope(10_000.0, 32, RopeLayout::Normal),
            rms_eps: 1e-5,
        }
    }

    pub fn qkv_dim(&self) -> usize {
        self.heads.q_dim() + 2 * self.heads.kv_dim()
    }

    /// Weights of one layer's linear maps (q, k, v, o, gate, up, down).
    pub fn layer_params(&self) -> usize {
        self.hidden * (self.qkv_dim() + self.heads.q_dim()) + 3 * self.hidden * self.intermediate
    }

    /// GEMM FLOPs of a prefill whose layer i runs on rows[i] rows (plus the head on one row).
    pub fn gemm_flops(&self, rows: &[usize]) -> f64 {
        let per_row = 2.0 * self.layer_params() as f64;
        rows.iter().map(|&r| r as f64 * per_row).sum::<f64>()
            + 2.0 * (self.vocab * self.hidden) as f64
    }

    /// FLOPs of causal attention (Q Kᵀ and P V) of a prefill whose layer i runs on rows[i]
    /// rows, each attending to itself and the rows before it.
    pub fn attention_flops(&self, rows: &[usize]) -> f64 {
        let per_pair = 4.0 * self.heads.q_dim() as f64;
        (rows.iter())
            .map(|&r| per_pair * r as f64 * (r as f64 + 1.0) / 2.0)
            .sum()
    }

    /// Bytes of K and V for one cached row of one layer (bf16).
    pub fn kv_row_bytes(&self) -> usize {
        2 * self.heads.kv_dim() * 2
    }
}

/// How a model file's RoPE rotates its heads.
fn rope_params(spec: &ModelSpec) -> RopeParams {
    RopeParams {
        head_dim: spec.head_dim,
        rope_dim: spec.rope_dim,
        theta: spec.rope_theta,
        linear_scaling: match spec.rope_scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear(f) => f,
        },
        layout: match spec.rope_style {
            RopeStyle::Normal => RopeLayout::Normal,
            RopeStyle::Neox => RopeLayout::Neox,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::LlamaShape;

    #[test]
    fn the_8b_shapes_prefill_work_at_32k_is_counted_as_the_gpu_bar_counts_it() {
        let s = LlamaShape::llama31_8b();
        let dense = vec![32_768; 32];
        // about 7.0e9 weights in the layers: 2 FLOPs each per row, plus the head on one row
        let gemm = s.gemm_flops(&dense);
        assert!((4.5e14..4.7e14).contains(&gemm), "{gemm:e}");
        // 4 x 4096 x 32,768 x 32,769 / 2 a layer
        let attention = s.attention_flops(&dense);
        assert!((attention / 2.8147e14 - 1.0).abs() < 1e-3, "{attention:e}");
        // a pruned layer's attention falls with the square of its rows
        let mut pruned = dense.clone();
        pruned[31] = 8_192;
        let one_layer = attention / 32.0;
        let saved = attention - s.attention_flops(&pruned);
        assert!(
            (saved / one_layer - 0.9375).abs() < 1e-3,
            "{}",
            saved / one_layer
        );
    }
}
