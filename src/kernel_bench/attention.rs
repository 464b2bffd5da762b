//! `bench --kernels`: the prefill attention kernels (f32 and 8-bit) on the default model's
//! heads, against the machine's f32 FMA and int8 dot peaks measured just before.

use std::ops::Range;

use super::best_of;
use crate::backend::attention::attention;
use crate::backend::attention_int8::{attention_int8, Int8Path};
use crate::backend::heads::Heads;
use crate::backend::kv_format::{KvDtype, KvView};

/// One layer's causal attention at `n` tokens, both kernels; `f32_peak` and `int8_peak` in
/// GFLOP/s and GOP/s on every thread.
pub fn run(out: &mut dyn FnMut(String), f32_peak: f64, int8_peak: Option<f64>) {
    // SmolLM2-135M: 9 query heads sharing 3 KV heads of 64
    let shape = Heads {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let hd = shape.head_dim;
    for n in [2048usize, 8192] {
        let wave = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 7919 + seed) % 1013) as f32 - 506.0) * 2e-3)
                .collect()
        };
        let q = wave(n * shape.n_heads * hd, 1);
        let mut k16 = vec![0u16; n * shape.n_kv_heads * hd];
        let mut v16 = k16.clone();
        KvDtype::F16.encode(&wave(k16.len(), 2), &mut k16);
        KvDtype::F16.encode(&wave(v16.len(), 3), &mut v16);
        let pos: Vec<u32> = (0..n as u32).collect();
        let view = KvView {
            k: &k16,
            v: &v16,
            positions: &pos,
            dtype: KvDtype::F16,
        };
        let all: Range<usize> = 0..n;
        let ranges = std::slice::from_ref(&all);
        // Q·Kᵀ and P·V over the visible (query, key) pairs: 2 x 2 hd operations a pair a head
        let ops = 4.0 * hd as f64 * shape.n_heads as f64 * (n * (n + 1) / 2) as f64;
        let mut o = vec![0.0f32; q.len()];
        let reps = if n > 4096 { 2 } else { 4 };
        let t32 = best_of(reps, || {
            attention(&q, &pos, view, ranges, shape, &mut o).expect("attention");
        });
        let r32 = ops / t32 / 1e9;
        let mut line = format!(
            "prefill attention, {n} tokens causal (9/3 heads of 64): f32 {:.1} ms, {r32:.0} GFLOP/s ({:.0}% of the f32 FMA peak)",
            t32 * 1e3,
            100.0 * r32 / f32_peak
        );
        // every fast path side by side: AMX tiles (where usable) and VNNI
        let fast: Vec<Int8Path> = Int8Path::available(hd)
            .into_iter()
            .filter(|p| matches!(p, Int8Path::Amx | Int8Path::Vnni512))
            .collect();
        for path in &fast {
            let t8 = best_of(reps, || {
                attention_int8(*path, &q, &pos, view, ranges, shape, &mut o).expect("int8");
            });
            let r8 = ops / t8 / 1e9;
            line += &format!(
                "; 8-bit ({path:?}) {:.1} ms, {r8:.0} GOP/s ({:.0}% of the VNNI int8 dot peak), {:.2}x f32",
                t8 * 1e3,
                100.0 * r8 / int8_peak.unwrap_or(f64::NAN),
                t32 / t8
            );
        }
        if fast.is_empty() {
            line += "; 8-bit: no AVX-512 VNNI on this CPU (the f32 kernel runs)";
        }
        out(line);
    }
}
