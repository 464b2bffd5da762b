//! Tests of single-query decode attention (src/backend/decode_attention.rs) over real layer
//! caches: every ISA path against the f64 reference in every KV type (Q8 keys stored with their
//! channel scale), key ranges, the query position, and the fast tier's runs cutting the same
//! keys differently. Here rather than in backend because they build the caches with
//! [`LayerKv`] (backend does not depend on kv).
#![allow(clippy::single_range_in_vec_init)] // one key range covering every key is the common case

use std::ops::Range;

use rayon::prelude::*;

use super::cache::LayerKv;
use crate::backend::attention::attention_reference;
use crate::backend::decode_attention::{
    decode_attention, decode_attention_runs_with, decode_attention_with, KeyRun,
};
use crate::backend::heads::Heads;
use crate::backend::isa::Isa;
use crate::backend::kv_format::KvDtype;

fn patterned(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Compare every path with the f64 reference over the gathered keys of `ranges` (the
/// reference sees the same 16-bit-rounded K and V, so only arithmetic differs).
fn check(n: usize, q_pos: u32, ranges: &[Range<usize>], shape: Heads, dtype: KvDtype, seed: u64) {
    let kv_dim = shape.n_kv_heads * shape.head_dim;
    // gapped positions, as after SlimInfer's row drop
    let positions: Vec<u32> = (0..n as u32).map(|i| i * 3 + i % 2).collect();
    let mut cache = LayerKv::new(dtype);
    // large-ish scores so the softmax is peaked and the online rescaling matters
    let k: Vec<f32> = patterned(n * kv_dim, seed)
        .iter()
        .map(|x| x * 3.0)
        .collect();
    cache
        .append(&k, &patterned(n * kv_dim, seed + 1), &positions)
        .unwrap();
    let q: Vec<f32> = patterned(shape.n_heads * shape.head_dim, seed + 2)
        .iter()
        .map(|x| x * 2.0)
        .collect();
    let visible = positions.partition_point(|&p| p <= q_pos);
    let rows: Vec<usize> = ranges
        .iter()
        .flat_map(|r| r.clone())
        .filter(|&j| j < visible)
        .collect();
    let (kf, vf) = (cache.keys_f32(), cache.values_f32());
    let gather = |x: &[f32]| {
        rows.iter()
            .flat_map(|&j| x[j * kv_dim..][..kv_dim].to_vec())
            .collect::<Vec<_>>()
    };
    let sub_pos: Vec<u32> = rows.iter().map(|&j| positions[j]).collect();
    let want = attention_reference(&q, &[q_pos], &gather(&kf), &gather(&vf), &sub_pos, shape);
    // Q8 keys are stored divided by their channel scale, which the query takes instead
    let mut q = q;
    cache.scale_queries(&mut q, shape);
    for &isa in Isa::available() {
        let mut out = vec![f32::NAN; q.len()];
        decode_attention_with(isa, &q, q_pos, cache.view(), ranges, shape, &mut out);
        let worst = out
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            worst < 2e-5,
            "{isa:?} {dtype:?} n {n}: max abs error {worst}"
        );
    }
}

const GQA: Heads = Heads {
    n_heads: 9,
    n_kv_heads: 3,
    head_dim: 64,
};

#[test]
fn every_path_matches_reference_on_odd_lengths() {
    for (i, n) in [1usize, 31, 33, 517, 2501].into_iter().enumerate() {
        for dtype in [KvDtype::F16, KvDtype::Bf16, KvDtype::Q8] {
            check(n, u32::MAX, &[0..n], GQA, dtype, i as u64);
        }
    }
}

#[test]
fn every_path_honours_key_ranges_and_the_query_position() {
    let n = 1999;
    let ranges = [0..64, 67..70, 300..301, 640..1283, 1500..1999];
    check(n, u32::MAX, &ranges, GQA, KvDtype::F16, 7);
    // the query sits inside the last range: later keys are masked
    check(n, 3200, &ranges, GQA, KvDtype::Bf16, 8);
    check(n, 2900, &ranges, GQA, KvDtype::Q8, 10);
}

#[test]
fn odd_head_dim_and_group_match_reference() {
    let shape = Heads {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 40,
    };
    check(777, u32::MAX, &[5..700, 701..777], shape, KvDtype::F16, 9);
}

/// The KV manager's fast tier holds the same keys as the host cache, cut differently (slots
/// in position order, then the generated rows): the output must not depend on the cut.
#[test]
fn output_depends_on_the_key_sequence_not_on_how_it_is_cut() {
    let kv_dim = GQA.n_kv_heads * GQA.head_dim;
    let n = 3001;
    let positions: Vec<u32> = (0..n as u32).collect();
    let mut cache = LayerKv::new(KvDtype::F16);
    let k: Vec<f32> = patterned(n * kv_dim, 21).iter().map(|x| x * 3.0).collect();
    cache
        .append(&k, &patterned(n * kv_dim, 22), &positions)
        .unwrap();
    let q = patterned(GQA.n_heads * GQA.head_dim, 23);
    for ranges in [
        vec![0..64, 67..70, 300..301, 640..1283, 1500..3001],
        vec![0..64, 128..192, 1024..1088, 2900..3001],
        vec![5..2000],
    ] {
        let rows: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
        let gather = |x: &[u16]| -> Vec<u16> {
            rows.iter()
                .flat_map(|&j| x[j * kv_dim..][..kv_dim].to_vec())
                .collect()
        };
        let (gk, gv) = (gather(&cache.k), gather(&cache.v));
        // cuts of the gathered sequence into runs of odd lengths (some empty)
        let mut cuts = vec![0usize];
        let mut at = 0;
        for len in [1usize, 0, 7, 64, 33, 31, 100, 1, 257, 64].iter().cycle() {
            at += len;
            if at >= rows.len() {
                break;
            }
            cuts.push(at);
        }
        cuts.push(rows.len());
        let odd: Vec<KeyRun> = cuts
            .windows(2)
            .map(|w| KeyRun {
                k: &gk[w[0] * kv_dim..w[1] * kv_dim],
                v: &gv[w[0] * kv_dim..w[1] * kv_dim],
            })
            .collect();
        let whole = [KeyRun { k: &gk, v: &gv }];
        for &isa in Isa::available() {
            let mut by_ranges = vec![f32::NAN; q.len()];
            decode_attention_with(
                isa,
                &q,
                u32::MAX,
                cache.view(),
                &ranges,
                GQA,
                &mut by_ranges,
            );
            for runs in [&whole[..], &odd[..]] {
                let mut out = vec![f32::NAN; q.len()];
                decode_attention_runs_with(isa, &q, runs, KvDtype::F16, GQA, &mut out);
                let same = out
                    .iter()
                    .zip(&by_ranges)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{isa:?}: {} runs differ from the key ranges",
                    runs.len()
                );
            }
        }
    }
}

