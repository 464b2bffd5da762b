//! `slimchat bench --kernels`: this machine's peaks (f32 FMA, int8 dot, bf16 dot, memory read
//! bandwidth) on 1 and 2 threads, the decode GEMV kernels' rates and the prefill GEMM's (int8
//! against candle's f32 GEMM) on the default model's shapes, so each kernel can be read against
//! its floor (bench/NOTES.md).

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

mod attention;

use crate::backend::attention_int8::AmxStatus;
use crate::backend::qgemm;
use crate::backend::qgemv::kernels::Kernel;
use crate::backend::qgemv::{Kind, QMatrix};

/// One line naming the CPU and whether it exposes AMX tiles (`amx_tile` in /proc/cpuinfo on
/// Linux): llama.cpp's prefill is 2-3x faster where it does, so every ratio against it
/// depends on it. The 8-bit prefill attention uses them where this process may
/// ([`crate::backend::attention_int8::amx_usable`]).
fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| "unknown CPU".into());
    let amx = match field("flags") {
        Some(flags) if flags.split_whitespace().any(|f| f == "amx_tile") => "yes",
        Some(_) => "no",
        None => "unknown",
    };
    format!(
        "machine: {model}, {} threads; AVX-512 VNNI {}; AMX tiles exposed: {amx}, usable by \
         this process: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if peaks::has_vnni() { "yes" } else { "no" },
        match crate::backend::attention_int8::amx_status() {
            AmxStatus::Usable => "yes",
            AmxStatus::Declined => "no (SLIMCHAT_NO_AMX)",
            AmxStatus::NotExposed => "no",
            AmxStatus::Refused => "no (refused by the OS)",
            AmxStatus::FailedProbe => "no (its tiles failed the probe against the emulation)",
        }
    )
}

/// Best of `reps` timings of `f`, in seconds.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

