//! The CPU references of the CUDA kernels (`CpuOps`, the ops seam on the CPU) against
//! independent naive implementations, the comparison harness against itself, and the
//! Llama forward written against the seam, random weights (dense, pruned, decode).

use std::sync::atomic::Ordering;

use slimchat::backend::cpu_ops::{rope_tables, to_bf16, to_f32, CpuOps};
use slimchat::backend::ops::{
    AttentionContext, Heads, KvPool, Ops, RowSlice, ScoreMode, UnitBlocks, KV_BLOCK,
};
use slimchat::backend::ops_check::{compare, rel_err, Rng};
use slimchat::backend::paged_kv::NoHooks;
use slimchat::backend::rowwise::{Rope, RopeLayout, RopeParams};
use slimchat::backend::score::{block_scores_attention_reference, block_scores_reference};
use slimchat::model::ops_llama::{LlamaShape, ModelCache, OpsLlama};
use slimchat::slim::SlimConfig;

#[test]
fn the_harness_passes_cpu_against_cpu_with_zero_error() {
    let checks = compare(&CpuOps, &CpuOps, 3).unwrap();
    assert!(checks.len() >= 19, "{} checks", checks.len());
    for c in &checks {
        assert!(c.pass && c.rel_err == 0.0, "{c:?}");
    }
}

#[test]
fn matmul_matches_a_naive_product() {
    let mut rng = Rng::new(1);
    let (rows, k, n) = (13, 67, 29);
    let (x, w) = (rng.bf16s(rows * k, 1.0), rng.bf16s(n * k, 1.0));
    let mut y = vec![0u16; rows * n];
    CpuOps.matmul(&x, &w, &mut y, rows, k, n).unwrap();
    let (xf, wf) = (to_f32(&x), to_f32(&w));
    let naive: Vec<f32> = (0..rows * n)
        .map(|i| (0..k).map(|j| xf[i / n * k + j] * wf[i % n * k + j]).sum())
        .collect();
    assert!(rel_err(&to_f32(&y), &naive) < 5e-3);
}

#[test]
fn rope_matches_the_engines_rope_in_both_layouts_with_scaling_and_factors() {
    let (hd, heads, rows, theta) = (64, 3, 9, 10_000.0);
    let factors: Vec<f32> = (0..hd / 2).map(|i| 1.0 + (i % 5) as f32).collect();
    for (layout, linear_scaling, factors) in [
        (RopeLayout::Normal, 1.0, None),
        (RopeLayout::Neox, 1.0, None),
        (RopeLayout::Normal, 4.0, Some(&factors[..])),
        (RopeLayout::Neox, 2.0, Some(&factors[..])),
    ] {
        let spec = RopeParams {
            head_dim: hd,
            rope_dim: hd,
            theta,
            linear_scaling,
            layout,
        };
        let mut rng = Rng::new(2);
        let x = rng.bf16s(rows * heads * hd, 1.0);
        let positions: Vec<u32> = (0..rows).map(|_| rng.below(4096) as u32).collect();
        let mut expect = to_f32(&x);
        Rope::new(&spec, factors, 4096)
            .apply(&mut expect, &positions)
            .unwrap();
        let (cos, sin) = rope_tables(&spec, factors, 4096);
        let mut got = x.clone();
        let at = RowSlice {
            rows,
            stride: heads * hd,
            offset: 0,
        };
        CpuOps
            .rope(&mut got, at, &positions, &cos, &sin, heads, hd, layout)
            .unwrap();
        let err = rel_err(&to_f32(&got), &expect);
        assert!(err < 5e-3, "{layout:?} x{linear_scaling}: {err}");
    }
}

