//! The few operations the forward is written against. Only the CPU backend exists today: linear
//! layers go through candle (quantized `QMatMul` or dense f32 GEMM), and the row-wise ops
//! (RMSNorm, RoPE over explicit positions, SiLU-gate, attention) are plain Rust over slices,
//! vectorised for AVX2/FMA when the CPU has it. A CUDA backend will implement the same set.

pub mod attention;
pub mod cpu_ops;
pub mod decode_attention;
pub mod isa;
pub mod kv_format;
pub mod linear;
pub mod ops;
pub mod ops_check;
pub mod paged_kv;
pub mod qgemm;
pub mod qgemv;
pub mod rowwise;
pub mod score;
pub mod simd;

use candle_core::{Device, Storage, Tensor};

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

/// Wrap an owned buffer as a CPU tensor of shape (rows, cols), without copying.
pub fn tensor2(data: Vec<f32>, rows: usize, cols: usize) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, (rows, cols), &Device::Cpu)
}
