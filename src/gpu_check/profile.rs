//! Where the forward's time goes on the device: the probe
//! ([`crate::model::ops_llama::OpProbe`]) over a few decode steps waiting at every mark (what
//! each part costs the device) and a few not waiting (what issuing it costs the host), and over
//! one prefill; decode attention's kernels (registers, spills, occupancy) and their time at each
//! launch setting (gpu-check runs the fastest); and the cost of one kernel launch and of one
//! token's GEMV against what their bytes need.

use std::time::Instant;

use serde::Serialize;

use crate::backend::cpu_ops::to_f32;
use crate::backend::ops::{AttentionContext, KvPool, Ops, RowSlice, KV_BLOCK};
use crate::backend::ops_check::rel_err;
use crate::backend::paged_kv::NoHooks;
use crate::cuda::ops::{DecodeKernel, DecodeTuning, OneRowLinear};
use crate::cuda::{CudaOps, OrEngine};
use crate::model::ops_llama::LlamaShape;
use crate::model::ops_llama::{KvPlacement, OpsLlama, ProbeMode, ProbePart};
use crate::slim::schedule::SlimConfig;
use crate::Result;

use super::argmax;

/// One prompt's decode steps, timed part by part in both modes.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeProfile {
    pub prompt_tokens: usize,
    pub mode: &'static str,
    pub steps: usize,
    /// Waiting for the device at each mark.
    pub synced: Vec<ProbePart>,
    /// Never waiting: the host's time to issue each part.
    pub enqueued: Vec<ProbePart>,
    /// A whole step without the probe's waits, as the decode runs.
    pub step_ms: f64,
}

/// One prefill, synced at every mark: where its time goes.
#[derive(Debug, Clone, Serialize)]
pub struct PrefillProfile {
    pub prompt_tokens: usize,
    pub mode: &'static str,
    pub parts: Vec<ProbePart>,
    /// The same prefill without the probe's waits.
    pub ttft_ms: f64,
}

/// [`PrefillProfile`] of `tokens` (after the unprobed prefill, which also warms up).
pub fn prefill_profile(
    model: &OpsLlama<CudaOps>,
    tokens: &[u32],
    slim: Option<&SlimConfig>,
) -> Result<PrefillProfile> {
    let placement = KvPlacement::Resident;
    model.ops.sync()?;
    let t = Instant::now();
    model.prefill_placed(tokens, slim, 1, placement, &mut NoHooks)?;
    let ttft_ms = t.elapsed().as_secs_f64() * 1e3;
    model.probe.start(model.ops, ProbeMode::Sync)?;
    model.prefill_placed(tokens, slim, 1, placement, &mut NoHooks)?;
    Ok(PrefillProfile {
        prompt_tokens: tokens.len(),
        mode: if slim.is_some() { "pruned" } else { "dense" },
        parts: model.probe.finish(),
        ttft_ms,
    })
}

/// The prefill profile as lines: each part's milliseconds over the prefill.
pub fn prefill_lines(p: &PrefillProfile) -> Vec<String> {
    let mut out = vec![format!(
        "prefill profile, {} at {} tokens: TTFT {:.1} ms unprobed",
        p.mode, p.prompt_tokens, p.ttft_ms
    )];
    for x in &p.parts {
        out.push(format!(
            "  {:<18} {:>10.2} ms {:>5} marks",
            x.part, x.ms, x.marks
        ));
    }
    let total: f64 = p.parts.iter().map(|x| x.ms).sum();
    out.push(format!("  {:<18} {:>10.2} ms", "prefill", total));
    out
}

/// One decode attention launch setting's time over one 8B layer's 32k keys.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeRate {
    pub keys: usize,
    pub tuning: DecodeTuning,
    pub us: f64,
    /// K and V bytes read over that time.
    pub gb_s: f64,
    /// Its output against the default setting's (whose kernel the kernel checks compared with
    /// the CPU), relative: a setting off by more than [`DECODE_AGREES`] is not run.
    pub rel_err: f64,
}

