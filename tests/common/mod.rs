//! Shared helpers for the integration tests that run the real default model.
#![allow(dead_code)]

use std::path::PathBuf;

use slimchat::backend::linear::LinearMode;
use slimchat::engine::{Engine, EngineOptions};
use slimchat::model::source::ModelSource;

/// Path of the default model (SmolLM2-135M-Instruct Q4_1), fetched into the cache on first use.
pub fn default_model() -> PathBuf {
    ModelSource::Default
        .resolve(&mut |_| {})
        .expect("the default model resolves")
}

/// The model at `path` with `linear` layers and pruning off (the dense reference).
pub fn dense_engine(path: &std::path::Path, linear: LinearMode) -> Engine {
    let mut opts = EngineOptions {
        linear,
        ..Default::default()
    };
    opts.slim.enabled = false;
    Engine::load(path, &opts).expect("the model loads")
}

/// Largest |a - b| and the largest |a| over two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    let scale = a.iter().map(|x| x.abs()).fold(0.0, f32::max);
    (diff, scale)
}

pub fn argmax(v: &[f32]) -> usize {
    slimchat::sampling::argmax(v) as usize
}
pub mod screen;
pub mod server;
pub mod tmux;
