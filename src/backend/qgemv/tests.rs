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

fn check(dtype: GgmlDType, rows: usize, cols: usize) {
    let q = quantized(dtype, rows, cols, rows as u64 * 31 + cols as u64);
    let m = QMatrix::from_qtensor(&q).unwrap().unwrap();
    let w = candle_dequantized(&q);
    assert_eq!(m.dequantize(), w, "the tiles hold candle's weights");
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
fn q8_0_kernels_match_the_reference() {
    check(GgmlDType::Q8_0, 149, 96);
    check(GgmlDType::Q8_0, 7, 160);
    check(GgmlDType::Q8_0, 67, 224);
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
    ] {
        let q = quantized(dtype, rows, cols, 99);
        let m = QMatrix::from_qtensor(&q).unwrap().unwrap();
        let w = candle_dequantized(&q);
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
