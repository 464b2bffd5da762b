//! The ops forward's KV manager: after a pruned prefill, a slim layer's fast tier (its pool, in
//! the device's memory) keeps only the blocks decode attends to and the rows past the prompt;
//! every kept prompt block has its copy in the host tier ([`HostTier`], RAM), from which a
//! block a decode step newly chooses is fetched into a free or evicted slot before the layer
//! attends (the blocks its first set likely holds stay in the pool from the prefill on). The
//! layer's unit keys (what decode scores every kept block with) are computed once from the
//! whole pool before it shrinks ([`CachedUnits`]), so choosing never needs a block's rows. A decode over the tiers reads the same keys and values as one over the whole pool:
//! the logits are the same bit for bit (tests/ops_reference.rs).
//!
//! Row blocks: row block `r` of a layer holds its rows `64r..64r + 64` (a kept prompt block
//! when all of them are prompt rows). Those before the first row block that holds a row past
//! the prompt, or the prompt's partial last block, can move to the host; that row block and
//! every later one (the rows decode writes) stay in the fast tier.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use super::ops::{KvPool, Ops, UnitBlocks, KV_BLOCK};
use super::paged_kv::{with_more_slots, LayerCache};
use super::spill_file::SpillFile;
use crate::{Error, Result};

/// A row block's slot-table entry while its rows are only in the host tier.
pub const ON_HOST: u32 = u32::MAX;

/// A layer's unit keys: the mean key of each unit of its prompt rows, kept for decode's scoring.
pub struct CachedUnits<O: Ops> {
    /// Prompt rows and unit size they were computed for.
    pub prompt_rows: usize,
    pub unit_size: usize,
    pub units: UnitBlocks,
    /// (units.n_units(), kv_dim) f32, where the keys were.
    pub keys: O::F32,
}

/// Work of a layer's host tier.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct TierCounts {
    /// Blocks copied to the host when the layer was tiered, and their bytes.
    pub offloaded_blocks: usize,
    pub offloaded_bytes: usize,
    /// Blocks copied back into the fast tier, and their bytes.
    pub fetched_blocks: usize,
    pub fetched_bytes: usize,
    /// Blocks whose slot was given to another (their copy stays on the host).
    pub evicted_blocks: usize,
    /// Times the fast tier had to grow (a raised ratio's larger decode set).
    pub grown: usize,
    /// Microseconds the forward spent on offloads (in the prefill; on a GPU the copies
    /// themselves run behind the layers that follow) and waiting for fetches (in decode).
    pub offload_us: usize,
    pub fetch_us: usize,
    /// Host blocks also written to the spill file, and their bytes; blocks not written because
    /// the file is at its cap, or because the backend's host blocks are not process memory.
    pub spilled_blocks: usize,
    pub spilled_bytes: usize,
    pub spill_skipped: usize,
    pub spill_unsupported: usize,
    /// Fetched blocks read back from the spill file, and those of them that failed their CRC
    /// (the RAM copy was used).
    pub spill_reads: usize,
    pub spill_corrupt: usize,
    /// Layers that gave their host tier up for a revival and hold every row in the fast tier.
    pub untiered: usize,
}

impl TierCounts {
    pub fn add(&mut self, o: &TierCounts) {
        self.offloaded_blocks += o.offloaded_blocks;
        self.offloaded_bytes += o.offloaded_bytes;
        self.fetched_blocks += o.fetched_blocks;
        self.fetched_bytes += o.fetched_bytes;
        self.evicted_blocks += o.evicted_blocks;
        self.grown += o.grown;
        self.offload_us += o.offload_us;
        self.fetch_us += o.fetch_us;
        self.spilled_blocks += o.spilled_blocks;
        self.spilled_bytes += o.spilled_bytes;
        self.spill_skipped += o.spill_skipped;
        self.spill_unsupported += o.spill_unsupported;
        self.spill_reads += o.spill_reads;
        self.spill_corrupt += o.spill_corrupt;
        self.untiered += o.untiered;
    }

