//! The kernel checks on the device: every CUDA op against its CPU reference
//! ([`crate::backend::ops_check::compare`]).

use std::sync::Arc;

use super::{CudaOps, Gpu};
use crate::backend::cpu_ops::CpuOps;
use crate::backend::ops_check::{compare, OpCheck};
use crate::Result;

/// Compare every op on `gpu` with the CPU; `seed` picks the random inputs.
pub fn run(gpu: Arc<Gpu>, seed: u64) -> Result<Vec<OpCheck>> {
    compare(&CpuOps, &CudaOps::new(gpu), seed)
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
