//! The scoring kernels against their f64 references, and their properties (units are means,
//! GQA head mapping, the window mean, rows past the prompt). The helpers are shared with
//! `crate::slim::score`'s test of keys in the cache's storage.

use super::*;

/// Max pooling: per block, the largest over the window's queries of its reference score
/// for that query alone.
#[test]
fn max_pooled_attention_scores_are_the_best_querys() {
    let mut rng = Rng(0x3A9_F00D);
    let shape = Heads {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let len = 517;
    let pos = positions(&mut rng, len, 7, 5);
    let keys = rng.vec(pos.len() * shape.n_kv_heads * shape.head_dim);
    // more queries than one scoring task takes, and token-level units (prefill) as well as 8
    let w = 11;
    let q = rng.vec(w * shape.n_heads * shape.head_dim);
    for unit in [1, 8] {
        let units = UnitKeys::new(Keys::F32(&keys), &pos, len, shape, 64, unit);
        let got = units.attention_scores(&q, WindowPool::Max);
        let mut want: Vec<(u32, f32)> = Vec::new();
        for row in q.chunks_exact(shape.n_heads * shape.head_dim) {
            let one = block_scores_attention_reference(row, &keys, &pos, len, shape, 64, unit);
            if want.is_empty() {
                want = one;
            } else {
                for (acc, (b, v)) in want.iter_mut().zip(one) {
                    assert_eq!(acc.0, b);
                    acc.1 = acc.1.max(v);
                }
            }
        }
        assert_close(
            &got,
            &want,
            &format!("max-pooled attention scores, unit {unit}"),
        );
        let mean = units.attention_scores(&q, WindowPool::Mean);
        assert!(got.iter().zip(&mean).all(|(m, a)| m.1 >= a.1 - 1e-6));
    }
}

#[test]
fn attention_scores_match_their_reference_and_sum_to_one() {
    let mut rng = Rng(0x51A7_C0DE);
    for (shape, len) in [
        (
            Heads {
                n_heads: 9,
                n_kv_heads: 3,
                head_dim: 64,
            },
            517,
        ),
        (
            Heads {
                n_heads: 4,
                n_kv_heads: 1,
                head_dim: 24,
            },
            130,
        ),
    ] {
        let pos = positions(&mut rng, len, 7, 5);
        let keys = rng.vec(pos.len() * shape.n_kv_heads * shape.head_dim);
        let q = rng.vec(4 * shape.n_heads * shape.head_dim);
        let got = block_scores_attention(&q, &keys, &pos, len, shape, 64, 8);
        let want = block_scores_attention_reference(&q, &keys, &pos, len, shape, 64, 8);
        assert_close(&got, &want, "attention scores");
        let total: f32 = got.iter().map(|s| s.1).sum();
        assert!((total - 1.0).abs() < 1e-4, "block masses sum to {total}");
    }
}

#[test]
fn attention_scores_of_a_window_are_the_mean_of_each_querys() {
    // the decode path keeps per-query scores and averages them (slim::session)
    let mut rng = Rng(0xC0FF_EE11);
    let shape = Heads {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let pos = positions(&mut rng, 300, 5, 3);
    let keys = rng.vec(pos.len() * shape.n_kv_heads * shape.head_dim);
    let width = shape.n_heads * shape.head_dim;
    let q = rng.vec(5 * width);
    let whole = block_scores_attention(&q, &keys, &pos, 300, shape, 64, 8);
    let mut mean: Vec<(u32, f32)> = whole.iter().map(|&(b, _)| (b, 0.0)).collect();
    for one in q.chunks(width) {
        let sc = block_scores_attention(one, &keys, &pos, 300, shape, 64, 8);
        for (m, (b, v)) in mean.iter_mut().zip(sc) {
            assert_eq!(m.0, b);
            m.1 += v / 5.0;
        }
    }
    assert_close(&mean, &whole, "mean of per-query scores");
}

/// Small deterministic generator (xorshift64*), uniform in [-1, 1).
pub(crate) struct Rng(pub(crate) u64);
impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(crate) fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub(crate) fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

pub(crate) fn assert_close(got: &[(u32, f32)], want: &[(u32, f32)], what: &str) {
    let ids = |v: &[(u32, f32)]| v.iter().map(|p| p.0).collect::<Vec<_>>();
    assert_eq!(ids(got), ids(want), "{what}: block ids");
    for (&(b, g), &(_, r)) in got.iter().zip(want) {
        assert!(
            (g - r).abs() <= 1e-4 * r.abs().max(1e-3),
            "{what}: block {b}: got {g}, reference {r}"
        );
    }
}

/// Positions 0..len with random gaps (as after pruning some blocks / rows), then
/// `generated` positions past `prompt_len`.
pub(crate) fn positions(
    rng: &mut Rng,
    prompt_len: usize,
    drop_every: u64,
    generated: usize,
) -> Vec<u32> {
    let mut p: Vec<u32> = (0..prompt_len as u32)
        .filter(|_| drop_every == 0 || rng.below(drop_every) != 0)
        .collect();
    // Drop a few whole 64-blocks too.
    let dropped_blocks: Vec<u32> = (0..3)
        .map(|_| rng.below(prompt_len as u64 / 64 + 1) as u32)
        .collect();
    p.retain(|&x| !dropped_blocks.contains(&(x / 64)) || x == 0);
    p.extend((0..generated as u32).map(|g| prompt_len as u32 + 3 + g));
    p
}

#[test]
fn fast_scores_match_the_reference_on_random_inputs() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let shapes = [
        Heads {
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
        },
        Heads {
            n_heads: 4,
            n_kv_heads: 1,
            head_dim: 13,
        },
        Heads {
            n_heads: 2,
            n_kv_heads: 2,
            head_dim: 7,
        },
    ];
    for shape in shapes {
        for (prompt_len, drop_every, generated, w) in [
            (1000, 0, 0, 4),
            (517, 5, 9, 4),
            (131, 2, 3, 1),
            (70, 0, 5, 3),
        ] {
            for (block_size, unit_size) in [(64, 8), (24, 6), (8, 8)] {
                let pos = positions(&mut rng, prompt_len, drop_every, generated);
                let q = rng.vec(w * shape.n_heads * shape.head_dim);
                let k = rng.vec(pos.len() * shape.n_kv_heads * shape.head_dim);
                let what = format!(
                    "{shape:?} len {prompt_len} drop 1/{drop_every} gen {generated} w {w} \
                     block {block_size}/{unit_size}"
                );
                let got = block_scores(&q, &k, &pos, prompt_len, shape, block_size, unit_size);
                let want =
                    block_scores_reference(&q, &k, &pos, prompt_len, shape, block_size, unit_size);
                assert!(!want.is_empty());
                assert_close(&got, &want, &what);
            }
        }
    }
}

#[test]
fn rows_past_prompt_len_are_not_scored() {
    let shape = Heads {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
    };
    let mut rng = Rng(7);
    let pos: Vec<u32> = (0..200).collect();
    let q = rng.vec(4 * 8);
    let k = rng.vec(200 * 4);
    let all = block_scores(&q, &k, &pos, 200, shape, 64, 8);
    let cut = block_scores(&q, &k, &pos, 100, shape, 64, 8);
    assert_eq!(
        all.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert_eq!(cut.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(cut[0], all[0], "block 0 is untouched by the cut");
    // Block 1 is scored only from positions 64..100 (units 8..12, the last one partial).
    let only_prompt = block_scores(&q, &k[..100 * 4], &pos[..100], 100, shape, 64, 8);
    assert_eq!(cut, only_prompt);
}

#[test]
fn unit_key_is_a_mean_and_block_takes_the_max_unit() {
    // One head, head_dim 1, q = 1: a unit's score is |mean of its keys|.
    let shape = Heads {
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 1,
    };
    let pos: Vec<u32> = (0..8).collect();
    let k = [1.0, 3.0, -2.0, -2.0, 0.5, 0.5, 0.5, 0.5]; // units of 2: |2|, |-2|, .5, .5
    let s = block_scores(&[1.0], &k, &pos, 8, shape, 4, 2);
    assert_eq!(s, vec![(0, 2.0), (1, 0.5)]);
}

#[test]
fn gqa_maps_query_heads_to_their_kv_head() {
    // 4 query heads over 2 KV heads, head_dim 1: heads 0,1 read kv 0; heads 2,3 read kv 1.
    let shape = Heads {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 1,
    };
    let q = [1.0, 1.0, 0.0, 0.0];
    let k = [5.0, 100.0]; // one row: kv0 = 5, kv1 = 100
    let s = block_scores(&q, &k, &[0], 1, shape, 8, 8);
    assert_eq!(s, vec![(0, (5.0 + 5.0) / 4.0)]);
}

#[test]
fn local_query_is_the_mean_of_the_window() {
    let shape = Heads {
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 2,
    };
    let q = [1.0, 0.0, 3.0, 0.0]; // mean (2, 0)
    let k = [1.0, 9.0];
    assert_eq!(block_scores(&q, &k, &[5], 6, shape, 8, 8), vec![(0, 2.0)]);
}

#[test]
fn no_prompt_rows_gives_no_scores() {
    let shape = Heads {
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 2,
    };
    assert!(block_scores(&[1.0, 1.0], &[], &[], 10, shape, 8, 8).is_empty());
    assert!(block_scores(&[1.0, 1.0], &[1.0, 1.0], &[10], 10, shape, 8, 8).is_empty());
}

#[test]
#[should_panic(expected = "keys has")]
fn mismatched_keys_are_a_caller_bug() {
    let shape = Heads {
        n_heads: 1,
        n_kv_heads: 1,
        head_dim: 2,
    };
    block_scores(&[1.0, 1.0], &[1.0], &[0], 10, shape, 8, 8);
}