/// How close a decode setting's output must be to the default's to be run: both are bf16 of
/// the same f32 sums in another order.
pub const DECODE_AGREES: f64 = 1e-2;

/// A kernel's registers, local (spilled) bytes a thread, and CTAs of `threads` a
/// multiprocessor holds.
#[derive(Debug, Clone, Serialize)]
pub struct KernelFootprint {
    pub kernel: String,
    pub dynamic_shared_bytes: usize,
    pub registers: i32,
    pub local_bytes: i32,
    pub ctas_per_sm: u32,
}

/// The decode attention kernels' footprints (the staged kernels at the 8B shape's group of 4).
pub fn footprints(ops: &CudaOps) -> Result<Vec<KernelFootprint>> {
    let staged = [2u8, 3, 4].map(|stages| DecodeKernel::Staged { stages });
    let mut names: Vec<(String, usize)> = [
        "decode_attention_warps_hd128_g4_bf16",
        "decode_attention_warps_hd128_g4_fused_bf16",
        "decode_attention_warps_hd128_g8_bf16",
        "decode_attention_warps_hd64_g4_bf16",
        "decode_attention_split_bf16",
        "decode_attention_merge_bf16",
    ]
    .map(|n| (n.to_string(), 0))
    .into();
    names.extend(staged.map(|k| (k.entry(128, 4), k.shared_bytes(128, 4))));
    let mut out = Vec::new();
    for (name, smem) in names {
        let f = match smem {
            0 => ops.gpu.kernels.get(&name)?,
            _ => ops.gpu.kernels.get_with_shared(&name, smem)?,
        };
        out.push(KernelFootprint {
            registers: f.num_regs().or_engine("attribute")?,
            local_bytes: f.local_size_bytes().or_engine("attribute")?,
            ctas_per_sm: (f.occupancy_max_active_blocks_per_multiprocessor(128, smem, None))
                .or_engine("occupancy")?,
            dynamic_shared_bytes: smem,
            kernel: name,
        });
    }
    Ok(out)
}

/// Decode attention over one 8B layer's `keys` keys (a dense table) at each launch setting of
/// [`DecodeTuning::sweep`]: the median of 10 timed calls after 3, and the output against the
/// default setting's.
pub fn decode_rates(ops: &CudaOps, keys: usize) -> Result<Vec<DecodeRate>> {
    let heads = LlamaShape::llama31_8b().heads;
    let (q_dim, kv_dim) = (heads.q_dim(), heads.kv_dim());
    let slots = keys.div_ceil(KV_BLOCK);
    let mut pool = KvPool::new(ops, slots, kv_dim)?;
    ops.fill_uniform(&mut pool.k, 5, 1.0)?;
    ops.fill_uniform(&mut pool.v, 6, 1.0)?;
    let positions: Vec<u32> = (0..(slots * KV_BLOCK) as u32).collect();
    pool.pos = ops.upload_u32(&positions)?;
    let table = ops.upload_u32(&(0..slots as u32).collect::<Vec<_>>())?;
    let mut q = ops.zeros_bf16(q_dim)?;
    ops.fill_uniform(&mut q, 7, 1.0)?;
    let q_pos = ops.upload_u32(&[keys as u32])?;
    let mut out = ops.zeros_bf16(q_dim)?;
    let at = RowSlice {
        rows: 1,
        stride: q_dim,
        offset: 0,
    };
    let reference = ops.clone().with_decode_tuning(DecodeTuning::default());
    reference.attention(
        &q,
        at,
        &q_pos,
        &pool,
        &table,
        keys,
        heads,
        &mut out,
        &AttentionContext::NONE,
    )?;
    let want = to_f32(&ops.download_bf16(&out)?);
    let mut rates = Vec::new();
    for tuning in DecodeTuning::sweep() {
        let tuned = ops.clone().with_decode_tuning(tuning);
        ops.fill_uniform(&mut out, 8, 1.0)?;
        let ms = super::rates::time_ms(&tuned, 3, 10, &mut || {
            tuned.attention(
                &q,
                at,
                &q_pos,
                &pool,
                &table,
                keys,
                heads,
                &mut out,
                &AttentionContext::NONE,
            )
        })?;
        let got = to_f32(&ops.download_bf16(&out)?);
        rates.push(DecodeRate {
            keys,
            tuning,
            us: ms * 1e3,
            gb_s: (2 * keys * kv_dim * 2) as f64 / (ms * 1e-3) / 1e9,
            rel_err: rel_err(&got, &want),
        });
    }
    Ok(rates)
}

