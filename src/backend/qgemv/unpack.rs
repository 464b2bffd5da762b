//! GGUF weight blocks of every supported type, read into one common form before they are
//! repacked into tiles: for each 32 columns, 32 unsigned integer quants and, for each half of 16,
//! a scale and a min, with weight j = scale * q_j + min. Every ggml block type with integer quants
//! fits that form exactly (a K-quant's 6-bit sub-block scale times its super-block scale is one
//! f32 product), so the integer kernels serve them all:
//! - Q4_0 (d (q - 8)), Q4_1 (d q + m): quants below 16, one scale and min per 32: Q4_1 tiles;
//! - Q4_K (32-value sub-blocks, d sc q - dmin m): read as `K4Block`s instead, its integer 6-bit
//!   sc and m kept for the `Q4K` tiles (`Sub32` holds it too, for the tests);
//! - Q5_0 (d (q - 16)): Q5z tiles; Q5_1, Q5_K: below 32, one scale and min per 32: Q5 tiles;
//! - Q6_K (16-value sub-blocks, below 64, d (q - 32)) and Q3_K (16-value, d (q - 4)): Q6 tiles;
//! - Q2_K (16-value sub-blocks, below 4, with a min): `Q8x16` tiles (a byte per weight, a scale
//!   and a min per 16).
//!
//! [`as_q8_0`] gives Q8_0 blocks for float weights (F32, F16, BF16), which have no integer form:
//! rounded with ggml's Q8_0 rounding (per 32 values, d = max|w| / 127), as llama.cpp's Q8_0 does.
//!
//! Layouts: ggml's `ggml-common.h` (QK_K = 256 values per K-quant super-block).

use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

use super::QK;

/// Values per K-quant super-block.
const QK_K: usize = 256;

/// 32 columns of one row: w[j] = s[j / 16] * q[j] + m[j / 16].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sub32 {
    pub q: [u8; QK],
    pub s: [f32; 2],
    pub m: [f32; 2],
}

impl Default for Sub32 {
    fn default() -> Self {
        Self {
            q: [0; QK],
            s: [0.0; 2],
            m: [0.0; 2],
        }
    }
}

impl Sub32 {
    /// The 32 weights as f32 (tests).
    pub fn weights(&self) -> [f32; QK] {
        std::array::from_fn(|j| self.s[j / 16] * self.q[j] as f32 + self.m[j / 16])
    }

    /// The largest quant; Q4_1 tiles hold quants below 16, `Q8x16` tiles below 64.
    pub fn max_q(&self) -> u8 {
        self.q.iter().copied().max().unwrap_or(0)
    }

    fn uniform(s: f32, m: f32) -> Self {
        Self {
            s: [s; 2],
            m: [m; 2],
            ..Self::default()
        }
    }
}

/// The types `unpack_row` reads, with (values, bytes) per block.
pub fn integer_block(dtype: GgmlDType) -> Option<(usize, usize)> {
    Some(match dtype {
        GgmlDType::Q4_0 => (QK, 18),
        GgmlDType::Q4_1 => (QK, 20),
        GgmlDType::Q5_0 => (QK, 22),
        GgmlDType::Q5_1 => (QK, 24),
        GgmlDType::Q2K => (QK_K, 84),
        GgmlDType::Q3K => (QK_K, 110),
        GgmlDType::Q4K => (QK_K, 144),
        GgmlDType::Q5K => (QK_K, 176),
        GgmlDType::Q6K => (QK_K, 210),
        _ => return None,
    })
}

