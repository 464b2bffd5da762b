//! What the SlimInfer session reads and changes of the ops forward: a layer's paged cache as
//! it scores it ([`OpsKeys`]: the backend scores, the host chooses), the hidden rows it keeps
//! ([`OpsHidden`]), and the slot table of a decode set ([`slot_subset`]).

use std::borrow::Cow;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::backend::ops::{Heads, Ops, RowSlice, ScoreMode, UnitBlocks, KV_BLOCK};
use crate::backend::paged_kv::LayerCache;
use crate::backend::score::WindowPool;
use crate::kv::policy::Held;
use crate::kv::policy::RowChange;
use crate::slim::schedule::ScoreKind;
use crate::slim::score::{ScoreRequest, ScoredLayer};
use crate::slim::session::{HiddenRows, KeptRows};
use crate::{Error, Result};

use super::{OpProbe, ZerosU32};

/// The rows a prefill's change keeps: a prompt's first forward prunes, and brings nothing
/// back (revival happens in later forwards, [`super::OpsLlama::extend`]).
pub(super) fn kept_only(change: RowChange) -> Result<Vec<usize>> {
    if change.insert.is_some() {
        return Err(Error::Engine(
            "ops forward: a stage brought back pruned rows during the prompt's prefill".into(),
        ));
    }
    Ok(change.keep)
}

/// Whether `ranges` are every one of a layer's `rows` rows.
pub(super) fn every_row(ranges: &[Range<usize>], rows: usize) -> bool {
    matches!(ranges, [r] if *r == (0..rows))
}

/// The slot table of the rows `ranges` of a layer (sorted, disjoint; every range but the last
/// starts and ends on a slot's boundary, as a stage's whole blocks do), and how many rows it
/// holds: attention over a decode set is attention over this table.
pub(super) fn slot_subset(table: &[u32], ranges: &[Range<usize>]) -> Result<(Vec<u32>, usize)> {
    let mut slots = Vec::new();
    let mut rows = 0;
    for (i, r) in ranges.iter().enumerate() {
        let last = i + 1 == ranges.len();
        if r.start % KV_BLOCK != 0 || (!last && r.end % KV_BLOCK != 0) {
            return Err(Error::Engine(format!(
                "ops forward: attended rows {r:?} do not fall on {KV_BLOCK}-row slots"
            )));
        }
        slots.extend_from_slice(&table[r.start / KV_BLOCK..r.end.div_ceil(KV_BLOCK)]);
        rows += r.len();
    }
    Ok((slots, rows))
}

/// A layer's paged cache as the session scores it: the backend scores the queries over the
/// layer's prompt rows where the keys are; the host gets one score per block.
pub(super) struct OpsKeys<'a, O: Ops> {
    pub(super) ops: &'a O,
    pub(super) kv: &'a LayerCache<O>,
    pub(super) heads: Heads,
    /// The forward's probe: scoring's upload, kernels and download are parts of their own.
    pub(super) probe: Option<&'a OpProbe>,
    /// Scores computed before the session asked, from the query where the forward left it
    /// (a decode step's newest query, scored before it was downloaded): returned when the
    /// session asks for the same query and request.
    pub(super) ready: Option<ReadyScores>,
    /// Counts the askings [`Self::ready`] answered.
    pub(super) ready_used: Option<&'a AtomicUsize>,
}

/// Block scores of one query, computed ahead (see [`OpsKeys::ready`]).
pub(super) struct ReadyScores {
    pub(super) q: Vec<f32>,
    pub(super) req: ScoreRequest,
    pub(super) scores: Vec<(u32, f32)>,
}

/// Scoring issued on the backend, not yet read: per-block sums and the blocks they belong to
/// (the layer's kept unit blocks, or those of its rows now).
pub(super) struct IssuedScores<'a, O: Ops> {
    acc: O::F32,
    ids: Cow<'a, [u32]>,
}

impl<'a, O: Ops> OpsKeys<'a, O> {
    fn mark(&self, part: &'static str) -> Result<()> {
        self.probe.map_or(Ok(()), |p| p.mark(self.ops, part))
    }

