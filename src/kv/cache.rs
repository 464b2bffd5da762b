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

use std::sync::Arc;

use super::manager::KvManager;
use super::policy::LayerPolicy;
use super::stats::KvStats;
use crate::backend::attention::{attention_in_place_with, scale_queries, AttentionKind, AttnShape};
use crate::backend::decode_attention::decode_attention_runs;
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
    pub fn scale_queries(&self, q: &mut [f32], shape: AttnShape) {
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

    /// For a Q8 layer whose last rows are at `positions`: its rows in f16 in `out` (reused
    /// between layers, so a prefill does not fault in fresh pages per layer), the last ones `k`,
    /// `v` (their f32 values, rounded to f16 only) and the earlier ones widened from Q8. False
    /// for 16-bit layers, or when the rows are not the layer's last ones (a revival merged into
    /// place reads the stored rows).
    fn exact_tail_into(&self, k: &[f32], v: &[f32], positions: &[u32], out: &mut LayerKv) -> bool {
        let Some(old) = self.len().checked_sub(positions.len()) else {
            return false;
        };
        if self.dtype != KvDtype::Q8 || self.positions[old..] != *positions {
            return false;
        }
        let kv_dim = k.len() / positions.len();
        let row_words = self.dtype.stored_len(kv_dim);
        out.dtype = KvDtype::F16;
        out.k_scale.clear();
        out.positions.clear();
        out.positions.extend_from_slice(&self.positions);
        for (dst, src, fresh, scale) in [
            (&mut out.k, &self.k, k, &self.k_scale[..]),
            (&mut out.v, &self.v, v, &[][..]),
        ] {
            dst.resize(self.len() * kv_dim, 0);
            let (head, tail) = dst.split_at_mut(old * kv_dim);
            // earlier rows: Q8 → f32 → f16, 256 rows at a time
            let mut wide = vec![0f32; 256.min(old.max(1)) * kv_dim];
            for (bits, narrow) in src[..old * row_words]
                .chunks(256 * row_words)
                .zip(head.chunks_mut(256 * kv_dim))
            {
                let wide = &mut wide[..narrow.len()];
                self.dtype.decode(bits, wide);
                unscale_keys(wide, scale);
                KvDtype::F16.encode(wide, narrow);
            }
            KvDtype::F16.encode(fresh, tail);
        }
        true
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

/// The caches of all layers (the host tier), and the KV manager that keeps a bounded fast tier
/// of what decode attends to (None: every block resident, the reference path).
///
/// Layers are shared (`Arc`) so that the offload worker can read a layer's rows while the
/// forward runs other layers; a layer is appended to only once its copies have completed.
#[derive(Debug)]
pub struct KvCache {
    pub layers: Vec<Arc<LayerKv>>,
    tiers: Option<KvManager>,
    /// A Q8 prefill's layer in f16 for its own attention (see `attend`), reused across layers.
    exact: LayerKv,
    /// The kernel of a prefill's attention (`[model] attention`).
    attention: AttentionKind,
}

impl KvCache {
    /// Empty caches in the default element type.
    pub fn new(n_layers: usize) -> Self {
        Self::with_dtype(n_layers, KvDtype::default())
    }

    pub fn with_dtype(n_layers: usize, dtype: KvDtype) -> Self {
        Self {
            layers: (0..n_layers)
                .map(|_| Arc::new(LayerKv::new(dtype)))
                .collect(),
            tiers: None,
            exact: LayerKv::default(),
            attention: AttentionKind::default(),
        }
    }

    /// The kernel prefills attend with from now on (decode rows keep theirs).
    pub fn set_attention(&mut self, kind: AttentionKind) {
        self.attention = kind;
    }

    pub fn attention(&self) -> AttentionKind {
        self.attention
    }

    /// Manage the fast tier with `tiers` (None: everything resident).
    pub fn set_tiers(&mut self, tiers: Option<KvManager>) {
        self.tiers = tiers;
    }

    pub fn tiers(&self) -> Option<&KvManager> {
        self.tiers.as_ref()
    }

    pub fn tiers_mut(&mut self) -> Option<&mut KvManager> {
        self.tiers.as_mut()
    }

    /// A decode step ends: the manager runs the copies it deferred.
    pub fn end_step(&mut self) {
        if let Some(t) = &mut self.tiers {
            t.end_step(&self.layers);
        }
    }

    pub fn layer(&self, i: usize) -> &LayerKv {
        &self.layers[i]
    }

    pub fn clear(&mut self) {
        if let Some(t) = &mut self.tiers {
            t.reset(&self.layers);
        }
        for l in &mut self.layers {
            *l = Arc::new(LayerKv::new(l.dtype));
        }
        self.exact = LayerKv::default();
    }

    /// Drop every row at position >= `pos` in every layer (undo a turn, or regenerate).
    pub fn truncate_from(&mut self, pos: u32) {
        if let Some(t) = &mut self.tiers {
            t.truncate_from(pos, &self.layers);
        }
        for l in &mut self.layers {
            let keep = l.positions.partition_point(|&p| p < pos);
            if keep < l.len() {
                Arc::make_mut(l).truncate(keep);
            }
        }
    }

    /// Before layer `i` appends and attends: its pending copies must have landed.
    pub fn before_layer(&mut self, i: usize) {
        if let Some(t) = &mut self.tiers {
            t.before_layer(i, &self.layers);
        }
    }

    /// Append rows to layer `i` (host tier; rows past the prompt also to the fast tier).
    pub fn append(
        &mut self,
        i: usize,
        k: &[f32],
        v: &[f32],
        positions: &[u32],
        policy: &dyn LayerPolicy,
    ) -> candle_core::Result<()> {
        Arc::make_mut(&mut self.layers[i]).append(k, v, positions)?;
        if let Some(t) = &mut self.tiers {
            t.after_append(
                i,
                &self.layers[i],
                positions,
                policy.active_blocks(i).as_ref(),
            );
        }
        Ok(())
    }

    /// Attention of layer `i`'s rows over its cached keys, written over their queries: `qo`
    /// holds the queries of the rows at `positions` on entry, (rows, n_heads * hd), and their
    /// attention output on return, so a long prefill holds one such buffer, not two. A decode
    /// row of a slim layer reads the fast tier; everything else reads the host cache through
    /// the policy's key ranges. Both give the same bits.
    ///
    /// `fresh`: the f32 K and V of these rows, just appended. A Q8 layer's prefill (several rows
    /// appended at its end) reads them at f16 precision instead of their int8 rounding, and the
    /// earlier rows widened from Q8: a prompt's own hidden states are computed as with an f16
    /// cache, and only what is read again later (decode, follow-up turns) is int8.
    pub fn attend(
        &mut self,
        i: usize,
        qo: &mut [f32],
        positions: &[u32],
        fresh: Option<(&[f32], &[f32])>,
        policy: &dyn LayerPolicy,
        shape: AttnShape,
    ) -> candle_core::Result<()> {
        let host = &self.layers[i];
        let keys = policy.key_ranges(i, host);
        if let (Some((k, v)), true) = (fresh, positions.len() > 1) {
            if host.exact_tail_into(k, v, positions, &mut self.exact) {
                let exact = self.exact.view();
                return attention_in_place_with(self.attention, qo, positions, exact, &keys, shape);
            }
        }
        host.scale_queries(qo, shape);
        if let (Some(t), 1) = (&mut self.tiers, positions.len()) {
            let active = policy.active_blocks(i);
            let want: usize = keys.iter().map(|r| r.len()).sum();
            let last_visible = host.positions.last().is_none_or(|&p| p <= positions[0]);
            if let Some(runs) = t.runs(i, active.as_ref(), host) {
                let have: usize = runs.iter().map(|r| r.k.len()).sum::<usize>()
                    / host.dtype.stored_len(shape.n_kv_heads * shape.head_dim);
                if have == want && last_visible {
                    let q = qo.to_vec(); // one row
                    decode_attention_runs(&q, &runs, host.dtype, shape, qo);
                    return Ok(());
                }
                t.note_miss();
            }
        }
        attention_in_place_with(self.attention, qo, positions, host.view(), &keys, shape)
    }

    /// Layer `i`'s policy may have just chosen its keys: the manager gives the new blocks their
    /// fast-tier slots before the layer attends (their copies run at the end of the step).
    pub fn before_attention(&mut self, i: usize, policy: &dyn LayerPolicy) -> crate::Result<()> {
        match &mut self.tiers {
            Some(t) => t.before_attention(i, &self.layers, policy),
            None => Ok(()),
        }
    }

    /// After layer `i` and its policy step: let the manager move blocks.
    pub fn after_layer(
        &mut self,
        i: usize,
        rows: usize,
        policy: &dyn LayerPolicy,
    ) -> crate::Result<()> {
        match &mut self.tiers {
            Some(t) => t.after_layer(i, rows, &self.layers, policy),
            None => Ok(()),
        }
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bytes()).sum()
    }

    /// The manager's numbers since the last call, once its copies have landed (None: resident).
    pub fn take_tier_stats(&mut self) -> Option<KvStats> {
        let t = self.tiers.as_mut()?;
        t.wait_all(&self.layers);
        Some(t.take_stats(&self.layers))
    }

    /// Rows held per layer.
    pub fn rows_per_layer(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.len()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::attention::attention;
    use crate::backend::kv_format::SCALE_MAX_RATIO;
    use crate::backend::qgemv::tests::noise;

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
    fn q8_keys_divided_per_channel_attend_as_their_widened_values() {
        use crate::backend::attention::attention_reference;
        use crate::kv::policy::Dense;
        let shape = AttnShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 64,
        };
        let (kv_dim, n) = (128, 300);
        let loud = |c: usize| if c % 64 < 4 { 25.0 } else { 1.0 };
        let k: Vec<f32> = (noise(n * kv_dim, 1).into_iter().enumerate())
            .map(|(i, x)| x * loud(i % kv_dim))
            .collect();
        let v = noise(n * kv_dim, 2);
        let pos: Vec<u32> = (0..n as u32).collect();
        let mut cache = KvCache::with_dtype(1, KvDtype::Q8);
        cache.append(0, &k, &v, &pos, &Dense).unwrap();
        let layer = cache.layer(0).clone();
        let quiet_err = |wide: &[f32]| {
            let (mut e, mut m) = (0f32, 0f32);
            for (i, (a, b)) in k.iter().zip(wide).enumerate() {
                if loud(i % kv_dim) == 1.0 {
                    e = e.max((a - b).abs());
                    m = m.max(a.abs());
                }
            }
            e / m
        };
        let mut plain = LayerKv::new(KvDtype::Q8);
        plain.append(&k, &v, &pos).unwrap();
        plain.k_scale.clear();
        let mut bits = vec![0u16; KvDtype::Q8.stored_len(k.len())];
        KvDtype::Q8.encode(&k, &mut bits);
        plain.k = bits;
        let (scaled, unscaled) = (quiet_err(&layer.keys_f32()), quiet_err(&plain.keys_f32()));
        assert!(
            scaled * 2.0 < unscaled,
            "quiet channels: error {scaled} with the channel scale, {unscaled} without"
        );
        let (wk, wv) = (layer.keys_f32(), layer.values_f32());
        for rows in [&pos[250..], &pos[299..]] {
            let q = noise(rows.len() * 6 * 64, rows.len() as u64);
            let want = attention_reference(&q, rows, &wk, &wv, &pos, shape);
            let mut got = q.clone();
            cache
                .attend(0, &mut got, rows, None, &Dense, shape)
                .unwrap();
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-4, "{} query rows: max error {err}", rows.len());
        }
    }

    /// The channel scale comes from a first append of enough rows, is floored at the loudest
    /// channel / SCALE_MAX_RATIO, and a short first turn leaves keys unscaled.
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

    /// A Q8 layer's prefill reads its own rows at f16 precision: bit-identical to an f16 cache
    /// on a first turn, and on a second turn the earlier rows come widened from Q8. Without the
    /// fresh rows (as in decode) it reads the int8 rounding, which differs.
    #[test]
    fn q8_prefill_attends_over_its_own_rows_at_f16_precision() {
        use crate::kv::policy::Dense;
        let shape = AttnShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 64,
        };
        let (kv_dim, n) = (128, 200);
        let (k, v, q) = (
            noise(n * kv_dim, 3),
            noise(n * kv_dim, 4),
            noise(n * 6 * 64, 5),
        );
        let pos: Vec<u32> = (0..n as u32).collect();
        let attend = |dtype: KvDtype, turns: &[std::ops::Range<usize>], fresh: bool| {
            let mut cache = KvCache::with_dtype(1, dtype);
            let mut out = Vec::new();
            for rows in turns {
                let (k, v) = (
                    &k[rows.start * kv_dim..rows.end * kv_dim],
                    &v[rows.start * kv_dim..rows.end * kv_dim],
                );
                cache.append(0, k, v, &pos[rows.clone()], &Dense).unwrap();
                let q = &q[rows.start * 6 * 64..rows.end * 6 * 64];
                out = q.to_vec();
                let fresh = fresh.then_some((k, v));
                cache
                    .attend(0, &mut out, &pos[rows.clone()], fresh, &Dense, shape)
                    .unwrap();
            }
            (out, cache.layer(0).clone())
        };
        let (f16, _) = attend(KvDtype::F16, &[0..n], true);
        let (q8, _) = attend(KvDtype::Q8, &[0..n], true);
        assert_eq!(q8, f16, "first turn: Q8 prefill = f16 prefill");
        let (rounded, _) = attend(KvDtype::Q8, &[0..n], false);
        assert_ne!(rounded, f16, "the int8 rows differ from f16");

        // second turn: rows 0..120 cached as Q8, rows 120..200 fresh
        let (second, layer) = attend(KvDtype::Q8, &[0..120, 120..n], true);
        let (mut wk, wv) = (layer.keys_f32(), layer.values_f32());
        wk[120 * kv_dim..].copy_from_slice(&k[120 * kv_dim..]);
        let mut wv = wv;
        wv[120 * kv_dim..].copy_from_slice(&v[120 * kv_dim..]);
        let mut mixed = LayerKv::new(KvDtype::F16);
        mixed.append(&wk, &wv, &pos).unwrap();
        let mut want = vec![0f32; second.len()];
        attention(
            &q[120 * 6 * 64..],
            &pos[120..],
            mixed.view(),
            &[0..n],
            shape,
            &mut want,
        )
        .unwrap();
        assert_eq!(second, want, "second turn: earlier rows widened from Q8");
    }

    #[test]
    fn truncate_from_drops_rows_at_and_after_position() {
        let mut c = KvCache::new(2);
        Arc::make_mut(&mut c.layers[0])
            .append(&[0.0; 3], &[0.0; 3], &[0, 1, 2])
            .unwrap();
        Arc::make_mut(&mut c.layers[1])
            .append(&[0.0; 2], &[0.0; 2], &[0, 2])
            .unwrap();
        c.truncate_from(2);
        assert_eq!(c.rows_per_layer(), vec![2, 1]);
        assert_eq!(c.bytes(), 3 * 2 * 2);
    }
}