#[test]
fn attention_matches_a_naive_softmax_over_visible_keys() {
    let heads = Heads {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 32,
    };
    let mut rng = Rng::new(3);
    // keys: blocks 0 and 2 kept, then 10 rows of block 3
    let key_pos: Vec<u32> = (0..64).chain(128..192).chain(192..202).collect();
    let n = key_pos.len();
    let d = heads.kv_dim();
    let table = vec![2u32, 0, 1];
    let mut pool = KvPool::<CpuOps>::new(&CpuOps, 3, d).unwrap();
    let (k, v) = (rng.bf16s(n * d, 1.0), rng.bf16s(n * d, 1.0));
    for s in 0..n {
        let row = table[s / KV_BLOCK] as usize * KV_BLOCK + s % KV_BLOCK;
        pool.k[row * d..][..d].copy_from_slice(&k[s * d..][..d]);
        pool.v[row * d..][..d].copy_from_slice(&v[s * d..][..d]);
        pool.pos[row] = key_pos[s];
    }
    let nq = 7;
    let q_pos: Vec<u32> = key_pos[n - nq..].to_vec();
    let q = rng.bf16s(nq * heads.q_dim(), 1.0);
    let at = RowSlice {
        rows: nq,
        stride: heads.q_dim(),
        offset: 0,
    };
    let mut out = vec![0u16; nq * heads.q_dim()];
    CpuOps
        .attention(
            &q,
            at,
            &q_pos,
            &pool,
            &table,
            n,
            heads,
            &mut out,
            &AttentionContext::NONE,
        )
        .unwrap();
    let (qf, kf, vf) = (to_f32(&q), to_f32(&k), to_f32(&v));
    let hd = heads.head_dim;
    let mut naive = vec![0f32; nq * heads.q_dim()];
    for r in 0..nq {
        for h in 0..heads.n_heads {
            let g = h / 2;
            let qh = &qf[r * heads.q_dim() + h * hd..][..hd];
            let logits: Vec<f32> = (0..n)
                .map(|j| {
                    if key_pos[j] > q_pos[r] {
                        f32::NEG_INFINITY
                    } else {
                        let kh = &kf[j * d + g * hd..][..hd];
                        qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()
                    }
                })
                .collect();
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let p: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
            let z: f32 = p.iter().sum();
            for (j, pj) in p.iter().enumerate() {
                for e in 0..hd {
                    naive[r * heads.q_dim() + h * hd + e] += pj / z * vf[j * d + g * hd + e];
                }
            }
        }
    }
    assert!(rel_err(&to_f32(&out), &naive) < 1e-2);
}

#[test]
fn block_scores_match_the_slim_references() {
    let heads = Heads {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 32,
    };
    let mut rng = Rng::new(4);
    let key_pos: Vec<u32> = (0..64).chain(192..256).chain(320..347).collect();
    let n = key_pos.len();
    let d = heads.kv_dim();
    let table = vec![0u32, 1, 2];
    let mut pool = KvPool::<CpuOps>::new(&CpuOps, 3, d).unwrap();
    let k = rng.bf16s(n * d, 1.0);
    pool.k[..n * d].copy_from_slice(&k);
    pool.pos[..n].copy_from_slice(&key_pos);
    let w = 3;
    let q = rng.bf16s(w * heads.q_dim(), 1.0);
    let at = RowSlice {
        rows: w,
        stride: heads.q_dim(),
        offset: 0,
    };
    let units = UnitBlocks::from_positions(&key_pos, KV_BLOCK, 8);
    assert_eq!(units.ids, vec![0, 3, 5]);
    assert_eq!(units.first, vec![0, 8, 16, 20]);
    let shape = Heads {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 32,
    };
    let (qf, kf) = (to_f32(&q), to_f32(&k));
    // pooled by max: each window query's own mass (the mean over one query), the largest
    let max_pooled = |q: &[f32], k: &[f32], pos: &[u32], len, shape, bs, us| {
        let mut best: Vec<(u32, f32)> = Vec::new();
        for one in q.chunks(heads.q_dim()) {
            let s = block_scores_attention_reference(one, k, pos, len, shape, bs, us);
            if best.is_empty() {
                best = s;
            } else {
                best.iter_mut()
                    .zip(s)
                    .for_each(|(b, (_, v))| b.1 = b.1.max(v));
            }
        }
        best
    };
    for mode in [
        ScoreMode::Attention,
        ScoreMode::AttentionMax,
        ScoreMode::Paper,
    ] {
        let mut acc = vec![0f32; 6];
        CpuOps
            .block_scores(&q, at, &pool, &table, n, &units, 8, heads, mode, &mut acc)
            .unwrap();
        let expect = match mode {
            ScoreMode::Attention => {
                block_scores_attention_reference(&qf, &kf, &key_pos, usize::MAX, shape, 64, 8)
            }
            ScoreMode::AttentionMax => max_pooled(&qf, &kf, &key_pos, usize::MAX, shape, 64, 8),
            ScoreMode::Paper => {
                block_scores_reference(&qf, &kf, &key_pos, usize::MAX, shape, 64, 8)
            }
        };
        let got: Vec<f32> = expect.iter().map(|&(b, _)| acc[b as usize]).collect();
        let want: Vec<f32> = expect.iter().map(|&(_, s)| s).collect();
        assert!(rel_err(&got, &want) < 1e-4, "{mode:?}: {got:?} vs {want:?}");
    }
}

