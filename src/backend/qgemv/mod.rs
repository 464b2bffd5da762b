//! Matrix-vector products straight from GGUF quantized weights, for decode: one row of
//! activations against the whole weight matrix, bound by the bytes read (0.578 to 1.25 bytes per
//! weight, against dense f32's 4).
//!
//! GGUF blocks (ggml): Q4_1 = { f16 d, f16 m, u8 qs[16] } for 32 weights, weight j is
//! `d * q_j + m` with q_j the low nibble of qs[j] (j < 16) or the high nibble of qs[j - 16];
//! Q8_0 = { f16 d, i8 qs[32] }, weight j is `d * qs[j]`. Q4_K keeps its own form in Q4K tiles
//! (0.578 bytes per weight: nibbles, its 6-bit sub-block scales and mins as bytes, f16 d and dmin
//! per row and 256 columns). Every other integer type (Q4_0, Q5_*, the other K-quants) is read
//! into one common form (unpack.rs: integer quants, a scale and a min per 16 or 32 values) and
//! repacked into the smallest tile format that holds it exactly (`Kind`): Q4_1 (0.625 bytes per
//! weight: Q4_0, Q4_1), Q5z (0.6875: Q5_0), Q5 (0.75: Q5_1, Q5_K), Q6 (0.875: Q6_K, Q3_K), Q8_0
//! (1.0625) and Q8x16 (1.25, a byte per weight with a scale and min per 16: Q2_K). Float weights
//! (F16, BF16, F32) are rounded to Q8_0 at load.
//!
//! At load the blocks are repacked into tiles of 16 rows (kernels.rs has the byte layout): the
//! kernel streams one tile's blocks in order and keeps each row in one lane of an i32 vector,
//! so there is no horizontal sum and no shuffle. Each product quantizes the activation row to
//! Q8 once (activation.rs) and multiplies with integer dot products; rows are split across the
//! thread pool in runs of whole tiles. Several matrices over the same input (q/k/v, gate/up)
//! can be stacked into one, so the activation is quantized once and the pool entered once.

pub mod activation;
pub mod kernels;
pub mod unpack;

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use activation::Q8Row;
use kernels::{Kernel, Tiles};
use unpack::{K4Block, Sub32};

/// Values per quantized block.
pub const QK: usize = 32;
/// Rows interleaved in one tile.
pub const TILE: usize = 16;

/// 64 bytes on a cache-line boundary: the kernels load whole aligned lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Line(pub [u8; 64]);

/// The tile format a matrix was repacked into (kernels.rs has the byte layouts).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// 4-bit quants, an f16 scale and min per 32: Q4_0, Q4_1.
    Q4_1,
    /// Q4_K as it is: 4-bit quants, 6-bit scale and min codes per 32 (bytes), f16 d and dmin per
    /// 256: weight = d sc q - dmin m.
    Q4K,
    /// Q5's quants with an f16 scale per 32 and the fixed offset -16 (d (q - 16)): Q5_0.
    Q5z,
    /// 5-bit quants (Q4_1's nibbles plus a line of fifth bits), an f16 scale and min per 32:
    /// Q5_1, Q5_K.
    Q5,
    /// 6-bit quants (Q4_1's nibbles plus two lines of fifth and sixth bits), an f16 scale per 16
    /// and the fixed offset -32: weight = d (q - 32). Q6_K, and Q3_K (its q - 4 is q + 28 - 32).
    Q6,
    /// signed 8-bit quants, an f16 scale per 32: Q8_0, and float weights rounded to it at load.
    Q8_0,
    /// a byte per weight (quants below 64), an f16 scale and min per 16: Q2_K.
    Q8x16,
}

