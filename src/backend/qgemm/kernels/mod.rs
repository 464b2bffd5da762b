//! The inner loops of the prefill GEMM: a rectangle of the output (activation rows × weight
//! tiles) from the packed weight tiles (`QMatrix`, 16 weight rows interleaved per tile, see
//! `qgemv::kernels` for the byte layout) and Q8-quantized activation rows.
//!
//! AVX-512 VNNI: a microkernel keeps R activation rows × T weight tiles of i32 accumulators
//! (one zmm per (row, tile): 16 output columns) for one 32-value block, and R × T f32
//! accumulators across blocks. Per 4 columns of K it loads T weight vectors of unsigned bytes
//! and broadcasts 4 activation bytes per row; each `vpdpbusd` then multiplies 4 weights of 16
//! output columns by the same 4 activation bytes. Q8_0 and Q8x16 tiles are bytes already; the
//! nibble formats (Q4_1, Q4K, Q5, Q5z) and Q6 are first unpacked to bytes, with f32 scales,
//! once per task and group of T tiles (`Unpacked`), so the microkernels, run for every group of
//! R rows, do no bit work (unpacking in the microkernel cost Q6 a third of its speed, Q5 a
//! fifth). Per block: i32 → f32, × (weight scale × activation scale), and the min × the
//! activation block sum (Q4_1, Q4K, Q5; Q5z's and Q8_0's offsets start the i32 dot instead; Q6
//! and Q8x16 have a scale per half block of 16). The weight tiles of one T group are reused by
//! every row group of a task (they stay in L1/L2); the activation rows stream.
//! AVX2 (`vpmaddubsw` + `vpmaddwd`, 8 columns per register) and scalar (any CPU, the tests'
//! reference) compute the same sums.

use std::ops::Range;

use super::activation::Q8Rows;
use crate::backend::qgemv::kernels::{nibble_scale_min, q6_value, Kernel};
use crate::backend::qgemv::{Kind, Line, QK, TILE};

/// One product out = x W^T: the operands and where the output lives.
pub struct Gemm<'a> {
    pub kind: Kind,
    /// tile-major, then block (`kind.lines()` lines per tile-block)
    pub quants: &'a [Line],
    /// tile-major, then block (`kind.scales()` f16 bit patterns per tile-block)
    pub scales: &'a [u16],
    /// weight rows = output columns
    pub n: usize,
    pub x: &'a Q8Rows,
    /// (x.rows, n) row-major
    pub out: *mut f32,
}

impl Gemm<'_> {
    fn nb(&self) -> usize {
        self.x.blocks()
    }

    fn tiles(&self) -> usize {
        self.n.div_ceil(TILE)
    }

    /// The weight operand holds every tile-block of `n` rows and `x` blocks.
    pub fn check(&self) {
        let tile_blocks = self.tiles() * self.nb();
        assert!(
            self.quants.len() >= tile_blocks * self.kind.lines(),
            "qgemm: short quants"
        );
        assert!(
            self.scales.len() >= tile_blocks * self.kind.scales(),
            "qgemm: short scales"
        );
    }
}

/// Rows of activations and tiles of weights per VNNI microkernel.
pub const VNNI_ROWS: usize = 6;
pub const VNNI_TILES: usize = 2;

/// out[rows, 16 tiles.start .. min(16 tiles.end, n)] for this rectangle.
///
/// # Safety
/// `g.check()` passed; rows ⊂ 0..g.x.rows, tiles ⊂ 0..ceil(n / 16); `g.out` points to
/// (x.rows, n) f32 and no other thread touches this rectangle of it during the call.
pub unsafe fn rect(kernel: Kernel, g: &Gemm, rows: Range<usize>, tiles: Range<usize>) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Vnni if Kernel::best() == Kernel::Vnni => {
            // SAFETY: the CPU has the features (best() checked them); bounds as the caller
            // promised.
            unsafe { x86::rect_vnni(g, rows, tiles) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Vnni | Kernel::Avx2 if Kernel::best() != Kernel::Scalar => {
            // SAFETY: as above; VNNI CPUs have AVX2, FMA and F16C too.
            unsafe { x86::rect_avx2(g, rows, tiles) }
        }
        // SAFETY: as the caller promised.
        _ => unsafe { rect_scalar(g, rows, tiles) },
    }
}