fn half(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// One row of GGUF blocks of an integer type (`integer_block`) into `out`, one `Sub32` per 32
/// columns. `row` holds whole blocks; `out.len() * 32` columns.
pub fn unpack_row(dtype: GgmlDType, row: &[u8], out: &mut [Sub32]) {
    let (values, bytes) = integer_block(dtype).expect("unpack_row: an integer block type");
    assert_eq!(
        row.len() / bytes * values,
        out.len() * QK,
        "unpack_row: {dtype:?} row of {} bytes for {} columns",
        row.len(),
        out.len() * QK
    );
    let per = values / QK; // Sub32s per block
    for (block, out) in row.chunks_exact(bytes).zip(out.chunks_exact_mut(per)) {
        match dtype {
            GgmlDType::Q4_0 => q4_0(block, &mut out[0]),
            GgmlDType::Q4_1 => q4_1(block, &mut out[0]),
            GgmlDType::Q5_0 => q5_0(block, &mut out[0]),
            GgmlDType::Q5_1 => q5_1(block, &mut out[0]),
            GgmlDType::Q2K => q2_k(block, out),
            GgmlDType::Q3K => q3_k(block, out),
            GgmlDType::Q4K => q4_k(block, out),
            GgmlDType::Q5K => q5_k(block, out),
            GgmlDType::Q6K => q6_k(block, out),
            _ => unreachable!("checked by integer_block"),
        }
    }
}

/// { f16 d, u8 qs[16] }: w_j = d (nibble_j - 8), low nibbles first.
fn q4_0(b: &[u8], o: &mut Sub32) {
    let d = half(b, 0);
    *o = Sub32::uniform(d, -8.0 * d);
    nibbles(&b[2..18], &mut o.q);
}

/// { f16 d, f16 m, u8 qs[16] }: w_j = d nibble_j + m.
fn q4_1(b: &[u8], o: &mut Sub32) {
    *o = Sub32::uniform(half(b, 0), half(b, 2));
    nibbles(&b[4..20], &mut o.q);
}

/// { f16 d, u32 qh, u8 qs[16] }: w_j = d (nibble_j | bit_j << 4) - 16 d.
fn q5_0(b: &[u8], o: &mut Sub32) {
    let d = half(b, 0);
    *o = Sub32::uniform(d, -16.0 * d);
    five_bits(&b[2..6], &b[6..22], &mut o.q);
}

/// { f16 d, f16 m, u32 qh, u8 qs[16] }: w_j = d (nibble_j | bit_j << 4) + m.
fn q5_1(b: &[u8], o: &mut Sub32) {
    *o = Sub32::uniform(half(b, 0), half(b, 2));
    five_bits(&b[4..8], &b[8..24], &mut o.q);
}

/// Values j < 16 are the low nibbles of qs[j], values 16 + j the high nibbles.
fn nibbles(qs: &[u8], q: &mut [u8; QK]) {
    for j in 0..16 {
        q[j] = qs[j] & 15;
        q[j + 16] = qs[j] >> 4;
    }
}

/// `nibbles`, plus bit j of the little-endian u32 `qh` as bit 4 of value j.
fn five_bits(qh: &[u8], qs: &[u8], q: &mut [u8; QK]) {
    let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    nibbles(qs, q);
    for (j, v) in q.iter_mut().enumerate() {
        *v |= (((h >> j) & 1) as u8) << 4;
    }
}

/// { u8 scales[16], u8 qs[64], f16 d, f16 dmin }: 16-value sub-blocks, sub-block i has scale
/// d (scales[i] & 15) and min -dmin (scales[i] >> 4); 2-bit quants, each 32-byte half of qs
/// holds 128 values as four 2-bit planes of 32.
fn q2_k(b: &[u8], out: &mut [Sub32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (half(b, 80), half(b, 82));
    for (n, plane_bytes) in qs.chunks_exact(32).enumerate() {
        for shift in 0..4 {
            let o = &mut out[4 * n + shift];
            for h in 0..2 {
                let sc = scales[8 * n + 2 * shift + h];
                o.s[h] = d * (sc & 15) as f32;
                o.m[h] = -dmin * (sc >> 4) as f32;
            }
            for (j, q) in o.q.iter_mut().enumerate() {
                *q = (plane_bytes[j] >> (2 * shift)) & 3;
            }
        }
    }
}

/// { u8 hmask[32], u8 qs[64], u8 scales[12], f16 d }: 16-value sub-blocks with 6-bit scales
/// (stored offset by 32), 3-bit quants: 2 low bits as in Q2_K, the high bit in hmask; the value
/// is (low | high << 2) - 4, i.e. a min of -4 times the scale.
fn q3_k(b: &[u8], out: &mut [Sub32]) {
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = half(b, 108);
    let scales = q3_k_scales(packed);
    for (n, plane_bytes) in qs.chunks_exact(32).enumerate() {
        for shift in 0..4 {
            let o = &mut out[4 * n + shift];
            let bit = 4 * n + shift; // the hmask bit of this 32-value group
            for h in 0..2 {
                let s = d * (scales[8 * n + 2 * shift + h] as i32 - 32) as f32;
                o.s[h] = s;
                o.m[h] = -4.0 * s;
            }
            for (j, q) in o.q.iter_mut().enumerate() {
                let low = (plane_bytes[j] >> (2 * shift)) & 3;
                let high = (hmask[j] >> bit) & 1;
                *q = low | (high << 2);
            }
        }
    }
}

/// Q3_K's 16 6-bit scales from 12 bytes: the low 4 bits of scale i are the low nibble of byte i
/// (i < 8) or the high nibble of byte i - 8; the high 2 bits are bit pair i / 4 of byte 8 + i % 4.
fn q3_k_scales(p: &[u8]) -> [u8; 16] {
    std::array::from_fn(|i| {
        let low = if i < 8 { p[i] & 15 } else { p[i - 8] >> 4 };
        let high = (p[8 + i % 4] >> (2 * (i / 4))) & 3;
        low | (high << 4)
    })
}

/// Scale and min of 32-value sub-block j of a Q4_K/Q5_K block (6 bits each, packed in 12 bytes).
fn k4_scale_min(p: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (p[j] & 63, p[j + 4] & 63)
    } else {
        (
            (p[j + 4] & 15) | ((p[j - 4] >> 6) << 4),
            (p[j + 4] >> 4) | ((p[j] >> 6) << 4),
        )
    }
}

/// One Q4_K super-block of 256 values with its integers kept: f16 bits of d and dmin, and per
/// 32-value sub-block j its 6-bit scale sc[j], 6-bit min m[j] and nibbles q[j]:
/// w = d sc q - dmin m (the `Q4K` tiles keep this form; `Sub32` folds the products into f32).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct K4Block {
    pub d: u16,
    pub dmin: u16,
    pub sc: [u8; 8],
    pub m: [u8; 8],
    pub q: [[u8; QK]; 8],
}