impl Kind {
    /// The tile format of a GGUF type: the smallest that holds its weights exactly (up to the
    /// f16 rounding of a K-quant's scale products); None for a type without a kernel here.
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        use GgmlDType as T;
        Some(match dtype {
            T::Q4_0 | T::Q4_1 => Kind::Q4_1,
            T::Q4K => Kind::Q4K,
            T::Q5_0 => Kind::Q5z,
            T::Q5_1 | T::Q5K => Kind::Q5,
            T::Q6K | T::Q3K => Kind::Q6,
            T::Q8_0 | T::F16 | T::BF16 | T::F32 => Kind::Q8_0,
            T::Q2K => Kind::Q8x16,
            _ => return None,
        })
    }

    /// What Q6 tiles add to a type's quants so that its min is -32 scales (Q3_K's is -4).
    fn q6_shift(dtype: GgmlDType) -> u8 {
        if dtype == GgmlDType::Q3K {
            28
        } else {
            0
        }
    }

    /// Lines of 64 bytes per tile-block.
    pub(crate) fn lines(self) -> usize {
        match self {
            Kind::Q4_1 => kernels::Q4_1_LINES,
            Kind::Q4K => kernels::Q4K_LINES,
            Kind::Q5 | Kind::Q5z => kernels::Q5_LINES,
            Kind::Q6 => kernels::Q6_LINES,
            Kind::Q8_0 => kernels::Q8_0_LINES,
            Kind::Q8x16 => kernels::Q8X16_LINES,
        }
    }

    /// u16 scale slots per tile-block (f16 bit patterns; Q4K: on average, see kernels.rs).
    pub(crate) fn scales(self) -> usize {
        match self {
            Kind::Q4K => kernels::Q4K_SCALES,
            Kind::Q4_1 | Kind::Q5 | Kind::Q6 => kernels::Q4_1_SCALES,
            Kind::Q5z => kernels::Q5Z_SCALES,
            Kind::Q8_0 => kernels::Q8_0_SCALES,
            Kind::Q8x16 => kernels::Q8X16_SCALES,
        }
    }
}

/// Tiles `first..` of a matrix and the rows of the output they make.
struct Run<'a> {
    m: &'a QMatrix,
    first: usize,
    out: &'a mut [f32],
}

impl Run<'_> {
    fn compute(self, kernel: Kernel, x: &Q8Row) {
        let m = self.m;
        let nb = m.cols / QK;
        let (lines, scales) = (m.kind.lines() * nb, m.kind.scales() * nb); // per tile
        let t = Tiles {
            quants: &m.quants[self.first * lines..],
            scales: &m.scales[self.first * scales..],
            nb,
        };
        let out = self.out;
        match m.kind {
            Kind::Q4_1 => kernels::q4_1(kernel, &t, x, out),
            Kind::Q4K => kernels::q4k(kernel, &t, x, out),
            Kind::Q5 => kernels::q5(kernel, &t, x, out),
            Kind::Q5z => kernels::q5z(kernel, &t, x, out),
            Kind::Q6 => kernels::q6(kernel, &t, x, out),
            Kind::Q8_0 => kernels::q8_0(kernel, &t, x, out),
            Kind::Q8x16 => kernels::q8x16(kernel, &t, x, out),
        }
    }
}

/// A (rows, cols) weight matrix in tiles of 16 rows (the last one padded with zero weights).
pub struct QMatrix {
    kind: Kind,
    rows: usize,
    cols: usize,
    /// tile-major, then block: `kind.lines()` lines per tile-block
    quants: Vec<Line>,
    /// tile-major, then block: `kind.scales()` f16 bit patterns per tile-block
    scales: Vec<u16>,
}

/// One weight row, read from its GGUF blocks into the form its tiles take.
enum RowBlocks {
    /// Q8_0 blocks { f16 d, i8 qs[32] }
    Q8_0(Vec<u8>),
    /// 32 columns each (`Q4_1`, `Q5`, `Q5z`, `Q6` and `Q8x16` tiles)
    Subs(Vec<Sub32>),
    /// Q4_K super-blocks of 256 columns (`Q4K` tiles)
    K4(Vec<K4Block>),
}

/// The GGUF rows of one tensor, with how to read them.
struct SourceRows<'a> {
    dtype: GgmlDType,
    data: Cow<'a, [u8]>,
    row_bytes: usize,
}