/// Print every line of the report.
pub fn run(out: &mut dyn FnMut(String)) {
    out(machine());
    let threads = rayon::current_num_threads();
    let (mut f32_peak, mut int8_peak) = (0.0, None);
    for t in [1, threads.max(1)] {
        let p = pool(t);
        let iters = 20_000_000usize;
        let fma = best_of(3, || {
            p.broadcast(|_| peaks::fma(iters))
                .into_iter()
                .for_each(drop)
        });
        let dot = best_of(3, || {
            p.broadcast(|_| peaks::dpbusd(iters))
                .into_iter()
                .for_each(drop)
        });
        let bf16 = best_of(3, || {
            p.broadcast(|_| peaks::dpbf16(iters))
                .into_iter()
                .for_each(drop)
        });
        let rate = |ok: bool, ops: usize, secs: f64| {
            if ok {
                format!("{:.0}", (t * iters * ops) as f64 / secs / 1e9)
            } else {
                "n/a".into()
            }
        };
        f32_peak = (t * iters * peaks::FMA_FLOPS) as f64 / fma / 1e9;
        int8_peak = peaks::has_vnni().then(|| (t * iters * peaks::DOT_OPS) as f64 / dot / 1e9);
        out(format!(
            "peak, {t} thread(s): f32 FMA {:.0} GFLOP/s, int8 dot (vpdpbusd) {} GOP/s, bf16 dot (vdpbf16ps) {} GFLOP/s",
            (t * iters * peaks::FMA_FLOPS) as f64 / fma / 1e9,
            rate(peaks::has_vnni(), peaks::DOT_OPS, dot),
            rate(peaks::has_bf16(), peaks::BF16_FLOPS, bf16),
        ));
        for mib in [2usize, 32, 96, 512] {
            let buf: Vec<u64> = vec![1; mib << 17];
            let read = best_of(5, || {
                let s: u64 = p.install(|| buf.par_chunks(buf.len() / t).map(peaks::sum).sum());
                std::hint::black_box(s);
            });
            out(format!(
                "peak, {t} thread(s): memory read of {mib} MiB: {:.1} GB/s",
                (buf.len() * 8) as f64 / read / 1e9
            ));
        }
    }
    prefill_gemm(out);
    attention::run(out, f32_peak, int8_peak);
    gemv_types(out);
    q4k_tiles(out);
    // The decode GEMVs of one token of the default model (SmolLM2-135M: 30 layers, then the
    // head), random weights, each matrix its own copy so the 96 MB stream like in decode.
    let layer = [
        ("q/k/v stacked", GgmlDType::Q4_1, 960, 576),
        ("attn out", GgmlDType::Q4_1, 576, 576),
        ("gate/up stacked", GgmlDType::Q4_1, 3072, 576),
        ("down", GgmlDType::Q4_1, 576, 1536),
    ];
    let head = ("head", GgmlDType::Q8_0, 49152, 576);
    let matrix = |dtype, rows: usize, cols: usize, seed: usize| {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| (((i + seed) * 7919 % 1013) as f32 - 506.0) * 1e-4)
            .collect();
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&t, dtype).expect("quantize");
        QMatrix::from_qtensor(&q)
            .expect("repack")
            .expect("kernel type")
    };
    let mut model: Vec<(&str, QMatrix)> = Vec::new();
    for l in 0..30 {
        for &(name, dtype, rows, cols) in &layer {
            model.push((name, matrix(dtype, rows, cols, l)));
        }
    }
    model.push((head.0, matrix(head.1, head.2, head.3, 0)));
    let names = [
        "q/k/v stacked",
        "attn out",
        "gate/up stacked",
        "down",
        "head",
    ];
    for kernel in Kernel::available() {
        if kernel == Kernel::Scalar {
            continue; // ~100x slower: see the tests for its correctness
        }
        let mut best = vec![f64::INFINITY; names.len()];
        let mut total_best = f64::INFINITY;
        for _ in 0..5 {
            let mut times = vec![0.0; names.len()];
            // on a pool thread, as a decode step runs (src/engine.rs, `step`)
            rayon::scope(|_| {
                for (name, m) in &model {
                    let x: Vec<f32> = (0..m.cols()).map(|i| (i % 17) as f32 - 8.0).collect();
                    let mut y = vec![0.0; m.rows()];
                    let t = Instant::now();
                    m.gemv_with(kernel, &x, &mut y);
                    times[names.iter().position(|n| n == name).unwrap_or(0)] +=
                        t.elapsed().as_secs_f64();
                }
            });
            for (b, t) in best.iter_mut().zip(&times) {
                *b = b.min(*t);
            }
            total_best = total_best.min(times.iter().sum());
        }
        for (name, t) in names.iter().zip(&best) {
            let bytes: usize = model
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, m)| m.bytes())
                .sum();
            out(format!(
                "gemv per token, {kernel:?}: {name:>16} {:6.0} us for {:5.1} MB: {:5.1} GB/s",
                t * 1e6,
                bytes as f64 / 1e6,
                bytes as f64 / t / 1e9
            ));
        }
        let bytes: usize = model.iter().map(|(_, m)| m.bytes()).sum();
        out(format!(
            "gemv per token, {kernel:?}: all {:.2} ms for {:.1} MB: {:.1} GB/s, {:.0} tok/s if decode were only its GEMVs",
            total_best * 1e3,
            bytes as f64 / 1e6,
            bytes as f64 / total_best / 1e9,
            1.0 / total_best
        ));
    }
}

