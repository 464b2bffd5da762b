//! The ops forward's KV: every layer's paged cache, the prompt it was filled from, the pruning
//! that chose its rows, and where decode keeps them ([`KvPlacement`]: the whole pool, or the
//! fast tier of src/backend/paged_tier.rs with the rest in RAM).

use serde::Serialize;

use super::session_io::OpsKeys;
use super::LlamaShape;
use crate::backend::ops::{Ops, KV_BLOCK};
use crate::backend::paged_kv::LayerCache;
use crate::backend::paged_tier::{SharedSpill, TierCounts, TierSpill};
use crate::slim::session::SlimSession;
use crate::Result;

/// Where decode keeps a pruned prompt's KV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvPlacement {
    /// Every kept row in the device's pool (`--kv-resident`, the reference).
    Resident,
    /// Each slim layer's pool holds its decode set and the rows past the prompt; every kept
    /// prompt block has a copy in RAM, fetched when a step chooses it.
    Tiered,
}

/// The KV of every layer, the prompt it was filled from, and the pruning that chose its rows.
pub struct ModelCache<O: Ops> {
    pub layers: Vec<LayerCache<O>>,
    pub prompt_len: usize,
    /// The prompt's SlimInfer session (None: dense): decode's sets come from it.
    pub session: Option<SlimSession>,
}

/// Ready layer `layer`'s cache for decode once the prefill is done with it: a layer decode
/// scores (a slim layer, or the one before the first stage) keeps its unit keys, and with
/// [`KvPlacement::Tiered`] a slim layer whose decode set is smaller than what its stage kept
/// moves its prompt blocks to RAM and keeps slots for that set only, holding the blocks the
/// set likely starts with, so that the fast tier holds one layer's whole pool at a time during
/// the prefill rather than every layer's (and writes the moved blocks to `spill` too, when
/// there is one).
pub(super) fn ready_for_decode<O: Ops>(
    ops: &O,
    layer: usize,
    kv: &mut LayerCache<O>,
    session: &SlimSession,
    placement: KvPlacement,
    spill: Option<&SharedSpill>,
) -> Result<()> {
    let stages = session.stages();
    let Some(first) = stages.first().map(|s| s.start_layer) else {
        return Ok(());
    };
    if layer + 1 < first {
        return Ok(());
    }
    let prompt_len = session.prompt_len();
    kv.cache_unit_keys(ops, kv.prompt_rows(prompt_len), session.decode_unit_size())?;
    match (
        placement,
        stages.iter().rev().find(|s| s.start_layer <= layer),
    ) {
        (KvPlacement::Tiered, Some(st)) if st.decode_blocks < st.keep_blocks => {
            let stay = session.likely_decode_blocks(layer);
            let spill = spill.map(|file| TierSpill {
                file: file.clone(),
                layer,
            });
            kv.move_to_host_tier(ops, prompt_len, st.decode_blocks, &stay, spill)
        }
        _ => Ok(()),
    }
}

/// Where a cache's KV is, in bytes, and what its host tiers did.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct TierReport {
    /// Keys and values in the device's pools (the fast tier).
    pub fast_bytes: usize,
    /// Keys and values of prompt blocks in RAM (the host tier).
    pub host_bytes: usize,
    pub counts: TierCounts,
}

impl<O: Ops> ModelCache<O> {
    /// Bytes of each tier and the host tiers' work so far.
    pub fn tiers(&self) -> TierReport {
        let mut r = TierReport {
            fast_bytes: self.pool_bytes(),
            ..Default::default()
        };
        for layer in &self.layers {
            r.counts.add(&layer.past_tier);
            if let Some(host) = &layer.host {
                r.host_bytes += host.bytes();
                r.counts.add(&host.counts);
            }
        }
        r
    }

    /// The next token's position.
    pub fn next_position(&self) -> usize {
        (self.layers.first())
            .and_then(|l| l.positions.last())
            .map_or(0, |&p| p as usize + 1)
    }

    /// Bytes of the prompt's K and V (rows below the prompt length), over all layers.
    pub fn prompt_kv_bytes(&self, shape: &LlamaShape) -> usize {
        let rows: usize = (self.layers.iter())
            .map(|l| l.prompt_rows(self.prompt_len))
            .sum();
        rows * shape.kv_row_bytes()
    }

    /// Bytes of every pool (what the cache holds in the device's memory).
    pub fn pool_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.pool.bytes()).sum()
    }

    pub fn rows_per_layer(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.rows).collect()
    }

    /// Forget the rows at positions `pos` and after, in every layer.
    pub fn truncate_from(&mut self, pos: usize) -> Result<()> {
        if self.session.is_some() && pos < self.prompt_len {
            return Err(crate::Error::Engine(format!(
                "kv: cannot cut a pruned prompt of {} tokens at {pos}",
                self.prompt_len
            )));
        }
        for layer in &mut self.layers {
            layer.truncate_from(pos as u32)?;
        }
        Ok(())
    }

    /// Tokens every layer still has room for before its pool grows.
    pub fn room(&self) -> usize {
        (self.layers.iter())
            .map(|l| l.row_blocks() * KV_BLOCK - l.rows)
            .min()
            .unwrap_or(0)
    }

    /// Bytes of K and V a decode step reads now, over all layers: every row of a layer, or the
    /// rows of the blocks its session chose (each slim layer's decode set).
    pub fn attended_kv_bytes(&self, ops: &O, shape: &LlamaShape) -> usize {
        let rows: usize = (self.layers.iter().enumerate())
            .map(|(layer, kv)| match &self.session {
                Some(session) => {
                    let keys = OpsKeys {
                        ops,
                        kv,
                        heads: shape.heads,
                        probe: None,
                        ready: None,
                        ready_used: None,
                    };
                    (session.attended_rows(layer, &keys).iter())
                        .map(|r| r.len())
                        .sum()
                }
                None => kv.rows,
            })
            .sum();
        rows * shape.kv_row_bytes()
    }
}