#[test]
fn bf16_round_trip_is_round_to_nearest_even() {
    assert_eq!(to_bf16(&[1.0]), vec![0x3f80]);
    assert_eq!(to_f32(&to_bf16(&[1.0 + 1.0 / 256.0])), vec![1.0]); // tie to even
}

/// Six tiny layers with random weights and a prompt of 1,000 random tokens: the pruned decode
/// tests' model (stages at layers 2 and 4, see [`slim`]).
fn six_layers_and_a_prompt() -> (LlamaShape, OpsLlama<'static, CpuOps>, Vec<u32>) {
    let shape = LlamaShape::tiny(6);
    let model = OpsLlama::random(&CpuOps, shape, 2048, 9).unwrap();
    let mut rng = Rng::new(5);
    let tokens: Vec<u32> = (0..1000).map(|_| rng.below(shape.vocab) as u32).collect();
    (shape, model, tokens)
}

fn slim(keep_ratio: f32) -> SlimConfig {
    SlimConfig {
        keep_ratio,
        preset: "custom".into(),
        stages: vec![
            slimchat::slim::StageConfig {
                layer: 2,
                fraction: 0.5,
                floor: 0,
            },
            slimchat::slim::StageConfig {
                layer: 4,
                fraction: 0.25,
                floor: 0,
            },
        ],
        min_keep_tokens: 64,
        local_window: 4,
        ..SlimConfig::default()
    }
}

#[test]
fn ops_forward_prunes_on_schedule_and_decodes() {
    let (shape, model, tokens) = six_layers_and_a_prompt();
    let (mut dense_cache, dense) = model.prefill(&tokens, None, 4, &mut NoHooks).unwrap();
    assert_eq!(dense.rows_per_layer, vec![1000; 6]);
    assert!(dense.logits.iter().all(|x| x.is_finite()));
    let (mut cache, pruned) = model
        .prefill(&tokens, Some(&slim(1.0)), 4, &mut NoHooks)
        .unwrap();
    // 16 blocks: half (8 blocks) from layer 2, a quarter (4 blocks) from layer 4; the last
    // block is partial (1000 = 15 * 64 + 40)
    let r = &pruned.rows_per_layer;
    assert_eq!(&r[..2], &[1000, 1000]);
    assert!(r[2] < 1000 && r[2] > 7 * 64 && r[2] <= 8 * 64, "{r:?}");
    assert!(r[4] <= 4 * 64 && r[4] > 3 * 64, "{r:?}");
    assert_eq!(r[2], r[3]);
    assert!(cache.prompt_kv_bytes(&shape) < dense_cache.prompt_kv_bytes(&shape));
    // kept rows carry their original positions, in order, with the last prompt token
    let p = &cache.layers[5].positions;
    assert!(p.windows(2).all(|w| w[0] < w[1]) && *p.last().unwrap() == 999 && p[0] == 0);
    for _ in 0..3 {
        let l = model.decode(&mut cache, 7, &mut NoHooks).unwrap();
        assert!(l.iter().all(|x| x.is_finite()));
        model.decode(&mut dense_cache, 7, &mut NoHooks).unwrap();
    }
    assert_eq!(cache.layers[5].positions.last(), Some(&1002));
    assert_eq!(cache.layers[5].rows, r[5] + 3);
}

