//! The inner loops of the decode GEMV: a run of row tiles (16 rows interleaved, see
//! `super::QMatrix`) against one Q8-quantized activation row. Three versions of each, chosen
//! at run time: AVX-512 VNNI (`vpdpbusd`, 16 rows in the 16 i32 lanes of one register), AVX2
//! (`vpmaddubsw` + `vpmaddwd`, 8 rows per register) and scalar (any CPU; the reference the
//! others are tested against).
//!
//! Tile-block layouts (one tile = 16 rows, one block = 32 columns):
//! - Q4_1: 4 lines of 64 bytes; line k holds, for rows r = 0..16, the row's nibble bytes
//!   qs[4k..4k+4] at bytes 4r..4r+4: low nibbles are weights 4k..4k+4, high nibbles weights
//!   16+4k..16+4k+4. Scales: 16 f16 d then 16 f16 m.
//! - Q5: Q4_1's 4 lines, then a line of fifth bits: byte 4r + j holds, in bit k, the fifth bit
//!   of value 4k + j of row r and, in bit 4 + k, that of value 16 + 4k + j (k < 4), so that
//!   line k's nibbles get theirs with one shift and mask. Scales as Q4_1.
//! - Q5z: Q5's lines; scales: 16 f16 d only, the min is -16 d (Q5_0's d (q - 16)).
//! - Q6: Q4_1's 4 lines of low nibbles, then two lines of bits 4-5: in line 4 + h, byte 4r + j
//!   holds in bits 2k, 2k+1 the high bits of value 16h + 4k + j of row r (k < 4). Scales: 16
//!   f16 d for values 0..16, 16 for values 16..32; weight = d_h (q - 32).
//! - Q4K: Q4_1's 4 lines; Q4_K's integer scales kept: weight = d sc q - dmin m with d, dmin f16
//!   per row and 256 columns (the GGUF super-block) and sc, m 6-bit codes per row and 32. Scales
//!   (u16 slots) per tile and super-block of 8 tile-blocks: 16 f16 d, 16 f16 dmin, then per
//!   tile-block 32 bytes: the 16 rows' sc, then their m (`Q4K_SCALES` = 20 slots per tile-block
//!   on average; see `q4k_offsets`). d sc and dmin m are exact f32 products.
//! - Q8_0: 8 lines; line k holds the rows' weights 4k..4k+4 as bytes w ^ 0x80 (= w + 128, so
//!   they are unsigned for `vpdpbusd`; the 128 Σ x it adds is subtracted per block).
//!   Scales: 16 f16 d.
//! - Q8x16: 8 lines laid out as Q8_0's, but the bytes are the unsigned quants themselves (below
//!   64, so AVX2's `vpmaddubsw` pairs cannot saturate). Scales: 16 f16 d for values 0..16, 16 for
//!   values 16..32, then the two halves' mins: weight = d_h q + m_h.

use super::activation::Q8Row;
use super::{Kind, Line, QK, TILE};

/// Which implementation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Vnni,
    Avx2,
    Scalar,
}

impl Kernel {
    /// The fastest the CPU supports.
    pub fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") && has!("f16c") {
                return Self::Vnni;
            }
            if has!("avx2") && has!("fma") && has!("f16c") {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }

    /// Every kernel this CPU can run (for tests and the kernel bench).
    pub fn available() -> Vec<Self> {
        let best = Self::best();
        [Self::Vnni, Self::Avx2, Self::Scalar]
            .into_iter()
            .filter(|k| match best {
                Self::Vnni => true,
                Self::Avx2 => *k != Self::Vnni,
                Self::Scalar => *k == Self::Scalar,
            })
            .collect()
    }
}

/// Lines and f16 scale bits per tile-block of each format.
pub const Q4_1_LINES: usize = 4;
pub const Q4_1_SCALES: usize = 2 * TILE;
pub const Q5_LINES: usize = 5;
pub const Q5Z_SCALES: usize = TILE;
pub const Q6_LINES: usize = 6;
pub const Q4K_LINES: usize = 4;
/// Tile-blocks per Q4K super-block (256 columns), and its scale slots (u16) per tile.
pub const Q4K_BLOCKS: usize = 8;
pub const Q4K_SUPER: usize = 2 * TILE + Q4K_BLOCKS * TILE;
pub const Q4K_SCALES: usize = Q4K_SUPER / Q4K_BLOCKS;
pub const Q8_0_LINES: usize = 8;
pub const Q8_0_SCALES: usize = TILE;
pub const Q8X16_LINES: usize = 8;
pub const Q8X16_SCALES: usize = 4 * TILE;

/// The tiles of one run: `out.len()` rows, i.e. ceil(out.len() / 16) tiles of `nb` blocks.
pub struct Tiles<'a> {
    pub quants: &'a [Line],
    pub scales: &'a [u16],
    pub nb: usize,
}

impl Tiles<'_> {
    fn check(&self, lines: usize, scales: usize, x: &Q8Row, out: &[f32]) {
        let tiles = out.len().div_ceil(TILE);
        assert!(
            self.quants.len() >= tiles * self.nb * lines,
            "qgemv: short quants"
        );
        assert!(
            self.scales.len() >= tiles * self.nb * scales,
            "qgemv: short scales"
        );
        assert_eq!(x.blocks(), self.nb, "qgemv: activation blocks");
    }
}