    /// What was done after `earlier` (a reading of the same counters).
    pub fn since(&self, earlier: &TierCounts) -> TierCounts {
        TierCounts {
            offloaded_blocks: self.offloaded_blocks - earlier.offloaded_blocks,
            offloaded_bytes: self.offloaded_bytes - earlier.offloaded_bytes,
            fetched_blocks: self.fetched_blocks - earlier.fetched_blocks,
            fetched_bytes: self.fetched_bytes - earlier.fetched_bytes,
            evicted_blocks: self.evicted_blocks - earlier.evicted_blocks,
            grown: self.grown - earlier.grown,
            offload_us: self.offload_us - earlier.offload_us,
            fetch_us: self.fetch_us - earlier.fetch_us,
            spilled_blocks: self.spilled_blocks - earlier.spilled_blocks,
            spilled_bytes: self.spilled_bytes - earlier.spilled_bytes,
            spill_skipped: self.spill_skipped - earlier.spill_skipped,
            spill_unsupported: self.spill_unsupported - earlier.spill_unsupported,
            spill_reads: self.spill_reads - earlier.spill_reads,
            spill_corrupt: self.spill_corrupt - earlier.spill_corrupt,
            untiered: self.untiered - earlier.untiered,
        }
    }

    /// Blocks copied between the tiers, either way.
    pub fn blocks_moved(&self) -> usize {
        self.offloaded_blocks + self.fetched_blocks
    }

    /// Bytes copied between the tiers, either way.
    pub fn bytes_copied(&self) -> usize {
        self.offloaded_bytes + self.fetched_bytes
    }
}

/// The spill file the host tiers of one cache share (`[kv] spill`).
pub type SharedSpill = Arc<Mutex<SpillFile>>;

/// Where a layer's host tier also writes its blocks: the shared file and the layer's index in it.
#[derive(Clone)]
pub struct TierSpill {
    pub file: SharedSpill,
    pub layer: usize,
}

/// A layer's host tier: the copy of each of its prompt row blocks (host block `r` holds row
/// block `r`), and with a spill file a second copy of each there.
pub struct HostTier<O: Ops> {
    /// Row blocks before this one are host-backed; it and later ones stay fast.
    pub first_fast: usize,
    blocks: O::HostBlocks,
    /// Bytes of one block's keys and values.
    block_bytes: usize,
    spill: Option<TierSpill>,
    pub counts: TierCounts,
}

impl<O: Ops> HostTier<O> {
    /// Bytes of the copies it holds.
    pub fn bytes(&self) -> usize {
        self.first_fast * self.block_bytes
    }
}

impl<O: Ops> LayerCache<O> {
    /// Row blocks: how many the layer's table lists (its capacity in blocks of rows).
    pub fn row_blocks(&self) -> usize {
        self.table.len()
    }

    /// Rows at positions below `prompt_len`.
    pub fn prompt_rows(&self, prompt_len: usize) -> usize {
        (self.positions).partition_point(|&p| (p as usize) < prompt_len)
    }

    /// For a tiered layer, a pool holding every row block in row order (slot r: row block r),
    /// the resident blocks copied from the fast pool and the others from the host tier: what a
    /// backend that reads a subset as the layer's rows reads (a follow-up's several rows). None
    /// for a layer without a host tier (its own pool holds every row).
    pub fn whole_pool(&self, ops: &O) -> Result<Option<KvPool<O>>> {
        let Some(host) = &self.host else {
            return Ok(None);
        };
        let (mut resident, mut on_host) = (Vec::new(), Vec::new());
        for (r, &slot) in self.table.iter().enumerate() {
            match slot {
                ON_HOST if r < host.first_fast => on_host.push((r, r as u32)),
                ON_HOST => {
                    return Err(Error::Engine(format!(
                        "kv tier: row block {r} is neither fast nor on the host"
                    )))
                }
                slot => resident.push((slot, r as u32)),
            }
        }
        let mut whole = ops.kv_pool_regrouped(&self.pool, &resident, self.table.len())?;
        if !on_host.is_empty() {
            ops.kv_fetch(&host.blocks, &on_host, &mut whole)?;
        }
        Ok(Some(whole))
    }

    /// Bring every row block of a tiered layer back into one pool, in row order, and drop its
    /// host tier (a revival inserts blocks among the prompt's rows, which the host tier's
    /// numbering by row block cannot follow): the layer then holds all its rows in the fast
    /// tier. Its host tier's work stays counted.
    pub fn untier(&mut self, ops: &O) -> Result<()> {
        let Some(whole) = self.whole_pool(ops)? else {
            return Ok(());
        };
        if let Some(host) = self.host.take() {
            self.past_tier.add(&host.counts);
            self.past_tier.untiered += 1;
        }
        self.pool = whole;
        self.set_table(ops, (0..self.table.len() as u32).collect())
    }