#[test]
fn ops_decode_attends_to_each_slim_layers_own_blocks() {
    let (shape, model, tokens) = six_layers_and_a_prompt();
    // decode attends to a quarter of each stage's blocks (no floor) or to all of them
    let narrow = SlimConfig {
        decode_keep: 0.25,
        decode_min_tokens: 0,
        ..slim(1.0)
    };
    let every = SlimConfig {
        decode_keep: 1.0,
        ..narrow.clone()
    };
    let (mut cache, report) = model
        .prefill(&tokens, Some(&narrow), 4, &mut NoHooks)
        .unwrap();
    let (mut all, _) = model
        .prefill(&tokens, Some(&every), 4, &mut NoHooks)
        .unwrap();
    let mut differ = false;
    for step in 0..3 {
        let got = model.decode(&mut cache, 7 + step, &mut NoHooks).unwrap();
        let want = model.decode(&mut all, 7 + step, &mut NoHooks).unwrap();
        assert!(got.iter().all(|x| x.is_finite()));
        differ |= got != want;
    }
    // the session chose each slim layer's set from its pool, smaller than it
    let trace = cache.session.as_ref().expect("pruned").trace();
    assert_eq!(trace.decode_sets.len(), 4, "layers 2-5 are slim");
    for (layer, set) in &trace.decode_sets {
        let stage = if *layer < 4 { 0 } else { 1 };
        let pool = &report.kept_blocks[stage];
        assert!(
            set.iter().all(|b| pool.contains(b)),
            "layer {layer}: {set:?} of {pool:?}"
        );
        assert!(set.len() < pool.len(), "layer {layer}: {set:?} of {pool:?}");
    }
    // and attended to them: the logits are not those of attending to every kept row
    assert!(
        differ,
        "decode over the sets gave the logits of decode over every kept row"
    );
    let rows: usize = cache.layers.iter().map(|l| l.rows).sum();
    let (narrow_kv, every_kv) = (
        cache.attended_kv_bytes(&CpuOps, &shape),
        all.attended_kv_bytes(&CpuOps, &shape),
    );
    assert_eq!(every_kv, rows * shape.kv_row_bytes());
    assert!(narrow_kv < every_kv * 3 / 4, "{narrow_kv} of {every_kv}");
    // the person turns the ratio down mid-answer: the next step's sets are smaller
    let half = SlimConfig {
        decode_keep: 0.5,
        ..narrow.clone()
    };
    let (mut turned, _) = model
        .prefill(&tokens, Some(&half), 4, &mut NoHooks)
        .unwrap();
    model.decode(&mut turned, 7, &mut NoHooks).unwrap();
    let before = turned.attended_kv_bytes(&CpuOps, &shape);
    turned
        .session
        .as_mut()
        .expect("pruned")
        .set_keep_ratio(0.25);
    model.decode(&mut turned, 8, &mut NoHooks).unwrap();
    let after = turned.attended_kv_bytes(&CpuOps, &shape);
    assert!(after < before, "{after} after {before}");
    let every_trace = all.session.as_ref().expect("pruned").trace();
    for ((_, set), stage_pool) in every_trace.decode_sets.iter().zip([0, 0, 1, 1]) {
        assert_eq!(set, &report.kept_blocks[stage_pool]);
    }
}