/// The decode GEMV of one (8192, 2048) matrix (a Llama-3.2-1B gate) in each tile format, from
/// the GGUF types that repack into it: bytes streamed and the rate.
fn gemv_types(out: &mut dyn FnMut(String)) {
    let (rows, cols) = (8192, 2048);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-4)
        .collect();
    let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).expect("tensor");
    let x: Vec<f32> = (0..cols).map(|i| (i % 17) as f32 - 8.0).collect();
    for dtype in [
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
        GgmlDType::Q8_0,
        GgmlDType::Q6K,
        GgmlDType::Q5K,
    ] {
        let q = QTensor::quantize(&wt, dtype).expect("quantize");
        let m = QMatrix::from_qtensor(&q)
            .expect("repack")
            .expect("kernel type");
        let mut y = vec![0.0; rows];
        let t = best_of(10, || m.gemv_with(Kernel::best(), &x, &mut y));
        out(format!(
            "gemv ({rows}x{cols} {dtype:?} as {:?} tiles, {:?}): {:5.0} us for {:5.1} MB ({:.1} MB in the GGUF): {:5.1} GB/s",
            m.tiles().0,
            Kernel::best(),
            t * 1e6,
            m.bytes() as f64 / 1e6,
            q.storage_size_in_bytes() as f64 / 1e6,
            m.bytes() as f64 / t / 1e9
        ));
    }
}

/// Q4_K's own tiles (Q4K, 0.578 bytes per weight) against the Q4_1 tiles it took before (0.625),
/// measured alternately (best of many, so a shared machine's noise hits both alike): the decode
/// GEMV of an (8192, 2048) matrix, hot in the L3 cache (one matrix) and streamed from memory
/// (8 copies, ~80 MB, one GEMV each, as decode reads a model), and the prefill GEMM of 1024
/// rows with a (576, 1536) one.
fn q4k_tiles(out: &mut dyn FnMut(String)) {
    let quantize = |rows: usize, cols: usize| {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-4)
            .collect();
        let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).expect("tensor");
        QTensor::quantize(&wt, GgmlDType::Q4K).expect("quantize")
    };
    let tiles = |q: &QTensor, kind| {
        QMatrix::from_qtensor_in(q, kind)
            .expect("repack")
            .expect("a format that holds Q4_K")
    };
    let kinds = [Kind::Q4_1, Kind::Q4K];
    let (rows, cols) = (8192, 2048);
    let q = quantize(rows, cols);
    let copies = 8;
    let ms = kinds.map(|k| (0..copies).map(|_| tiles(&q, k)).collect::<Vec<_>>());
    let x: Vec<f32> = (0..cols).map(|i| (i % 17) as f32 - 8.0).collect();
    let mut y = vec![0.0; rows];
    for kernel in Kernel::available() {
        if kernel == Kernel::Scalar {
            continue;
        }
        for (place, n) in [("hot", 1), ("streamed", copies)] {
            let mut best = [f64::INFINITY; 2];
            for _ in 0..40 / n + 5 {
                for (b, m) in best.iter_mut().zip(&ms) {
                    let t = best_of(1, || {
                        m[..n].iter().for_each(|m| m.gemv_with(kernel, &x, &mut y))
                    });
                    *b = b.min(t / n as f64);
                }
            }
            let mut line = format!("q4k tiles: gemv ({rows}x{cols} Q4K, {kernel:?}, {place})");
            for ((kind, m), t) in kinds.iter().zip(&ms).zip(best) {
                line += &format!(
                    ", as {kind:?} {:4.0} us for {:4.1} MB ({:5.1} GB/s)",
                    t * 1e6,
                    m[0].bytes() as f64 / 1e6,
                    m[0].bytes() as f64 / t / 1e9
                );
            }
            out(line);
        }
    }
    let (m, n, k) = (1024, 576, 1536);
    let q = quantize(n, k);
    let ws = kinds.map(|kind| tiles(&q, kind));
    let x: Vec<f32> = (0..m * k).map(|i| ((i % 23) as f32 - 11.0) * 0.1).collect();
    let ops = (2 * m * n * k) as f64;
    for kernel in Kernel::available() {
        if kernel == Kernel::Scalar {
            continue;
        }
        let mut best = [f64::INFINITY; 2];
        for _ in 0..10 {
            for (b, w) in best.iter_mut().zip(&ws) {
                *b = b.min(best_of(1, || {
                    std::hint::black_box(qgemm::gemm_with(kernel, w, &x));
                }));
            }
        }
        let mut line = format!("q4k tiles: prefill gemm, {m} rows ({n}x{k} Q4K, {kernel:?})");
        for (kind, t) in kinds.iter().zip(best) {
            line += &format!(", as {kind:?} {:4.0} GOP/s", ops / t / 1e9);
        }
        out(line);
    }
}

