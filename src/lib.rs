//! slimchat: a terminal chat application for long documents, whose model prunes prompt tokens'
//! hidden states layer by layer (SlimInfer, arXiv 2508.06447).
pub mod backend;
pub mod bench;
pub mod config;
pub mod context_fit;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod device_forward;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fuzz;
#[cfg(feature = "cuda")]
pub mod gpu_check;
pub mod headless;
pub mod heap_budget;
pub mod kernel_bench;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod openai_api;
pub mod perplexity;
pub mod private_fs;
pub mod remote_client;
pub mod rng;
pub mod sampling;
pub mod serve;
pub mod slim;
pub mod tui;

pub use error::{Error, Result};