#[test]
fn scoring_queries_before_they_are_downloaded_changes_nothing() {
    // the prefill and decode of ops_decode_attends_to_each_slim_layers_own_blocks, the
    // session's scorings started from the queries on the backend (the default) or from their
    // downloads
    let (_, mut model, tokens) = six_layers_and_a_prompt();
    let narrow = SlimConfig {
        decode_keep: 0.25,
        decode_min_tokens: 0,
        ..slim(1.0)
    };
    let run = |model: &mut OpsLlama<CpuOps>, ahead: bool| {
        model.score_ahead = ahead;
        let (mut cache, report) = model
            .prefill(&tokens, Some(&narrow), 4, &mut NoHooks)
            .unwrap();
        let prefilled = model.scored_ahead.swap(0, Ordering::Relaxed);
        let logits: Vec<Vec<f32>> = (0..3)
            .map(|step| model.decode(&mut cache, 7 + step, &mut NoHooks).unwrap())
            .collect();
        let decoded = model.scored_ahead.swap(0, Ordering::Relaxed);
        let sets = cache.session.as_ref().expect("pruned").trace().decode_sets;
        (report.kept_blocks, logits, sets, prefilled, decoded)
    };
    let (plain_kept, plain, plain_sets, none, also_none) = run(&mut model, false);
    assert_eq!((none, also_none), (0, 0));
    let (kept, ahead, sets, prefilled, decoded) = run(&mut model, true);
    // the prefill's scorings (every layer up to the last stage's boundary, and the first sets
    // of the 4 slim layers) and 4 slim layers x 3 steps, each answered from scores started
    // ahead
    assert!(prefilled >= 4 + 4, "{prefilled}");
    assert_eq!(decoded, 12);
    assert_eq!(kept, plain_kept, "the same blocks kept");
    assert_eq!(ahead, plain, "the same logits, bit for bit");
    assert_eq!(sets, plain_sets);
}

/// The keys layer `layer` of `cache` holds for the token at `pos` (CpuOps: on the host).
fn key_row(cache: &ModelCache<CpuOps>, layer: usize, pos: u32, kv_dim: usize) -> Vec<u16> {
    let kv = &cache.layers[layer];
    let r = kv.positions.partition_point(|&p| p < pos);
    assert_eq!(kv.positions[r], pos, "layer {layer} holds position {pos}");
    let at = (kv.table[r / KV_BLOCK] as usize * KV_BLOCK + r % KV_BLOCK) * kv_dim;
    kv.pool.k[at..at + kv_dim].to_vec()
}

#[test]
fn a_raised_ratio_revives_pruned_blocks_into_each_stage_in_position_order() {
    let (shape, model, tokens) = six_layers_and_a_prompt();
    let cfg = SlimConfig {
        decode_keep: 1.0,
        revive: true,
        ..slim(0.5)
    };
    let (mut cache, report) = model.prefill(&tokens, Some(&cfg), 8, &mut NoHooks).unwrap();
    let (dense, _) = model.prefill(&tokens, None, 8, &mut NoHooks).unwrap();
    model.decode(&mut cache, 7, &mut NoHooks).unwrap();
    let rows_before: Vec<usize> = cache.layers.iter().map(|l| l.rows).collect();
    // the person raises the ratio: each stage's budget now exceeds the blocks it kept
    let session = cache.session.as_mut().expect("pruned");
    session.set_keep_ratio(1.0);
    let logits = model.decode(&mut cache, 8, &mut NoHooks).unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
    let session = cache.session.as_mut().expect("pruned");
    let revived = session.take_revived();
    let pools: Vec<Vec<u32>> = (session.trace().stages.into_iter())
        .map(|st| st.pool)
        .collect();
    assert!(revived > 0, "no block came back");
    let kv_dim = shape.heads.kv_dim();
    for (stage, (layers, pool)) in [(2..4, &pools[0]), (4..6, &pools[1])]
        .into_iter()
        .enumerate()
    {
        let back: Vec<u32> = (pool.iter())
            .filter(|b| !report.kept_blocks[stage].contains(b))
            .copied()
            .collect();
        assert!(!back.is_empty(), "stage {stage} revived nothing");
        for layer in layers {
            let kv = &cache.layers[layer];
            // the revived blocks' 64 rows joined the layer, in position order, with the step's
            assert_eq!(kv.rows, rows_before[layer] + 1 + KV_BLOCK * back.len());
            assert!(
                kv.positions.windows(2).all(|w| w[0] < w[1]),
                "layer {layer}"
            );
            for b in &back {
                let first = kv.positions.partition_point(|&p| p < b * KV_BLOCK as u32);
                assert_eq!(
                    first % KV_BLOCK,
                    0,
                    "layer {layer}: block {b} at row {first}"
                );
            }
        }
        if stage == 0 {
            // nothing is pruned before the first stage: a revived row's keys at its first
            // layer are the dense prefill's
            for b in &back {
                for pos in [b * 64, b * 64 + 37] {
                    assert_eq!(
                        key_row(&cache, 2, pos, kv_dim),
                        key_row(&dense, 2, pos, kv_dim),
                        "block {b}, position {pos}"
                    );
                }
            }
        }
    }
    // the revived rows left the forward at the next boundary (the later stage's layers hold
    // only its own blocks and the steps'), and the next step runs on one row again
    let logits = model.decode(&mut cache, 9, &mut NoHooks).unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
    assert_eq!(cache.session.as_mut().expect("pruned").take_revived(), 0);
}

