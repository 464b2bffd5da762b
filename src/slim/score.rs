//! What the session reads of a layer's cache: [`ScoredLayer`], the positions of its rows and
//! the block scores of queries over its prompt rows, computed where the keys are. The engine's
//! CPU cache implements it here ([`keys_of`] widens its stored keys for the CPU scorers); the
//! ops forward implements it over its backend's cache (src/model/ops_llama.rs).

use crate::backend::score::{block_scores_of, HeadShape, Keys, UnitKeys, WindowPool};
use crate::kv::LayerKv;
use crate::slim::schedule::ScoreKind;
use crate::Result;

/// How a session asks for block scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreRequest {
    /// Rows at positions below this are the prompt's: the candidates.
    pub prompt_len: usize,
    pub shape: HeadShape,
    pub block_size: usize,
    /// Tokens per unit (1: every token's own key).
    pub unit_size: usize,
    pub kind: ScoreKind,
    /// How the queries' scores combine (attention scores).
    pub pool: WindowPool,
}

/// What a backend may keep between two scorings of one layer while its prompt rows stay the
/// same (decode scores a new query against the same keys at every step): on the CPU, the
/// layer's unit keys.
#[derive(Debug, Clone, Default)]
pub struct ScoreMemo {
    /// (prompt rows, unit size) they were built from, and the unit keys.
    units: Option<((usize, usize), UnitKeys)>,
}

/// A layer's cache as the session reads it.
pub trait ScoredLayer {
    /// Positions of the cached rows, ascending.
    fn positions(&self) -> &[u32];

    /// Block scores of the post-RoPE queries `q` ((w, n_heads * head_dim)) over the cached rows
    /// at positions below `req.prompt_len`, by block id ascending. `memo`, when given, belongs
    /// to this layer and may carry work from its previous call.
    fn block_scores(
        &self,
        q: &[f32],
        req: &ScoreRequest,
        memo: Option<&mut ScoreMemo>,
    ) -> Result<Vec<(u32, f32)>>;
}

/// The keys a layer's cache holds, as the scorers read them (widened a few rows at a time).
pub fn keys_of(kv: &LayerKv) -> Keys<'_> {
    Keys::Stored {
        bits: &kv.k,
        dtype: kv.dtype,
        channel_scale: &kv.k_scale,
    }
}

impl ScoredLayer for LayerKv {
    fn positions(&self) -> &[u32] {
        &self.positions
    }

    fn block_scores(
        &self,
        q: &[f32],
        req: &ScoreRequest,
        memo: Option<&mut ScoreMemo>,
    ) -> Result<Vec<(u32, f32)>> {
        let units = |kv: &LayerKv| {
            UnitKeys::new(
                keys_of(kv),
                &kv.positions,
                req.prompt_len,
                req.shape,
                req.block_size,
                req.unit_size,
            )
        };
        Ok(match (req.kind, memo) {
            (ScoreKind::Paper, _) => block_scores_of(
                q,
                keys_of(self),
                &self.positions,
                req.prompt_len,
                req.shape,
                req.block_size,
                req.unit_size,
            ),
            (ScoreKind::Attention, None) => units(self).attention_scores(q, req.pool),
            (ScoreKind::Attention, Some(memo)) => {
                // the unit keys change only when the layer's prompt rows do (revival)
                let prompt_rows =
                    (self.positions).partition_point(|&p| (p as usize) < req.prompt_len);
                let key = (prompt_rows, req.unit_size);
                let units = match memo.units.take() {
                    Some((k, u)) if k == key => &memo.units.insert((k, u)).1,
                    _ => &memo.units.insert((key, units(self))).1,
                };
                units.attention_scores(q, req.pool)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::score::tests::{positions, Rng};
    use crate::backend::score::{
        block_scores, block_scores_attention, block_scores_attention_of, block_scores_of, HeadShape,
    };
    use crate::kv::KvDtype;

    #[test]
    fn stored_keys_score_as_their_widened_f32_values() {
        let mut rng = Rng(0xF16);
        let shape = HeadShape {
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