/// A kernel entry point: checks that the tiles hold every tile-block of `out`, then runs the
/// VNNI, AVX2 or scalar version (the best the CPU has, or the one asked for if it has it).
macro_rules! entry {
    ($(#[$doc:meta])* $name:ident, $lines:expr, $scales:expr, $vnni:path, $avx2:path, $scalar:path) => {
        $(#[$doc])*
        pub fn $name(kernel: Kernel, t: &Tiles, x: &Q8Row, out: &mut [f32]) {
            t.check($lines, $scales, x, out);
            match kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Vnni if Kernel::best() == Kernel::Vnni => {
                    // SAFETY: the CPU has the features (best() checked them); `check`
                    // guarantees every tile-block the kernel reads lies inside the slices.
                    unsafe { $vnni(t, x, out) }
                }
                #[cfg(target_arch = "x86_64")]
                Kernel::Vnni | Kernel::Avx2 if Kernel::best() != Kernel::Scalar => {
                    // SAFETY: as above; VNNI CPUs have AVX2, FMA and F16C too.
                    unsafe { $avx2(t, x, out) }
                }
                _ => $scalar(t, x, out),
            }
        }
    };
}

entry! {
    /// out[r] = Σ_b d_rb (d_b Σ_j q_rbj x_bj) + m_rb (d_b Σ_j x_bj), over Q4_1 tiles.
    q4_1, Q4_1_LINES, Q4_1_SCALES,
    x86::q4_1_vnni::<false, false>, x86::q4_1_avx2::<false, false>, q4_1_scalar
}

entry! {
    /// `q4_1` over Q5z tiles: Q5's quants with the min -16 d computed, not stored (Q5_0).
    q5z, Q5_LINES, Q5Z_SCALES,
    x86::q4_1_vnni::<true, true>, x86::q4_1_avx2::<true, true>, q5z_scalar
}

entry! {
    /// `q4_1` over Q5 tiles: the same sums with 5-bit quants.
    q5, Q5_LINES, Q4_1_SCALES,
    x86::q4_1_vnni::<true, false>, x86::q4_1_avx2::<true, false>, q5_scalar
}

entry! {
    /// `q4_1` over Q4K tiles: d_rb = d_r sc_rb and m_rb = -dmin_r m_rb, from the integer codes.
    q4k, Q4K_LINES, Q4K_SCALES,
    x86::q4k_vnni, x86::q4k_avx2, q4k_scalar
}

/// Where tile-block `tb`'s scales lie in a Q4K scales slice that starts at a tile: the slot of
/// its super-block's 16 d (16 dmin follow), and that of its own 32 bytes (16 sc, then 16 m).
#[inline(always)]
pub(crate) fn q4k_offsets(tb: usize) -> (usize, usize) {
    let sup = tb / Q4K_BLOCKS * Q4K_SUPER;
    (sup, sup + 2 * TILE + tb % Q4K_BLOCKS * TILE)
}

/// Scale and min of lane `r` of tile-block `tb` in the scales of a format with nibble lines
/// (Q4_1, Q5, Q5z, Q4K): weight = scale q + min.
pub(crate) fn nibble_scale_min(kind: Kind, scales: &[u16], tb: usize, r: usize) -> (f32, f32) {
    match kind {
        Kind::Q4K => {
            let (sup, own) = q4k_offsets(tb);
            let byte = |i: usize| scales[own + i / 2].to_le_bytes()[i % 2] as f32;
            let (d, dmin) = (f16(scales[sup + r]), f16(scales[sup + TILE + r]));
            (d * byte(r), -(dmin * byte(TILE + r)))
        }
        Kind::Q5z => {
            let d = f16(scales[tb * Q5Z_SCALES + r]);
            (d, -16.0 * d)
        }
        _ => {
            let s = &scales[tb * Q4_1_SCALES..];
            (f16(s[r]), f16(s[TILE + r]))
        }
    }
}

entry! {
    /// out[r] = Σ_b Σ_h d_rbh (d_b Σ_{j in h} q_rbj x_bj - 32 d_b Σ_{j in h} x_bj), over Q6 tiles.
    q6, Q6_LINES, Q4_1_SCALES,
    x86::q6_vnni, x86::q6_avx2, q6_scalar
}

/// The 6-bit quant of value 16h + 4k + j of lane `r` in a Q6 tile-block's lines.
pub(crate) fn q6_value(lines: &[Line], r: usize, h: usize, k: usize, j: usize) -> u8 {
    let byte = lines[k].0[4 * r + j];
    let nibble = if h == 0 { byte & 15 } else { byte >> 4 };
    nibble | (((lines[4 + h].0[4 * r + j] >> (2 * k)) & 3) << 4)
}

fn q6_scalar(t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    for (tile, out) in out.chunks_mut(TILE).enumerate() {
        for (r, o) in out.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for b in 0..t.nb {
                let tb = tile * t.nb + b;
                let lines = &t.quants[tb * Q6_LINES..][..Q6_LINES];
                let xq = &x.q[b * QK..][..QK];
                for h in 0..2 {
                    let mut dot = 0i32;
                    for k in 0..4 {
                        for j in 0..4 {
                            dot +=
                                q6_value(lines, r, h, k, j) as i32 * xq[16 * h + 4 * k + j] as i32;
                        }
                    }
                    let d = f16(t.scales[tb * Q4_1_SCALES + h * TILE + r]);
                    acc += d * (x.d[b] * dot as f32 - 32.0 * x.dsum16[2 * b + h]);
                }
            }
            *o = acc;
        }
    }
}

