//! Key/value caches, one per layer, owned by the engine and passed into the forward; the row
//! policy seam between the forward, its pruning and the caches (`policy`); and the two-tier KV
//! manager: block tables (`table`), fast-tier slots (`fast`), the offload worker (`worker`), the
//! optional spill file (`spill`), tied to the forward by `manager`, set by `[kv]` (`config`),
//! measured in `stats`.
pub mod cache;
pub mod config;
#[cfg(test)]
mod decode_attention_tests;
pub mod fast;
pub mod manager;
pub mod policy;
pub mod spill;
pub mod stats;
pub mod table;
pub mod worker;

pub use crate::backend::kv_format::KvDtype;
pub use cache::{KvCache, LayerKv};
pub use config::KvConfig;
pub use manager::{KvManager, LayerPlan};
pub use stats::KvStats;
