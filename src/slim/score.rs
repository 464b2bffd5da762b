//! What the session reads of a layer's cache: [`ScoredLayer`], the positions of its rows and
//! the block scores of queries over its prompt rows, computed where the keys are. The forward
//! implements it over its backend's cache (src/model/ops_llama/session_io.rs); the session's
//! tests over a host layer ([`crate::kv::LayerKv`], below).

use crate::backend::heads::Heads;
use crate::backend::score::WindowPool;
use crate::slim::schedule::ScoreKind;
use crate::Result;

/// How a session asks for block scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreRequest {
    /// Rows at positions below this are the prompt's: the candidates.
    pub prompt_len: usize,
    pub shape: Heads,
    pub block_size: usize,
    /// Tokens per unit (1: every token's own key).
    pub unit_size: usize,
    pub kind: ScoreKind,
    /// How the queries' scores combine (attention scores).
    pub pool: WindowPool,
}

/// A layer's cache as the session reads it.
pub trait ScoredLayer {
    /// Positions of the cached rows, ascending.
    fn positions(&self) -> &[u32];

    /// Block scores of the post-RoPE queries `q` ((w, n_heads * head_dim)) over the cached rows
    /// at positions below `req.prompt_len`, by block id ascending.
    fn block_scores(&self, q: &[f32], req: &ScoreRequest) -> Result<Vec<(u32, f32)>>;
}

/// The keys a host layer holds, as the CPU scorers read them (widened a few rows at a time).
#[cfg(test)]
pub fn keys_of(kv: &crate::kv::LayerKv) -> crate::backend::score::Keys<'_> {
    crate::backend::score::Keys::Stored {
        bits: &kv.k,
        dtype: kv.dtype,
        channel_scale: &kv.k_scale,
    }
}

#[cfg(test)]
impl ScoredLayer for crate::kv::LayerKv {
    fn positions(&self) -> &[u32] {
        &self.positions
    }

    fn block_scores(&self, q: &[f32], req: &ScoreRequest) -> Result<Vec<(u32, f32)>> {
        let (pos, len, shape) = (&self.positions, req.prompt_len, req.shape);
        let (bs, unit) = (req.block_size, req.unit_size);
        Ok(match req.kind {
            ScoreKind::Paper => {
                crate::backend::score::block_scores_of(q, keys_of(self), pos, len, shape, bs, unit)
            }
            ScoreKind::Attention => {
                crate::backend::score::UnitKeys::new(keys_of(self), pos, len, shape, bs, unit)
                    .attention_scores(q, req.pool)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::score::tests::{positions, Rng};
    use crate::backend::score::{
        block_scores, block_scores_attention, block_scores_attention_of, block_scores_of,
    };
    use crate::kv::KvDtype;
    use crate::kv::LayerKv;

    #[test]
    fn stored_keys_score_as_their_widened_f32_values() {
        let mut rng = Rng(0xF16);
        let shape = Heads {
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
        };
        let len = 701; // rows not a multiple of the 32-row widening batch
        let pos = positions(&mut rng, len, 5, 9);
        let keys = rng.vec(pos.len() * shape.n_kv_heads * shape.head_dim);
        let q = rng.vec(3 * shape.n_heads * shape.head_dim);
        for dtype in [KvDtype::F16, KvDtype::Bf16, KvDtype::Q8] {
            let mut kv = LayerKv::new(dtype);
            kv.append(&keys, &keys, &pos).unwrap();
            assert_eq!(kv.k_scale.is_empty(), dtype != KvDtype::Q8);
            let wide = kv.keys_f32();
            let stored = keys_of(&kv);
            let got = block_scores_of(&q, stored, &pos, len, shape, 64, 8);
            let want = block_scores(&q, &wide, &pos, len, shape, 64, 8);
            assert_eq!(got, want, "{dtype:?} paper scores");
            let got = block_scores_attention_of(&q, stored, &pos, len, shape, 64, 8);
            let want = block_scores_attention(&q, &wide, &pos, len, shape, 64, 8);
            assert_eq!(got, want, "{dtype:?} attention scores");
        }
    }
}
