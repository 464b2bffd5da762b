//! The few operations the forward is written against. On the CPU, linear layers go through our
//! GEMM / GEMV over the GGUF types (or candle's dense f32 GEMM), and the row-wise ops (RMSNorm,
//! RoPE over explicit positions, SiLU-gate, attention) are plain Rust over slices, vectorised for
//! AVX2/AVX-512 when the CPU has them. The ops seam ([`ops`]) is what the CUDA backend
//! (src/cuda) implements too; [`cpu_ops`] is its CPU side, [`paged_kv`] the paged cache of a
//! forward written against it.
//!
//! The bottom layer: nothing here imports `crate::kv`, `crate::model` or `crate::slim`
//! (tests/layers.rs). What it shares with them lives here as leaves: the KV storage formats
//! ([`kv_format`], which the caches in src/kv store), SlimInfer's scoring kernels ([`score`],
//! which src/slim calls) and RoPE's own parameters ([`rowwise::RopeParams`], which the model
//! fills from its hyper-parameters).

pub mod attention;
pub mod attention_int8;
pub mod attention_kind;
pub mod cpu_ops;
pub mod decode_attention;
pub mod engine_ops;
pub mod heads;
pub mod host_pool;
pub mod isa;
pub mod kv_format;
pub mod linear;
pub mod ops;
pub mod ops_check;
pub mod paged_kv;
pub mod paged_tier;
pub mod qgemm;
pub mod qgemv;
pub mod rowwise;
pub mod score;
pub mod simd;
pub mod spill_file;

use candle_core::{Storage, Tensor};

/// Run `f` on the f32 elements of a contiguous CPU tensor, without copying.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!(
            "with_f32: tensor of shape {:?} is not contiguous",
            t.shape()
        )
    };
    match &*storage {
        Storage::Cpu(cpu) => {
            let all = cpu.as_slice::<f32>()?;
            Ok(f(&all[start..end]))
        }
        _ => candle_core::bail!("with_f32: tensor is not on the CPU"),
    }
}
