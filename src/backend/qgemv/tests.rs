//! Every kernel against plain references, on odd sizes: rows not a multiple of the tile (and
//! split into several runs), several blocks per row.

use candle_core::{Device, Tensor};

use super::*;

/// Deterministic values in [-1, 1).
pub(crate) fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub(crate) fn quantized(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> QTensor {
    // rows of different magnitudes, with an offset, as real weights have
    let w: Vec<f32> = noise(rows * cols, seed)
        .iter()
        .enumerate()
        .map(|(i, v)| v * 0.05 * (1 + (i / cols) % 5) as f32 + 0.01)
        .collect();
    let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

fn candle_dequantized(q: &QTensor) -> Vec<f32> {
    q.dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The tiles hold candle's weights: exactly for the types kept in their own form (Q4_1, Q8_0,
/// Q4_K: d sc and dmin m are exact f32 products, then d sc q - dmin m as candle computes it), up
/// to the f16 rounding of a product of scales (other K-quants) or Q8_0's rounding (floats).
pub(crate) fn assert_holds_candle_weights(m: &QMatrix, q: &QTensor) {
    let (w, want) = (m.dequantize(), candle_dequantized(q));
    if matches!(
        q.dtype(),
        GgmlDType::Q4_1 | GgmlDType::Q8_0 | GgmlDType::Q4K
    ) {
        assert_eq!(w, want, "the tiles hold candle's weights");
        return;
    }
    let step = match q.dtype() {
        // half a Q8_0 step, plus the f16 rounding of the step times 127
        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => 0.57 / 127.0,
        // f16 rounding of the scale and of the min, each up to about the block's largest weight
        // (the min cancels part of the scaled quant)
        _ => 6.0 / 2048.0,
    };
    for (r, (row, want)) in w.chunks(m.cols()).zip(want.chunks(m.cols())).enumerate() {
        for (b, (wb, cb)) in row.chunks(QK).zip(want.chunks(QK)).enumerate() {
            let max = cb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            for (a, c) in wb.iter().zip(cb) {
                assert!(
                    (a - c).abs() <= step * 1.01 * max + 1e-7,
                    "{:?} row {r} block {b}: {a} vs candle's {c}",
                    q.dtype()
                );
            }
        }
    }
}

fn check(dtype: GgmlDType, rows: usize, cols: usize) {
    let q = quantized(dtype, rows, cols, rows as u64 * 31 + cols as u64);
    let m = QMatrix::from_qtensor(&q).unwrap().unwrap();
    assert_holds_candle_weights(&m, &q);
    let w = m.dequantize();
    let x: Vec<f32> = noise(cols, 7).iter().map(|v| v * 3.0).collect();
    let xq = Q8Row::quantize(&x);
    let xd = xq.dequantize();
    for kernel in Kernel::available() {
        let mut out = vec![f32::NAN; rows];
        m.gemv_with(kernel, &x, &mut out);
        for r in 0..rows {
            let wr = &w[r * cols..][..cols];
            // 1. against W · dequant(Q8(x)) in f64: only f32 rounding of the block sums
            let want: f64 = wr.iter().zip(&xd).map(|(a, b)| *a as f64 * *b as f64).sum();
            let mag: f64 = wr
                .iter()
                .zip(&xd)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            assert!(
                (out[r] as f64 - want).abs() <= 1e-5 * mag + 1e-6,
                "{kernel:?} {dtype:?} ({rows}x{cols}) row {r}: {} vs {want}",
                out[r]
            );
            // 2. against W · x in f64: within the activation rounding, half a step per value
            let exact: f64 = wr.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            let bound: f64 = wr
                .iter()
                .enumerate()
                .map(|(c, a)| a.abs() as f64 * 0.5 * xq.d[c / QK] as f64)
                .sum();
            assert!(
                (out[r] as f64 - exact).abs() <= bound * 1.001 + 1e-5 * mag + 1e-6,
                "{kernel:?} {dtype:?} row {r}: {} vs exact {exact} (bound {bound})",
                out[r]
            );
        }
    }
}

#[test]
fn q4_1_kernels_match_the_reference() {
    check(GgmlDType::Q4_1, 149, 96); // 10 tiles, the last with 5 rows; 2 runs of 5 tiles
    check(GgmlDType::Q4_1, 573, 64); // 36 tiles: runs of 4 and 5 tiles on 2 threads
    check(GgmlDType::Q4_1, 7, 160); // one partial tile
    check(GgmlDType::Q4_1, 64, 32); // one block per row
}

#[test]
fn q4k_kernels_match_the_reference() {
    check(GgmlDType::Q4K, 149, 256); // one super-block per row, a partial tile
    check(GgmlDType::Q4K, 573, 512); // 36 tiles in several runs, two super-blocks
    check(GgmlDType::Q4K, 7, 768);
    check(GgmlDType::Q4K, 64, 2048);
}

/// Q4K tiles keep Q4_K's integer codes: the file's weights exactly, in 0.578 bytes per weight
/// (nibbles 0.5, sc and m bytes 0.0625, f16 d and dmin per 256 0.0156).
#[test]
fn q4k_tiles_hold_the_file_exactly_in_fewer_bytes() {
    for (rows, cols) in [(37, 256), (64, 1024)] {
        let q = quantized(GgmlDType::Q4K, rows, cols, 5);
        let m = QMatrix::from_qtensor(&q).unwrap().unwrap();
        assert_eq!(m.tiles().0, Kind::Q4K);
        assert_eq!(m.dequantize(), candle_dequantized(&q), "({rows}, {cols})");
        let padded = rows.next_multiple_of(TILE);
        assert_eq!(m.bytes(), padded * cols * 296 / 512);
        let mut row = vec![0.0; cols];
        m.row_f32(rows - 1, &mut row);
        assert_eq!(row, candle_dequantized(&q)[(rows - 1) * cols..]);
    }
}

#[test]
fn q8_0_kernels_match_the_reference() {
    check(GgmlDType::Q8_0, 149, 96);
    check(GgmlDType::Q8_0, 7, 160);
    check(GgmlDType::Q8_0, 67, 224);
}

/// The GGUF types with a kernel besides Q4_1 and Q8_0 (tested on their own above): read
/// through `unpack` (the integer ones) or rounded to Q8_0 (the floats).
pub(crate) const OTHER_TYPES: [GgmlDType; 11] = [
    GgmlDType::Q4_0,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::F32,
];

/// Every other GGUF type with a kernel (K-quants, 5-bit, Q4_0, floats), on shapes with several
/// 256-value super-blocks per row and partial tiles.
#[test]
fn every_weight_type_matches_the_reference() {
    for dtype in OTHER_TYPES {
        check(dtype, 149, 256);
        check(dtype, 7, 768);
    }
}

#[test]
fn each_type_takes_the_smallest_format_and_stacks_only_with_its_own() {
    let m = |dtype, rows, seed| quantized(dtype, rows, 256, seed);
    for (dtype, kind) in [
        (GgmlDType::Q4_0, Kind::Q4_1),
        (GgmlDType::Q4K, Kind::Q4K),
        (GgmlDType::Q5_0, Kind::Q5z),
        (GgmlDType::Q5_1, Kind::Q5),
        (GgmlDType::Q5K, Kind::Q5),
        (GgmlDType::Q6K, Kind::Q6),
        (GgmlDType::Q3K, Kind::Q6),
        (GgmlDType::Q2K, Kind::Q8x16),
        (GgmlDType::Q8_0, Kind::Q8_0),
        (GgmlDType::F16, Kind::Q8_0),
    ] {
        let q = m(dtype, 8, 1);
        assert_eq!(
            QMatrix::from_qtensor(&q).unwrap().unwrap().tiles().0,
            kind,
            "{dtype:?}"
        );
    }
    // a Q4_K_M file's q/k (Q4_K) beside a Q6_K v, and the default model's Q5_0 beside Q8_0:
    // apart, each at its own size
    let (q4k, q6k) = (m(GgmlDType::Q4K, 40, 1), m(GgmlDType::Q6K, 9, 2));
    assert!(QMatrix::stacked(&[&q4k, &q6k]).unwrap().is_none());
    let (q5, q8) = (m(GgmlDType::Q5_0, 16, 4), m(GgmlDType::Q8_0, 8, 3));
    assert!(QMatrix::stacked(&[&q5, &q8]).unwrap().is_none());
    // Q4_K keeps its own tiles: not stacked with Q4_0 (Q4_1 tiles) either
    let q40 = m(GgmlDType::Q4_0, 16, 7);
    assert!(QMatrix::stacked(&[&q4k, &q40]).unwrap().is_none());
    // Q4_K with Q4_K stacks, each row as it was alone
    let q4k2 = m(GgmlDType::Q4K, 9, 8);
    let both = QMatrix::stacked(&[&q4k, &q4k2]).unwrap().unwrap();
    assert_eq!(both.tiles().0, Kind::Q4K);
    let alone: Vec<f32> = [&q4k, &q4k2]
        .iter()
        .flat_map(|t| QMatrix::from_qtensor(t).unwrap().unwrap().dequantize())
        .collect();
    assert_eq!(both.dequantize(), alone);
    // types of one format stack, each row as it was alone
    let (q51, q5k) = (m(GgmlDType::Q5_1, 16, 6), m(GgmlDType::Q5K, 8, 5));
    let both = QMatrix::stacked(&[&q51, &q5k]).unwrap().unwrap();
    assert_eq!(both.tiles().0, Kind::Q5);
    let alone: Vec<f32> = [&q51, &q5k]
        .iter()
        .flat_map(|t| QMatrix::from_qtensor(t).unwrap().unwrap().dequantize())
        .collect();
    assert_eq!(both.dequantize(), alone);
}

#[test]
fn stacked_matrices_are_their_parts_in_order() {
    let parts: Vec<QTensor> = [(40, 64), (24, 64), (9, 64)]
        .iter()
        .map(|&(r, c)| quantized(GgmlDType::Q4_1, r, c, r as u64))
        .collect();
    let refs: Vec<&QTensor> = parts.iter().collect();
    let m = QMatrix::stacked(&refs).unwrap().unwrap();
    assert_eq!(m.rows(), 73);
    let want: Vec<f32> = parts.iter().flat_map(candle_dequantized).collect();
    assert_eq!(m.dequantize(), want);
    let other = quantized(GgmlDType::Q8_0, 8, 64, 1);
    assert!(
        QMatrix::stacked(&[&parts[0], &other]).unwrap().is_none(),
        "mixed types"
    );
}

#[test]
fn zero_activation_gives_zero() {
    let q = quantized(GgmlDType::Q8_0, 20, 64, 3);
    let m = QMatrix::from_qtensor(&q).unwrap().unwrap();
    for kernel in Kernel::available() {
        let mut out = vec![1.0; 20];
        m.gemv_with(kernel, &[0.0; 64], &mut out);
        assert!(out.iter().all(|&v| v == 0.0), "{kernel:?}");
    }
}

#[test]
fn f32_product_uses_the_exact_weights_and_the_unrounded_activation() {
    // rows over several parallel runs (64 tiles each) and a partial tile
    for (dtype, rows, cols) in [
        (GgmlDType::Q8_0, 2 * 64 * TILE + 37, 96),
        (GgmlDType::Q4_1, 53, 160),
        (GgmlDType::Q6K, 53, 512),
        (GgmlDType::Q4K, 53, 512),
    ] {
        let q = quantized(dtype, rows, cols, 99);
        let m = QMatrix::from_qtensor(&q).unwrap().unwrap();
        let w = m.dequantize();
        let x: Vec<f32> = noise(cols, 3).iter().map(|v| v * 2.0).collect();
        let mut out = vec![f32::NAN; rows];
        m.gemv_f32(&x, &mut out);
        for r in 0..rows {
            let wr = &w[r * cols..][..cols];
            let want: f64 = wr.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
            let mag: f64 = wr
                .iter()
                .zip(&x)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            let err = (out[r] as f64 - want).abs();
            assert!(
                err <= 1e-6 * mag.max(1.0),
                "{dtype:?} row {r}: {} vs {want}",
                out[r]
            );
        }
    }
}

#[test]
fn gemv_each_equals_one_gemv_per_matrix() {
    let parts: Vec<QMatrix> = [
        (GgmlDType::Q4K, 70),
        (GgmlDType::Q6K, 9),
        (GgmlDType::Q8_0, 300),
    ]
    .iter()
    .map(|&(dtype, rows)| {
        QMatrix::from_qtensor(&quantized(dtype, rows, 256, 7))
            .unwrap()
            .unwrap()
    })
    .collect();
    let x = noise(256, 8);
    let mut outs: Vec<Vec<f32>> = parts.iter().map(|m| vec![f32::NAN; m.rows()]).collect();
    let refs: Vec<&QMatrix> = parts.iter().collect();
    let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
    QMatrix::gemv_each(&refs, &x, &mut slices);
    for (m, got) in parts.iter().zip(&outs) {
        let mut want = vec![0.0; m.rows()];
        m.gemv(&x, &mut want);
        assert_eq!(got, &want, "{:?}", m.tiles().0);
    }
}
