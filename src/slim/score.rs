//! Block scores of SlimInfer (arXiv 2508.06447, §"token importance"): how much the local query
//! attends to each prompt block, estimated without an attention matrix. The kernels live in
//! [`crate::backend::score`] (the CPU ops call them too); this module adds what ties them to the
//! KV cache: [`keys_of`], a layer's keys in the cache's storage.

use crate::backend::score::Keys;
use crate::kv::LayerKv;

/// The keys a layer's cache holds, as the scorers read them (widened a few rows at a time).
pub fn keys_of(kv: &LayerKv) -> Keys<'_> {
    Keys::Stored {
        bits: &kv.k,
        dtype: kv.dtype,
        channel_scale: &kv.k_scale,
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
