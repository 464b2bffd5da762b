//! The choice of prefill attention kernel (`[model] attention`): the f32 GEMM kernel
//! ([`super::attention`], the exact reference) or the 8-bit one ([`super::attention_int8`]),
//! and the entry point that dispatches between them.

use crate::backend::heads::Heads;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::attention::attention_in_place;
use super::attention_int8::{self, Int8Path};
use super::kv_format::KvView;

/// Which kernel a prefill's attention runs (`[model] attention`); a single query row (decode)
/// always takes [`super::decode_attention`]. `Default` (f32) is a bare cache's kernel; the
/// app's default (`[model] attention`) is int8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// f32 GEMMs: the exact reference
    #[default]
    F32,
    /// 8-bit Q·Kᵀ and P·V on the integer dot product ([`super::attention_int8`]); the f32
    /// kernel where the CPU has no VNNI, the head size does not fit, or there are fewer than
    /// [`attention_int8::MIN_ROWS`] query rows
    Int8,
}

impl AttentionKind {
    pub fn parse(s: &str) -> Option<AttentionKind> {
        match s {
            "f32" => Some(AttentionKind::F32),
            "int8" => Some(AttentionKind::Int8),
            _ => None,
        }
    }

    /// The 8-bit path this call would take, None for the f32 kernel.
    pub fn int8_path(self, rows: usize, head_dim: usize) -> Option<Int8Path> {
        let fits = rows >= attention_int8::MIN_ROWS && attention_int8::supports(head_dim);
        (self == AttentionKind::Int8 && fits)
            .then(|| Int8Path::fast(head_dim))
            .flatten()
    }
}

/// [`attention_in_place`] on the kernel `kind` chooses (see [`AttentionKind`]).
pub fn attention_in_place_with(
    kind: AttentionKind,
    qo: &mut [f32],
    q_pos: &[u32],
    kv: KvView,
    key_ranges: &[Range<usize>],
    shape: Heads,
) -> candle_core::Result<()> {
    match kind.int8_path(q_pos.len(), shape.head_dim) {
        Some(path) => {
            attention_int8::attention_int8_in_place(path, qo, q_pos, kv, key_ranges, shape)
        }
        None => attention_in_place(qo, q_pos, kv, key_ranges, shape),
    }
}
