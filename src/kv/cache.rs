//! Per-layer KV cache: the keys and values of every token a layer has seen, with their
//! position ids. Layers may hold different tokens (SlimInfer drops rows in later layers), so
//! each layer has its own rows and positions.
//!
//! Keys and values are stored narrowed ([`KvDtype`]: 16-bit floats or Q8 groups, in `u16`
//! words; a row of `kv_dim` values is `dtype.stored_len(kv_dim)` words); callers append f32 rows and
//! read them back through [`LayerKv::view`] (kernels widen tiles as they go) or
//! [`LayerKv::keys_f32`].
//!
//! Q8 keys are stored divided by a per-channel scale (`LayerKv::k_scale`) fixed at the layer's
//! first append: the largest |k| of each pair of channels that RoPE rotates together. A few
//! channels carry most of a key's magnitude (KIVI, arXiv 2402.02750), so a per-row int8 scale
//! would leave the others a handful of levels; dividing first gives every channel the whole int8
//! range (about half the key error on SmolLM2, bench/NOTES.md). Attention multiplies the query by
//! the scale instead of widening keys back: `q·k = (q∘s)·(k/s)`.
//!
//! Invariant: within a layer, positions are strictly increasing in row order.

use crate::backend::attention::scale_queries;
use crate::backend::heads::Heads;
use crate::backend::kv_format::{first_key_scale, unscale_keys, KvDtype, KvView};

/// One layer's cache.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    /// (len, stored_len(kv_dim)): post-RoPE keys, as `dtype` words
    pub k: Vec<u16>,
    /// (len, stored_len(kv_dim)), as `dtype` words
    pub v: Vec<u16>,
    /// (len)
    pub positions: Vec<u32>,
    pub dtype: KvDtype,
    /// Q8 only: the divisor of each key channel (kv_dim values; empty for 16-bit types and
    /// before the first append)
    pub k_scale: Vec<f32>,
}

impl LayerKv {
    pub fn new(dtype: KvDtype) -> Self {
        Self {
            dtype,
            ..Self::default()
        }
    }

