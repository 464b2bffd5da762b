//! Key/value caches, one per layer, owned by the engine and passed into the forward.
pub mod cache;

pub use cache::{KvCache, LayerKv};