/// { f16 d, f16 dmin, u8 scales[12], u8 qs[128] }: 32-value sub-blocks, w = d sc q - dmin m;
/// each 32-byte quarter of qs holds sub-blocks 2i (low nibbles) and 2i+1 (high nibbles).
pub fn k4_block(b: &[u8]) -> K4Block {
    let (packed, qs) = (&b[4..16], &b[16..144]);
    let mut out = K4Block {
        d: u16::from_le_bytes([b[0], b[1]]),
        dmin: u16::from_le_bytes([b[2], b[3]]),
        ..K4Block::default()
    };
    for j in 0..8 {
        (out.sc[j], out.m[j]) = k4_scale_min(packed, j);
        let bytes = &qs[32 * (j / 2)..][..32];
        let shift = 4 * (j % 2);
        for (q, &byte) in out.q[j].iter_mut().zip(bytes) {
            *q = (byte >> shift) & 15;
        }
    }
    out
}

/// A row of Q4_K blocks (144 bytes each) as `K4Block`s.
pub fn k4_row(row: &[u8]) -> Vec<K4Block> {
    row.chunks_exact(144).map(k4_block).collect()
}

/// `k4_block` as `Sub32`s: scale d sc and min -dmin m in f32 (both exact: an f16 times a 6-bit
/// integer).
fn q4_k(b: &[u8], out: &mut [Sub32]) {
    let k = k4_block(b);
    let (d, dmin) = (
        f16::from_bits(k.d).to_f32(),
        f16::from_bits(k.dmin).to_f32(),
    );
    for (j, o) in out.iter_mut().enumerate() {
        *o = Sub32::uniform(d * k.sc[j] as f32, -dmin * k.m[j] as f32);
        o.q = k.q[j];
    }
}