    /// Compute and keep the unit keys of the layer's first `prompt_rows` rows, in units of
    /// `unit_size` rows (decode's scoring then reads these instead of the pool).
    pub fn cache_unit_keys(&mut self, ops: &O, prompt_rows: usize, unit_size: usize) -> Result<()> {
        if prompt_rows == 0 {
            return Ok(());
        }
        let units = UnitBlocks::from_positions(&self.positions[..prompt_rows], KV_BLOCK, unit_size);
        let mut keys = ops.zeros_f32(units.n_units() * self.pool.kv_dim)?;
        ops.unit_keys(
            &self.pool,
            &self.table_dev,
            prompt_rows,
            unit_size,
            &mut keys,
        )?;
        self.units = Some(CachedUnits {
            prompt_rows,
            unit_size,
            units,
            keys,
        });
        Ok(())
    }

    /// Move the layer's full prompt row blocks (those before the block holding `prompt_len`'s
    /// row, or the first past the prompt) to a host tier, and shrink the pool to
    /// `fast_prompt_blocks` slots for them plus a slot for each later row block. Every prompt
    /// row block gets its copy on the host; those of prompt blocks `stay` (block ids) also keep
    /// their rows in the pool while its slots last, the others wait for decode to fetch them.
    /// With `spill`, every host block is also written to the spill file.
    pub fn move_to_host_tier(
        &mut self,
        ops: &O,
        prompt_len: usize,
        fast_prompt_blocks: usize,
        stay: &[u32],
        spill: Option<TierSpill>,
    ) -> Result<()> {
        if self.host.is_some() {
            return Ok(());
        }
        let t = Instant::now();
        let first_fast = self.prompt_rows(prompt_len) / KV_BLOCK;
        let tail = self.row_blocks() - first_fast;
        let mut blocks = ops.kv_offload(&self.pool, &self.table[..first_fast])?;
        let block_bytes = KV_BLOCK * self.pool.row_bytes();
        // the fast pool: the staying prompt blocks' slots first, then a slot per later block
        let mut table = vec![ON_HOST; self.row_blocks()];
        let mut moves = Vec::with_capacity(fast_prompt_blocks + tail);
        for (r, &old) in self.table[..first_fast].iter().enumerate() {
            let block = self.positions[r * KV_BLOCK] / KV_BLOCK as u32;
            if moves.len() < fast_prompt_blocks && stay.contains(&block) {
                table[r] = moves.len() as u32;
                moves.push((old, table[r]));
            }
        }
        for (i, r) in (first_fast..self.row_blocks()).enumerate() {
            table[r] = (fast_prompt_blocks + i) as u32;
            moves.push((self.table[r], table[r]));
        }
        self.pool = ops.kv_pool_regrouped(&self.pool, &moves, fast_prompt_blocks + tail)?;
        self.set_table(ops, table)?;
        let mut counts = TierCounts {
            offloaded_blocks: first_fast,
            offloaded_bytes: first_fast * block_bytes,
            ..Default::default()
        };
        if let Some(spill) = &spill {
            write_to_spill(ops, &mut blocks, first_fast, spill, &mut counts);
        }
        counts.offload_us = t.elapsed().as_micros() as usize;
        self.host = Some(HostTier {
            first_fast,
            block_bytes,
            spill,
            counts,
            blocks,
        });
        Ok(())
    }

