//! What the KV side shares with the forward and the engine: the row policy types between the
//! forward and its pruning (`policy`), the `[kv]` config section (`config`), the request's KV
//! numbers (`stats`), and a layer's keys and values on the host (`cache`), which the session's
//! and the decode kernels' tests build their caches with.
#[cfg(test)]
pub mod cache;
pub mod config;
#[cfg(test)]
mod decode_attention_tests;
pub mod policy;
pub mod stats;

pub use crate::backend::kv_format::KvDtype;
#[cfg(test)]
pub use cache::LayerKv;
pub use config::KvConfig;
pub use stats::KvStats;