    pub fn view(&self) -> KvView<'_> {
        KvView {
            k: &self.k,
            v: &self.v,
            positions: &self.positions,
            dtype: self.dtype,
        }
    }

    /// Every key widened to f32: (len, kv_dim).
    pub fn keys_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.dtype.values_in(self.k.len())];
        self.dtype.decode(&self.k, &mut out);
        unscale_keys(&mut out, &self.k_scale);
        out
    }

    /// Scales `q` (rows of heads of `shape.head_dim`) by the key scale of its KV head, so that
    /// it can be dotted with the stored keys; nothing when keys are stored as they are.
    pub fn scale_queries(&self, q: &mut [f32], shape: Heads) {
        scale_queries(q, &self.k_scale, shape);
    }

    /// Every value widened to f32: (len, kv_dim).
    pub fn values_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.dtype.values_in(self.v.len())];
        self.dtype.decode(&self.v, &mut out);
        out
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Add rows. Rows whose positions continue the sequence are appended; rows at earlier
    /// positions (SlimInfer reviving a pruned block in decode) are merged into place. Positions
    /// within `positions` must increase, and none may already be cached.
    pub fn append(&mut self, k: &[f32], v: &[f32], positions: &[u32]) -> candle_core::Result<()> {
        let rows = positions.len();
        if rows == 0 {
            return Ok(());
        }
        if k.len() != v.len() || !k.len().is_multiple_of(rows) {
            candle_core::bail!(
                "kv append: k {} / v {} floats for {rows} rows",
                k.len(),
                v.len()
            )
        }
        let width = self.dtype.stored_len(k.len() / rows);
        if let Some(have) = (!self.is_empty()).then(|| self.k.len() / self.len()) {
            if width != have {
                candle_core::bail!(
                    "kv append: rows of {} floats into a cache of rows of {have} words",
                    k.len() / rows
                )
            }
        }
        if !positions.windows(2).all(|w| w[0] < w[1]) {
            candle_core::bail!("kv append: new positions must increase")
        }
        let continues = self
            .positions
            .last()
            .is_none_or(|&last| last < positions[0]);
        let (mut k16, mut v16) = (vec![0u16; rows * width], vec![0u16; rows * width]);
        if self.dtype == KvDtype::Q8 {
            if self.k_scale.is_empty() {
                self.k_scale = first_key_scale(k, k.len() / rows);
            }
            let mut scaled = k.to_vec();
            for row in scaled.chunks_exact_mut(self.k_scale.len()) {
                row.iter_mut().zip(&self.k_scale).for_each(|(x, s)| *x /= s);
            }
            self.dtype.encode(&scaled, &mut k16);
        } else {
            self.dtype.encode(k, &mut k16);
        }
        self.dtype.encode(v, &mut v16);
        if continues {
            self.k.extend_from_slice(&k16);
            self.v.extend_from_slice(&v16);
            self.positions.extend_from_slice(positions);
            return Ok(());
        }
        self.merge(&k16, &v16, positions)
    }

    /// Merge rows at positions that interleave with the cached ones (one pass, O(len)).
    fn merge(&mut self, k: &[u16], v: &[u16], positions: &[u32]) -> candle_core::Result<()> {
        let width = k.len() / positions.len();
        let total = self.len() + positions.len();
        let (mut nk, mut nv) = (
            Vec::with_capacity(total * width),
            Vec::with_capacity(total * width),
        );
        let mut npos = Vec::with_capacity(total);
        let (mut i, mut j) = (0, 0);
        while i < self.len() || j < positions.len() {
            let old = (i < self.len()).then(|| self.positions[i]);
            let new = (j < positions.len()).then(|| positions[j]);
            let (src_k, src_v, row, pos) = match (old, new) {
                (Some(o), Some(n)) if o == n => {
                    candle_core::bail!("kv append: position {n} is already cached")
                }
                (Some(o), n) if n.is_none_or(|n| o < n) => {
                    i += 1;
                    (&self.k[..], &self.v[..], i - 1, o)
                }
                (_, Some(n)) => {
                    j += 1;
                    (k, v, j - 1, n)
                }
                (_, None) => unreachable!("loop runs while rows remain"),
            };
            nk.extend_from_slice(&src_k[row * width..(row + 1) * width]);
            nv.extend_from_slice(&src_v[row * width..(row + 1) * width]);
            npos.push(pos);
        }
        self.k = nk;
        self.v = nv;
        self.positions = npos;
        Ok(())
    }

    /// Keep only the first `len` rows (none: the key scale is chosen again).
    pub fn truncate(&mut self, len: usize) {
        if len == 0 {
            self.k_scale.clear();
        }
        if len < self.len() {
            let width = self.k.len() / self.len();
            self.k.truncate(len * width);
            self.v.truncate(len * width);
            self.positions.truncate(len);
        }
    }

    /// Bytes of K and V held.
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<u16>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kv_format::SCALE_MAX_RATIO;

    #[test]
    fn append_rejects_cached_or_unordered_positions() {
        let mut l = LayerKv::default();
        l.append(&[0.0; 4], &[0.0; 4], &[0, 5]).unwrap();
        assert!(l.append(&[0.0; 2], &[0.0; 2], &[5]).is_err());
        assert!(l.append(&[0.0; 4], &[0.0; 4], &[7, 6]).is_err());
        assert!(l.append(&[0.0; 4], &[0.0; 4], &[3, 5]).is_err());
        l.append(&[0.0; 2], &[0.0; 2], &[9]).unwrap();
        assert_eq!(l.positions, vec![0, 5, 9]);
    }

    #[test]
    fn append_merges_earlier_positions_into_place_with_their_rows() {
        let mut l = LayerKv::default();
        l.append(&[0.0, 0.5, 5.0, 5.5], &[10.0, 10.5, 15.0, 15.5], &[0, 5])
            .unwrap();
        l.append(
            &[2.0, 2.5, 3.0, 3.5, 7.0, 7.5],
            &[12.0, 12.5, 13.0, 13.5, 17.0, 17.5],
            &[2, 3, 7],
        )
        .unwrap();
        assert_eq!(l.positions, vec![0, 2, 3, 5, 7]);
        assert_eq!(
            l.keys_f32(),
            vec![0.0, 0.5, 2.0, 2.5, 3.0, 3.5, 5.0, 5.5, 7.0, 7.5]
        );
        assert_eq!(
            l.values_f32(),
            vec![10.0, 10.5, 12.0, 12.5, 13.0, 13.5, 15.0, 15.5, 17.0, 17.5]
        );
    }

    /// Keys with two loud channel pairs (as real keys have): Q8 with the per-channel scale keeps
    /// the quiet channels' error at half of a plain per-row Q8 or less, and attention over the
    /// stored keys (prefill rows and a decode row, query scaled) equals the reference over the
    /// widened keys.
    #[test]
    fn key_scale_needs_enough_rows_and_is_floored() {
        let kv_dim = 64;
        let row = |i: usize| -> Vec<f32> {
            (0..kv_dim)
                .map(|c| {
                    if c < 2 {
                        32.0
                    } else {
                        0.01 * (1 + i % 3) as f32
                    }
                })
                .collect()
        };
        let rows = |n: usize| -> Vec<f32> { (0..n).flat_map(row).collect() };
        let mut short = LayerKv::new(KvDtype::Q8);
        short
            .append(&rows(10), &rows(10), &(0..10).collect::<Vec<u32>>())
            .unwrap();
        assert_eq!(short.k_scale, vec![1.0; kv_dim]);
        let mut long = LayerKv::new(KvDtype::Q8);
        long.append(&rows(100), &rows(100), &(0..100).collect::<Vec<u32>>())
            .unwrap();
        assert_eq!(long.k_scale[..2], [32.0, 32.0]);
        assert!(long.k_scale[2..]
            .iter()
            .all(|&s| s == 32.0 / SCALE_MAX_RATIO));
        let mut zero = LayerKv::new(KvDtype::Q8);
        zero.append(
            &vec![0.0; 100 * kv_dim],
            &vec![0.0; 100 * kv_dim],
            &(0..100).collect::<Vec<u32>>(),
        )
        .unwrap();
        assert_eq!(zero.k_scale, vec![1.0; kv_dim]);
    }
}