/// The prefill GEMMs of one layer of the default model on 1024 activation rows (an MLP chunk;
/// attention's take every row, at the same rate per row): the int8 GEMM on the packed GGUF
/// blocks per kernel, against candle's f32 GEMM on the dequantized weights.
fn prefill_gemm(out: &mut dyn FnMut(String)) {
    let m = 1024;
    let shapes = [
        ("q/k/v stacked", GgmlDType::Q4_1, 960, 576),
        ("attn out", GgmlDType::Q4_1, 576, 576),
        ("gate/up stacked", GgmlDType::Q4_1, 3072, 576),
        ("down", GgmlDType::Q4_1, 576, 1536),
        ("a Q8_0 matrix", GgmlDType::Q8_0, 576, 576),
        // the other tile formats: Q5_0 as Q5z, Q4_K as Q4K, Q5_K as Q5, Q6_K as Q6
        ("down", GgmlDType::Q5_0, 576, 1536),
        ("down", GgmlDType::Q4K, 576, 1536),
        ("down", GgmlDType::Q5K, 576, 1536),
        ("down", GgmlDType::Q6K, 576, 1536),
    ];
    let mut totals = vec![0.0f64; 1 + Kernel::available().len()];
    for (name, dtype, n, k) in shapes {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-4)
            .collect();
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&wt, dtype).expect("quantize");
        let packed = QMatrix::from_qtensor(&q)
            .expect("repack")
            .expect("kernel type");
        let dense = q.dequantize(&Device::Cpu).expect("dequantize");
        let x: Vec<f32> = (0..m * k).map(|i| ((i % 23) as f32 - 11.0) * 0.1).collect();
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).expect("tensor");
        let ops = (2 * m * n * k) as f64;
        let f32_time = best_of(5, || {
            let y = xt.matmul(&dense.t().expect("t")).expect("matmul");
            std::hint::black_box(y);
        });
        let mut line = format!(
            "prefill gemm, {m} rows: {name:>16} ({n}x{k} {dtype:?}): f32 {:5.0} GFLOP/s",
            ops / f32_time / 1e9
        );
        if dtype == GgmlDType::Q4_1 {
            totals[0] += f32_time;
        }
        for (i, kernel) in Kernel::available().into_iter().enumerate() {
            if kernel == Kernel::Scalar {
                continue; // far slower: see the tests for its correctness
            }
            let t = best_of(5, || {
                std::hint::black_box(qgemm::gemm_with(kernel, &packed, &x));
            });
            if dtype == GgmlDType::Q4_1 {
                totals[1 + i] += t;
            }
            line += &format!(
                ", {kernel:?} {:5.0} GOP/s ({:.2}x)",
                ops / t / 1e9,
                f32_time / t
            );
        }
        out(line);
    }
    let mut line = format!(
        "prefill gemm, {m} rows: one layer (Q4_1 shapes): f32 {:.1} ms",
        totals[0] * 1e3
    );
    for (i, kernel) in Kernel::available().into_iter().enumerate() {
        if kernel != Kernel::Scalar {
            line += &format!(
                ", {kernel:?} {:.1} ms ({:.2}x)",
                totals[1 + i] * 1e3,
                totals[0] / totals[1 + i]
            );
        }
    }
    out(line);
}

