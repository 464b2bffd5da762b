//! The 8-bit kernel against the f32 one (the exact reference) on odd shapes, and its paths
//! against each other (the same integers, so the same bits). Each test prints the paths it ran.

// one key range covering every key is the common case
#![allow(clippy::single_range_in_vec_init)]

use super::*;
use crate::backend::attention::{attention, attention_in_place_with, AttentionKind};
use crate::backend::kv_format::KvDtype;

/// Deterministic pseudo-random values in [-1, 1).
fn patterned(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Queries and keys shaped like a real layer's: logits spread over several units (a peaked
/// softmax), a few loud key channels with an offset shared by every key (what smoothing
/// removes), and values with per-channel offsets.
fn inputs(nq: usize, nk: usize, shape: Heads, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let hd = shape.head_dim;
    let mut q = patterned(nq * shape.n_heads * hd, seed);
    q.iter_mut().for_each(|x| *x *= 3.0);
    let mut k = patterned(nk * shape.n_kv_heads * hd, seed + 1);
    for (i, x) in k.iter_mut().enumerate() {
        let d = i % hd;
        if d % 16 == 3 {
            *x = *x * 4.0 + 6.0;
        }
    }
    let mut v = patterned(nk * shape.n_kv_heads * hd, seed + 2);
    for (i, x) in v.iter_mut().enumerate() {
        *x += ((i % hd) as f32 - 20.0) * 0.05;
    }
    (q, k, v)
}

/// K and V stored as `dtype` words.
fn store(dtype: KvDtype, x: &[f32]) -> Vec<u16> {
    let mut out = vec![0u16; dtype.stored_len(x.len())];
    dtype.encode(x, &mut out);
    out
}

/// The 8-bit kernel on every path against the f32 kernel on the same cache: the paths agree
/// bit for bit (also written in place), and the error against f32 is within `max_err` (largest)
/// and `rms_err` (root mean square), both relative to the output's root mean square.
#[allow(clippy::too_many_arguments)]
fn check(
    q_pos: &[u32],
    k_pos: &[u32],
    ranges: &[Range<usize>],
    shape: Heads,
    dtype: KvDtype,
    seed: u64,
    max_err: f32,
    rms_err: f32,
) {
    let (q, k, v) = inputs(q_pos.len(), k_pos.len(), shape, seed);
    let (ks, vs) = (store(dtype, &k), store(dtype, &v));
    let view = KvView {
        k: &ks,
        v: &vs,
        positions: k_pos,
        dtype,
    };
    let mut want = vec![f32::NAN; q.len()];
    attention(&q, q_pos, view, ranges, shape, &mut want).unwrap();
    let scale = (want.iter().map(|x| x * x).sum::<f32>() / want.len() as f32).sqrt();
    let mut first: Option<Vec<f32>> = None;
    for path in Int8Path::available(shape.head_dim) {
        let mut got = vec![f32::NAN; q.len()];
        attention_int8(path, &q, q_pos, view, ranges, shape, &mut got).unwrap();
        let mut qo = q.clone();
        attention_int8_in_place(path, &mut qo, q_pos, view, ranges, shape).unwrap();
        let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&qo), bits(&got), "{path:?}: in place differs");
        if let Some(f) = &first {
            assert_eq!(bits(&got), bits(f), "{path:?} differs from the first path");
        }
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        let rms = (got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            / got.len() as f32)
            .sqrt();
        println!(
            "int8 attention on {path:?} (nq {}, nk {}, {dtype:?}): max err {:.4}, rms err {:.4} \
             of output rms {scale:.3}",
            q_pos.len(),
            k_pos.len(),
            worst / scale,
            rms / scale
        );
        assert!(
            worst <= max_err * scale && rms <= rms_err * scale,
            "{path:?}: max err {} rms err {} (output rms {scale}, nq {}, nk {})",
            worst / scale,
            rms / scale,
            q_pos.len(),
            k_pos.len()
        );
        first.get_or_insert(got);
    }
}

const GQA: Heads = Heads {
    n_heads: 9,
    n_kv_heads: 3,
    head_dim: 64,
};

#[test]
fn prefill_of_odd_length_matches_f32() {
    // 203 rows: a partial tile whose row vectors mix heads; 203 keys: a partial block
    let pos: Vec<u32> = (0..203).collect();
    check(&pos, &pos, &[0..203], GQA, KvDtype::F16, 1, 0.05, 0.004);
}

