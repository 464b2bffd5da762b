//! What the session keeps of the rows a stage prunes, for revival: their hidden states at the
//! stage's input, by block, copied to the host ([`KeptRows::Rows`], the engine's CPU forward) or
//! held where the forward keeps them ([`KeptRows::Held`], the ops forward: on a GPU in its
//! memory), and the rows a revival hands back to the forward ([`Revived`]).

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::backend::with_f32;
use crate::kv::policy::{Held, Revived};
use crate::Result;

/// The hidden states of a forward's rows, wherever they live: what the session keeps of the rows
/// prefill drops, for revival.
pub trait HiddenRows {
    /// Rows `rows` (ascending), kept: copied to the host, or held on the forward's device.
    fn keep(&self, rows: &[usize]) -> Result<KeptRows>;
}

/// Rows a [`HiddenRows`] kept, in the order asked.
pub enum KeptRows {
    /// (rows, hidden) f32 on the host
    Rows(Vec<f32>),
    /// Held by the forward, with the bytes of a row
    Held(Held, usize),
}

impl KeptRows {
    /// Bytes of one row of `n`.
    fn row_bytes(&self, n: usize) -> usize {
        match self {
            Self::Rows(v) => v.len() / n.max(1) * std::mem::size_of::<f32>(),
            Self::Held(_, bytes) => *bytes,
        }
    }
}

impl HiddenRows for Tensor {
    fn keep(&self, rows: &[usize]) -> Result<KeptRows> {
        let hidden = self.dims2()?.1;
        let h = self.contiguous()?;
        let mut out = Vec::with_capacity(rows.len() * hidden);
        with_f32(&h, |h| {
            for &r in rows {
                out.extend_from_slice(&h[r * hidden..(r + 1) * hidden]);
            }
        })?;
        Ok(KeptRows::Rows(out))
    }
}

/// The hidden states of one pruned block at a stage's input.
#[derive(Clone)]
pub(super) struct AuxBlock {
    hidden: AuxRows,
    positions: Vec<u32>,
    /// Bytes of its hidden states.
    pub(super) bytes: usize,
}

impl std::fmt::Debug for AuxBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = match &self.hidden {
            AuxRows::Rows(_) => "host",
            AuxRows::Held(..) => "held",
        };
        let (rows, bytes) = (self.positions.len(), self.bytes);
        write!(f, "AuxBlock({rows} rows, {bytes} bytes, {place})")
    }
}

/// Where a pruned block's hidden states are kept.
#[derive(Clone)]
enum AuxRows {
    /// (rows, hidden) on the host
    Rows(Vec<f32>),
    /// Rows `range` of what the forward holds
    Held(Held, Range<usize>),
}

/// `kept`, the rows `rows` (ascending) of a forward at `positions`, grouped by the block
/// `block_of(row)` each belongs to (a block's rows are consecutive among `rows`).
pub(super) fn group_by_block(
    kept: KeptRows,
    positions: &[u32],
    rows: &[usize],
    block_of: impl Fn(usize) -> u32,
) -> BTreeMap<u32, AuxBlock> {
    let row_bytes = kept.row_bytes(rows.len());
    let floats = row_bytes / std::mem::size_of::<f32>();
    let mut out: BTreeMap<u32, AuxBlock> = BTreeMap::new();
    for (i, &r) in rows.iter().enumerate() {
        let block = out.entry(block_of(r)).or_insert(AuxBlock {
            hidden: match &kept {
                KeptRows::Rows(_) => AuxRows::Rows(Vec::new()),
                KeptRows::Held(held, _) => AuxRows::Held(held.clone(), i..i),
            },
            positions: Vec::new(),
            bytes: 0,
        });
        match (&mut block.hidden, &kept) {
            (AuxRows::Rows(v), KeptRows::Rows(all)) => {
                v.extend_from_slice(&all[i * floats..(i + 1) * floats])
            }
            (AuxRows::Held(_, range), _) => range.end = i + 1,
            _ => unreachable!("one kind of kept rows"),
        }
        block.positions.push(positions[r]);
        block.bytes += row_bytes;
    }
    out
}

/// The rows of revived `blocks` (in order) as the forward takes them, with their positions;
/// None when they hold none.
pub(super) fn revived(blocks: Vec<AuxBlock>) -> Result<Option<(Revived, Vec<u32>)>> {
    let (mut rows, mut held, mut positions) = (Vec::new(), Vec::new(), Vec::new());
    for block in blocks {
        match block.hidden {
            AuxRows::Rows(h) => rows.extend(h),
            AuxRows::Held(h, range) => held.push((h, range)),
        }
        positions.extend(block.positions);
    }
    if positions.is_empty() {
        return Ok(None);
    }
    let revived = match (rows.is_empty(), held.is_empty()) {
        (false, true) => {
            let (n, width) = (positions.len(), rows.len() / positions.len());
            Revived::Rows(Tensor::from_vec(rows, (n, width), &Device::Cpu)?)
        }
        (true, false) => Revived::Held(held),
        _ => {
            return Err(crate::Error::Engine(
                "slim: revived rows kept in two places".into(),
            ))
        }
    };
    Ok(Some((revived, positions)))
}
