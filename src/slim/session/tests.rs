use candle_core::{Device, Tensor};

use super::*;
use crate::kv::{KvDtype, LayerKv};
use crate::slim::schedule::StageConfig;

const BS: usize = 8;
const PROMPT: usize = 64; // 8 blocks
const HD: usize = 8;
const SHAPE: Heads = Heads {
    n_heads: 1,
    n_kv_heads: 1,
    head_dim: HD,
};

/// Layers 1..4 are one stage that keeps every block; decode attends to half of them,
/// chosen per layer.
fn cfg() -> SlimConfig {
    SlimConfig {
        preset: "custom".into(),
        stages: vec![StageConfig {
            layer: 1,
            fraction: 1.0,
            floor: 0,
        }],
        keep_ratio: 1.0,
        min_keep_tokens: 0,
        block_size: BS,
        unit_size: 4,
        local_window: 1,
        decode_keep: 0.5,
        decode_min_tokens: 0,
        decode_select: DecodeSelect::Layer,
        ..Default::default()
    }
}

/// One query pointing at block `b`'s key direction.
fn query_at(b: usize) -> Vec<f32> {
    let mut q = vec![0.0; HD];
    q[b] = 10.0;
    q
}

/// A prompt cache whose block b has every key along dimension b.
fn prompt_kv() -> LayerKv {
    let mut kv = LayerKv::new(KvDtype::F16);
    let k: Vec<f32> = (0..PROMPT)
        .flat_map(|r| (0..HD).map(move |d| if d == r / BS { 1.0 } else { 0.0 }))
        .collect();
    let positions: Vec<u32> = (0..PROMPT as u32).collect();
    kv.append(&k, &vec![0.0; PROMPT * HD], &positions).unwrap();
    kv
}

/// Blocks whose rows `ranges` cover, over `kv`'s prompt rows.
fn blocks_read(ranges: &[Range<usize>], kv: &LayerKv) -> Vec<u32> {
    let mut out: Vec<u32> = (ranges.iter().cloned().flatten())
        .map(|r| kv.positions[r])
        .filter(|&p| (p as usize) < PROMPT)
        .map(|p| p / BS as u32)
        .collect();
    out.dedup();
    out
}

#[test]
fn each_slim_layer_attends_to_the_blocks_its_own_query_chose() {
    let n_layers = 4;
    let mut s = SlimSession::new(&cfg(), n_layers, SHAPE, PROMPT);
    let mut kvs: Vec<LayerKv> = (0..n_layers).map(|_| prompt_kv()).collect();
    let h = Tensor::zeros((PROMPT, HD), candle_core::DType::F32, &Device::Cpu).unwrap();
    let positions: Vec<u32> = (0..PROMPT as u32).collect();
    // prefill: the last prompt query of layer 1 looks at block 3, of layer 2 at block 5
    let targets = [2, 3, 5, 6];
    for (layer, kv) in kvs.iter().enumerate() {
        let mut q = vec![0.0; PROMPT * HD];
        q[(PROMPT - 1) * HD..].copy_from_slice(&query_at(targets[layer]));
        s.prepare_attention(layer, &q, &positions, kv).unwrap();
        assert!(s
            .finish_layer(layer, &h, &q, &positions, kv)
            .unwrap()
            .is_none());
    }
    // forced: sink 0 and last 7; then the layer's target and the lowest id among the ties
    let read =
        |s: &SlimSession, layer: usize, kv: &LayerKv| blocks_read(&s.attended_rows(layer, kv), kv);
    assert_eq!(
        read(&s, 0, &kvs[0]),
        (0..8).collect::<Vec<u32>>(),
        "layer 0 is dense"
    );
    assert_eq!(read(&s, 1, &kvs[1]), vec![0, 1, 3, 7]);
    assert_eq!(read(&s, 2, &kvs[2]), vec![0, 1, 5, 7]);
    assert_eq!(s.decode_set(2).unwrap(), &[0, 1, 5, 7]);

    // a decode step: layer 1's new query looks at block 5, and reads it at this step
    for (layer, kv) in kvs.iter_mut().enumerate() {
        let k = query_at(0);
        kv.append(&k, &[0.0; HD], &[PROMPT as u32]).unwrap();
        let q = query_at(if layer == 1 { 5 } else { targets[layer] });
        s.prepare_attention(layer, &q, &[PROMPT as u32], kv)
            .unwrap();
        if layer == 1 {
            assert_eq!(read(&s, 1, kv), vec![0, 1, 5, 7]);
        }
        let h1 = h.narrow(0, 0, 1).unwrap();
        let change = s.finish_layer(layer, &h1, &q, &[PROMPT as u32], kv);
        assert!(change.unwrap().is_none());
    }
    assert_eq!(read(&s, 3, &kvs[3]), vec![0, 1, 6, 7]);
    assert_eq!(s.take_swaps(), 2, "block 3 out, block 5 in");
    // the row past the prompt is always read
    let last = kvs[1].len() - 1;
    assert!(s
        .attended_rows(1, &kvs[1])
        .iter()
        .any(|r| r.contains(&last)));
}

