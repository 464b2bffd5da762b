//! The paged KV cache of the forward written against the ops seam: one layer's pool of
//! [`KV_BLOCK`]-row slots with its slot table and positions ([`LayerCache`]), and the calls a
//! forward makes to whoever watches each layer ([`LayerHooks`]: the device forward's prefill
//! progress; [`NoHooks`] does nothing). What a layer moves to RAM after a pruned prefill is in
//! src/backend/paged_tier.rs.

use super::ops::{KvPool, Ops, RowSlice, KV_BLOCK};
use super::paged_tier::{CachedUnits, HostTier, TierCounts};
use crate::{Error, Result};

/// One layer's KV: a pool of slots, the slots in row order, and the rows' positions.
pub struct LayerCache<O: Ops> {
    pub pool: KvPool<O>,
    /// Slot of each block of rows, in row order (host copy of `table_dev`).
    pub table: Vec<u32>,
    pub table_dev: O::U32,
    /// Rows written.
    pub rows: usize,
    /// Positions of the rows, ascending.
    pub positions: Vec<u32>,
    /// The unit keys of its prompt rows, once decode has them (src/backend/paged_tier.rs).
    pub units: Option<CachedUnits<O>>,
    /// Its prompt blocks' host tier, once it has one: the pool then holds only some of them.
    pub host: Option<HostTier<O>>,
    /// The work of a host tier it no longer has ([`Self::untier`]).
    pub past_tier: TierCounts,
}

impl<O: Ops> LayerCache<O> {
    /// Room for `capacity_rows` rows of `kv_dim` values, the slots in order, no rows yet.
    pub fn new(ops: &O, capacity_rows: usize, kv_dim: usize) -> Result<Self> {
        let slots = capacity_rows.div_ceil(KV_BLOCK).max(1);
        let table: Vec<u32> = (0..slots as u32).collect();
        Ok(Self {
            pool: KvPool::new(ops, slots, kv_dim)?,
            table_dev: ops.upload_u32(&table)?,
            table,
            rows: 0,
            positions: Vec::new(),
            units: None,
            host: None,
            past_tier: TierCounts::default(),
        })
    }

    /// Make room for `more` rows after the layer's last: when its row blocks cannot hold them,
    /// the pool grows (a new pool, every slot copied over on the device) by what is missing or
    /// an eighth of its blocks, whichever is more, and the table lists the new slots.
    pub fn reserve(&mut self, ops: &O, more: usize) -> Result<()> {
        let blocks = self.table.len();
        let missing = (self.rows + more).div_ceil(KV_BLOCK).saturating_sub(blocks);
        if missing == 0 {
            return Ok(());
        }
        let add = missing.max(blocks / 8);
        let pool = with_more_slots(ops, &self.pool, add)?;
        let mut table = self.table.clone();
        table.extend(self.pool.slots as u32..(self.pool.slots + add) as u32);
        self.table_dev = ops.upload_u32(&table)?;
        self.table = table;
        self.pool = pool;
        Ok(())
    }

    /// Forget the rows at positions `pos` and after (the slots keep their stale words until the
    /// next rows overwrite them: they lie past `rows`, and past every position that follows).
    /// Rows a host tier backs cannot go: an error when `pos` falls among them.
    pub fn truncate_from(&mut self, pos: u32) -> Result<()> {
        let keep = self.positions.partition_point(|&p| p < pos);
        if keep == self.rows {
            return Ok(());
        }
        if let Some(host) = &self.host {
            if keep < host.first_fast * KV_BLOCK {
                return Err(Error::Engine(format!(
                    "kv: cannot cut a tiered layer at row {keep}, inside its host tier"
                )));
            }
        }
        if self.units.as_ref().is_some_and(|u| keep < u.prompt_rows) {
            self.units = None;
        }
        self.rows = keep;
        self.positions.truncate(keep);
        Ok(())
    }