mod peaks {
    /// FLOPs of one `fma` iteration: 8 accumulators × 16 lanes × (mul + add).
    pub const FMA_FLOPS: usize = 8 * 16 * 2;
    /// Ops of one `dpbusd` iteration: 8 accumulators × 64 byte products × (mul + add).
    pub const DOT_OPS: usize = 8 * 64 * 2;
    /// FLOPs of one `dpbf16` iteration: 8 accumulators × 32 bf16 products × (mul + add).
    pub const BF16_FLOPS: usize = 8 * 32 * 2;

    pub fn has_bf16() -> bool {
        #[cfg(target_arch = "x86_64")]
        return std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bf16");
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    }

    pub fn dpbf16(iters: usize) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_bf16() {
            // SAFETY: the CPU has AVX-512F and AVX-512 BF16.
            return unsafe { x86::dpbf16(iters) };
        }
        std::hint::black_box(iters) as f32
    }

    pub fn has_vnni() -> bool {
        #[cfg(target_arch = "x86_64")]
        return std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vnni");
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    }

    crate::backend::simd::dispatch! {
        /// Wrapping sum, 32 lanes so the read is not limited by the adds.
        pub fn sum(v: &[u64]) -> u64 {
            let mut acc = [0u64; 32];
            for c in v.chunks_exact(32) {
                for i in 0..32 {
                    acc[i] = acc[i].wrapping_add(c[i]);
                }
            }
            acc.iter().fold(0, |a, b| a.wrapping_add(*b))
        }
    }

    /// `iters` rounds of 8 independent 16-lane FMAs (latency 4, 2 per cycle: 8 chains fill them).
    pub fn fma(iters: usize) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { x86::fma(iters) };
        }
        let mut acc = [1.0f32; 8];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = a.mul_add(0.999_999, 1e-7);
            }
        }
        acc.iter().sum()
    }

    pub fn dpbusd(iters: usize) -> i32 {
        #[cfg(target_arch = "x86_64")]
        if has_vnni() {
            // SAFETY: the CPU has AVX-512F and VNNI.
            return unsafe { x86::dpbusd(iters) };
        }
        std::hint::black_box(iters) as i32
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        /// SAFETY: needs AVX-512F.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn fma(iters: usize) -> f32 {
            let (m, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            let mut a = [_mm512_set1_ps(1.0); 8];
            for _ in 0..iters {
                for v in a.iter_mut() {
                    *v = _mm512_fmadd_ps(*v, m, c);
                }
            }
            let s = a
                .iter()
                .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v));
            _mm512_reduce_add_ps(s)
        }

        /// SAFETY: needs AVX-512F and AVX-512 BF16.
        #[target_feature(enable = "avx512f,avx512bf16")]
        pub unsafe fn dpbf16(iters: usize) -> f32 {
            // 1.0 in both bf16 halves of every lane
            let one = _mm512_castsi512_ps(_mm512_set1_epi32(0x3F80_3F80));
            let b: __m512bh = std::mem::transmute::<__m512, __m512bh>(one);
            let mut a = [_mm512_setzero_ps(); 8];
            for _ in 0..iters {
                for v in a.iter_mut() {
                    *v = _mm512_dpbf16_ps(*v, b, b);
                }
            }
            let s = a
                .iter()
                .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v));
            _mm512_reduce_add_ps(s)
        }

        /// SAFETY: needs AVX-512F and VNNI.
        #[target_feature(enable = "avx512f,avx512vnni")]
        pub unsafe fn dpbusd(iters: usize) -> i32 {
            let (u, s) = (_mm512_set1_epi8(3), _mm512_set1_epi8(-2));
            let mut a = [_mm512_setzero_si512(); 8];
            for _ in 0..iters {
                for v in a.iter_mut() {
                    *v = _mm512_dpbusd_epi32(*v, u, s);
                }
            }
            let s = a
                .iter()
                .fold(_mm512_setzero_si512(), |s, v| _mm512_add_epi32(s, *v));
            _mm512_reduce_add_epi32(s)
        }
    }
}
