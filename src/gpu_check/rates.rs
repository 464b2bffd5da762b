//! Kernel rates on the device, timed with events on the compute stream: cuBLAS's bf16 GEMM (the
//! prefill floor's rate) and one layer's causal prefill attention on each prefill kernel
//! (tensor cores pipelined and plain, FMA units) at the Llama-3.1-8B head shape.

use cudarc::driver::sys::CUevent_flags;
use serde::Serialize;

use crate::backend::ops::{AttentionContext, KvPool, Ops, RowSlice, KV_BLOCK};
use crate::cuda::ops::PrefillFootprint;
use crate::cuda::{CudaOps, OrEngine};
use crate::model::ops_llama::LlamaShape;
use crate::Result;

/// Milliseconds of `work` on the compute stream: the median of `runs` after `warm` warm-ups.
pub(super) fn time_ms(
    ops: &CudaOps,
    warm: usize,
    runs: usize,
    work: &mut dyn FnMut() -> Result<()>,
) -> Result<f64> {
    let ctx = &ops.gpu.ctx;
    let mut times = Vec::new();
    for i in 0..warm + runs {
        let start = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .or_engine("event")?;
        let end = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .or_engine("event")?;
        start.record(&ops.gpu.stream).or_engine("record")?;
        work()?;
        end.record(&ops.gpu.stream).or_engine("record")?;
        let ms = start.elapsed_ms(&end).or_engine("elapsed")? as f64;
        if i >= warm {
            times.push(ms);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Measured bf16 GEMM rate on random data: TFLOP/s, median of 10 after 3 warm-ups.
pub fn cublas(ops: &CudaOps) -> Result<f64> {
    let n = 8192;
    let (mut a, mut b, mut c) = (
        ops.zeros_bf16(n * n)?,
        ops.zeros_bf16(n * n)?,
        ops.zeros_bf16(n * n)?,
    );
    ops.fill_uniform(&mut a, 1, 1.0)?;
    ops.fill_uniform(&mut b, 2, 1.0)?;
    let ms = time_ms(ops, 3, 10, &mut || ops.matmul(&a, &b, &mut c, n, n, n))?;
    Ok(2.0 * (n as f64).powi(3) / (ms * 1e-3) / 1e12)
}

/// One layer's dense causal prefill attention, timed.
#[derive(Debug, Clone, Serialize)]
pub struct AttentionRate {
    pub tokens: usize,
    /// [`crate::cuda::ops::PrefillKernel::name`]: "tensor cores, pipelined", "tensor cores"
    /// or "fma"
    pub kernel: &'static str,
    pub ms: f64,
    pub tflops: f64,
    /// The tensor-core kernel's occupancy, registers and spills; None on FMA units.
    pub footprint: Option<PrefillFootprint>,
}

/// One layer of the 8B shape's attention over `tokens` random rows (every row a query and a
/// key, positions 0..tokens): median of 3 after one warm-up, on `ops`'s kernel.
pub fn attention(ops: &CudaOps, tokens: usize) -> Result<AttentionRate> {
    let shape = LlamaShape::llama31_8b();
    let heads = shape.heads;
    let (q_dim, kv_dim) = (heads.q_dim(), heads.kv_dim());
    let stride = q_dim + 2 * kv_dim;
    let mut qkv = ops.zeros_bf16(tokens * stride)?;
    ops.fill_uniform(&mut qkv, 3, 1.0)?;
    let positions: Vec<u32> = (0..tokens as u32).collect();
    let pos = ops.upload_u32(&positions)?;
    let slots = tokens.div_ceil(KV_BLOCK);
    let mut pool = KvPool::new(ops, slots, kv_dim)?;
    let table = ops.upload_u32(&(0..slots as u32).collect::<Vec<_>>())?;
    let rows = |offset| RowSlice {
        rows: tokens,
        stride,
        offset,
    };
    ops.kv_append(
        &qkv,
        rows(0),
        q_dim,
        q_dim + kv_dim,
        &pos,
        &mut pool,
        &table,
        0,
    )?;
    let mut out = ops.zeros_bf16(tokens * q_dim)?;
    let ms = time_ms(ops, 1, 3, &mut || {
        ops.attention(
            &qkv,
            rows(0),
            &pos,
            &pool,
            &table,
            tokens,
            heads,
            &mut out,
            &AttentionContext::NONE,
        )
    })?;
    let flops = shape.attention_flops(&[tokens]);
    Ok(AttentionRate {
        tokens,
        kernel: ops.prefill_kernel().name(),
        ms,
        tflops: flops / (ms * 1e-3) / 1e12,
        footprint: ops.prefill_footprint(heads)?,
    })
}