    /// Issue the block scores of the queries at `window` of `q` (post-RoPE, on the backend) over the layer's prompt rows; None where there is nothing to score.
    pub(super) fn issue(
        &self,
        q: &O::Act,
        window: RowSlice,
        req: &ScoreRequest,
    ) -> Result<Option<IssuedScores<'a, O>>> {
        let (ops, kv, heads) = (self.ops, self.kv, self.heads);
        let prompt_rows = (kv.positions).partition_point(|&p| (p as usize) < req.prompt_len);
        if prompt_rows == 0 || window.rows == 0 {
            return Ok(None);
        }
        let mode = match (req.kind, req.pool) {
            (ScoreKind::Attention, WindowPool::Mean) => ScoreMode::Attention,
            (ScoreKind::Attention, WindowPool::Max) => ScoreMode::AttentionMax,
            (ScoreKind::Paper, _) => ScoreMode::Paper,
        };
        let mut acc = ops.zeros_f32(req.prompt_len.div_ceil(KV_BLOCK))?;
        let cached = (kv.units.as_ref())
            .filter(|u| u.prompt_rows == prompt_rows && u.unit_size == req.unit_size);
        let ids = match cached {
            Some(u) => {
                ops.unit_scores(q, window, &u.keys, &u.units, heads, mode, &mut acc)?;
                Cow::Borrowed(&u.units.ids[..])
            }
            None if kv.host.is_some() => {
                return Err(Error::Engine(format!(
                    "ops forward: a tiered layer scored in units of {} without its unit keys",
                    req.unit_size
                )))
            }
            None => {
                let units = UnitBlocks::from_positions(
                    &kv.positions[..prompt_rows],
                    KV_BLOCK,
                    req.unit_size,
                );
                ops.block_scores(
                    q,
                    window,
                    &kv.pool,
                    &kv.table_dev,
                    prompt_rows,
                    &units,
                    req.unit_size,
                    heads,
                    mode,
                    &mut acc,
                )?;
                Cow::Owned(units.ids)
            }
        };
        self.mark("scores: kernels")?;
        Ok(Some(IssuedScores { acc, ids }))
    }

    /// The scores an [`Self::issue`] left on the backend, by block id ascending.
    pub(super) fn collect(&self, issued: Option<IssuedScores<O>>) -> Result<Vec<(u32, f32)>> {
        let Some(IssuedScores { acc, ids }) = issued else {
            return Ok(Vec::new());
        };
        let sums = self.ops.download_f32(&acc)?;
        self.mark("scores: download")?;
        Ok(ids.iter().map(|&b| (b, sums[b as usize])).collect())
    }
}

impl<O: Ops> ScoredLayer for OpsKeys<'_, O> {
    fn positions(&self) -> &[u32] {
        &self.kv.positions
    }

    fn block_scores(&self, q: &[f32], req: &ScoreRequest) -> Result<Vec<(u32, f32)>> {
        if let Some(r) = (self.ready.as_ref()).filter(|r| r.req == *req && r.q == q) {
            self.ready_used.map(|n| n.fetch_add(1, Ordering::Relaxed));
            return Ok(r.scores.clone());
        }
        let w = q.len() / self.heads.q_dim();
        if w == 0 {
            return Ok(Vec::new());
        }
        let window = RowSlice {
            rows: w,
            stride: self.heads.q_dim(),
            offset: 0,
        };
        self.mark("session (host)")?;
        let q = self.ops.upload_act(q)?;
        self.mark("scores: upload")?;
        let issued = self.issue(&q, window, req)?;
        self.collect(issued)
    }
}

/// A forward's hidden states on the backend, as the session reads the rows it keeps.
pub(super) struct OpsHidden<'a, O: Ops> {
    pub(super) ops: &'a O,
    pub(super) h: &'a O::F32,
    pub(super) rows: usize,
    pub(super) hidden: usize,
    /// The layer whose MLP the rows have yet to run (a prefill runs it on the rows that go on
    /// only); None: they are that layer's output.
    pub(super) mlp_pending: Option<usize>,
}

