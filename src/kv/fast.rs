//! Fast-tier storage of one slim layer: slots, each one prompt block's K and V (block_size rows,
//! 16-bit), holding the blocks decode attends to; and the rows past the prompt (generated
//! tokens, later turns' tokens), which always stay fast. Attention reads the slots of the active
//! blocks in position order, then the rows past the prompt, as runs of rows ([`KeyRun`]): no
//! contiguous copy is built, and the kernel's result does not depend on the cut.
//!
//! A slot's buffer is moved to the offload worker while its copy runs (in flight) and moved back
//! with the completion, so the worker and the forward never share a buffer.

use crate::backend::decode_attention::KeyRun;

/// One slot's storage: K and V of up to `block_size` rows, and how many rows it holds (the
/// prompt's last block may be short).
#[derive(Debug, Clone)]
pub struct SlotBuf {
    /// (block_size, kv_dim)
    pub k: Vec<u16>,
    /// (block_size, kv_dim)
    pub v: Vec<u16>,
    pub rows: usize,
}

impl SlotBuf {
    pub fn new(block_size: usize, kv_dim: usize) -> Self {
        Self {
            k: vec![0; block_size * kv_dim],
            v: vec![0; block_size * kv_dim],
            rows: 0,
        }
    }
}

/// The fast tier of one slim layer.
#[derive(Debug, Default)]
pub struct FastLayer {
    /// By slot index; None while the slot's buffer is with the worker.
    slots: Vec<Option<SlotBuf>>,
    /// Rows past the prompt: (rows, kv_dim) each, positions ascending.
    tail_k: Vec<u16>,
    tail_v: Vec<u16>,
    tail_pos: Vec<u32>,
}

impl FastLayer {
    /// The buffer of `slot`, created on first use, to fill (locally or by the worker).
    pub fn take_slot(&mut self, slot: u32, block_size: usize, kv_dim: usize) -> SlotBuf {
        let i = slot as usize;
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
            self.slots[i] = Some(SlotBuf::new(block_size, kv_dim));
        }
        self.slots[i]
            .take()
            .unwrap_or_else(|| SlotBuf::new(block_size, kv_dim))
    }

    /// Give a filled buffer back to its slot.
    pub fn put_slot(&mut self, slot: u32, buf: SlotBuf) {
        let i = slot as usize;
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, || None);
        }
        self.slots[i] = Some(buf);
    }

    /// Rows of `slot` as a run, if its buffer is here.
    pub fn slot_run(&self, slot: u32, kv_dim: usize) -> Option<KeyRun<'_>> {
        let b = self.slots.get(slot as usize)?.as_ref()?;
        Some(KeyRun {
            k: &b.k[..b.rows * kv_dim],
            v: &b.v[..b.rows * kv_dim],
        })
    }

    /// The rows past the prompt as one run.
    pub fn tail_run(&self) -> KeyRun<'_> {
        KeyRun {
            k: &self.tail_k,
            v: &self.tail_v,
        }
    }

    pub fn tail_rows(&self) -> usize {
        self.tail_pos.len()
    }

    /// Append rows past the prompt (already in the cache's dtype), positions ascending.
    pub fn append_tail(&mut self, k: &[u16], v: &[u16], positions: &[u32]) {
        self.tail_k.extend_from_slice(k);
        self.tail_v.extend_from_slice(v);
        self.tail_pos.extend_from_slice(positions);
    }

    /// Drop the rows past the prompt at positions >= `pos`.
    pub fn truncate_tail(&mut self, pos: u32) {
        let keep = self.tail_pos.partition_point(|&p| p < pos);
        if keep < self.tail_pos.len() {
            let kv_dim = self.tail_k.len() / self.tail_pos.len();
            self.tail_k.truncate(keep * kv_dim);
            self.tail_v.truncate(keep * kv_dim);
            self.tail_pos.truncate(keep);
        }
    }

    /// Forget the rows past the prompt (slots are reused through the block table).
    pub fn clear_tail(&mut self) {
        self.tail_k.clear();
        self.tail_v.clear();
        self.tail_pos.clear();
    }

    /// Bytes this layer's fast tier holds: every slot created (free or not) plus the tail.
    pub fn bytes(&self, slots_created: usize, slot_bytes: usize) -> usize {
        slots_created * slot_bytes + (self.tail_k.len() + self.tail_v.len()) * 2
    }
}