    /// Make row blocks `needed` (ascending) resident before the layer attends to them: each
    /// one on the host only takes a free slot, or the slot of a resident prompt block that is
    /// not needed (evicted: its copy stays on the host), or, when none is left, a slot of a
    /// grown pool; its rows are fetched from the host. A layer without a host tier has every
    /// row block resident.
    pub fn make_resident(&mut self, ops: &O, needed: &[usize]) -> Result<()> {
        let Some(host) = self.host.as_mut() else {
            return Ok(());
        };
        let missing: Vec<usize> = (needed.iter().copied())
            .filter(|&r| self.table.get(r) == Some(&ON_HOST))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if let Some(&r) = missing.iter().find(|&&r| r >= host.first_fast) {
            return Err(Error::Engine(format!(
                "kv tier: row block {r} is neither fast nor on the host"
            )));
        }
        let t = Instant::now();
        let mut used = vec![false; self.pool.slots];
        for &s in self.table.iter().filter(|&&s| s != ON_HOST) {
            used[s as usize] = true;
        }
        let mut free: Vec<u32> = (0..self.pool.slots as u32)
            .filter(|&s| !used[s as usize])
            .rev()
            .collect();
        // resident prompt blocks that this step does not read, oldest row first
        let mut evictable: Vec<usize> = (0..host.first_fast)
            .filter(|&r| self.table[r] != ON_HOST && needed.binary_search(&r).is_err())
            .rev()
            .collect();
        let mut table = self.table.clone();
        let mut fetch = Vec::with_capacity(missing.len());
        let mut short = 0;
        for &r in &missing {
            let slot = if let Some(s) = free.pop() {
                s
            } else if let Some(e) = evictable.pop() {
                host.counts.evicted_blocks += 1;
                std::mem::replace(&mut table[e], ON_HOST)
            } else {
                short += 1;
                ON_HOST
            };
            table[r] = slot;
            fetch.push(r);
        }
        if short > 0 {
            // a larger set than the fast tier was sized for: grow it by what is missing
            let pool = with_more_slots(ops, &self.pool, short)?;
            let mut next = self.pool.slots as u32;
            for &r in &fetch {
                if table[r] == ON_HOST {
                    table[r] = next;
                    next += 1;
                }
            }
            self.pool = pool;
            host.counts.grown += 1;
        }
        if let Some(spill) = &host.spill {
            read_from_spill(ops, &mut host.blocks, &fetch, spill, &mut host.counts);
        }
        let writes: Vec<(usize, u32)> = fetch.iter().map(|&r| (r, table[r])).collect();
        ops.kv_fetch(&host.blocks, &writes, &mut self.pool)?;
        host.counts.fetched_blocks += fetch.len();
        host.counts.fetched_bytes += fetch.len() * host.block_bytes;
        self.set_table(ops, table)?;
        if let Some(host) = self.host.as_mut() {
            host.counts.fetch_us += t.elapsed().as_micros() as usize;
        }
        Ok(())
    }

    fn set_table(&mut self, ops: &O, table: Vec<u32>) -> Result<()> {
        self.table_dev = ops.upload_u32(&table)?;
        self.table = table;
        Ok(())
    }
}

/// Write host blocks `0..n` to the spill file, until it is full (or the backend's blocks are
/// not process memory).
fn write_to_spill<O: Ops>(
    ops: &O,
    blocks: &mut O::HostBlocks,
    n: usize,
    spill: &TierSpill,
    counts: &mut TierCounts,
) {
    let mut file = spill.file.lock().unwrap_or_else(|e| e.into_inner());
    for r in 0..n {
        let Some((k, v)) = ops.host_block_words(blocks, r) else {
            counts.spill_unsupported += n - r;
            return;
        };
        let bytes = (k.len() + v.len()) * 2;
        if file.write(spill.layer, r as u32, k, v).is_err() {
            counts.spill_skipped += n - r;
            return;
        }
        counts.spilled_blocks += 1;
        counts.spilled_bytes += bytes;
    }
}

/// Before host blocks `fetch` go back to the fast tier, read each one the spill file holds
/// from there over its RAM copy; a block that fails its CRC keeps the RAM copy (counted).
fn read_from_spill<O: Ops>(
    ops: &O,
    blocks: &mut O::HostBlocks,
    fetch: &[usize],
    spill: &TierSpill,
    counts: &mut TierCounts,
) {
    let file = spill.file.lock().unwrap_or_else(|e| e.into_inner());
    for &r in fetch {
        if !file.contains(spill.layer, r as u32) {
            continue;
        }
        let Some((k, v)) = ops.host_block_words(blocks, r) else {
            return;
        };
        let (mut rk, mut rv) = (vec![0; k.len()], vec![0; v.len()]);
        if file.read(spill.layer, r as u32, &mut rk, &mut rv) {
            k.copy_from_slice(&rk);
            v.copy_from_slice(&rv);
            counts.spill_reads += 1;
        } else {
            counts.spill_corrupt += 1;
        }
    }
}

/// The row blocks that `ranges` (sorted row ranges) touch, ascending.
pub fn row_blocks_of(ranges: &[std::ops::Range<usize>]) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for r in ranges.iter().filter(|r| !r.is_empty()) {
        for b in r.start / KV_BLOCK..r.end.div_ceil(KV_BLOCK) {
            if out.last() != Some(&b) {
                out.push(b);
            }
        }
    }
    out
}
