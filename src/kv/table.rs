//! Block table of one layer: where each 64-token prompt block's KV is, and which fast-tier slots
//! are free. Bookkeeping only, no tensors; the manager (`kv::manager`) moves the bytes.
//!
//! Invariants (each checked here and by a test named after the behaviour):
//! 1. A block is in exactly one state: not computed (absent), host (KV only in the host tier),
//!    in flight (a copy into its slot is running) or fast (its slot holds its KV).
//! 2. A slot is free (on the free list) or owned by exactly one block, in flight or fast.
//! 3. Slots in use never exceed the layer's capacity (its share of the fast-tier budget):
//!    running out is an error (`Exhausted`), never a silent eviction of another block.
//! 4. Freeing a block that holds no slot is an error (`NoSlot`: a double free).
//! 5. An in-flight block cannot be evicted (`InFlight`): its copy is writing the slot; wait for
//!    its completion first.
//! 6. `reset` forgets every block and returns every slot; slots are handed out again after it.

use std::collections::BTreeMap;
use std::fmt;

/// Index of a slot in a layer's fast-tier storage.
pub type Slot = u32;

/// Where one block's KV is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    NotComputed,
    Host,
    InFlight(Slot),
    Fast(Slot),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableError {
    /// Every slot of the layer is in use.
    Exhausted { block: u32, capacity: usize },
    /// The block holds no slot (freeing it twice, or never fetched).
    NoSlot { block: u32 },
    /// The block's copy is still running.
    InFlight { block: u32 },
    /// A fetch of a block whose KV does not exist, or that already holds a slot.
    BadFetch { block: u32, state: Residency },
    /// A completion for a block that is not in flight.
    NotInFlight { block: u32 },
    /// A capacity below the slots in use.
    Shrink { capacity: usize, in_use: usize },
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::Exhausted { block, capacity } => write!(
                f,
                "fast tier exhausted: block {block} needs a slot and all {capacity} are in use"
            ),
            TableError::NoSlot { block } => write!(f, "block {block} holds no fast slot to free"),
            TableError::InFlight { block } => {
                write!(f, "block {block} is in flight and cannot be evicted")
            }
            TableError::BadFetch { block, state } => {
                write!(f, "cannot fetch block {block} in state {state:?}")
            }
            TableError::NotInFlight { block } => {
                write!(f, "completion for block {block}, which is not in flight")
            }
            TableError::Shrink { capacity, in_use } => {
                write!(f, "capacity {capacity} is below the {in_use} slots in use")
            }
        }
    }
}

/// One layer's block table and slot free list.
#[derive(Debug, Clone, Default)]
pub struct BlockTable {
    /// Computed blocks; absent = not computed.
    blocks: BTreeMap<u32, Residency>,
    /// Slots returned and ready for reuse.
    free: Vec<Slot>,
    /// Slots handed out so far (in use or on the free list).
    created: usize,
    /// Most slots the layer may use.
    capacity: usize,
}