/// One setting's time at one of the 8B shape's one-row linear layers.
#[derive(Debug, Clone, Serialize)]
pub struct GemvRate {
    /// (n, k): out (1, n) = x (1, k) . w (n, k)ᵀ
    pub shape: (usize, usize),
    pub linear: OneRowLinear,
    pub us: f64,
    /// The weights' bytes over that time.
    pub gb_s: f64,
    /// Its output against cuBLAS's, relative.
    pub rel_err: f64,
}

/// The decode step's four linear layers of the 8B shape (q|k|v, o, gate|up, down) at one row,
/// at every [`OneRowLinear`] setting: the median of 20 timed calls after 3, and the outputs
/// against cuBLAS's.
pub fn gemv_rates(ops: &CudaOps) -> Result<Vec<GemvRate>> {
    let shape = LlamaShape::llama31_8b();
    let (h, i) = (shape.hidden, shape.intermediate);
    let qkv = shape.heads.q_dim() + 2 * shape.heads.kv_dim();
    let mut out = Vec::new();
    for (n, k) in [(qkv, h), (h, shape.heads.q_dim()), (2 * i, h), (h, i)] {
        let mut x = ops.zeros_bf16(k)?;
        ops.fill_uniform(&mut x, 11, 1.0)?;
        let mut w = ops.zeros_bf16(n * k)?;
        ops.fill_uniform(&mut w, 12, 0.02)?;
        let mut y = ops.zeros_bf16(n)?;
        let cublas = ops.clone().with_one_row(OneRowLinear::Cublas);
        cublas.matmul(&x, &w, &mut y, 1, k, n)?;
        let want = to_f32(&ops.download_bf16(&y)?);
        for linear in OneRowLinear::ALL {
            let o = ops.clone().with_one_row(linear);
            ops.fill_uniform(&mut y, 13, 1.0)?;
            let ms = super::rates::time_ms(&o, 3, 20, &mut || o.matmul(&x, &w, &mut y, 1, k, n))?;
            let got = to_f32(&ops.download_bf16(&y)?);
            out.push(GemvRate {
                shape: (n, k),
                linear,
                us: ms * 1e3,
                gb_s: (n * k * 2) as f64 / (ms * 1e-3) / 1e9,
                rel_err: rel_err(&got, &want),
            });
        }
    }
    Ok(out)
}

/// Launch and GEMV costs of the device.
#[derive(Debug, Clone, Serialize)]
pub struct LaunchCost {
    /// Host time to issue one small kernel (2,000 in a row, no waiting).
    pub launch_issue_us: f64,
    /// The same launches' wall time to completion, per launch.
    pub launch_done_us: f64,
    /// One token's (1 x 4096) x (14336 x 4096)ᵀ bf16 GEMV as the runs do it (cuBLAS or
    /// gemv.cu), wall per call.
    pub gemv_us: f64,
    /// Its weight bytes over that time.
    pub gemv_gb_s: f64,
}