#[test]
fn prefill_across_key_blocks_matches_f32() {
    // 600 keys: two whole blocks of 256 and a partial one
    let pos: Vec<u32> = (0..600).collect();
    check(&pos, &pos, &[0..600], GQA, KvDtype::F16, 2, 0.05, 0.004);
}

#[test]
fn continuation_over_a_q8_cache_matches_f32() {
    // a follow-up turn: 91 new rows after 309 cached ones, the cache in Q8
    let k_pos: Vec<u32> = (0..400).collect();
    check(
        &k_pos[309..],
        &k_pos,
        &[0..400],
        GQA,
        KvDtype::Q8,
        3,
        0.05,
        0.004,
    );
}

#[test]
fn pruned_rows_with_gapped_positions_and_key_ranges_match_f32() {
    // SlimInfer's rectangle: kept queries and keys with holes in their positions, and key
    // ranges that start inside a block (and inside a group of four keys) and cross a block
    // boundary
    let k_pos: Vec<u32> = (0..900)
        .filter(|p| p % 7 != 3 && !(64..128).contains(p))
        .collect();
    let q_pos: Vec<u32> = k_pos.iter().copied().filter(|p| p % 3 == 0).collect();
    let nk = k_pos.len();
    check(
        &q_pos,
        &k_pos,
        &[0..64, 101..300, 503..nk],
        GQA,
        KvDtype::F16,
        4,
        0.05,
        0.004,
    );
}

#[test]
fn wide_heads_and_groups_of_two_match_f32() {
    let shape = Heads {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 128,
    };
    let pos: Vec<u32> = (0..333).collect();
    check(&pos, &pos, &[0..333], shape, KvDtype::Bf16, 5, 0.05, 0.004);
}

#[test]
fn query_before_every_key_outputs_zero() {
    let shape = Heads {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 16,
    };
    let q = patterned(2 * 2 * 16, 6);
    let (k, v) = (patterned(3 * 16, 7), patterned(3 * 16, 8));
    let (ks, vs) = (store(KvDtype::F16, &k), store(KvDtype::F16, &v));
    let view = KvView {
        k: &ks,
        v: &vs,
        positions: &[5, 6, 7],
        dtype: KvDtype::F16,
    };
    for path in Int8Path::available(shape.head_dim) {
        let mut out = vec![f32::NAN; q.len()];
        attention_int8(path, &q, &[1, 6], view, &[0..3], shape, &mut out).unwrap();
        assert!(out[..32].iter().all(|&x| x == 0.0), "{path:?}");
        assert!(
            out[32..].iter().all(|x| x.is_finite() && *x != 0.0),
            "{path:?}"
        );
    }
}