impl SourceRows<'_> {
    fn rows(&self) -> usize {
        self.data.len() / self.row_bytes
    }

    fn read(&self, r: usize, kind: Kind, cols: usize) -> RowBlocks {
        let row = &self.data[r * self.row_bytes..][..self.row_bytes];
        match kind {
            Kind::Q8_0 if self.dtype == GgmlDType::Q8_0 => RowBlocks::Q8_0(row.to_vec()),
            Kind::Q8_0 => {
                RowBlocks::Q8_0(unpack::as_q8_0(self.dtype, row).expect("a float type (Kind::of)"))
            }
            Kind::Q4K => RowBlocks::K4(unpack::k4_row(row)),
            Kind::Q4_1 | Kind::Q5 | Kind::Q5z | Kind::Q6 | Kind::Q8x16 => {
                let mut subs = vec![Sub32::default(); cols / QK];
                unpack::unpack_row(self.dtype, row, &mut subs);
                RowBlocks::Subs(subs)
            }
        }
    }
}

impl QMatrix {
    /// The matrix of a 2-D tensor of a type with a kernel here, in the smallest tile format that
    /// holds it (`Kind::of`); None for other types.
    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<Option<Self>> {
        Self::stacked(&[t])
    }

    /// The rows of several tensors of one width, stacked in order; None when their types take
    /// different tile formats (a Q4_K_M file's Q4_K q/k beside a Q6_K v are better apart, each
    /// at its own size), a type has no kernel here, or the widths differ.
    pub fn stacked(parts: &[&QTensor]) -> candle_core::Result<Option<Self>> {
        let Some(kind) = parts.first().and_then(|p| Kind::of(p.dtype())) else {
            return Ok(None);
        };
        if parts.iter().any(|p| Kind::of(p.dtype()) != Some(kind)) {
            return Ok(None);
        }
        Self::stacked_in(parts, kind)
    }

    /// `from_qtensor` in a chosen tile format: its own (`Kind::of`), or for Q4_K the Q4_1 tiles
    /// it took before Q4K (the kernel bench compares them); None for any other.
    pub fn from_qtensor_in(t: &QTensor, kind: Kind) -> candle_core::Result<Option<Self>> {
        let own = Kind::of(t.dtype()) == Some(kind);
        if !own && (t.dtype(), kind) != (GgmlDType::Q4K, Kind::Q4_1) {
            return Ok(None);
        }
        Self::stacked_in(&[t], kind)
    }