fn f16(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// Plain loops: for each output, per block an exact i32 dot, then the scales in f32.
///
/// SAFETY: as `rect`.
unsafe fn rect_scalar(g: &Gemm, rows: Range<usize>, tiles: Range<usize>) {
    let (nb, lines, scales) = (g.nb(), g.kind.lines(), g.kind.scales());
    for i in rows {
        let xq = &g.x.q[i * g.x.cols..][..g.x.cols];
        for tile in tiles.clone() {
            for lane in 0..TILE.min(g.n - tile * TILE) {
                let mut acc = 0.0f32;
                for b in 0..nb {
                    let tb = tile * nb + b;
                    let xb = &xq[b * QK..][..QK];
                    let s = &g.scales[tb * scales..][..scales];
                    let ib = i * nb + b;
                    // dot[h]: the i32 dot over values 16h..16h+16
                    let mut dot = [0i32; 2];
                    let tile_lines = &g.quants[tb * lines..][..lines];
                    let nibble_lines = match g.kind {
                        Kind::Q5 | Kind::Q5z | Kind::Q6 => 4,
                        _ => lines,
                    };
                    for (k, line) in tile_lines[..nibble_lines].iter().enumerate() {
                        for (j, &byte) in line.0[4 * lane..][..4].iter().enumerate() {
                            match g.kind {
                                Kind::Q4_1 | Kind::Q4K | Kind::Q5 | Kind::Q5z => {
                                    let (mut lo, mut hi) = (byte & 15, byte >> 4);
                                    if matches!(g.kind, Kind::Q5 | Kind::Q5z) {
                                        let h = tile_lines[4].0[4 * lane + j];
                                        lo |= ((h >> k) & 1) << 4;
                                        hi |= ((h >> (4 + k)) & 1) << 4;
                                    }
                                    dot[0] += lo as i32 * xb[4 * k + j] as i32;
                                    dot[1] += hi as i32 * xb[16 + 4 * k + j] as i32;
                                }
                                Kind::Q6 => {
                                    for (h, dot) in dot.iter_mut().enumerate() {
                                        let q = q6_value(tile_lines, lane, h, k, j);
                                        *dot += q as i32 * xb[16 * h + 4 * k + j] as i32;
                                    }
                                }
                                Kind::Q8_0 => {
                                    dot[k / 4] +=
                                        ((byte ^ 0x80) as i8) as i32 * xb[4 * k + j] as i32
                                }
                                Kind::Q8x16 => dot[k / 4] += byte as i32 * xb[4 * k + j] as i32,
                            }
                        }
                    }
                    match g.kind {
                        Kind::Q4_1 | Kind::Q4K | Kind::Q5 | Kind::Q5z => {
                            let (d, m) = nibble_scale_min(g.kind, g.scales, tb, lane);
                            acc += d * g.x.d[ib] * (dot[0] + dot[1]) as f32;
                            acc += m * g.x.dsum[ib];
                        }
                        Kind::Q8_0 => acc += f16(s[lane]) * g.x.d[ib] * (dot[0] + dot[1]) as f32,
                        Kind::Q6 => {
                            for h in 0..2 {
                                let sum = g.x.d[ib] * dot[h] as f32 - 32.0 * g.x.dsum16[2 * ib + h];
                                acc += f16(s[h * TILE + lane]) * sum;
                            }
                        }
                        Kind::Q8x16 => {
                            for h in 0..2 {
                                acc += f16(s[h * TILE + lane]) * g.x.d[ib] * dot[h] as f32;
                                acc += f16(s[(2 + h) * TILE + lane]) * g.x.dsum16[2 * ib + h];
                            }
                        }
                    }
                }
                // SAFETY: (i, tile * 16 + lane) is inside this rectangle (caller).
                unsafe { *g.out.add(i * g.n + tile * TILE + lane) = acc };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;
