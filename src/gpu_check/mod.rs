//! `slimchat gpu-check`: on a GPU, (1) every kernel against its CPU reference, (2) a
//! Llama-3.1-8B-shaped model with random bf16 weights built on the device, (3) dense vs pruned
//! prefill (TTFT) at each prompt length, decode tokens/s, prompt KV bytes on the GPU, VRAM,
//! the measured cuBLAS bf16 rate and the dense prefill's FLOP floor at it, one layer's prefill
//! attention on each kernel ([`rates`]: the runs take the fastest tensor-core kernel that passed
//! its checks) and decode attention at each launch setting ([`profile`]: the runs take the
//! fastest); the pruned prompt once more with its KV tiered as the chat engine keeps it (each
//! slim layer's pool holds its decode set, the rest in RAM): VRAM KV against dense and decode
//! against the resident run; where the time of a prefill and of a decode step goes, part by
//! part ([`profile`]); (4) a table on stdout and the full numbers as JSON.
//! [`agreement`] (`--agreement`): a model file's teacher-forced logits on the GPU against the
//! CPU engine's.
//!
//! A command over the CUDA backend (src/cuda), the ops forward (`crate::model::ops_llama`)
//! and SlimInfer's schedule, not part of the backend: src/cuda does not import the model.

pub mod agreement;
mod profile;
mod rates;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::backend::kv_format::KvDtype;
use crate::backend::ops::{Ops, KV_BLOCK};
use crate::backend::ops_check::{OpCheck, Rng};
use crate::backend::paged_kv::NoHooks;
use crate::backend::paged_tier::TierCounts;
use crate::cuda::gpu::VramInfo;
use crate::cuda::{check, CudaOps, Gpu, OrEngine};
use crate::model::ops_llama::{KvPlacement, LlamaShape, OpsLlama};
use crate::slim::schedule::SlimConfig;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct GpuCheckArgs {
    /// Folder for gpu_check.json (created).
    pub out_dir: PathBuf,
    pub lengths: Vec<usize>,
    pub decode_tokens: usize,
    /// Only the kernel checks.
    pub kernels_only: bool,
    /// SlimInfer settings of the pruned runs (the llama3.1-8b preset at keep ratio 0.5
    /// reproduces the paper's 8192/4096/2048 tokens at 32k).
    pub slim: SlimConfig,
}

/// One prompt length, dense or pruned.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub prompt_tokens: usize,
    pub mode: &'static str,
    /// The KV element type (the bars' runs bf16; the Q8 runs after them the product's default).
    pub kv_dtype: KvDtype,
    pub ttft_ms: f64,
    pub decode_tok_s: f64,
    pub rows_per_layer: Vec<usize>,
    pub prompt_kv_bytes: usize,
    /// K and V in VRAM (every layer's pool: the fast tier).
    pub kv_pool_bytes: usize,
    /// K and V of prompt blocks in RAM (the tiered run's host tier).
    pub kv_host_bytes: usize,
    /// The tiered run's copies between the tiers (offloaded in the prefill, fetched in decode).
    pub tier_counts: Option<TierCounts>,
    /// K and V the last decode step read (pruned: each slim layer's decode set).
    pub decode_kv_bytes: usize,
    /// Hidden states of pruned rows held in VRAM for revival (a raised ratio brings them back).
    pub held_bytes: usize,
    pub gemm_flops: f64,
    /// GEMM FLOPs over the measured cuBLAS bf16 rate.
    pub gemm_floor_ms: f64,
    /// Causal attention FLOPs of the prefill (each layer's rows against themselves).
    pub attention_flops: f64,
    /// The prefill's floor: GEMM and attention FLOPs at the measured cuBLAS bf16 rate.
    pub prefill_floor_ms: f64,
    /// The tiered run: time after TTFT until the host tier's copies of the prompt blocks
    /// (on the copy stream, behind the layers) had landed.
    pub offload_tail_ms: Option<f64>,
    pub vram_after: VramInfo,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub device: String,
    pub nvrtc_compile_ms: f64,
    pub kernels: Vec<OpCheck>,
    pub cublas_bf16_tflops: f64,
    /// The prefill attention kernel of the runs ([`crate::cuda::ops::PrefillKernel::name`]):
    /// the faster tensor-core kernel that passed its checks, or "fma" when neither did.
    pub prefill_attention: &'static str,
    /// One layer's causal attention on each kernel (8192 and 32768 tokens).
    pub attention_rates: Vec<rates::AttentionRate>,
    pub weights_bytes: u64,
    pub slim: SlimConfig,
    pub runs: Vec<RunResult>,
    /// Where a decode step's time goes at the longest length (dense and tiered).
    pub decode_profiles: Vec<profile::DecodeProfile>,
    /// Where the prefill's time goes at the longest length (dense and pruned).
    pub prefill_profiles: Vec<profile::PrefillProfile>,
    pub decode_footprints: Vec<profile::KernelFootprint>,
    /// Decode attention over one 8B layer at 32k keys, at each launch setting.
    pub decode_rates: Vec<profile::DecodeRate>,
    /// One-row linear layers on cuBLAS and on gemv.cu.
    pub gemv_rates: Vec<profile::GemvRate>,
    pub launch_cost: Option<profile::LaunchCost>,
    pub vram: VramInfo,
    pub bars: Vec<(String, bool)>,
}