#[test]
fn extending_a_cache_gives_the_logits_of_one_prefill() {
    let shape = LlamaShape::tiny(4);
    let model = OpsLlama::random(&CpuOps, shape, 1024, 12).unwrap();
    let mut rng = Rng::new(7);
    let tokens: Vec<u32> = (0..300).map(|_| rng.below(shape.vocab) as u32).collect();
    let (_, whole) = model.prefill(&tokens, None, 1, &mut NoHooks).unwrap();
    // 260 tokens, then a 40-token follow-up after them
    let (mut cache, _) = model
        .prefill(&tokens[..260], None, 60, &mut NoHooks)
        .unwrap();
    let room = cache.room();
    assert!((60..60 + KV_BLOCK).contains(&room), "{room}");
    let got = model
        .extend(&mut cache, &tokens[260..], &mut NoHooks)
        .unwrap();
    let err = rel_err(&got, &whole.logits);
    assert!(err < 1e-3, "relative error {err}");
    assert_eq!(cache.room(), room - 40);
    assert_eq!(cache.layers[3].positions.last(), Some(&299));
    // more than the room left grows every layer's pool: the logits are still one prefill's
    let more: Vec<u32> = (0..200).map(|_| rng.below(shape.vocab) as u32).collect();
    let all: Vec<u32> = tokens.iter().chain(&more).copied().collect();
    let (_, whole) = model.prefill(&all, None, 1, &mut NoHooks).unwrap();
    let slots = cache.layers[0].pool.slots;
    let got = model.extend(&mut cache, &more, &mut NoHooks).unwrap();
    let err = rel_err(&got, &whole.logits);
    assert!(err < 1e-3, "relative error {err}");
    assert!(cache.layers[0].pool.slots > slots && cache.layers[0].rows == 500);
    // past the model's positions is an error, and the cache is untouched
    let too_many = vec![1u32; 1024 - 500 + 1];
    assert!(model.extend(&mut cache, &too_many, &mut NoHooks).is_err());
    assert_eq!(cache.layers[0].rows, 500);
}