    /// Write rows `at` of `qkv` (keys at columns k_col.., values at v_col..) with their
    /// `positions` (ascending; `pos_dev` the same on the backend) into the layer. Rows past
    /// the layer's last position follow its rows; rows before it (prompt blocks a session
    /// revives: whole [`KV_BLOCK`]-row blocks) take a free slot each, placed in the table where
    /// their positions fall, so that the layer's rows stay in position order.
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        ops: &O,
        qkv: &O::Act,
        at: RowSlice,
        (k_col, v_col): (usize, usize),
        positions: &[u32],
        pos_dev: &O::U32,
    ) -> Result<()> {
        let n = positions.len();
        let behind = match self.positions.last() {
            Some(&last) => positions.partition_point(|&p| p <= last),
            None => 0,
        };
        if behind > 0 {
            let revived = at.rows_from(0, behind);
            self.insert_blocks(ops, qkv, revived, (k_col, v_col), &positions[..behind])?;
        }
        if behind == n {
            return Ok(());
        }
        self.reserve(ops, n - behind)?;
        let rest = at.rows_from(behind, n - behind);
        let (pool, table, row0) = (&mut self.pool, &self.table_dev, self.rows);
        match behind {
            0 => ops.kv_append(qkv, rest, k_col, v_col, pos_dev, pool, table, row0)?,
            _ => {
                let tail = ops.upload_u32(&positions[behind..])?;
                ops.kv_append(qkv, rest, k_col, v_col, &tail, pool, table, row0)?
            }
        }
        self.rows += n - behind;
        self.positions.extend_from_slice(&positions[behind..]);
        Ok(())
    }

    /// [`Self::append`]'s rows before the layer's last: whole blocks, each into a free slot
    /// inserted in the table before the rows whose positions follow it. The layer's unit keys,
    /// when it keeps them, are made again over its prompt rows.
    fn insert_blocks(
        &mut self,
        ops: &O,
        qkv: &O::Act,
        at: RowSlice,
        (k_col, v_col): (usize, usize),
        positions: &[u32],
    ) -> Result<()> {
        if !positions.len().is_multiple_of(KV_BLOCK) {
            return Err(Error::Engine(format!(
                "ops forward: {} rows before a layer's last, not whole blocks",
                positions.len()
            )));
        }
        self.untier(ops)?;
        self.reserve(ops, positions.len())?;
        for (i, block) in positions.chunks(KV_BLOCK).enumerate() {
            let first = block[0];
            let whole =
                first.is_multiple_of(KV_BLOCK as u32) && block.windows(2).all(|w| w[1] == w[0] + 1);
            let r = self.positions.partition_point(|&p| p < first);
            let clear = (self.positions.get(r)).is_none_or(|&p| p > block[KV_BLOCK - 1]);
            if !whole || !r.is_multiple_of(KV_BLOCK) || !clear {
                return Err(Error::Engine(format!(
                    "ops forward: rows at positions {first}.. cannot join a layer as a whole block"
                )));
            }
            // a free slot (after the slots in use: `reserve` made room), placed at row r
            let slot = self.table.remove(self.rows.div_ceil(KV_BLOCK));
            self.table.insert(r / KV_BLOCK, slot);
            self.table_dev = ops.upload_u32(&self.table)?;
            self.positions.splice(r..r, block.iter().copied());
            self.rows += KV_BLOCK;
            let rows = at.rows_from(i * KV_BLOCK, KV_BLOCK);
            let pos = ops.upload_u32(block)?;
            ops.kv_append(
                qkv,
                rows,
                k_col,
                v_col,
                &pos,
                &mut self.pool,
                &self.table_dev,
                r,
            )?;
        }
        if let Some(units) = self.units.take() {
            let prompt_rows = units.prompt_rows + positions.len();
            self.cache_unit_keys(ops, prompt_rows, units.unit_size)?;
        }
        Ok(())
    }

    /// Sequence rows of the slots (ascending) holding prompt block `block` (position / 64).
    pub fn slot_of_block(&self, block: u32) -> Option<u32> {
        let first = self
            .positions
            .partition_point(|&p| p < block * KV_BLOCK as u32);
        (first < self.rows && self.positions[first] / KV_BLOCK as u32 == block)
            .then(|| self.table[first / KV_BLOCK])
            .filter(|&slot| slot != super::paged_tier::ON_HOST)
    }
}

/// A copy of `pool` (on the device) with `add` empty slots after its own.
pub(super) fn with_more_slots<O: Ops>(ops: &O, pool: &KvPool<O>, add: usize) -> Result<KvPool<O>> {
    let keep: Vec<(u32, u32)> = (0..pool.slots as u32).map(|s| (s, s)).collect();
    ops.kv_pool_regrouped(pool, &keep, pool.slots + add)
}

/// Calls a forward makes around each layer to whoever watches it (the device forward's prefill
/// progress).
pub trait LayerHooks<O: Ops> {
    /// Layer `layer` has appended this step's rows to its cache.
    fn kv_written(&mut self, _ops: &O, _layer: usize, _kv: &LayerCache<O>) -> Result<()> {
        Ok(())
    }
    /// A prefill is done with layer `layer`: its cache is as decode will find it (tiered, when
    /// the KV manager moved its prompt blocks to the host).
    fn layer_done(&mut self, _ops: &O, _layer: usize, _kv: &LayerCache<O>) -> Result<()> {
        Ok(())
    }
}

/// No KV manager.
pub struct NoHooks;
impl<O: Ops> LayerHooks<O> for NoHooks {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu_ops::CpuOps;

    /// q|k|v rows whose key and value columns hold the row's position (kv_dim 2, no queries).
    fn rows_at(positions: &[u32]) -> (Vec<u16>, RowSlice) {
        let qkv: Vec<u16> = (positions.iter())
            .flat_map(|&p| [p as u16, p as u16, p as u16 + 1, p as u16 + 1])
            .collect();
        let at = RowSlice {
            rows: positions.len(),
            stride: 4,
            offset: 0,
        };
        (qkv, at)
    }

    fn append(kv: &mut LayerCache<CpuOps>, positions: &[u32]) -> Result<()> {
        let (qkv, at) = rows_at(positions);
        let pos = CpuOps.upload_u32(positions)?;
        kv.append(&CpuOps, &qkv, at, (0, 2), positions, &pos)
    }

    /// The key (first column) of each row, read through the table.
    fn keys(kv: &LayerCache<CpuOps>) -> Vec<u32> {
        (0..kv.rows)
            .map(|r| {
                let slot = kv.table[r / KV_BLOCK] as usize;
                kv.pool.k[(slot * KV_BLOCK + r % KV_BLOCK) * 2] as u32
            })
            .collect()
    }

    #[test]
    fn a_revived_block_joins_the_layer_in_position_order() {
        let mut kv = LayerCache::new(&CpuOps, 130, 2).unwrap();
        // blocks 0 and 2 of a prompt, then a step's token; block 1 comes back with the next
        let kept: Vec<u32> = (0..64).chain(128..192).chain([500]).collect();
        append(&mut kv, &kept).unwrap();
        let revived: Vec<u32> = (64..128).chain([501]).collect();
        append(&mut kv, &revived).unwrap();
        let want: Vec<u32> = (0..192).chain([500, 501]).collect();
        assert_eq!(kv.positions, want);
        assert_eq!(keys(&kv), want, "each row's key through the table");
        // a block's rows must come whole and on a block's start, or not at all
        for bad in [(300..310).collect::<Vec<u32>>(), (200..264).collect()] {
            assert!(append(&mut kv, &bad).is_err(), "{:?}..", bad.first());
        }
    }
}