    /// `stacked` into tiles of `kind`, which holds every part's type.
    fn stacked_in(parts: &[&QTensor], kind: Kind) -> candle_core::Result<Option<Self>> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        let cols = first.shape().dims2()?.1;
        let mut sources = Vec::with_capacity(parts.len());
        for p in parts {
            let (rows, c) = p.shape().dims2()?;
            let dtype = p.dtype();
            if c != cols || !cols.is_multiple_of(QK) || !cols.is_multiple_of(dtype.block_size()) {
                return Ok(None);
            }
            let data = p.data()?;
            let row_bytes = cols / dtype.block_size() * dtype.type_size();
            if data.len() != rows * row_bytes {
                candle_core::bail!(
                    "qgemv: {dtype:?} tensor ({rows}, {cols}) has {} bytes",
                    data.len()
                )
            }
            sources.push(SourceRows {
                dtype,
                data,
                row_bytes,
            });
        }
        let rows: Vec<(&SourceRows, usize)> = sources
            .iter()
            .flat_map(|s| (0..s.rows()).map(move |r| (s, r)))
            .collect();
        Ok(Some(Self::repack(kind, cols, &rows)))
    }

    /// Build the tiles from rows of GGUF blocks, each row read once.
    fn repack(kind: Kind, cols: usize, rows: &[(&SourceRows, usize)]) -> Self {
        let nb = cols / QK;
        let tiles = rows.len().div_ceil(TILE);
        let mut quants = vec![Line([0; 64]); tiles * nb * kind.lines()];
        let mut scales = vec![0u16; tiles * nb * kind.scales()];
        let f16_bits = |v: f32| f16::from_f32(v).to_bits();
        for tile in 0..tiles {
            for r in 0..TILE {
                let row = rows
                    .get(tile * TILE + r)
                    .map(|(src, i)| src.read(*i, kind, cols));
                for b in 0..nb {
                    let tb = tile * nb + b;
                    let lines = &mut quants[tb * kind.lines()..][..kind.lines()];
                    let s = &mut scales[tb * kind.scales()..][..kind.scales()];
                    match &row {
                        // a zero weight is stored as 0 + 128; the other formats' zero is 0
                        None if kind == Kind::Q8_0 => {
                            lines.iter_mut().for_each(|l| l.0[4 * r..][..4].fill(0x80))
                        }
                        None => {}
                        Some(RowBlocks::K4(blocks)) => {
                            let block = &blocks[b / kernels::Q4K_BLOCKS];
                            let tile_scales = &mut scales[tile * nb * kind.scales()..];
                            Self::put_q4k(lines, tile_scales, b, r, block);
                        }
                        Some(RowBlocks::Q8_0(blocks)) => {
                            let block = &blocks[b * 34..][..34];
                            s[r] = u16::from_le_bytes([block[0], block[1]]);
                            for (k, l) in lines.iter_mut().enumerate() {
                                for j in 0..4 {
                                    l.0[4 * r + j] = block[2 + 4 * k + j] ^ 0x80;
                                }
                            }
                        }
                        Some(RowBlocks::Subs(subs)) => {
                            let sub = &subs[b];
                            let dtype = rows[tile * TILE + r].0.dtype;
                            match kind {
                                Kind::Q6 => {
                                    let shift = Kind::q6_shift(dtype);
                                    let q = |i: usize| sub.q[i] + shift; // below 64
                                    for h in 0..2 {
                                        s[h * TILE + r] = f16_bits(sub.s[h]);
                                    }
                                    for (k, l) in lines[..4].iter_mut().enumerate() {
                                        for j in 0..4 {
                                            l.0[4 * r + j] = (q(4 * k + j) & 15)
                                                | ((q(16 + 4 * k + j) & 15) << 4);
                                        }
                                    }
                                    // line 4 + h, byte 4r + j: bits 2k, 2k+1 are bits 4, 5 of
                                    // value 16h + 4k + j
                                    for h in 0..2 {
                                        for j in 0..4 {
                                            lines[4 + h].0[4 * r + j] = (0..4)
                                                .map(|k| (q(16 * h + 4 * k + j) >> 4) << (2 * k))
                                                .fold(0, |a, b| a | b);
                                        }
                                    }
                                }
                                Kind::Q4_1 | Kind::Q5 | Kind::Q5z => {
                                    s[r] = f16_bits(sub.s[0]);
                                    if kind != Kind::Q5z {
                                        s[TILE + r] = f16_bits(sub.m[0]);
                                    }
                                    let q = |i: usize| sub.q[i] & 15;
                                    for (k, l) in lines[..4].iter_mut().enumerate() {
                                        for j in 0..4 {
                                            l.0[4 * r + j] =
                                                q(4 * k + j) | (q(16 + 4 * k + j) << 4);
                                        }
                                    }
                                    if kind != Kind::Q4_1 {
                                        // byte 4r + j: bit k is value 4k + j's fifth bit, bit
                                        // 4 + k value 16 + 4k + j's
                                        let high = |i: usize| (sub.q[i] >> 4) & 1;
                                        for j in 0..4 {
                                            lines[4].0[4 * r + j] = (0..4)
                                                .map(|k| {
                                                    high(4 * k + j) << k
                                                        | high(16 + 4 * k + j) << (4 + k)
                                                })
                                                .fold(0, |a, b| a | b);
                                        }
                                    }
                                }
                                _ => {
                                    for h in 0..2 {
                                        s[h * TILE + r] = f16_bits(sub.s[h]);
                                        s[(2 + h) * TILE + r] = f16_bits(sub.m[h]);
                                    }
                                    for (k, l) in lines.iter_mut().enumerate() {
                                        l.0[4 * r..][..4].copy_from_slice(&sub.q[4 * k..][..4]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Self {
            kind,
            rows: rows.len(),
            cols,
            quants,
            scales,
        }
    }

    /// Row `r` of tile-block `b` of a tile from its Q4_K super-block: the nibbles as Q4_1's,
    /// d and dmin (at the super-block's first block), sc and m as bytes (`kernels::q4k_offsets`).
    fn put_q4k(lines: &mut [Line], tile_scales: &mut [u16], b: usize, r: usize, k: &K4Block) {
        let j = b % kernels::Q4K_BLOCKS;
        let q = &k.q[j];
        for (kk, l) in lines.iter_mut().enumerate() {
            for i in 0..4 {
                l.0[4 * r + i] = q[4 * kk + i] | (q[16 + 4 * kk + i] << 4);
            }
        }
        let (sup, own) = kernels::q4k_offsets(b);
        tile_scales[sup + r] = k.d;
        tile_scales[sup + TILE + r] = k.dmin;
        let mut put_byte = |i: usize, v: u8| {
            let mut pair = tile_scales[own + i / 2].to_le_bytes();
            pair[i % 2] = v;
            tile_scales[own + i / 2] = u16::from_le_bytes(pair);
        };
        put_byte(r, k.sc[j]);
        put_byte(TILE + r, k.m[j]);
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn bytes(&self) -> usize {
        self.quants.len() * 64 + self.scales.len() * 2
    }

    /// The block type and the tiles (tile-major, then block), for the prefill GEMM.
    pub(crate) fn tiles(&self) -> (Kind, &[Line], &[u16]) {
        (self.kind, &self.quants, &self.scales)
    }

    /// out = W x. x: (cols), out: (rows).
    pub fn gemv(&self, x: &[f32], out: &mut [f32]) {
        self.gemv_with(Kernel::best(), x, out)
    }

    /// `gemv` with a chosen kernel (tests, kernel bench).
    pub fn gemv_with(&self, kernel: Kernel, x: &[f32], out: &mut [f32]) {
        assert_eq!(
            x.len(),
            self.cols,
            "qgemv: x has {} values, want {}",
            x.len(),
            self.cols
        );
        self.gemv_q8(kernel, &Q8Row::quantize(x), out)
    }

    /// out = W x for an already quantized x.
    pub fn gemv_q8(&self, kernel: Kernel, x: &Q8Row, out: &mut [f32]) {
        let runs = self.runs(x, out);
        if runs.len() == 1 {
            return runs.into_iter().for_each(|r| r.compute(kernel, x));
        }
        runs.into_par_iter().for_each(|r| r.compute(kernel, x));
    }

    /// outs[i] = parts[i] x for one activation row of their common width: x quantized once and
    /// every part's runs in one parallel section (several matrices over one input whose types
    /// take different tile formats, which cannot be stacked into one).
    pub fn gemv_each(parts: &[&QMatrix], x: &[f32], outs: &mut [&mut [f32]]) {
        let (kernel, xq) = (Kernel::best(), Q8Row::quantize(x));
        let runs: Vec<Run> = parts
            .iter()
            .zip(outs.iter_mut())
            .flat_map(|(m, out)| m.runs(&xq, out))
            .collect();
        runs.into_par_iter().for_each(|r| r.compute(kernel, &xq));
    }

    /// `out` cut into runs of whole tiles: four per thread so that a core slowed by another
    /// process can be helped, each large enough (>= 4 tiles) to amortise entering the pool, and
    /// of sizes that differ by at most one tile (36 tiles as 7 runs of 5 and one of 1 would
    /// leave one thread a fifth more work).
    fn runs<'a>(&'a self, x: &Q8Row, out: &'a mut [f32]) -> Vec<Run<'a>> {
        assert_eq!(
            x.q.len(),
            self.cols,
            "qgemv: x has {} values, want {}",
            x.q.len(),
            self.cols
        );
        assert_eq!(
            out.len(),
            self.rows,
            "qgemv: out has {} values, want {}",
            out.len(),
            self.rows
        );
        let tiles = self.rows.div_ceil(TILE);
        let threads = rayon::current_num_threads().max(1);
        let n_runs = (4 * threads).min(tiles / 4).max(1);
        let mut runs = Vec::with_capacity(n_runs);
        let mut rest = out;
        for i in 0..n_runs {
            let (first, end) = (i * tiles / n_runs, (i + 1) * tiles / n_runs);
            let rows = (end * TILE).min(self.rows) - first * TILE;
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(rows);
            runs.push(Run {
                m: self,
                first,
                out: part,
            });
            rest = tail;
        }
        runs
    }

    /// out = W x in f32: each weight exactly as the GGUF defines it, x unrounded, f32 sums;
    /// equal to the dequantized f32 matrix's product up to summation order. For one-row
    /// products that must not take Q8 rounding (a prefill's head), without holding W in f32.
    pub fn gemv_f32(&self, x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), self.cols, "qgemv: x has {} values", x.len());
        assert_eq!(out.len(), self.rows, "qgemv: out has {} values", out.len());
        let per_run = 64 * TILE;
        out.par_chunks_mut(per_run)
            .enumerate()
            .for_each(|(i, out)| {
                let mut w = [0.0f32; QK];
                for (j, o) in out.iter_mut().enumerate() {
                    let r = i * per_run + j;
                    let mut acc = [0.0f32; QK];
                    for (b, xb) in x.chunks_exact(QK).enumerate() {
                        self.row_block(r, b, &mut w);
                        acc.iter_mut()
                            .zip(w.iter().zip(xb))
                            .for_each(|(a, (w, x))| *a += w * x);
                    }
                    *o = acc.iter().sum();
                }
            });
    }

    /// Weights of row `r`, block `b` (columns 32b..32b+32) as f32.
    fn row_block(&self, r: usize, b: usize, wb: &mut [f32; QK]) {
        let f = |bits: u16| f16::from_bits(bits).to_f32();
        let (tile, lane) = (r / TILE, r % TILE);
        let tb = tile * (self.cols / QK) + b;
        let lines = &self.quants[tb * self.kind.lines()..][..self.kind.lines()];
        let s = &self.scales[tb * self.kind.scales()..];
        let byte = |k: usize, j: usize| lines[k].0[4 * lane + j];
        match self.kind {
            Kind::Q4_1 | Kind::Q4K | Kind::Q5 | Kind::Q5z => {
                let (d, m) = kernels::nibble_scale_min(self.kind, &self.scales, tb, lane);
                for k in 0..4 {
                    for j in 0..4 {
                        let (mut lo, mut hi) = (byte(k, j) & 15, byte(k, j) >> 4);
                        if matches!(self.kind, Kind::Q5 | Kind::Q5z) {
                            let h = byte(4, j);
                            lo |= ((h >> k) & 1) << 4;
                            hi |= ((h >> (4 + k)) & 1) << 4;
                        }
                        wb[4 * k + j] = d * lo as f32 + m;
                        wb[16 + 4 * k + j] = d * hi as f32 + m;
                    }
                }
            }
            Kind::Q6 => {
                let d = [f(s[lane]), f(s[TILE + lane])];
                for h in 0..2 {
                    for k in 0..4 {
                        for j in 0..4 {
                            let q = kernels::q6_value(lines, lane, h, k, j);
                            wb[16 * h + 4 * k + j] = d[h] * (q as f32 - 32.0);
                        }
                    }
                }
            }
            Kind::Q8_0 => {
                let d = f(s[lane]);
                for (i, w) in wb.iter_mut().enumerate() {
                    *w = d * ((byte(i / 4, i % 4) ^ 0x80) as i8) as f32;
                }
            }
            Kind::Q8x16 => {
                let d = [f(s[lane]), f(s[TILE + lane])];
                let m = [f(s[2 * TILE + lane]), f(s[3 * TILE + lane])];
                for (i, w) in wb.iter_mut().enumerate() {
                    *w = d[i / 16] * byte(i / 4, i % 4) as f32 + m[i / 16];
                }
            }
        }
    }

    /// Row `r` of the weights as f32 (a tied head's rows are the token embeddings).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.rows && out.len() == self.cols,
            "qgemv: row {r} of {}",
            self.rows
        );
        let mut block = [0.0f32; QK];
        for (b, ob) in out.chunks_exact_mut(QK).enumerate() {
            self.row_block(r, b, &mut block);
            ob.copy_from_slice(&block);
        }
    }

    /// The weights as f32, (rows, cols) row-major (for tests).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0.0f32; self.rows * self.cols];
        for (r, row) in w.chunks_exact_mut(self.cols).enumerate() {
            self.row_f32(r, row);
        }
        w
    }
}

#[cfg(test)]
pub(crate) mod tests;
