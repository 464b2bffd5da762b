//! Every GGUF weight type on the int8 path, end to end: the default model requantized here by
//! candle's quantizer (independent of llama.cpp's and of our reader) into mixes of K-quants,
//! 5-bit, 4-bit, Q8_0 and float types, written as GGUF files, and our logits (int8 GEMM in
//! prefill, GEMV in decode) held against candle-transformers' `quantized_llama` with the file's
//! weights dequantized to f32 (`CANDLE_DEQUANTIZE_ALL`), as tests/oracle.rs does for Q4_1.
//!
//! Rows of 576 values (the default model's width) cannot hold K-quant super-blocks of 256, so, as
//! llama-quantize does, those tensors get 32-value types and only `ffn_down` (rows of 1536) takes
//! the K-quants.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use slimchat::backend::linear::LinearMode;
use slimchat::bench::LONG_TEXT;
use slimchat::engine::{Engine, EngineOptions};

/// As tests/oracle.rs's `INT8_TOL` (8-bit activations against f32 weights), with room for the
/// f16 rounding of K-quant scale products (2^-11 relative) and, for float files, the Q8_0
/// rounding of the weights at load.
const TOL: f32 = 6e-2;
/// A decode step after the int8 prefill (tests/oracle.rs's `INT8_DECODE_TOL`).
const DECODE_TOL: f32 = 1e-1;

/// The type each weight tensor gets in a mix; None keeps the file's own.
type Mix = fn(name: &str, layer: usize) -> Option<GgmlDType>;

/// What llama-quantize's Q4_K_M gives a model of this width: Q5_0 and Q8_0 where rows are too
/// short for K-quants, and three K-quant types in `ffn_down`.
fn k_quant_mix(name: &str, layer: usize) -> Option<GgmlDType> {
    Some(match name {
        "ffn_down" => [GgmlDType::Q6K, GgmlDType::Q4K, GgmlDType::Q5K][layer % 3],
        "attn_v" => GgmlDType::Q8_0,
        _ => GgmlDType::Q5_0,
    })
}

/// The low-bit types: 2- and 3-bit K-quants, Q4_0 and Q5_1.
fn low_bit_mix(name: &str, layer: usize) -> Option<GgmlDType> {
    Some(match name {
        "ffn_down" => [GgmlDType::Q3K, GgmlDType::Q2K][layer % 2],
        "ffn_gate" | "ffn_up" => GgmlDType::Q5_1,
        _ => GgmlDType::Q4_0,
    })
}

fn float_mix(name: &str, _layer: usize) -> Option<GgmlDType> {
    Some(match name {
        "ffn_down" => GgmlDType::F32,
        "ffn_gate" | "ffn_up" => GgmlDType::BF16,
        _ => GgmlDType::F16,
    })
}

fn q8_0_mix(_name: &str, _layer: usize) -> Option<GgmlDType> {
    Some(GgmlDType::Q8_0)
}

/// The default model with every `blk.N.*.weight` matrix converted as `mix` says, at `out`.
fn requantized(mix: Mix, out: &Path) {
    let src = common::default_model();
    let mut file = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let t = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let parts: Vec<&str> = name.split('.').collect();
        let target = match parts.as_slice() {
            ["blk", layer, kind, "weight"] if t.shape().dims().len() == 2 => {
                mix(kind, layer.parse().unwrap())
            }
            _ => None,
        };
        let t = match target {
            Some(dtype) if dtype != t.dtype() => {
                let w: Tensor = t.dequantize(&Device::Cpu).unwrap();
                QTensor::quantize(&w, dtype).unwrap()
            }
            _ => t,
        };
        tensors.push((name.clone(), t));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut w = std::io::BufWriter::new(std::fs::File::create(out).unwrap());
    gguf_file::write(&mut w, &metadata, &tensors).unwrap();
}

/// candle's logits after the prompt, then after one more token `next` (a decode step).
fn candle_logits(path: PathBuf, tokens: Vec<u32>, next: u32) -> (Vec<f32>, Vec<f32>) {
    // candle reads the switch once per thread: a fresh thread sees it
    std::thread::spawn(move || {
        std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
        let mut file = std::fs::File::open(&path).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let mut m = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
        let mut run = |tokens: &[u32], pos: usize| {
            let input = Tensor::new(tokens, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            m.forward(&input, pos)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        (run(&tokens, 0), run(&[next], tokens.len()))
    })
    .join()
    .unwrap()
}

/// Within `tol` of the largest logit; the same argmax, or a near-tie that the allowed error can
/// flip (their margin between the two within the tolerance).
fn assert_close(ours: &[f32], theirs: &[f32], tol: f32, what: &str) {
    let (diff, scale) = common::max_abs_diff(ours, theirs);
    eprintln!("{what}: max |Δlogit| = {diff:.3e}, max |logit| = {scale:.2}");
    assert!(
        diff <= tol * scale,
        "{what}: max |Δlogit| {diff} > {tol} * {scale}"
    );
    let (mine, top) = (common::argmax(ours), common::argmax(theirs));
    let margin = theirs[top] - theirs[mine];
    assert!(
        margin <= tol * scale,
        "{what}: argmax {mine} against their {top}, a margin of {margin}"
    );
}

fn check(mix: Mix, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{what}.gguf"));
    requantized(mix, &path);
    let options = EngineOptions {
        linear: LinearMode::Int8,
        slim: slimchat::slim::SlimConfig {
            enabled: false,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut engine = Engine::load(&path, &options).unwrap();
    let tokens = engine.encode(LONG_TEXT).unwrap()[..48].to_vec();
    let (ours, _) = engine.prefill(&tokens, &mut |_| {}).unwrap();
    let next = common::argmax(&ours) as u32;
    let (theirs, theirs_next) = candle_logits(path.clone(), tokens, next);
    assert_close(&ours, &theirs, TOL, &format!("{what}, prefill"));
    // one decode step: the GEMV over the same tiles
    let ours_next = engine.step(next).unwrap();
    assert_close(
        &ours_next,
        &theirs_next,
        DECODE_TOL,
        &format!("{what}, decode"),
    );
}

#[test]
fn k_quant_mix_matches_candle() {
    check(k_quant_mix, "k-quant mix (Q6_K, Q5_K, Q4_K, Q5_0, Q8_0)");
}

#[test]
fn low_bit_mix_matches_candle() {
    check(low_bit_mix, "low-bit mix (Q3_K, Q2_K, Q5_1, Q4_0)");
}

#[test]
fn float_weights_match_candle() {
    check(float_mix, "float mix (F16, BF16, F32)");
}

#[test]
fn q8_0_everywhere_matches_candle() {
    check(q8_0_mix, "Q8_0");
}