impl BlockTable {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Change the capacity (a new request's plan); never below the slots in use.
    pub fn set_capacity(&mut self, capacity: usize) -> Result<(), TableError> {
        let in_use = self.in_use();
        if capacity < in_use {
            return Err(TableError::Shrink { capacity, in_use });
        }
        self.capacity = capacity;
        Ok(())
    }

    pub fn state(&self, block: u32) -> Residency {
        self.blocks
            .get(&block)
            .copied()
            .unwrap_or(Residency::NotComputed)
    }

    /// The block's KV now exists in the host tier (no-op if it is known already).
    pub fn mark_host(&mut self, block: u32) {
        self.blocks.entry(block).or_insert(Residency::Host);
    }

    /// Take a slot for `block` (host → in flight).
    pub fn start_fetch(&mut self, block: u32) -> Result<Slot, TableError> {
        let state = self.state(block);
        if state != Residency::Host {
            return Err(TableError::BadFetch { block, state });
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None if self.created < self.capacity => {
                self.created += 1;
                (self.created - 1) as Slot
            }
            None => {
                return Err(TableError::Exhausted {
                    block,
                    capacity: self.capacity,
                })
            }
        };
        if self.in_use() > self.capacity {
            // a lowered capacity: the free list may hold slots beyond it
            self.free.push(slot);
            return Err(TableError::Exhausted {
                block,
                capacity: self.capacity,
            });
        }
        self.blocks.insert(block, Residency::InFlight(slot));
        Ok(slot)
    }

    /// The copy into `block`'s slot finished (in flight → fast).
    pub fn complete(&mut self, block: u32) -> Result<Slot, TableError> {
        match self.state(block) {
            Residency::InFlight(slot) => {
                self.blocks.insert(block, Residency::Fast(slot));
                Ok(slot)
            }
            _ => Err(TableError::NotInFlight { block }),
        }
    }

    /// Free `block`'s slot (fast → host). The host tier keeps its KV.
    pub fn evict(&mut self, block: u32) -> Result<Slot, TableError> {
        match self.state(block) {
            Residency::Fast(slot) => {
                self.blocks.insert(block, Residency::Host);
                self.free.push(slot);
                Ok(slot)
            }
            Residency::InFlight(_) => Err(TableError::InFlight { block }),
            _ => Err(TableError::NoSlot { block }),
        }
    }

    /// Forget every block; every slot is free again.
    pub fn reset(&mut self) {
        self.blocks.clear();
        self.free = (0..self.created as Slot).rev().collect();
    }

    /// Forget the blocks at or after `block` (a truncated conversation); their slots are freed.
    /// In-flight blocks must have completed.
    pub fn forget_from(&mut self, block: u32) -> Result<(), TableError> {
        let gone: Vec<(u32, Residency)> =
            self.blocks.range(block..).map(|(&b, &r)| (b, r)).collect();
        for (b, r) in gone {
            match r {
                Residency::InFlight(_) => return Err(TableError::InFlight { block: b }),
                Residency::Fast(slot) => self.free.push(slot),
                _ => {}
            }
            self.blocks.remove(&b);
        }
        Ok(())
    }

    /// Slots owned by a block (in flight or fast).
    pub fn in_use(&self) -> usize {
        self.created - self.free.len()
    }

    /// Slots ever created: the storage the layer's fast tier holds.
    pub fn created(&self) -> usize {
        self.created
    }

    /// Blocks in flight.
    pub fn in_flight(&self) -> impl Iterator<Item = u32> + '_ {
        (self.blocks.iter())
            .filter(|(_, r)| matches!(r, Residency::InFlight(_)))
            .map(|(&b, _)| b)
    }