/// Run the check; prints as it goes through `log`, writes `<out_dir>/gpu_check.json`.
/// Returns whether every kernel check passed.
pub fn run(args: &GpuCheckArgs, log: &mut dyn FnMut(&str)) -> Result<bool> {
    std::fs::create_dir_all(&args.out_dir)?;
    let gpu = Arc::new(Gpu::new(0)?);
    log(&format!("device: {}", gpu.describe()));
    let t = Instant::now();
    gpu.kernels.load_all()?;
    let nvrtc_compile_ms = t.elapsed().as_secs_f64() * 1e3;
    log(&format!(
        "NVRTC: kernels/*.cu compiled and loaded in {nvrtc_compile_ms:.0} ms"
    ));
    let kernels = check::run(gpu.clone(), 0x5eed)?;
    check::table(&kernels).iter().for_each(|l| log(l));
    let kernels_ok = kernels.iter().all(|c| c.pass);
    log(&format!(
        "kernel checks: {} passed, {} failed",
        kernels.iter().filter(|c| c.pass).count(),
        kernels.iter().filter(|c| !c.pass).count()
    ));
    let mut report = Report {
        device: gpu.describe(),
        nvrtc_compile_ms,
        kernels,
        cublas_bf16_tflops: 0.0,
        prefill_attention: "tensor cores, pipelined",
        attention_rates: Vec::new(),
        weights_bytes: 0,
        slim: args.slim.clone(),
        runs: Vec::new(),
        decode_profiles: Vec::new(),
        prefill_profiles: Vec::new(),
        decode_footprints: Vec::new(),
        decode_rates: Vec::new(),
        gemv_rates: Vec::new(),
        launch_cost: None,
        vram: gpu.vram()?,
        bars: Vec::new(),
    };
    if args.kernels_only {
        write(args, &report)?;
        return Ok(kernels_ok);
    }
    // every prefill kernel is timed; a tensor-core one that failed its checks is neither timed
    // nor run (its numbers must not decide anything); the runs take the fastest that passed
    use crate::cuda::ops::PrefillKernel;
    let with = |k: PrefillKernel| CudaOps::new(gpu.clone()).with_prefill_kernel(k);
    let checked = |k: PrefillKernel| {
        let cases = || report.kernels.iter().filter(|c| k.checked_by(&c.op));
        cases().count() > 0 && cases().all(|c| c.pass)
    };
    let timed: Vec<PrefillKernel> = (PrefillKernel::ALL.into_iter())
        .filter(|&k| k == PrefillKernel::Fma || checked(k))
        .collect();
    for k in PrefillKernel::ALL.iter().filter(|k| !timed.contains(k)) {
        log(&format!("prefill attention, {}: checks failed", k.name()));
    }
    report.cublas_bf16_tflops = rates::cublas(&with(PrefillKernel::Fma))?;
    log(&format!(
        "cuBLAS bf16 GEMM 8192^3, random data: {:.0} TFLOP/s",
        report.cublas_bf16_tflops
    ));
    // (kernel, summed ms over the lengths)
    let mut total_ms: Vec<(PrefillKernel, f64)> = timed.iter().map(|&k| (k, 0.0)).collect();
    for tokens in [8192, 32768] {
        for (k, ms) in total_ms.iter_mut() {
            let r = rates::attention(&with(*k), tokens)?;
            let occupancy = (r.footprint.as_ref()).map_or(String::new(), |f| {
                format!(
                    " ({} CTAs of {} threads an SM, {} B dynamic shared, {} registers, {} local bytes)",
                    f.ctas_per_sm, f.threads, f.dynamic_shared_bytes, f.registers, f.local_bytes
                )
            });
            log(&format!(
                "prefill attention, one 8B layer, {tokens} tokens, {}: {:.1} ms, {:.0} TFLOP/s{occupancy}",
                r.kernel, r.ms, r.tflops
            ));
            *ms += r.ms;
            report.attention_rates.push(r);
        }
    }
    let best = (total_ms.iter())
        .filter(|(k, _)| *k != PrefillKernel::Fma)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(PrefillKernel::Fma, |(k, _)| *k);
    report.prefill_attention = best.name();
    log(&format!("the runs' prefill attention: {}", best.name()));
    let ops = with(best).with_decode_tuning(decode_tuning(&with(best), &mut report, log));
    let ops = ops
        .clone()
        .with_one_row(one_row_linear(&ops, &mut report, log));
    write(args, &report)?;

    let shape = LlamaShape::llama31_8b();
    let longest = args.lengths.iter().copied().max().unwrap_or(0);
    let before = gpu.vram()?.gpu_own_bytes;
    let t = Instant::now();
    let model = OpsLlama::random(&ops, shape, longest + args.decode_tokens + 2 * KV_BLOCK, 7)?;
    ops.sync()?;
    report.weights_bytes = gpu.vram()?.gpu_own_bytes - before;
    log(&format!(
        "Llama-3.1-8B shape, random bf16 weights: {:.1} GB on the device in {:.1} s",
        report.weights_bytes as f64 / 1e9,
        t.elapsed().as_secs_f64()
    ));
    // warm-up: cuBLAS heuristics, allocator
    let mut rng = Rng::new(11);
    let warm: Vec<u32> = (0..2048).map(|_| rng.below(shape.vocab) as u32).collect();
    model.prefill(&warm, Some(&args.slim), 1, &mut NoHooks)?;
    let prompts: Vec<Vec<u32>> = (args.lengths.iter())
        .map(|&len| (0..len).map(|_| rng.below(shape.vocab) as u32).collect())
        .collect();
    // dense and pruned (every kept row in VRAM) at every length first: the TTFT, floor and
    // decode bars do not depend on the host tier's copies
    for tokens in &prompts {
        for slim in [None, Some(&args.slim)] {
            let tflops = report.cublas_bf16_tflops;
            let r = one_run(
                &model,
                &gpu,
                tokens,
                slim,
                KvPlacement::Resident,
                args,
                tflops,
            )?;
            log(&run_line(&r));
            report.runs.push(r);
            write(args, &report)?;
        }
    }
    // then pruned with the KV tiered, after a warm-up that page-locks the host tier once at the
    // longest length (reused from the arena, as a chat's later prompts find it); a failure
    // here is logged and leaves the numbers above standing
    let tiered = KvPlacement::Tiered;
    let t = Instant::now();
    let warm_tiered = (prompts.iter().max_by_key(|p| p.len()))
        .map(|p| {
            model
                .prefill_placed(p, Some(&args.slim), 1, tiered, &mut NoHooks)
                .map(drop)
        })
        .transpose();
    match warm_tiered {
        Ok(_) => log(&format!(
            "warm-up: a tiered pruned prefill at {longest} tokens (page-locks the host tier) in {:.0} ms",
            t.elapsed().as_secs_f64() * 1e3
        )),
        Err(e) => log(&format!("the tiered warm-up failed: {e}")),
    }
    for tokens in &prompts {
        let tflops = report.cublas_bf16_tflops;
        match one_run(&model, &gpu, tokens, Some(&args.slim), tiered, args, tflops) {
            Ok(r) => {
                log(&run_line(&r));
                report.runs.push(r);
                write(args, &report)?;
            }
            Err(e) => {
                log(&format!(
                    "the tiered run at {} tokens failed: {e}",
                    tokens.len()
                ));
                break;
            }
        }
    }
    // the product's default KV type (Q8, as on the CPU) at the longest length: dense, pruned
    // and tiered, beside the bf16 runs above (not in the bars)
    ops.set_kv_dtype(KvDtype::Q8);
    if let Some(tokens) = prompts.iter().max_by_key(|p| p.len()) {
        for (slim, placement) in [
            (None, KvPlacement::Resident),
            (Some(&args.slim), KvPlacement::Resident),
            (Some(&args.slim), tiered),
        ] {
            let tflops = report.cublas_bf16_tflops;
            match one_run(&model, &gpu, tokens, slim, placement, args, tflops) {
                Ok(r) => {
                    log(&format!("Q8 KV: {}", run_line(&r)));
                    report.runs.push(r);
                    write(args, &report)?;
                }
                Err(e) => {
                    log(&format!("the Q8 KV run failed: {e}"));
                    break;
                }
            }
        }
    }
    ops.set_kv_dtype(KvDtype::Bf16);
    profile_decode(&model, &mut report, &prompts, args, log);
    report.vram = gpu.vram()?;
    report.bars = bars(&report, kernels_ok);
    for line in summary(&report) {
        log(&line);
    }
    write(args, &report)?;
    Ok(kernels_ok)
}

