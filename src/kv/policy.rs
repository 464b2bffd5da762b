//! The seam between the forward and whoever decides, between layers, which rows go on and which
//! cached rows a layer attends to: [`LayerPolicy`] (SlimInfer's session in src/slim implements
//! it; [`Dense`] keeps everything), the decode set it hands the KV manager ([`ActiveBlocks`]) and
//! the change of rows it hands the forward ([`RowChange`]).

use std::any::Any;
use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;

use super::cache::LayerKv;
use crate::Result;

/// Decides between layers which rows go on, and which cached rows a layer attends to.
/// SlimInfer implements it (src/slim/); `Dense` keeps everything.
pub trait LayerPolicy {
    /// Rows of `kv` (layer `layer`'s cache, this step's rows already appended) that the layer
    /// may attend to: sorted, disjoint ranges.
    #[allow(clippy::single_range_in_vec_init)] // one range: every row
    fn key_ranges(&self, _layer: usize, kv: &LayerKv) -> Vec<Range<usize>> {
        vec![0..kv.len()]
    }

    /// The prompt blocks layer `layer` attends to in decode, when it attends to a subset of its
    /// cached prompt blocks; None = every row it holds. When Some, `key_ranges` in decode must be
    /// exactly the rows of these blocks plus every row past the prompt (the KV manager reads
    /// the same keys from its fast tier).
    fn active_blocks(&self, _layer: usize) -> Option<ActiveBlocks<'_>> {
        None
    }

    /// Called when layer `layer` has appended this step's rows (at `positions`, with post-RoPE
    /// queries `q`) to its cache `kv` and before it attends: a policy that chooses a layer's
    /// keys from the layer's own queries does so here, and `key_ranges` / `active_blocks` then
    /// answer with the new choice.
    fn before_attention(
        &mut self,
        _layer: usize,
        _q: &[f32],
        _positions: &[u32],
        _kv: &LayerKv,
    ) -> Result<()> {
        Ok(())
    }

    /// How many of a layer's last rows `after_layer` needs the queries of (0: none). A long
    /// prefill keeps only these once the layer has attended.
    fn query_rows(&self) -> usize {
        0
    }

    /// Called after layer `layer` with its output `h` (rows, hidden), the post-RoPE queries of
    /// its last `query_rows()` rows (all rows when fewer) in `q` (n, n_heads * hd), the rows'
    /// positions and the layer's cache. Returns how the rows change before the next layer, or
    /// None to keep them all.
    fn after_layer(
        &mut self,
        _layer: usize,
        _h: &Tensor,
        _q: &[f32],
        _positions: &[u32],
        _kv: &LayerKv,
    ) -> Result<Option<RowChange>> {
        Ok(None)
    }
}

/// The prompt blocks a layer's decode steps attend to (besides every row past the prompt), as the
/// policy decided them; the KV manager keeps these blocks in its fast tier.
#[derive(Debug, Clone)]
pub struct ActiveBlocks<'a> {
    /// Prompt blocks, ascending.
    pub blocks: &'a [u32],
    /// The layers that share this set (a SlimInfer stage); the set is decided before its first.
    pub stage_layers: Range<usize>,
    /// Tokens per block.
    pub block_size: usize,
    /// Positions below this are prompt blocks; rows at or past it always stay fast.
    pub prompt_len: usize,
}

/// How the rows change between two layers.
#[derive(Debug)]
pub struct RowChange {
    /// Indices (ascending) of the rows that go on. The last row must stay: it feeds the head.
    pub keep: Vec<usize>,
    /// Rows that join in front of the kept ones: hidden states and their ascending positions,
    /// all below the first kept row's (SlimInfer reviving a pruned block in decode).
    pub insert: Option<(Revived, Vec<u32>)>,
}

/// The hidden states of revived rows: on the host, or where the forward kept them.
pub enum Revived {
    /// (rows, hidden) f32.
    Rows(Tensor),
    /// Runs of rows of what the forward's backend holds ([`Held`]), in row order.
    Held(Vec<(Held, Range<usize>)>),
}

/// Rows a forward keeps on its own device for revival (the ops forward on a GPU: no download
/// during the prefill); only that forward reads them back.
pub type Held = Arc<dyn Any + Send + Sync>;

impl std::fmt::Debug for Revived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rows(t) => write!(f, "Revived::Rows({:?})", t.dims()),
            Self::Held(runs) => {
                let rows: Vec<&Range<usize>> = runs.iter().map(|(_, r)| r).collect();
                write!(f, "Revived::Held({rows:?})")
            }
        }
    }
}

impl RowChange {
    /// Keep only rows `keep`.
    pub fn keep(keep: Vec<usize>) -> Self {
        Self { keep, insert: None }
    }
}

/// Every row through every layer; attention over the whole cache.
pub struct Dense;

impl LayerPolicy for Dense {}
