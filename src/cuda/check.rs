//! The kernel checks on the device: every CUDA op against its CPU reference
//! ([`crate::backend::ops_check::compare`]).

use std::sync::Arc;

use super::ops::PrefillKernel;
use super::{CudaOps, Gpu};
use crate::backend::cpu_ops::CpuOps;
use crate::backend::ops_check::{compare, compare_prefill_attention, OpCheck};
use crate::Result;

/// Compare every op on `gpu` with the CPU; `seed` picks the random inputs. Prefill attention
/// is checked on both tensor-core kernels: every op with the plain one (`attention_mma_*`),
/// then the prefill cases again with the pipelined one (`attention_mma_pipelined_*`).
pub fn run(gpu: Arc<Gpu>, seed: u64) -> Result<Vec<OpCheck>> {
    let ops = |k| CudaOps::new(gpu.clone()).with_prefill_kernel(k);
    let mut checks = compare(&CpuOps, &ops(PrefillKernel::Mma), seed)?;
    let piped = PrefillKernel::MmaPipelined;
    checks.extend(compare_prefill_attention(
        &CpuOps,
        &ops(piped),
        seed,
        piped.check_prefix(),
    )?);
    Ok(checks)
}

/// The checks as table lines.
pub fn table(checks: &[OpCheck]) -> Vec<String> {
    let mut lines = vec![format!(
        "{:<32} {:<40} {:>10} {:>9}  result",
        "kernel", "shape", "rel err", "tol"
    )];
    for c in checks {
        lines.push(format!(
            "{:<32} {:<40} {:>10.2e} {:>9.0e}  {}",
            c.op,
            c.shape,
            c.rel_err,
            c.tolerance,
            if c.pass { "ok" } else { "FAIL" }
        ));
    }
    lines
}