/// The decode attention kernels' footprints and their time over one 8B layer at 32k keys at each
/// launch setting, logged: the runs take the fastest (the default when the sweep fails).
fn decode_tuning(
    ops: &CudaOps,
    report: &mut Report,
    log: &mut dyn FnMut(&str),
) -> crate::cuda::ops::DecodeTuning {
    match profile::footprints(ops) {
        Ok(f) => {
            for k in &f {
                log(&format!(
                    "kernel {}: {} registers, {} local bytes a thread, {} B dynamic shared, {} CTAs of 128 a multiprocessor",
                    k.kernel, k.registers, k.local_bytes, k.dynamic_shared_bytes, k.ctas_per_sm
                ));
            }
            report.decode_footprints = f;
        }
        Err(e) => log(&format!("the kernel footprints failed: {e}")),
    }
    match profile::decode_rates(ops, 32768) {
        Ok(rates) => {
            for r in &rates {
                log(&format!(
                    "decode attention, one 8B layer, {} keys, {}, {} CTAs a multiprocessor: {:.1} us, {:.0} GB/s, {:.1e} from the default's output{}",
                    r.keys,
                    r.tuning.kernel.name(),
                    r.tuning.ctas_per_sm,
                    r.us,
                    r.gb_s,
                    r.rel_err,
                    if r.rel_err <= profile::DECODE_AGREES { "" } else { ": WRONG, not run" }
                ));
            }
            report.decode_rates = rates;
        }
        Err(e) => log(&format!("the decode rates failed: {e}")),
    }
    let best = (report.decode_rates.iter())
        .filter(|r| r.rel_err <= profile::DECODE_AGREES)
        .min_by(|a, b| a.us.total_cmp(&b.us))
        .map_or_else(Default::default, |r| r.tuning);
    log(&format!(
        "the runs' decode attention: {}, {} CTAs a multiprocessor",
        best.kernel.name(),
        best.ctas_per_sm,
    ));
    best
}

