//! Per-layer KV cache: the keys and values of every token a layer has seen, with their
//! position ids. Layers may hold different tokens (SlimInfer drops rows in later layers), so
//! each layer has its own rows and positions.
//!
//! Keys and values are stored narrowed ([`KvDtype`]: 16-bit floats or Q8 groups, in `u16`
//! words; a row of `kv_dim` values is `dtype.stored_len(kv_dim)` words); callers append f32 rows and
//! read them back through [`LayerKv::view`] (kernels widen tiles as they go) or
//! [`LayerKv::keys_f32`].
//!
//! Invariant: within a layer, positions are strictly increasing in row order.

use super::dtype::KvDtype;

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
}

/// A borrowed cache for the attention kernels.
#[derive(Debug, Clone, Copy)]
pub struct KvView<'a> {
    /// (len, stored_len(kv_dim)) words
    pub k: &'a [u16],
    /// (len, stored_len(kv_dim)) words
    pub v: &'a [u16],
    /// (len), strictly increasing
    pub positions: &'a [u32],
    pub dtype: KvDtype,
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
        out
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
        self.dtype.encode(k, &mut k16);
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

    /// Keep only the first `len` rows.
    pub fn truncate(&mut self, len: usize) {
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

/// The caches of all layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    /// Empty caches in the default element type.
    pub fn new(n_layers: usize) -> Self {
        Self::with_dtype(n_layers, KvDtype::default())
    }

    pub fn with_dtype(n_layers: usize, dtype: KvDtype) -> Self {
        Self {
            layers: vec![LayerKv::new(dtype); n_layers],
        }
    }

    pub fn clear(&mut self) {
        for l in &mut self.layers {
            *l = LayerKv::new(l.dtype);
        }
    }

    /// Drop every row at position >= `pos` in every layer (undo a turn, or regenerate).
    pub fn truncate_from(&mut self, pos: u32) {
        for l in &mut self.layers {
            let keep = l.positions.partition_point(|&p| p < pos);
            l.truncate(keep);
        }
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum()
    }

    /// Rows held per layer.
    pub fn rows_per_layer(&self) -> Vec<usize> {
        self.layers.iter().map(LayerKv::len).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn truncate_from_drops_rows_at_and_after_position() {
        let mut c = KvCache::new(2);
        c.layers[0]
            .append(&[0.0; 3], &[0.0; 3], &[0, 1, 2])
            .unwrap();
        c.layers[1].append(&[0.0; 2], &[0.0; 2], &[0, 2]).unwrap();
        c.truncate_from(2);
        assert_eq!(c.rows_per_layer(), vec![2, 1]);
        assert_eq!(c.bytes(), 3 * 2 * 2);
    }
}
