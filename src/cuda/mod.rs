//! The CUDA backend (feature `cuda`): the ops seam ([`crate::backend::ops::Ops`]) on an NVIDIA
//! GPU through cudarc, with our kernels (kernels/*.cu, compiled by NVRTC at first use for the
//! device's compute capability) and cuBLAS for the GEMMs.
//!
//! libcuda, cuBLAS and NVRTC are loaded at run time, so the crate builds without the CUDA
//! toolkit. cudarc panics on its first call when a library is missing, so [`probe`] looks for
//! them (dlopen) before anything touches cudarc.
//!
//! - [`probe`]: is there a driver (and the libraries)? One line saying why not.
//! - [`kernels`]: the embedded sources, NVRTC compilation, the module and function cache.
//! - [`gpu`]: the context, the compute and copy streams, cuBLAS, memory figures.
//! - [`ops`]: [`CudaOps`], the ops over device buffers; `prefill_attention` its attention on
//!   tensor cores, `decode_attention` its one-row attention split over the keys,
//!   `kernel_choice` which of those kernels runs and how it is launched, `slim_scores`
//!   SlimInfer's block scores.
//! - [`host_blocks`]: the copies of the ops forward's KV tiers (pinned memory, offloads on the
//!   copy stream behind the layers that follow).
//! - [`check`]: every kernel against its CPU reference on random inputs.
//!
//! `slimchat gpu-check` (the Llama-3.1-8B-shaped dense vs pruned run) is a command over this
//! backend and the ops forward: `crate::gpu_check`.

pub mod check;
mod decode_attention;
pub mod gpu;
pub mod host_blocks;
mod kernel_choice;
pub mod kernels;
mod kv_types;
pub mod ops;
mod prefill_attention;
pub mod probe;
mod slim_scores;

pub use gpu::Gpu;
pub use ops::CudaOps;

/// A cudarc (or other) error as the crate's error, with what was being done.
pub(crate) trait OrEngine<T> {
    fn or_engine(self, what: &str) -> crate::Result<T>;
}

impl<T, E: std::fmt::Debug> OrEngine<T> for std::result::Result<T, E> {
    fn or_engine(self, what: &str) -> crate::Result<T> {
        self.map_err(|e| crate::Error::Engine(format!("cuda: {what}: {e:?}")))
    }
}