#[test]
fn ops_forward_keeping_everything_equals_dense() {
    let shape = LlamaShape::tiny(5);
    let model = OpsLlama::random(&CpuOps, shape, 1024, 10).unwrap();
    let mut rng = Rng::new(6);
    let tokens: Vec<u32> = (0..300).map(|_| rng.below(shape.vocab) as u32).collect();
    let (_, dense) = model.prefill(&tokens, None, 1, &mut NoHooks).unwrap();
    let mut keep_all = slim(1.0);
    keep_all.stages.iter_mut().for_each(|s| s.fraction = 1.0);
    let (_, same) = model
        .prefill(&tokens, Some(&keep_all), 1, &mut NoHooks)
        .unwrap();
    assert_eq!(same.rows_per_layer, vec![300; 5]);
    assert_eq!(same.logits, dense.logits);
}

#[test]
fn decode_over_the_host_tier_gives_the_resident_logits_bit_for_bit() {
    use slimchat::model::ops_llama::{KvPlacement, ModelCache};
    let shape = LlamaShape::tiny(6);
    let model = OpsLlama::random(&CpuOps, shape, 4096, 9).unwrap();
    let mut rng = Rng::new(11);
    let tokens: Vec<u32> = (0..2000).map(|_| rng.below(shape.vocab) as u32).collect();
    let narrow = SlimConfig {
        decode_keep: 0.5,
        decode_min_tokens: 0,
        gamma: 1.0, // swap on any change
        // a tiered layer does not take revived rows: both runs raise the ratio alike
        revive: false,
        ..slim(0.5)
    };
    let slim_pools =
        |c: &ModelCache<CpuOps>| -> usize { c.layers[2..].iter().map(|l| l.pool.bytes()).sum() };
    let run = |placement| {
        let mut hooks = NoHooks;
        (model.prefill_placed(&tokens, Some(&narrow), 40, placement, &mut hooks)).unwrap()
    };
    let (mut resident, want) = run(KvPlacement::Resident);
    let (mut tiered, got) = run(KvPlacement::Tiered);
    assert!(got.logits == want.logits);
    // layers 2-5 keep 8 and 4 of 32 blocks (the last one partial, 16 rows, with room for the
    // 40 rows after it): 8 and 4 slots resident. Tiered, the 7 and 3 full blocks move to RAM
    // and the pool keeps slots for decode's 4 and 2 blocks, plus the partial block's: 5 and 3
    let slot = 2 * KV_BLOCK * shape.heads.kv_dim() * 2;
    assert_eq!(slim_pools(&resident), 24 * slot);
    assert_eq!(slim_pools(&tiered), 16 * slot);
    let t = tiered.tiers();
    assert_eq!(t.fast_bytes, tiered.pool_bytes());
    assert_eq!(t.counts.offloaded_blocks, 2 * 7 + 2 * 3);
    assert_eq!(t.host_bytes, t.counts.offloaded_blocks * slot);
    assert_eq!(tiered.room(), resident.room());
    for step in 0..16u32 {
        let token = rng.below(shape.vocab) as u32;
        let want = model.decode(&mut resident, token, &mut NoHooks).unwrap();
        let got = model.decode(&mut tiered, token, &mut NoHooks).unwrap();
        assert!(got == want, "step {step}: the logits differ");
        if step == 8 {
            // the person raises the ratio mid-answer: sets of every kept block, more than the
            // fast tier was sized for
            for c in [&mut resident, &mut tiered] {
                c.session.as_mut().expect("pruned").set_keep_ratio(1.0);
            }
        }
    }
    let t = tiered.tiers();
    assert!(t.counts.evicted_blocks > 0, "{t:?}");
    assert!(t.counts.grown > 0, "{t:?}");
    assert_eq!(tiered.rows_per_layer(), resident.rows_per_layer());
    // a follow-up after the answer, longer than the room left: every pool grows, over the
    // tiers as well
    let follow: Vec<u32> = (0..60).map(|_| rng.below(shape.vocab) as u32).collect();
    let slots = tiered.layers[5].pool.slots;
    let want = model.extend(&mut resident, &follow, &mut NoHooks).unwrap();
    let got = model.extend(&mut tiered, &follow, &mut NoHooks).unwrap();
    assert!(got == want, "the follow-up's logits differ");
    assert!(tiered.layers[5].pool.slots > slots);
}
