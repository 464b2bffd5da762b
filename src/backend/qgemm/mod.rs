//! Matrix products of many activation rows (prefill) with GGUF quantized weights, without
//! dequantizing them: out = x W^T with x (m, k) f32 and W the decode GEMV's packed tiles
//! (`QMatrix`: one of four tile formats, 16 weight rows interleaved per tile). The same bytes serve
//! decode and prefill, so no f32 copy of the weights is held.
//!
//! Each product quantizes its activation rows to Q8 once (activation.rs: per row and 32-value
//! block, ggml's Q8_0 rounding) and multiplies with integer dot products (kernels.rs: AVX-512
//! VNNI microkernels of 6 rows × 32 output columns, AVX2, scalar), scaling each block's i32 sum
//! by the weight and activation scales in f32.
//!
//! Work split: the output is cut into rectangles of up to 96 rows × all columns (fewer columns
//! when there are few rows, so there are at least ~4 tasks per thread); one parallel section
//! over the rectangles on the current rayon pool, with no parallelism inside a task.

pub mod activation;
pub mod kernels;

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use crate::backend::qgemv::kernels::Kernel;
use crate::backend::qgemv::{QMatrix, TILE};
use activation::Q8Rows;
use kernels::Gemm;

/// Activation rows per task: a multiple of every microkernel's row count, and enough rows that
/// the task's weight tiles are reused many times while they sit in L1/L2.
const ROWS_PER_TASK: usize = 96;

/// x W^T. x: (m, w.cols()) -> (m, w.rows()).
pub fn gemm(w: &QMatrix, x: &[f32]) -> Vec<f32> {
    gemm_with(Kernel::best(), w, x)
}

/// `gemm` with a chosen kernel (tests, kernel bench).
pub fn gemm_with(kernel: Kernel, w: &QMatrix, x: &[f32]) -> Vec<f32> {
    assert!(
        w.cols() > 0 && x.len().is_multiple_of(w.cols()),
        "qgemm: x has {} values, rows of {}",
        x.len(),
        w.cols()
    );
    gemm_quantized(kernel, w, &Q8Rows::quantize(x, w.cols()))
}

/// x W^T for rows already quantized (several matrices over one input quantize it once).
pub fn gemm_quantized(kernel: Kernel, w: &QMatrix, x: &Q8Rows) -> Vec<f32> {
    // Not zeroed first: the product writes every element (a memset of the output cost as
    // much as a tenth of the GEMM, on one thread).
    let mut out = Vec::with_capacity(x.rows * w.rows());
    gemm_q8(
        kernel,
        w,
        x,
        &mut out.spare_capacity_mut()[..x.rows * w.rows()],
    );
    // SAFETY: `gemm_q8` initialised all x.rows * w.rows() elements (its rectangles cover the
    // output, see `split`).
    unsafe { out.set_len(x.rows * w.rows()) };
    out
}

/// out = x W^T for already quantized rows; every element of `out` is written.
pub fn gemm_q8(kernel: Kernel, w: &QMatrix, x: &Q8Rows, out: &mut [MaybeUninit<f32>]) {
    assert_eq!(
        x.cols,
        w.cols(),
        "qgemm: x has rows of {}, want {}",
        x.cols,
        w.cols()
    );
    assert_eq!(
        out.len(),
        x.rows * w.rows(),
        "qgemm: out has {} values, want {} x {}",
        out.len(),
        x.rows,
        w.rows()
    );
    let (kind, quants, scales) = w.tiles();
    let g = Shared(Gemm {
        kind,
        quants,
        scales,
        n: w.rows(),
        x,
        out: out.as_mut_ptr().cast::<f32>(),
    });
    g.0.check();
    let tasks = split(
        x.rows,
        w.rows().div_ceil(TILE),
        rayon::current_num_threads(),
    );
    let run = |(rows, tiles): (Range<usize>, Range<usize>)| {
        // SAFETY: `check` passed; the rectangles of `split` are disjoint and inside (m, n), and
        // `out` is borrowed mutably for the whole parallel section.
        unsafe { kernels::rect(kernel, g.gemm(), rows, tiles) }
    };
    if tasks.len() == 1 {
        tasks.into_iter().for_each(run);
    } else {
        tasks.into_par_iter().for_each(run);
    }
}

/// The operands, shared by the tasks of one product.
struct Shared<'a>(Gemm<'a>);

impl<'a> Shared<'a> {
    fn gemm(&self) -> &Gemm<'a> {
        &self.0
    }
}

// SAFETY: the tasks read the operands and write disjoint rectangles of `out` (see `split`).
unsafe impl Sync for Shared<'_> {}

/// Disjoint rectangles (activation rows, weight tiles) covering (m, tiles): rows in runs of
/// `ROWS_PER_TASK`; tiles split too when that gives fewer than 4 tasks per thread.
fn split(m: usize, tiles: usize, threads: usize) -> Vec<(Range<usize>, Range<usize>)> {
    let row_runs = m.div_ceil(ROWS_PER_TASK).max(1);
    let want = 4 * threads.max(1);
    let tile_runs = if row_runs >= want {
        1
    } else {
        want.div_ceil(row_runs)
            .min(tiles.div_ceil(kernels::VNNI_TILES))
            .max(1)
    };
    let per_run = tiles
        .div_ceil(tile_runs)
        .next_multiple_of(kernels::VNNI_TILES);
    let mut out = Vec::new();
    for r in (0..m).step_by(ROWS_PER_TASK) {
        for t in (0..tiles).step_by(per_run.max(1)) {
            out.push((r..(r + ROWS_PER_TASK).min(m), t..(t + per_run).min(tiles)));
        }
    }
    out
}

#[cfg(test)]
mod tests;