/// Blocks the first stage keeps when layer 0's last query scores the prompt as `q` does,
/// its budget (half the prompt: 4 blocks, 2 of them forced) fitted to the scores.
fn kept_with_fitted_budget(q_last: &[f32]) -> Vec<u32> {
    let cfg = SlimConfig {
        stages: vec![StageConfig {
            layer: 1,
            fraction: 0.5,
            floor: 0,
        }],
        budget_spread: 0.5,
        budget_coverage: 0.8,
        ..cfg()
    };
    let mut s = SlimSession::new(&cfg, 2, SHAPE, PROMPT);
    let kv = prompt_kv();
    let h = Tensor::zeros((PROMPT, HD), candle_core::DType::F32, &Device::Cpu).unwrap();
    let positions: Vec<u32> = (0..PROMPT as u32).collect();
    let mut q = vec![0.0; PROMPT * HD];
    q[(PROMPT - 1) * HD..].copy_from_slice(q_last);
    s.prepare_attention(0, &q, &positions, &kv).unwrap();
    let change = s.finish_layer(0, &h, &q, &positions, &kv).unwrap();
    assert!(change.is_some(), "the stage prunes");
    s.trace().stages[0].pool.clone()
}

#[test]
fn flat_scores_keep_more_blocks_and_peaked_ones_fewer() {
    // a query that looks nowhere in particular: every block scores alike, so 0.8 of the
    // mass needs 5 of the 6 free blocks; the budget's own 2 grow to 3 (1 + 0.5)
    assert_eq!(kept_with_fitted_budget(&[0.0; HD]).len(), 2 + 3);
    // one that looks at block 3 only: one block holds the mass, the budget's own 2 shrink
    // to 1 (1 - 0.5), and that block is it
    assert_eq!(kept_with_fitted_budget(&query_at(3)), vec![0, 3, 7]);
}

/// After an answer's heal every stage reads every block, a stage whose floor kept the whole
/// prompt in prefill (and so brought nothing back) included.
#[test]
fn an_answers_heal_reads_every_block_at_every_stage() {
    let stage = |layer, fraction| StageConfig {
        layer,
        fraction,
        floor: 0,
    };
    let c = SlimConfig {
        stages: vec![stage(1, 1.0), stage(3, 0.5)],
        ..cfg()
    };
    let mut s = SlimSession::new(&c, 6, SHAPE, PROMPT);
    let decode =
        |s: &SlimSession| -> Vec<usize> { s.stages().iter().map(|st| st.decode_blocks).collect() };
    assert_eq!(decode(&s), vec![4, 2], "half of each stage's blocks before");
    s.stages[0].pool = (0..8).collect();
    s.stages[1].pool = vec![0, 3, 5, 7];
    assert!(s.heal(AfterHeal::EveryBlock));
    let keep: Vec<usize> = s.stages().iter().map(|st| st.keep_blocks).collect();
    assert_eq!(keep, vec![8, 8]);
    assert_eq!(decode(&s), vec![8, 8]);
}
