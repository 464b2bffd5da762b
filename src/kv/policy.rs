//! What the pruning hands the forward between two layers: the change of rows ([`RowChange`]),
//! with the hidden states of rows a revival brings back ([`Revived`]).

use std::any::Any;
use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;

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