/// Prefill `tokens`, then `steps` greedy steps synced at every mark, `steps` issued without
/// waiting, and `steps` plain.
pub fn profile(
    model: &OpsLlama<CudaOps>,
    tokens: &[u32],
    slim: Option<&SlimConfig>,
    placement: KvPlacement,
    steps: usize,
) -> Result<DecodeProfile> {
    let headroom = 3 * steps + 2;
    let (mut cache, report) =
        model.prefill_placed(tokens, slim, headroom, placement, &mut NoHooks)?;
    let mut next = argmax(&report.logits);
    let mut parts = Vec::new();
    for mode in [ProbeMode::Sync, ProbeMode::Enqueue] {
        model.probe.start(model.ops, mode)?;
        for _ in 0..steps {
            next = argmax(&model.decode(&mut cache, next, &mut NoHooks)?);
        }
        parts.push(model.probe.finish());
    }
    model.ops.sync()?;
    let t = Instant::now();
    for _ in 0..steps {
        next = argmax(&model.decode(&mut cache, next, &mut NoHooks)?);
    }
    let step_ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
    let per_step = |v: Vec<ProbePart>| -> Vec<ProbePart> {
        (v.into_iter())
            .map(|p| ProbePart {
                ms: p.ms / steps as f64,
                ..p
            })
            .collect()
    };
    let enqueued = per_step(parts.pop().unwrap_or_default());
    let synced = per_step(parts.pop().unwrap_or_default());
    Ok(DecodeProfile {
        prompt_tokens: tokens.len(),
        mode: super::mode_name(slim.is_some(), placement),
        steps,
        synced,
        enqueued,
        step_ms,
    })
}

/// [`LaunchCost`] on `ops`' compute stream.
pub fn launch_cost(ops: &CudaOps) -> Result<LaunchCost> {
    let n = 4096;
    let mut h = ops.zeros_f32(n)?;
    let d = ops.zeros_bf16(n)?;
    for _ in 0..100 {
        ops.residual_add(&mut h, &d)?;
    }
    ops.sync()?;
    let launches = 2000;
    let t = Instant::now();
    for _ in 0..launches {
        ops.residual_add(&mut h, &d)?;
    }
    let issue = t.elapsed().as_secs_f64();
    ops.sync()?;
    let done = t.elapsed().as_secs_f64();
    let (k, m) = (4096, 14336);
    let x = ops.zeros_bf16(k)?;
    let mut w = ops.zeros_bf16(m * k)?;
    ops.fill_uniform(&mut w, 3, 0.02)?;
    let mut y = ops.zeros_bf16(m)?;
    for _ in 0..10 {
        ops.matmul(&x, &w, &mut y, 1, k, m)?;
    }
    ops.gpu.stream.synchronize().or_engine("sync")?;
    let calls = 200;
    let t = Instant::now();
    for _ in 0..calls {
        ops.matmul(&x, &w, &mut y, 1, k, m)?;
    }
    ops.sync()?;
    let gemv = t.elapsed().as_secs_f64() / calls as f64;
    Ok(LaunchCost {
        launch_issue_us: issue / launches as f64 * 1e6,
        launch_done_us: done / launches as f64 * 1e6,
        gemv_us: gemv * 1e6,
        gemv_gb_s: (m * k * 2) as f64 / gemv / 1e9,
    })
}

/// The profile as lines of a table: each part's milliseconds a step, synced and issued.
pub fn lines(p: &DecodeProfile) -> Vec<String> {
    let mut out = vec![format!(
        "decode profile, {} at {} tokens, {} steps a mode: {:.2} ms a step unprobed",
        p.mode, p.prompt_tokens, p.steps, p.step_ms
    )];
    out.push(format!(
        "  {:<18} {:>12} {:>12}",
        "part", "synced ms", "issued ms"
    ));
    let issued = |part: &str| {
        (p.enqueued.iter())
            .find(|e| e.part == part)
            .map_or(f64::NAN, |e| e.ms)
    };
    for s in &p.synced {
        out.push(format!(
            "  {:<18} {:>12.3} {:>12.3}",
            s.part,
            s.ms,
            issued(s.part)
        ));
    }
    let total = |v: &[ProbePart]| v.iter().map(|x| x.ms).sum::<f64>();
    out.push(format!(
        "  {:<18} {:>12.3} {:>12.3}",
        "step",
        total(&p.synced),
        total(&p.enqueued)
    ));
    out
}