impl<O: Ops> HiddenRows for OpsHidden<'_, O> {
    /// The rows gathered into a buffer of their own, held on the backend (on a GPU nothing is
    /// downloaded until a block is revived, [`read_held`]).
    fn keep(&self, rows: &[usize]) -> Result<KeptRows> {
        let ops = self.ops;
        let row_bytes = self.hidden * std::mem::size_of::<f32>();
        let idx = ops.upload_u32(&rows.iter().map(|&r| r as u32).collect::<Vec<_>>())?;
        let pos = ops.upload_u32(&vec![0; self.rows])?;
        let mut out = ops.zeros_f32(rows.len().max(1) * self.hidden)?;
        let mut out_pos = ops.zeros_u32_like(rows.len().max(1))?;
        ops.gather_rows(self.h, &pos, &idx, &mut out, &mut out_pos, self.hidden)?;
        let held = HeldRows::<O> {
            state: Mutex::new((out, self.mlp_pending.map_or(Mlp::Done, Mlp::Pending))),
            rows: rows.len(),
        };
        Ok(KeptRows::Held(Arc::new(held), row_bytes))
    }
}

/// Hidden states [`OpsHidden::keep`] holds on the backend, and whether their layer's MLP has
/// run (the first [`read_held`] runs it).
struct HeldRows<O: Ops> {
    state: Mutex<(O::F32, Mlp)>,
    rows: usize,
}

/// Where held rows stand with their layer's MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mlp {
    Done,
    /// Layer `.0`'s MLP is still to run.
    Pending(usize),
    /// It failed part way: the rows are no layer's output.
    Failed,
}

/// Runs layer `layer`'s MLP on `rows` held rows, in place: `(h, rows, layer)`.
pub(super) type FinishMlp<'a, O> = &'a dyn Fn(&mut <O as Ops>::F32, usize, usize) -> Result<()>;

/// Rows `range` of what an [`OpsHidden`] of this backend held, (range.len(), hidden) f32 on the
/// host, their pending MLP run first by `finish_mlp`; an error for rows held by anyone else.
pub(super) fn read_held<O: Ops>(
    ops: &O,
    held: &Held,
    range: Range<usize>,
    hidden: usize,
    finish_mlp: FinishMlp<O>,
) -> Result<Vec<f32>> {
    let Some(held) = held.downcast_ref::<HeldRows<O>>() else {
        return Err(Error::Engine(
            "ops forward: revived rows held by another backend".into(),
        ));
    };
    let mut state = (held.state.lock())
        .map_err(|_| Error::Engine("ops forward: held rows poisoned by a panic".into()))?;
    let (buf, mlp) = &mut *state;
    match *mlp {
        Mlp::Done => {}
        Mlp::Pending(layer) => {
            *mlp = Mlp::Failed;
            finish_mlp(buf, held.rows, layer)?;
            *mlp = Mlp::Done;
        }
        Mlp::Failed => {
            return Err(Error::Engine(
                "ops forward: revived rows whose MLP failed before".into(),
            ))
        }
    }
    let idx = ops.upload_u32(&range.clone().map(|r| r as u32).collect::<Vec<_>>())?;
    let pos = ops.upload_u32(&vec![0; range.end])?;
    let mut out = ops.zeros_f32(range.len() * hidden)?;
    let mut out_pos = ops.zeros_u32_like(range.len())?;
    ops.gather_rows(buf, &pos, &idx, &mut out, &mut out_pos, hidden)?;
    let mut rows = ops.download_f32(&out)?;
    rows.truncate(range.len() * hidden);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decode_set_is_the_slots_of_its_rows() {
        // a layer's rows in slots 4, 0, 3, 1 (row order); its last slot holds 10 rows
        let table = [4, 0, 3, 1];
        let (slots, rows) = slot_subset(&table, &[0..64, 128..202]).unwrap();
        assert_eq!((slots, rows), (vec![4, 3, 1], 138));
        let (slots, rows) = slot_subset(&table, &[64..128, 192..193]).unwrap();
        assert_eq!((slots, rows), (vec![0, 1], 65));
        // a range that ends inside a slot before the last is not a set of whole blocks
        assert!(slot_subset(&table, &[0..70, 128..202]).is_err());
        assert!(slot_subset(&table, &[10..64, 128..202]).is_err());
    }
}