entry! {
    /// out[r] = Σ_b d_rb d_b Σ_j w_rbj q_bj, over Q8_0 tiles.
    q8_0, Q8_0_LINES, Q8_0_SCALES,
    x86::q8_0_vnni, x86::q8_0_avx2, q8_0_scalar
}

entry! {
    /// out[r] = Σ_b Σ_h d_rbh (d_b Σ_{j in h} q_rbj x_bj) + m_rbh (d_b Σ_{j in h} x_bj), over Q8x16
    /// tiles (h: the two halves of 16 values).
    q8x16, Q8X16_LINES, Q8X16_SCALES,
    x86::q8x16_vnni, x86::q8x16_avx2, q8x16_scalar
}

fn f16(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

fn q4_1_scalar(t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    nibbles_scalar(Kind::Q4_1, t, x, out)
}

fn q5_scalar(t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    nibbles_scalar(Kind::Q5, t, x, out)
}

fn q5z_scalar(t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    nibbles_scalar(Kind::Q5z, t, x, out)
}

fn q4k_scalar(t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    nibbles_scalar(Kind::Q4K, t, x, out)
}

/// The formats with nibble lines: Q4_1 and Q4K (4 lines), Q5 and Q5z (a fifth line of high
/// bits); scale and min per `nibble_scale_min`.
fn nibbles_scalar(kind: Kind, t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    let five = matches!(kind, Kind::Q5 | Kind::Q5z);
    let lines = kind.lines();
    for (tile, out) in out.chunks_mut(TILE).enumerate() {
        for (r, o) in out.iter_mut().enumerate() {
            let (mut acc_d, mut acc_m) = (0.0f32, 0.0f32);
            for b in 0..t.nb {
                let tb = tile * t.nb + b;
                let xq = &x.q[b * QK..][..QK];
                let mut dot = 0i32;
                for k in 0..4 {
                    let bytes = &t.quants[tb * lines + k].0[4 * r..][..4];
                    for (j, &byte) in bytes.iter().enumerate() {
                        let (mut lo, mut hi) = (byte & 15, byte >> 4);
                        if five {
                            let h = t.quants[tb * lines + 4].0[4 * r + j];
                            lo |= ((h >> k) & 1) << 4;
                            hi |= ((h >> (4 + k)) & 1) << 4;
                        }
                        dot += lo as i32 * xq[4 * k + j] as i32;
                        dot += hi as i32 * xq[16 + 4 * k + j] as i32;
                    }
                }
                let (d, m) = nibble_scale_min(kind, t.scales, tb, r);
                acc_d += d * x.d[b] * dot as f32;
                acc_m += m * x.dsum[b];
            }
            *o = acc_d + acc_m;
        }
    }
}

fn q8_0_scalar(t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    for (tile, out) in out.chunks_mut(TILE).enumerate() {
        for (r, o) in out.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for b in 0..t.nb {
                let tb = tile * t.nb + b;
                let xq = &x.q[b * QK..][..QK];
                let mut dot = 0i32;
                for k in 0..Q8_0_LINES {
                    let bytes = &t.quants[tb * Q8_0_LINES + k].0[4 * r..][..4];
                    for (j, &byte) in bytes.iter().enumerate() {
                        dot += ((byte ^ 0x80) as i8) as i32 * xq[4 * k + j] as i32;
                    }
                }
                acc += f16(t.scales[tb * Q8_0_SCALES + r]) * x.d[b] * dot as f32;
            }
            *o = acc;
        }
    }
}

fn q8x16_scalar(t: &Tiles, x: &Q8Row, out: &mut [f32]) {
    for (tile, out) in out.chunks_mut(TILE).enumerate() {
        for (r, o) in out.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for b in 0..t.nb {
                let tb = tile * t.nb + b;
                let xq = &x.q[b * QK..][..QK];
                let s = &t.scales[tb * Q8X16_SCALES..];
                for h in 0..2 {
                    let mut dot = 0i32;
                    for k in 4 * h..4 * h + 4 {
                        let bytes = &t.quants[tb * Q8X16_LINES + k].0[4 * r..][..4];
                        for (j, &byte) in bytes.iter().enumerate() {
                            dot += byte as i32 * xq[4 * k + j] as i32;
                        }
                    }
                    acc += f16(s[h * TILE + r]) * x.d[b] * dot as f32;
                    acc += f16(s[(2 + h) * TILE + r]) * x.dsum16[2 * b + h];
                }
            }
            *o = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;
