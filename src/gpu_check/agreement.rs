//! `slimchat gpu-check --agreement`: one model file through the ops forward on the GPU, on the
//! CPU (`CpuOps`) and through the CPU engine, teacher-forced over the same tokens of real text,
//! compared pairwise (top-1 agreement, largest logit difference, NLL). The GPU run's "CPU and GPU
//! agree" bar reads `gpu_vs_engine`.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::backend::cpu_ops::CpuOps;
use crate::backend::linear::LinearMode;
use crate::bench::LONG_TEXT;
use crate::cuda::{CudaOps, Gpu};
use crate::engine::{Engine, EngineOptions};
use crate::eval::logits::{compare, LogitAgreement};
use crate::model::gguf::GgufFile;
use crate::model::ops_llama::OpsLlama;
use crate::{Error, Result};

#[derive(Debug, Clone, Serialize)]
pub struct AgreementReport {
    pub model: String,
    pub tokens: usize,
    /// The engine's linear layers (int8 by default: the product's CPU path).
    pub engine_linear: LinearMode,
    /// The ops forward on the GPU (bf16, cuBLAS) against the CPU engine.
    pub gpu_vs_engine: LogitAgreement,
    /// The ops forward on the GPU against the same forward on the CPU (the kernels alone).
    pub gpu_vs_cpu_ops: LogitAgreement,
    /// The ops forward on the CPU against the CPU engine (the forwards alone).
    pub cpu_ops_vs_engine: LogitAgreement,
    /// Weights uploaded and expanded to bf16 on the GPU, and the teacher-forced forward there.
    pub gpu_load_ms: f64,
    pub gpu_forward_ms: f64,
}

/// Compare over the first `tokens` tokens of the bench text; the report also goes to
/// `<out_dir>/agreement.json`.
pub fn run(
    model: &Path,
    engine_linear: LinearMode,
    tokens: usize,
    out_dir: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<AgreementReport> {
    let mut opts = EngineOptions {
        linear: engine_linear,
        ..Default::default()
    };
    opts.slim.enabled = false;
    let mut engine = Engine::load(model, &opts)?;
    let ids = engine.encode_plain(LONG_TEXT)?;
    let ids = ids
        .get(..tokens)
        .ok_or_else(|| Error::Usage(format!("the text has {} tokens, not {tokens}", ids.len())))?
        .to_vec();
    let want = engine.logits_from(&ids, 0)?;
    drop(engine);

    let mut file = GgufFile::open(model)?;
    let on_cpu = OpsLlama::from_gguf(&CpuOps, &mut file, tokens)?;
    let vocab = on_cpu.shape.vocab;
    let cpu = on_cpu.logits_all(&ids)?;
    drop(on_cpu);

    let gpu = Arc::new(Gpu::new(0)?);
    let ops = CudaOps::new(gpu);
    let t = Instant::now();
    let on_gpu = OpsLlama::from_gguf(&ops, &mut file, tokens)?;
    crate::backend::ops::Ops::sync(&ops)?;
    let gpu_load_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let got = on_gpu.logits_all(&ids)?;
    let gpu_forward_ms = t.elapsed().as_secs_f64() * 1e3;

    let report = AgreementReport {
        model: model.display().to_string(),
        tokens,
        engine_linear,
        gpu_vs_engine: compare(&got, &want, vocab, &ids),
        gpu_vs_cpu_ops: compare(&got, &cpu, vocab, &ids),
        cpu_ops_vs_engine: compare(&cpu, &want, vocab, &ids),
        gpu_load_ms,
        gpu_forward_ms,
    };
    for (what, a) in [
        ("GPU ops forward vs CPU engine", &report.gpu_vs_engine),
        ("GPU ops forward vs CPU ops forward", &report.gpu_vs_cpu_ops),
        ("CPU ops forward vs CPU engine", &report.cpu_ops_vs_engine),
    ] {
        log(&format!(
            "{what}: top-1 agreement {:.3} over {} positions, largest logit difference {:.3} of {:.1}, NLL {:.4} vs {:.4}",
            a.top1_agreement, a.positions, a.max_abs_diff, a.max_abs_logit, a.nll_a, a.nll_b
        ));
    }
    log(&format!(
        "GPU: weights expanded in {gpu_load_ms:.0} ms, {tokens}-token forward in {gpu_forward_ms:.0} ms"
    ));
    std::fs::create_dir_all(out_dir)?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Engine(e.to_string()))?;
    std::fs::write(out_dir.join("agreement.json"), json)?;
    Ok(report)
}