    /// Blocks holding a slot (in flight or fast), ascending.
    pub fn holding(&self) -> impl Iterator<Item = u32> + '_ {
        (self.blocks.iter())
            .filter(|(_, r)| matches!(r, Residency::InFlight(_) | Residency::Fast(_)))
            .map(|(&b, _)| b)
    }

    /// Computed blocks (any state but not computed).
    pub fn computed(&self) -> usize {
        self.blocks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_with_host(capacity: usize, blocks: &[u32]) -> BlockTable {
        let mut t = BlockTable::new(capacity);
        for &b in blocks {
            t.mark_host(b);
        }
        t
    }

    #[test]
    fn fetch_complete_evict_moves_a_block_through_its_states() {
        let mut t = table_with_host(2, &[3]);
        assert_eq!(t.state(3), Residency::Host);
        let s = t.start_fetch(3).unwrap();
        assert_eq!(t.state(3), Residency::InFlight(s));
        assert_eq!(t.complete(3).unwrap(), s);
        assert_eq!(t.state(3), Residency::Fast(s));
        assert_eq!(t.evict(3).unwrap(), s);
        assert_eq!(t.state(3), Residency::Host);
        assert_eq!(t.in_use(), 0);
        assert_eq!(t.state(9), Residency::NotComputed);
    }

    #[test]
    fn exhaustion_is_an_error_and_evicts_nothing() {
        let mut t = table_with_host(2, &[0, 1, 2]);
        t.start_fetch(0).unwrap();
        t.start_fetch(1).unwrap();
        assert_eq!(
            t.start_fetch(2),
            Err(TableError::Exhausted {
                block: 2,
                capacity: 2
            })
        );
        assert_eq!(t.state(2), Residency::Host);
        assert!(matches!(t.state(0), Residency::InFlight(_)));
        assert!(matches!(t.state(1), Residency::InFlight(_)));
        assert_eq!(t.in_use(), 2);
    }

    #[test]
    fn double_free_is_an_error() {
        let mut t = table_with_host(1, &[0]);
        t.start_fetch(0).unwrap();
        t.complete(0).unwrap();
        t.evict(0).unwrap();
        assert_eq!(t.evict(0), Err(TableError::NoSlot { block: 0 }));
        assert_eq!(t.evict(7), Err(TableError::NoSlot { block: 7 }));
        // the slot went back to the free list once, not twice
        assert_eq!(t.in_use(), 0);
        t.mark_host(1);
        t.start_fetch(0).unwrap();
        assert!(t.start_fetch(1).is_err());
    }

    #[test]
    fn evicting_an_in_flight_block_is_an_error() {
        let mut t = table_with_host(1, &[0]);
        let s = t.start_fetch(0).unwrap();
        assert_eq!(t.evict(0), Err(TableError::InFlight { block: 0 }));
        assert_eq!(t.state(0), Residency::InFlight(s));
        assert_eq!(t.forget_from(0), Err(TableError::InFlight { block: 0 }));
    }

    #[test]
    fn fetching_an_uncomputed_or_held_block_is_an_error() {
        let mut t = table_with_host(4, &[0]);
        assert!(matches!(t.start_fetch(5), Err(TableError::BadFetch { .. })));
        t.start_fetch(0).unwrap();
        assert!(matches!(t.start_fetch(0), Err(TableError::BadFetch { .. })));
        assert_eq!(t.complete(5), Err(TableError::NotInFlight { block: 5 }));
    }

    #[test]
    fn slots_are_reused_after_reset() {
        let mut t = table_with_host(2, &[0, 1]);
        t.start_fetch(0).unwrap();
        t.start_fetch(1).unwrap();
        t.complete(0).unwrap();
        t.reset();
        assert_eq!(t.in_use(), 0);
        assert_eq!(t.state(0), Residency::NotComputed);
        t.mark_host(10);
        t.mark_host(11);
        let a = t.start_fetch(10).unwrap();
        let b = t.start_fetch(11).unwrap();
        assert!(a < 2 && b < 2 && a != b, "slots {a} {b} are the old ones");
        assert_eq!(t.created(), 2, "no new storage after a reset");
    }

    #[test]
    fn capacity_cannot_shrink_below_the_slots_in_use() {
        let mut t = table_with_host(2, &[0, 1]);
        t.start_fetch(0).unwrap();
        t.start_fetch(1).unwrap();
        assert!(t.set_capacity(1).is_err());
        t.set_capacity(3).unwrap();
        t.complete(0).unwrap();
        t.evict(0).unwrap();
        t.set_capacity(1).unwrap();
    }

    #[test]
    fn forget_from_frees_the_slots_of_later_blocks() {
        let mut t = table_with_host(3, &[0, 1, 2]);
        for b in 0..3 {
            t.start_fetch(b).unwrap();
            t.complete(b).unwrap();
        }
        t.forget_from(1).unwrap();
        assert_eq!(t.in_use(), 1);
        assert_eq!(t.holding().collect::<Vec<_>>(), vec![0]);
        assert_eq!(t.state(2), Residency::NotComputed);
    }
}