/// The one-row linear layers' times at every setting, logged: the runs take the fastest over
/// the four layers among those that agree with cuBLAS at every one.
fn one_row_linear(
    ops: &CudaOps,
    report: &mut Report,
    log: &mut dyn FnMut(&str),
) -> crate::cuda::ops::OneRowLinear {
    use crate::cuda::ops::OneRowLinear;
    const AGREES: f64 = 1e-2;
    let rates = match profile::gemv_rates(ops) {
        Ok(rates) => rates,
        Err(e) => {
            log(&format!(
                "the one-row linear rates failed: {e}; cuBLAS runs them"
            ));
            return OneRowLinear::Cublas;
        }
    };
    for r in &rates {
        log(&format!(
            "one-row linear ({} x {}), {}: {:.1} us ({:.0} GB/s), {:.1e} from cuBLAS",
            r.shape.0,
            r.shape.1,
            r.linear.name(),
            r.us,
            r.gb_s,
            r.rel_err
        ));
    }
    let total = |l: OneRowLinear| -> Option<f64> {
        let of = || rates.iter().filter(move |r| r.linear == l);
        of().all(|r| r.rel_err <= AGREES)
            .then(|| of().map(|r| r.us).sum())
    };
    let best = (OneRowLinear::ALL.into_iter())
        .filter_map(|l| total(l).map(|us| (l, us)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(OneRowLinear::Cublas, |(l, _)| l);
    report.gemv_rates = rates;
    log(&format!("the runs' one-row linear layers: {}", best.name()));
    best
}

/// The decode profiles at the longest length and the launch costs, logged; a failure is logged
/// and leaves the rest of the report standing.
fn profile_decode(
    model: &OpsLlama<CudaOps>,
    report: &mut Report,
    prompts: &[Vec<u32>],
    args: &GpuCheckArgs,
    log: &mut dyn FnMut(&str),
) {
    match profile::launch_cost(model.ops) {
        Ok(c) => {
            log(&format!(
                "launch: {:.1} us to issue a small kernel, {:.1} us each to completion; one token's 4096x14336 GEMV {:.1} us ({:.0} GB/s)",
                c.launch_issue_us, c.launch_done_us, c.gemv_us, c.gemv_gb_s
            ));
            report.launch_cost = Some(c);
        }
        Err(e) => log(&format!("the launch cost failed: {e}")),
    }
    let Some(tokens) = prompts.iter().max_by_key(|p| p.len()) else {
        return;
    };
    for slim in [None, Some(&args.slim)] {
        match profile::prefill_profile(model, tokens, slim) {
            Ok(p) => {
                profile::prefill_lines(&p).iter().for_each(|l| log(l));
                report.prefill_profiles.push(p);
            }
            Err(e) => log(&format!("the prefill profile failed: {e}")),
        }
    }
    for (slim, placement) in [
        (None, KvPlacement::Resident),
        (Some(&args.slim), KvPlacement::Tiered),
    ] {
        match profile::profile(model, tokens, slim, placement, 8) {
            Ok(p) => {
                profile::lines(&p).iter().for_each(|l| log(l));
                report.decode_profiles.push(p);
            }
            Err(e) => log(&format!("the decode profile failed: {e}")),
        }
    }
}

/// A run's mode as the table names it: dense, or pruned with every kept row in VRAM, or tiered.
fn mode_name(pruned: bool, placement: KvPlacement) -> &'static str {
    match (pruned, placement) {
        (false, _) => "dense",
        (true, KvPlacement::Resident) => "pruned",
        (true, KvPlacement::Tiered) => "tiered",
    }
}

/// One run's line of the log.
fn run_line(r: &RunResult) -> String {
    format!(
        "{:>6} tokens {:>6}: TTFT {:>8.1} ms (floor {:>7.1} ms), decode {:>6.1} tok/s, prompt KV {:>6.2} GB, VRAM KV {:>6.2} GB, host KV {:>6.2} GB, decode reads {:>6.2} GB, held for revival {:.2} GB{}",
        r.prompt_tokens,
        r.mode,
        r.ttft_ms,
        r.prefill_floor_ms,
        r.decode_tok_s,
        r.prompt_kv_bytes as f64 / 1e9,
        r.kv_pool_bytes as f64 / 1e9,
        r.kv_host_bytes as f64 / 1e9,
        r.decode_kv_bytes as f64 / 1e9,
        r.held_bytes as f64 / 1e9,
        r.tier_counts.map_or(String::new(), |c| format!(
            ", offloads landed {:.1} ms after TTFT, decode fetched {} blocks in {:.2} ms",
            r.offload_tail_ms.unwrap_or(0.0),
            c.fetched_blocks,
            c.fetch_us as f64 / 1e3
        ))
    )
}

fn write(args: &GpuCheckArgs, report: &Report) -> Result<()> {
    let path = args.out_dir.join("gpu_check.json");
    let text = serde_json::to_string_pretty(report).map_err(|e| Error::Engine(e.to_string()))?;
    std::fs::write(&path, text)?;
    Ok(())
}

/// One prefill (timed to the first token's logits on the host) and `decode_tokens` steps. A
/// pruned run with every kept row resident also drives the async tier's offload and swap
/// drill; a tiered one keeps its KV as the chat engine does (synchronous copies).
fn one_run(
    model: &OpsLlama<CudaOps>,
    gpu: &Arc<Gpu>,
    tokens: &[u32],
    slim: Option<&SlimConfig>,
    placement: KvPlacement,
    args: &GpuCheckArgs,
    tflops: f64,
) -> Result<RunResult> {
    let shape = model.shape;
    let len = tokens.len();
    let headroom = args.decode_tokens + 2;
    gpu.stream.synchronize().or_engine("sync")?;
    let t0 = Instant::now();
    let (mut cache, report) =
        model.prefill_placed(tokens, slim, headroom, placement, &mut NoHooks)?;
    let ttft_ms = t0.elapsed().as_secs_f64() * 1e3;
    let tiered = slim.is_some() && placement == KvPlacement::Tiered;
    let offload_tail_ms = match tiered {
        true => {
            gpu.copy_stream.synchronize().or_engine("sync copies")?;
            Some(t0.elapsed().as_secs_f64() * 1e3 - ttft_ms)
        }
        false => None,
    };
    let mut next = argmax(&report.logits);
    let t1 = Instant::now();
    for _ in 0..args.decode_tokens {
        next = argmax(&model.decode(&mut cache, next, &mut NoHooks)?);
    }
    let decode_s = t1.elapsed().as_secs_f64();
    let decode_tok_s = args.decode_tokens as f64 / decode_s.max(1e-9);
    let gemm_flops = shape.gemm_flops(&report.rows_per_layer);
    let attention_flops = shape.attention_flops(&report.rows_per_layer);
    let tiers = cache.tiers();
    let result = RunResult {
        prompt_tokens: len,
        mode: mode_name(slim.is_some(), placement),
        kv_dtype: model.ops.kv_dtype(),
        ttft_ms,
        decode_tok_s,
        prompt_kv_bytes: cache.prompt_kv_bytes(&shape),
        kv_pool_bytes: tiers.fast_bytes,
        kv_host_bytes: tiers.host_bytes,
        tier_counts: tiered.then_some(tiers.counts),
        decode_kv_bytes: cache.attended_kv_bytes(model.ops, &shape),
        held_bytes: cache.session.as_ref().map_or(0, |s| s.aux_bytes()),
        rows_per_layer: report.rows_per_layer,
        gemm_flops,
        gemm_floor_ms: gemm_flops / (tflops * 1e12) * 1e3,
        attention_flops,
        prefill_floor_ms: (gemm_flops + attention_flops) / (tflops * 1e12) * 1e3,
        offload_tail_ms,
        vram_after: gpu.vram()?,
    };
    drop(cache);
    Ok(result)
}

fn argmax(v: &[f32]) -> u32 {
    (v.iter().enumerate())
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0 as u32
}

/// The issue's bars, where the numbers exist.
fn bars(r: &Report, kernels_ok: bool) -> Vec<(String, bool)> {
    let mut out = vec![("kernel tests pass".to_string(), kernels_ok)];
    let longest = r.runs.iter().map(|x| x.prompt_tokens).max().unwrap_or(0);
    let find = |mode: &str| {
        r.runs
            .iter()
            .find(|x| x.prompt_tokens == longest && x.mode == mode && x.kv_dtype == KvDtype::Bf16)
    };
    if let (Some(p), Some(t)) = (find("pruned"), find("tiered")) {
        if let Some(d) = find("dense") {
            let kv = t.kv_pool_bytes as f64 / d.prompt_kv_bytes as f64;
            out.push((
                format!(
                    "fast-tier (VRAM) KV tiered / dense prompt KV at {longest} = {kv:.3} <= 0.45"
                ),
                kv <= 0.45,
            ));
        }
        let decode = t.decode_tok_s / p.decode_tok_s;
        out.push((
            format!("decode tiered / resident at {longest} = {decode:.3} >= 0.95"),
            decode >= 0.95,
        ));
    }
    if let (Some(d), Some(p)) = (find("dense"), find("pruned")) {
        let ttft = p.ttft_ms / d.ttft_ms;
        out.push((
            format!("TTFT pruned/dense at {longest} = {ttft:.3} <= 0.4"),
            ttft <= 0.4,
        ));
        let floor = d.ttft_ms / d.prefill_floor_ms;
        out.push((
            format!(
                "dense TTFT / floor (GEMM + causal attention FLOPs at cuBLAS's rate) at {longest} = {floor:.2} <= 2.5"
            ),
            floor <= 2.5,
        ));
        out.push((
            format!(
                "dense decode at {longest} = {:.1} tok/s >= 120",
                d.decode_tok_s
            ),
            d.decode_tok_s >= 120.0,
        ));
    }
    out
}

fn summary(r: &Report) -> Vec<String> {
    let mut out = vec![
        String::new(),
        format!("== gpu-check: {} ==", r.device),
        format!(
            "{:>7} {:>7} {:>5} {:>10} {:>10} {:>9} {:>11} {:>11} {:>11} {:>9} {:>9}",
            "tokens",
            "mode",
            "KV",
            "TTFT ms",
            "floor ms",
            "decode/s",
            "prompt KV",
            "VRAM KV",
            "decode KV",
            "tail ms",
            "fetch ms"
        ),
    ];
    for x in &r.runs {
        out.push(format!(
            "{:>7} {:>7} {:>5} {:>10.1} {:>10.1} {:>9.1} {:>8.2} GB {:>8.2} GB {:>8.2} GB {:>9} {:>9}",
            x.prompt_tokens,
            x.mode,
            format!("{:?}", x.kv_dtype).to_lowercase(),
            x.ttft_ms,
            x.prefill_floor_ms,
            x.decode_tok_s,
            x.prompt_kv_bytes as f64 / 1e9,
            x.kv_pool_bytes as f64 / 1e9,
            x.decode_kv_bytes as f64 / 1e9,
            x.offload_tail_ms.map_or("-".into(), |t| format!("{t:.1}")),
            // the tiered run's fetches over its decode steps (the forward waits for them)
            x.tier_counts
                .map_or("-".into(), |c| format!("{:.3}", c.fetch_us as f64 / 1e3)),
        ));
    }
    out.push(format!(
        "VRAM: total {:.1} GB, free {:.1} GB, ours {:.1} GB; cuBLAS bf16 {:.0} TFLOP/s",
        r.vram.gpu_total_bytes as f64 / 1e9,
        r.vram.gpu_free_bytes as f64 / 1e9,
        r.vram.gpu_own_bytes as f64 / 1e9,
        r.cublas_bf16_tflops
    ));
    for (bar, ok) in &r.bars {
        out.push(format!("[{}] {bar}", if *ok { "pass" } else { "FAIL" }));
    }
    out
}