/// { f16 d, f16 dmin, u8 scales[12], u8 qh[32], u8 qs[128] }: Q4_K plus a fifth bit per value,
/// bit j of qh[l] for value l of sub-block j.
fn q5_k(b: &[u8], out: &mut [Sub32]) {
    let (d, dmin) = (half(b, 0), half(b, 2));
    let (packed, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (j, o) in out.iter_mut().enumerate() {
        let (sc, m) = k4_scale_min(packed, j);
        *o = Sub32::uniform(d * sc as f32, -dmin * m as f32);
        let bytes = &qs[32 * (j / 2)..][..32];
        let shift = 4 * (j % 2);
        for (l, q) in o.q.iter_mut().enumerate() {
            *q = ((bytes[l] >> shift) & 15) | (((qh[l] >> j) & 1) << 4);
        }
    }
}

/// { u8 ql[128], u8 qh[64], i8 scales[16], f16 d }: 16-value sub-blocks with signed 8-bit
/// scales, 6-bit quants offset by 32 (a min of -32 times the scale). Each half of 128 values
/// uses 64 bytes of ql and 32 of qh: value l + 32 k (l < 32, k < 4) takes nibble (k / 2) of
/// ql[l + 32 (k % 2)] and bit pair k of qh[l].
fn q6_k(b: &[u8], out: &mut [Sub32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = half(b, 208);
    for n in 0..2 {
        let (ql, qh) = (&ql[64 * n..][..64], &qh[32 * n..][..32]);
        for k in 0..4 {
            let o = &mut out[4 * n + k];
            for h in 0..2 {
                let s = d * scales[8 * n + 2 * k + h] as i8 as f32;
                o.s[h] = s;
                o.m[h] = -32.0 * s;
            }
            for (l, q) in o.q.iter_mut().enumerate() {
                let low = (ql[l + 32 * (k % 2)] >> (4 * (k / 2))) & 15;
                let high = (qh[l] >> (2 * k)) & 3;
                *q = low | (high << 4);
            }
        }
    }
}

/// A row of float weights (F32, F16, BF16) as Q8_0 blocks { f16 d, i8 qs[32] },
/// with ggml's rounding: d = max|w| / 127, q = round(w / d) (half away from zero), d as f16.
/// None for other types.
pub fn as_q8_0(dtype: GgmlDType, row: &[u8]) -> Option<Vec<u8>> {
    let values: Vec<f32> = match dtype {
        GgmlDType::F32 => row
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        GgmlDType::F16 => row
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        GgmlDType::BF16 => row
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        _ => return None,
    };
    let mut out = Vec::with_capacity(values.len() / QK * 34);
    for block in values.chunks_exact(QK) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        out.extend(block.iter().map(|v| (v * inv).round() as i8 as u8));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::backend::qgemv::tests::{noise, OTHER_TYPES};

    /// Our reading of each block type equals candle's dequantization (an independent reader).
    #[test]
    fn every_integer_type_reads_as_candle_dequantizes_it() {
        let (rows, cols) = (3, 512);
        let w: Vec<f32> = noise(rows * cols, 11)
            .iter()
            .enumerate()
            .map(|(i, v)| v * 0.03 * (1 + i % 7) as f32 - 0.004)
            .collect();
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        // the integer types (the floats have no integer form), and Q4_1
        let integer = OTHER_TYPES.iter().filter(|&&d| integer_block(d).is_some());
        for &dtype in integer.chain(&[GgmlDType::Q4_1]) {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let want: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let data = q.data().unwrap();
            let row_bytes = data.len() / rows;
            let mut subs = vec![Sub32::default(); cols / QK];
            for r in 0..rows {
                unpack_row(dtype, &data[r * row_bytes..][..row_bytes], &mut subs);
                let got: Vec<f32> = subs.iter().flat_map(|s| s.weights()).collect();
                for (c, (g, w)) in got.iter().zip(&want[r * cols..][..cols]).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                        "{dtype:?} row {r} col {c}: {g} vs candle's {w}"
                    );
                }
                let limit = match dtype {
                    GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => 16,
                    _ => 64,
                };
                assert!(
                    subs.iter().all(|s| s.max_q() < limit),
                    "{dtype:?} quant range"
                );
            }
        }
    }

    #[test]
    fn floats_requantize_as_ggml_q8_0() {
        let w: Vec<f32> = noise(256, 5).iter().map(|v| v * 0.2).collect();
        let t = Tensor::from_vec(w.clone(), (2, 128), &Device::Cpu).unwrap();
        let want = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let got = as_q8_0(GgmlDType::F32, &bytes).unwrap();
        assert_eq!(got, want.data().unwrap().to_vec());
    }
}
