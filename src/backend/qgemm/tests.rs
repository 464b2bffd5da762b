//! Every kernel against a plain f64 reference, on odd sizes: activation rows not a multiple of
//! any microkernel's rows (and split into several tasks), weight rows not a multiple of the
//! 16-row tile or of the 2-tile group, one to several blocks per row.

use candle_core::quantized::GgmlDType;

use super::*;
use crate::backend::qgemv::tests::{noise, quantized, OTHER_TYPES};
use crate::backend::qgemv::QK;

fn check(dtype: GgmlDType, n: usize, k: usize, m: usize) {
    let q = quantized(dtype, n, k, (n * 131 + k) as u64);
    let w_mat = QMatrix::from_qtensor(&q).unwrap().unwrap();
    let w = w_mat.dequantize();
    // activation rows of different magnitudes, some with an outlier
    let mut x: Vec<f32> = noise(m * k, (m * 7 + k) as u64)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1 + (i / k) % 3) as f32)
        .collect();
    for i in (0..m).step_by(3) {
        x[i * k + (i * 5) % k] = 20.0;
    }
    let xq = Q8Rows::quantize(&x, k);
    let xd = xq.dequantize();
    for kernel in Kernel::available() {
        let out = gemm_with(kernel, &w_mat, &x);
        for i in 0..m {
            for j in 0..n {
                let (wr, xr) = (&w[j * k..][..k], &xd[i * k..][..k]);
                // against W · dequant(Q8(x)) in f64: only f32 rounding of the block sums
                let want: f64 = wr.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                let mag: f64 = wr
                    .iter()
                    .zip(xr)
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum();
                let got = out[i * n + j] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * mag + 1e-6,
                    "{kernel:?} {dtype:?} n={n} k={k} m={m}: out[{i}, {j}] = {got}, want {want}"
                );
                // and against W · x: within half an activation step per value
                let exact: f64 = wr
                    .iter()
                    .zip(&x[i * k..][..k])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                let bound: f64 = wr
                    .iter()
                    .enumerate()
                    .map(|(c, a)| a.abs() as f64 * 0.5 * xq.d[i * (k / QK) + c / QK] as f64)
                    .sum();
                assert!(
                    (got - exact).abs() <= bound * 1.001 + 1e-5 * mag + 1e-6,
                    "{kernel:?} {dtype:?} out[{i}, {j}] = {got}, exact {exact} (bound {bound})"
                );
            }
        }
    }
}

#[test]
fn q4_1_matches_the_reference_on_odd_shapes() {
    for (n, k, m) in [
        (1, 32, 1),
        (17, 64, 7),
        (45, 96, 13),
        (50, 160, 197),
        (100, 32, 5),
    ] {
        check(GgmlDType::Q4_1, n, k, m);
    }
}

#[test]
fn q4k_matches_the_reference_on_odd_shapes() {
    for (n, k, m) in [
        (1, 256, 1),
        (17, 256, 7),
        (33, 768, 13),
        (50, 512, 197),
        (100, 256, 5),
    ] {
        check(GgmlDType::Q4K, n, k, m);
    }
}

#[test]
fn q8_0_matches_the_reference_on_odd_shapes() {
    for (n, k, m) in [
        (1, 32, 1),
        (17, 64, 7),
        (45, 96, 13),
        (50, 160, 197),
        (100, 32, 5),
    ] {
        check(GgmlDType::Q8_0, n, k, m);
    }
}

#[test]
fn every_weight_type_matches_the_reference_on_odd_shapes() {
    for dtype in OTHER_TYPES {
        for (n, k, m) in [(17, 256, 7), (45, 512, 13), (50, 256, 197)] {
            check(dtype, n, k, m);
        }
    }
}

#[test]
fn a_row_of_the_gemm_equals_the_gemv_of_that_row() {
    // the same quantization and per-block arithmetic: equal up to f32 summation order
    for (dtype, k) in [
        (GgmlDType::Q4_1, 192),
        (GgmlDType::Q6K, 256),
        (GgmlDType::Q4K, 512),
    ] {
        let q = quantized(dtype, 70, k, 3);
        let w = QMatrix::from_qtensor(&q).unwrap().unwrap();
        let x = noise(9 * k, 11);
        let out = gemm(&w, &x);
        for i in 0..9 {
            let mut row = vec![0.0; 70];
            w.gemv(&x[i * k..][..k], &mut row);
            for (a, b) in out[i * 70..][..70].iter().zip(&row) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{dtype:?} row {i}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn the_split_covers_the_output_once() {
    for (m, tiles, threads) in [
        (1, 1, 2),
        (5, 36, 2),
        (97, 3, 2),
        (2048, 60, 2),
        (300, 96, 16),
    ] {
        let mut seen = vec![0u8; m * tiles];
        for (rows, ts) in split(m, tiles, threads) {
            for i in rows {
                for t in ts.clone() {
                    seen[i * tiles + t] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&s| s == 1), "m={m} tiles={tiles}");
    }
}