/// The probability step alone, where its two paths could part: masked keys (-inf), the block
/// max's rounding residue on either side of 0, fractions just below an integer (where the AVX-512
/// fraction is rounded down), the edge of 2^-24, every exponent between, and partial groups.
#[cfg(target_arch = "x86_64")]
#[test]
fn probabilities_agree_on_every_edge() {
    let Some(_) = Int8Path::fast(64) else {
        println!("no fast 8-bit path on this CPU: the portable one alone, nothing to compare");
        return;
    };
    let mut xs: Vec<f32> = vec![
        f32::NEG_INFINITY,
        -24.0,
        -24.000002,
        -23.999998,
        -9.0,
        0.0,
        -0.0,
    ];
    for e in -40..0 {
        let t = 2f32.powi(e);
        xs.extend([t, -t, -1.0 + t, -1.0 - t]);
    }
    xs.extend(patterned(1500, 11).iter().map(|x| (x - 1.0) * 13.0));
    xs.extend((0..400).map(|i| -(i as f32) / 16.0));
    // the lanes' query scales and bases differ, so each key column takes 16 different paths
    let qs: [f32; LANES] = std::array::from_fn(|l| 0.5 + l as f32 / 8.0);
    let base: [f32; LANES] =
        std::array::from_fn(|l| if l % 3 == 0 { 0.0 } else { l as f32 * 0.37 });
    let keys = xs.len() / LANES;
    let mut logits = vec![0.0f32; keys * LANES];
    for (j, row) in logits.chunks_exact_mut(LANES).enumerate() {
        for l in 0..LANES {
            // logit x / qs lands on x after the scale, up to one rounding
            row[l] = (xs[(j * LANES + l * 7) % xs.len()] + base[l]) / qs[l];
        }
    }
    for ke in [keys, keys - 1, keys - 2, keys - 3] {
        let steps = ke.div_ceil(4);
        let (mut p4, mut at) = (vec![0u32; steps * LANES], vec![0u32; steps]);
        let (want_sum, want_kept) =
            softmax::probs::<true>(&logits, &qs, &base, ke, &mut p4, &mut at);
        let (mut p4v, mut atv) = (vec![0u32; steps * LANES], vec![0u32; steps]);
        // SAFETY: the fast path exists (checked above); the buffers have the sizes asked
        let (sum, kept) =
            unsafe { softmax::x86::probs::<true>(&logits, &qs, &base, ke, &mut p4v, &mut atv) };
        assert_eq!((sum, kept), (want_sum, want_kept), "keys {ke}");
        assert_eq!(p4v[..kept * LANES], p4[..kept * LANES], "keys {ke}");
        assert_eq!(atv[..kept], at[..kept], "keys {ke}");
    }
    // the portable step's values themselves: 255 at the max, 128 one unit below, 0 masked
    assert_eq!(softmax::exp2_u8(0.0), 255);
    assert_eq!(softmax::exp2_u8(1e-7), 255);
    assert_eq!(softmax::exp2_u8(-1e-7), 255);
    assert_eq!(softmax::exp2_u8(-1.0), 128);
    assert_eq!(softmax::exp2_u8(-8.0), 1);
    assert_eq!(softmax::exp2_u8(-10.0), 0);
    assert_eq!(softmax::exp2_u8(f32::NEG_INFINITY), 0);
    for i in 0..=9000 {
        let x = -(i as f32) / 1000.0;
        let want = (255.0 * (x as f64).exp2()).round();
        let got = softmax::exp2_u8(x) as f64;
        assert!((got - want).abs() <= 1.0, "x {x}: {got} against {want}");
    }
}

#[test]
fn f32_kind_is_the_f32_kernel_bit_for_bit() {
    let pos: Vec<u32> = (0..150).collect();
    let (q, k, v) = inputs(150, 150, GQA, 9);
    let (ks, vs) = (store(KvDtype::F16, &k), store(KvDtype::F16, &v));
    let view = KvView {
        k: &ks,
        v: &vs,
        positions: &pos,
        dtype: KvDtype::F16,
    };
    let mut want = vec![0.0; q.len()];
    attention(&q, &pos, view, &[0..150], GQA, &mut want).unwrap();
    let mut got = q.clone();
    attention_in_place_with(AttentionKind::F32, &mut got, &pos, view, &[0..150], GQA).unwrap();
    assert!(got
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    assert_eq!(AttentionKind::F32.int8_path(150, 64), None);
    assert_eq!(AttentionKind::Int8.int8_path(150, 64), Int8Path::fast(64));
    assert_eq!(AttentionKind::Int8.int8_path(150, 40), None);
    assert_eq!(AttentionKind::Int8.int8_path(1, 64), None);
    println!("this CPU's 8-bit path: {:?}", Int8Path::fast(64));
}

/// Timing, not a check: `cargo test --release --lib int8_attention_speed -- --ignored --nocapture`.
#[test]
#[ignore]
fn int8_attention_speed() {
    for n in [2048usize, 4096] {
        let pos: Vec<u32> = (0..n as u32).collect();
        let (q, k, v) = inputs(n, n, GQA, 11);
        let (ks, vs) = (store(KvDtype::F16, &k), store(KvDtype::F16, &v));
        let view = KvView {
            k: &ks,
            v: &vs,
            positions: &pos,
            dtype: KvDtype::F16,
        };
        let mut out = vec![0.0; q.len()];
        let time = |f: &mut dyn FnMut()| {
            (0..3)
                .map(|_| {
                    let t = std::time::Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .fold(f64::INFINITY, f64::min)
        };
        let f32_ms = time(&mut || attention(&q, &pos, view, &[0..n], GQA, &mut out).unwrap());
        let path = Int8Path::fast(64).unwrap_or(Int8Path::Scalar);
        let int8_ms =
            time(&mut || attention_int8(path, &q, &pos, view, &[0..n], GQA, &mut out).unwrap());
        println!("{n} tokens: f32 {f32_ms:.1} ms, int8 ({path:?}) {int8_ms:.1} ms");
    }
}
