//! Per-layer KV cache: the keys and values of every token a layer has seen, with their
//! position ids. Layers may hold different tokens (SlimInfer drops rows in later layers), so
//! each layer has its own rows and positions.
//!
//! Invariant: within a layer, positions are strictly increasing in row order.

/// One layer's cache.
#[derive(Debug, Clone, Default)]
pub struct LayerKv {
    /// (len, kv_dim): post-RoPE keys
    pub k: Vec<f32>,
    /// (len, kv_dim)
    pub v: Vec<f32>,
    /// (len)
    pub positions: Vec<u32>,
}

impl LayerKv {
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Append rows; their positions must continue the increasing sequence.
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
        if let Some(width) = (!self.is_empty()).then(|| self.k.len() / self.len()) {
            if k.len() / rows != width {
                candle_core::bail!(
                    "kv append: rows of {} floats into a cache of rows of {width}",
                    k.len() / rows
                )
            }
        }
        let increasing = positions.windows(2).all(|w| w[0] < w[1]);
        let continues = self
            .positions
            .last()
            .is_none_or(|&last| last < positions[0]);
        if !increasing || !continues {
            candle_core::bail!(
                "kv append: positions must increase (last {:?}, new start {})",
                self.positions.last(),
                positions[0]
            )
        }
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
        self.positions.extend_from_slice(positions);
        Ok(())
    }

    /// Keep only the first `len` rows.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len() {
            let kv_dim = self.k.len() / self.len();
            self.k.truncate(len * kv_dim);
            self.v.truncate(len * kv_dim);
            self.positions.truncate(len);
        }
    }

    /// Bytes of K and V held.
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f32>()
    }
}

/// The caches of all layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); n_layers],
        }
    }

    pub fn clear(&mut self) {
        for l in &mut self.layers {
            *l = LayerKv::default();
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
    fn append_rejects_positions_that_do_not_increase() {
        let mut l = LayerKv::default();
        l.append(&[0.0; 4], &[0.0; 4], &[0, 5]).unwrap();
        assert!(l.append(&[0.0; 2], &[0.0; 2], &[5]).is_err());
        assert!(l.append(&[0.0; 4], &[0.0; 4], &[7, 6]).is_err());
        l.append(&[0.0; 2], &[0.0; 2], &[9]).unwrap();
        assert_eq!(l.positions, vec![0, 5, 9]);
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
        assert_eq!(c.bytes(), 3 * 2 * 4);
    }
}