#[test]
fn no_visible_key_outputs_zero() {
    let mut cache = LayerKv::new(KvDtype::F16);
    cache.append(&[1.0; 8], &[1.0; 8], &[5, 6]).unwrap();
    let shape = Heads {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
    };
    let mut out = vec![f32::NAN; 8];
    decode_attention(&[1.0; 8], 4, cache.view(), &[0..2], shape, &mut out);
    assert!(out.iter().all(|&x| x == 0.0));
}

/// Timing, not a check: `cargo test --release --lib decode_attention_speed -- --ignored
/// --nocapture`. 30 layers' caches of 7,000 rows (161 MB of f16, 86 MB of Q8), as one
/// decode step reads.
#[test]
#[ignore]
fn decode_attention_speed() {
    for dtype in [KvDtype::F16, KvDtype::Q8] {
        eprintln!("{dtype:?}:");
        speed_with(dtype);
    }
}

fn speed_with(dtype: KvDtype) {
    // LAYERSxKEYS from SPEED_SHAPE (default 30x7000): smaller shapes show the rate when the
    // KV fits in the cache the machine gives us (bench/NOTES.md)
    let (layers, n) = std::env::var("SPEED_SHAPE")
        .ok()
        .and_then(|s| {
            let (a, b) = s.split_once('x')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .unwrap_or((30, 7000));
    let kv_dim = GQA.n_kv_heads * GQA.head_dim;
    let caches: Vec<LayerKv> = (0..layers)
        .map(|l| {
            let mut c = LayerKv::new(dtype);
            let pos: Vec<u32> = (0..n as u32).collect();
            let k = patterned(n * kv_dim, l as u64);
            c.append(&k, &k, &pos).unwrap();
            c
        })
        .collect();
    let q = patterned(GQA.n_heads * GQA.head_dim, 99);
    let mut out = vec![0.0; q.len()];
    // the floor: the same bytes streamed and summed by the same pool
    let steps = 20;
    let t = std::time::Instant::now();
    let mut total = 0u64;
    for _ in 0..steps {
        total += caches
            .par_iter()
            .flat_map(|c| [&c.k, &c.v])
            .flat_map(|x| x.par_chunks(1 << 16))
            .map(|x| x.iter().map(|&b| b as u64).sum::<u64>())
            .sum::<u64>();
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
    eprintln!("read floor: {ms:.2} ms per step (checksum {total})");
    for &isa in Isa::available() {
        let t = std::time::Instant::now();
        for _ in 0..steps {
            for c in &caches {
                decode_attention_with(isa, &q, u32::MAX, c.view(), &[0..n], GQA, &mut out);
            }
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
        let gbs = (layers * n * dtype.stored_len(kv_dim) * 2 * 2) as f64 / ms / 1e6;
        eprintln!(
            "{isa:?}: {ms:.2} ms per decode step at {n} keys x {layers} layers ({gbs:.1} GB/s)"
        );
    }
}
