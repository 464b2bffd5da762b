//! The SlimInfer pruning policy: which prompt rows each layer keeps, with no tensors in sight.
//!
//! SlimInfer ("Accelerating Long-Context LLM Inference via Dynamic Token Pruning",
//! <https://arxiv.org/abs/2508.06447>) drops whole rows of the hidden state of prompt tokens as they
//! climb the layers: early *preserve* layers see every prompt token, later *slim* layers are grouped
//! into nested *stages*, each keeping a budget of 64-token prompt blocks chosen by a cheap score.
//!
//! This module is the pure part of the method, on plain slices, so that it is unit-tested by
//! itself and shared by the CPU and CUDA forwards:
//!
//! - [`schedule`]: the `[slim]` config section, its presets, and [`Stage`]s resolved for one prompt
//!   (from which layer on, how many blocks); [`preset`]: which preset fits a model.
//! - block scores from the post-RoPE queries of the last `local_window` tokens and the post-RoPE
//!   keys (unit-mean keys, |q·k| averaged over heads, max over a block's units): the kernels are
//!   the backend's ([`crate::backend::score`]); [`score`] is what the session reads of a layer's
//!   cache on any device ([`score::ScoredLayer`]: positions, and scores computed where the keys
//!   are).
//! - [`select`]: top-K with the always-kept blocks (attention sink, the block(s) of the last prompt
//!   tokens), the overlap-aware gate that decode uses, and the row indices to gather.
//!
//! One stage boundary, in prefill or decode:
//! `block_scores` → `select_top_k(.., forced_blocks(..))` → (decode: `gate`) → `kept_rows` → gather.
//! Block ids are `position / block_size` over original positions, which pruning never renumbers;
//! generated tokens (position ≥ prompt length) are never candidates and are always kept.

pub mod preset;
pub mod schedule;
pub mod score;
pub mod select;
pub mod session;

pub use schedule::{SlimConfig, Stage, StageConfig};
pub use select::{forced_blocks, gate, kept_rows, overlap, select_top_k};
