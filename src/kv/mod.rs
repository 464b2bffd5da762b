//! Key/value caches, one per layer, owned by the engine and passed into the forward.
pub mod cache;
pub mod dtype;

pub use cache::{KvCache, KvView, LayerKv};
pub use dtype::KvDtype;
