//! The GGUF architectures slimchat runs besides the default SmolLM2 (`llama`), on tiny
//! random-weight models written here as GGUF files (no download): our logits against
//! candle-transformers' reference models read from the same file, and the one-line errors for
//! what slimchat does not run.
//!
//! - `qwen2` (q/k/v biases, NEOX RoPE, tied embeddings) against `quantized_qwen2`;
//! - `qwen3` (per-head q/k RMSNorm, NEOX RoPE, head_dim 32 with hidden 64 and 4 heads, so the
//!   attention output is wider than hidden) against `quantized_qwen3`;
//! - `llama` with a `rope_freqs.weight` tensor against `quantized_llama`, which ignores that
//!   tensor: factors f_i = c^(2i / rope_dim) turn theta^(-2i / rope_dim) / f_i into
//!   (c theta)^(-2i / rope_dim), so candle reads the same file with `rope.freq_base` c theta.
//!
//! Every model: 2 layers, hidden 64, 4 query heads sharing 2 KV heads, MLP 128, vocabulary 256,
//! Q8_0 weights (F32 norms and biases), a 20-token prefill then 4 decode steps through our KV
//! cache. candle runs with `CANDLE_DEQUANTIZE_ALL=1` (f32 weights, f32 arithmetic). Our
//! `dense-f32` mode is the same arithmetic but for the f16 KV cache (relative rounding 2^-11 per
//! key and value) and the summation order, so it is held to `DENSE_TOL` of the largest logit;
//! `int8` (the default) rounds every activation row to 8 bits per 32 values before each linear
//! layer, held to `INT8_TOL` like the default model's oracle (tests/oracle.rs).

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use slimchat::backend::attention_kind::AttentionKind;
use slimchat::backend::engine_ops::EngineOps;
use slimchat::backend::kv_format::KvDtype;
use slimchat::backend::linear::LinearMode;
use slimchat::backend::paged_kv::NoHooks;
use slimchat::model::gguf::{GgufFile, RopeStyle};
use slimchat::model::ops_llama::OpsLlama;

/// dense-f32 against candle's f32 model: f16 KV and summation order only.
/// Measured up to 5e-4 (qwen3, decode).
const DENSE_TOL: f32 = 2e-3;
/// int8 against candle's f32 model: 8-bit activations in every linear layer; measured up to
/// 2.5e-2 (qwen3, decode), as the default model's 2.2e-2 (tests/oracle.rs).
const INT8_TOL: f32 = 5e-2;

const PREFILL: usize = 20;
const DECODE: usize = 4;

/// What varies between the tiny models.
#[derive(Clone)]
struct Tiny {
    arch: &'static str,
    head_dim: usize,
    /// q/k/v biases (Qwen2)
    bias: bool,
    /// per-head q/k RMSNorm (Qwen3)
    qk_norm: bool,
    /// a separate `output.weight` (else the head is the embedding)
    output: bool,
    rope_theta: f32,
    /// `rope_freqs.weight` (Llama 3.1)
    rope_freqs: Option<Vec<f32>>,
    /// extra metadata, e.g. a RoPE scaling type
    extra: Vec<(&'static str, Value)>,
}

const LAYERS: usize = 2;
const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const INTER: usize = 128;
const VOCAB: usize = 256;

impl Tiny {
    fn qwen2() -> Self {
        Self {
            arch: "qwen2",
            head_dim: HIDDEN / HEADS,
            bias: true,
            qk_norm: false,
            output: false,
            rope_theta: 1_000_000.0,
            rope_freqs: None,
            extra: Vec::new(),
        }
    }

    fn qwen3() -> Self {
        Self {
            arch: "qwen3",
            head_dim: 32, // 4 heads of 32 = 128, twice hidden
            bias: false,
            qk_norm: true,
            output: true,
            rope_theta: 1_000_000.0,
            rope_freqs: None,
            extra: Vec::new(),
        }
    }

    /// Llama with per-frequency factors c^(2i / head_dim): the same angles as base c * theta.
    fn llama_with_rope_freqs(c: f32) -> Self {
        let hd = HIDDEN / HEADS;
        Self {
            arch: "llama",
            head_dim: hd,
            bias: false,
            qk_norm: false,
            output: true,
            rope_theta: 10_000.0,
            rope_freqs: Some(
                (0..hd / 2)
                    .map(|i| (c as f64).powf(2.0 * i as f64 / hd as f64) as f32)
                    .collect(),
            ),
            extra: Vec::new(),
        }
    }
}

/// Uniform values in [-scale, scale) from a 64-bit LCG: deterministic, no dependency.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n).map(|_| offset + scale * self.next()).collect()
    }
}

fn qtensor(data: Vec<f32>, dims: &[usize], dtype: GgmlDType) -> QTensor {
    let t = Tensor::from_vec(data, dims, &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

/// Write `t` as a GGUF file with llama.cpp's metadata keys and tensor names.
fn write_model(t: &Tiny, path: &Path) {
    let mut rng = Lcg(0x5eed ^ t.arch.len() as u64);
    let (q_dim, kv_dim) = (HEADS * t.head_dim, KV_HEADS * t.head_dim);
    // (out, in) weights with unit-variance outputs for unit-variance inputs
    let mut matrix = |rows: usize, cols: usize| {
        let scale = (3.0 / cols as f32).sqrt();
        qtensor(
            rng.vec(rows * cols, scale, 0.0),
            &[rows, cols],
            GgmlDType::Q8_0,
        )
    };
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), matrix(VOCAB, HIDDEN)),
        ("output_norm.weight".into(), norm_weight(HIDDEN, 1)),
    ];
    if t.output {
        tensors.push(("output.weight".into(), matrix(VOCAB, HIDDEN)));
    }
    if let Some(f) = &t.rope_freqs {
        tensors.push((
            "rope_freqs.weight".into(),
            qtensor(f.clone(), &[f.len()], GgmlDType::F32),
        ));
    }
    for i in 0..LAYERS {
        let b = |s: &str| format!("blk.{i}.{s}");
        tensors.extend([
            (b("attn_norm.weight"), norm_weight(HIDDEN, 10 * i + 2)),
            (b("attn_q.weight"), matrix(q_dim, HIDDEN)),
            (b("attn_k.weight"), matrix(kv_dim, HIDDEN)),
            (b("attn_v.weight"), matrix(kv_dim, HIDDEN)),
            (b("attn_output.weight"), matrix(HIDDEN, q_dim)),
            (b("ffn_norm.weight"), norm_weight(HIDDEN, 10 * i + 3)),
            (b("ffn_gate.weight"), matrix(INTER, HIDDEN)),
            (b("ffn_up.weight"), matrix(INTER, HIDDEN)),
            (b("ffn_down.weight"), matrix(HIDDEN, INTER)),
        ]);
        if t.bias {
            for (p, w) in [("q", q_dim), ("k", kv_dim), ("v", kv_dim)] {
                let bias = Lcg(100 + i as u64).vec(w, 0.5, 0.0);
                tensors.push((
                    b(&format!("attn_{p}.bias")),
                    qtensor(bias, &[w], GgmlDType::F32),
                ));
            }
        }
        if t.qk_norm {
            let hd = t.head_dim;
            tensors.push((b("attn_q_norm.weight"), norm_weight(hd, 10 * i + 4)));
            tensors.push((b("attn_k_norm.weight"), norm_weight(hd, 10 * i + 5)));
        }
    }
    let k = |s: &str| format!("{}.{s}", t.arch);
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(t.arch.into())),
        // candle's qwen3 builds its rotary table in this dtype (0 = f32); llama.cpp ignores it
        ("general.dtype".into(), Value::U32(0)),
        (k("block_count"), Value::U32(LAYERS as u32)),
        (k("context_length"), Value::U32(256)),
        (k("embedding_length"), Value::U32(HIDDEN as u32)),
        (k("feed_forward_length"), Value::U32(INTER as u32)),
        (k("attention.head_count"), Value::U32(HEADS as u32)),
        (k("attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (k("attention.key_length"), Value::U32(t.head_dim as u32)),
        (k("attention.value_length"), Value::U32(t.head_dim as u32)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (k("rope.freq_base"), Value::F32(t.rope_theta)),
        (k("rope.dimension_count"), Value::U32(t.head_dim as u32)),
        (k("vocab_size"), Value::U32(VOCAB as u32)),
    ];
    metadata.extend(t.extra.iter().map(|(key, v)| (k(key), v.clone())));
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &metadata, &tensors).unwrap();
}

/// An RMSNorm weight near 1, different per `seed`.
fn norm_weight(n: usize, seed: usize) -> QTensor {
    qtensor(Lcg(seed as u64).vec(n, 0.3, 1.0), &[n], GgmlDType::F32)
}

/// The prompt and the tokens fed in decode (fixed, so both sides see the same inputs).
fn tokens() -> (Vec<u32>, Vec<u32>) {
    let all: Vec<u32> = (0..(PREFILL + DECODE) as u32)
        .map(|i| (i * 97 + 13) % VOCAB as u32)
        .collect();
    (all[..PREFILL].to_vec(), all[PREFILL..].to_vec())
}

/// The CPU engine's backend with `mode`'s linear layers, a bare cache's KV type (f16) and
/// prefill attention (f32), for as long as the test runs.
fn backend(mode: LinearMode) -> &'static EngineOps {
    Box::leak(Box::new(EngineOps::new(
        mode,
        KvDtype::default(),
        AttentionKind::default(),
    )))
}

/// Our logits after the prefill, then after each decode token.
fn ours(path: &Path, mode: LinearMode) -> Vec<Vec<f32>> {
    let mut file = GgufFile::open(path).unwrap();
    let model = OpsLlama::from_gguf(backend(mode), &mut file, PREFILL + DECODE).unwrap();
    let (prompt, fed) = tokens();
    let (mut cache, report) = model.prefill(&prompt, None, DECODE, &mut NoHooks).unwrap();
    let mut out = vec![report.logits];
    for &t in &fed {
        out.push(model.decode(&mut cache, t, &mut NoHooks).unwrap());
    }
    out
}

/// candle's reference model over the same file: `forward(tokens, position of the first)`.
trait Reference {
    fn logits(&mut self, tokens: &[u32], pos: usize) -> Vec<f32>;
}

macro_rules! reference {
    ($model:ty) => {
        impl Reference for $model {
            fn logits(&mut self, tokens: &[u32], pos: usize) -> Vec<f32> {
                let input = Tensor::new(tokens, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                self.forward(&input, pos)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            }
        }
    };
}

use candle_transformers::models::{quantized_llama, quantized_qwen2, quantized_qwen3};
reference!(quantized_llama::ModelWeights);
reference!(quantized_qwen2::ModelWeights);
reference!(quantized_qwen3::ModelWeights);

/// candle's logits after the prefill and each decode token, with f32 weights. `edit` may change
/// the metadata candle sees. Runs on a fresh thread: candle reads `CANDLE_DEQUANTIZE_ALL` once
/// per thread.
fn theirs(path: &Path, edit: fn(&mut gguf_file::Content)) -> Vec<Vec<f32>> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
        let mut file = std::fs::File::open(&path).unwrap();
        let mut content = gguf_file::Content::read(&mut file).unwrap();
        edit(&mut content);
        let arch = content.metadata["general.architecture"]
            .to_string()
            .unwrap()
            .clone();
        let dev = &Device::Cpu;
        let mut model: Box<dyn Reference> = match arch.as_str() {
            "qwen2" => {
                Box::new(quantized_qwen2::ModelWeights::from_gguf(content, &mut file, dev).unwrap())
            }
            "qwen3" => {
                Box::new(quantized_qwen3::ModelWeights::from_gguf(content, &mut file, dev).unwrap())
            }
            _ => {
                Box::new(quantized_llama::ModelWeights::from_gguf(content, &mut file, dev).unwrap())
            }
        };
        let (prompt, fed) = tokens();
        let mut out = vec![model.logits(&prompt, 0)];
        for (i, &t) in fed.iter().enumerate() {
            out.push(model.logits(&[t], PREFILL + i));
        }
        out
    })
    .join()
    .unwrap()
}

/// Largest |a - b| over the largest |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit counts differ");
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    diff / b.iter().map(|x| x.abs()).fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> usize {
    slimchat::sampling::argmax(v) as usize
}

/// Both modes against candle on the model `t`, step by step.
fn matches_candle(t: Tiny, edit: fn(&mut gguf_file::Content)) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{}.gguf", t.arch));
    write_model(&t, &path);
    let theirs = theirs(&path, edit);
    for (mode, tol) in [
        (LinearMode::DenseF32, DENSE_TOL),
        (LinearMode::Int8, INT8_TOL),
    ] {
        let ours = ours(&path, mode);
        for (step, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            let rel = rel_diff(a, b);
            let what = format!("{} {mode:?} step {step}", t.arch);
            eprintln!("{what}: max |Δlogit| / max |logit| = {rel:.2e}");
            assert!(rel <= tol, "{what}: {rel} > {tol}");
            if mode == LinearMode::DenseF32 {
                assert_eq!(argmax(a), argmax(b), "{what}: argmax differs");
            }
        }
    }
}

#[test]
fn qwen2_with_biases_and_neox_rope_matches_candle() {
    matches_candle(Tiny::qwen2(), |_| {});
}

#[test]
fn qwen3_with_qk_norm_and_wide_heads_matches_candle() {
    matches_candle(Tiny::qwen3(), |_| {});
}

#[test]
fn llama_rope_freqs_divide_the_angles_as_candle_with_the_equivalent_base() {
    const C: f32 = 8.0;
    matches_candle(Tiny::llama_with_rope_freqs(C), |content| {
        content
            .metadata
            .insert("llama.rope.freq_base".into(), Value::F32(10_000.0 * C));
    });
}

/// The factors matter: the same llama file without the base change is far from candle.
#[test]
fn llama_rope_freqs_are_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("llama.gguf");
    write_model(&Tiny::llama_with_rope_freqs(8.0), &path);
    let (ours, theirs) = (ours(&path, LinearMode::DenseF32), theirs(&path, |_| {}));
    let rel = rel_diff(&ours[DECODE], &theirs[DECODE]);
    assert!(rel > 10.0 * DENSE_TOL, "factors had no effect: {rel}");
}

#[test]
fn architectures_choose_their_rope_layout_and_head_width() {
    let dir = tempfile::tempdir().unwrap();
    for (t, style) in [
        (Tiny::qwen2(), RopeStyle::Neox),
        (Tiny::qwen3(), RopeStyle::Neox),
        (Tiny::llama_with_rope_freqs(1.0), RopeStyle::Normal),
    ] {
        let path = dir.path().join(format!("{}.gguf", t.arch));
        write_model(&t, &path);
        let spec = GgufFile::open(&path).unwrap().spec().unwrap();
        assert_eq!(spec.rope_style, style, "{}", t.arch);
        assert_eq!(spec.head_dim, t.head_dim, "{}", t.arch);
        assert_eq!(spec.qk_norm, t.arch == "qwen3", "{}", t.arch);
    }
}

/// The error of opening and loading `path`, which must be one line with every piece of `want`.
fn load_error(path: &Path, want: &[&str]) {
    let err = GgufFile::open(path)
        .and_then(|mut f| OpsLlama::from_gguf(backend(LinearMode::Int8), &mut f, 64).map(|_| ()))
        .expect_err("the file should not load")
        .to_string();
    eprintln!("{err}");
    assert!(!err.contains('\n'), "more than one line: {err}");
    for w in want {
        assert!(err.contains(w), "{err:?} lacks {w:?}");
    }
}

#[test]
fn yarn_rope_scaling_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("yarn.gguf");
    let mut t = Tiny::qwen2();
    t.extra = vec![
        ("rope.scaling.type", Value::String("yarn".into())),
        ("rope.scaling.factor", Value::F32(4.0)),
    ];
    write_model(&t, &path);
    load_error(
        &path,
        &[
            "yarn.gguf",
            "RoPE scaling 'yarn'",
            "factor 4",
            "none and linear",
        ],
    );
}

#[test]
fn linear_rope_scaling_is_read_with_llama_cpps_default_type() {
    use slimchat::model::gguf::RopeScaling;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("linear.gguf");
    let mut t = Tiny::qwen2();
    // no `rope.scaling.type`: llama.cpp takes it as linear
    t.extra = vec![("rope.scaling.factor", Value::F32(2.0))];
    write_model(&t, &path);
    let spec = GgufFile::open(&path).unwrap().spec().unwrap();
    assert_eq!(spec.rope_scaling, RopeScaling::Linear(2.0));
}

#[test]
fn unsupported_architecture_lists_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gemma.gguf");
    let mut t = Tiny::qwen2();
    t.arch = "gemma2";
    write_model(&t, &path);
    load_error(
        &path,
        &["gemma.gguf", "'gemma2'", "llama, mistral, qwen2, qwen3"],
    );
}

/// A qwen2 file whose `blk.1.ffn_up.weight` claims ggml type `id` (its bytes stay Q8_0's: the
/// header is all that is read).
fn with_tensor_type(dir: &Path, id: u32) -> std::path::PathBuf {
    let path = dir.join(format!("type{id}.gguf"));
    let mut t = Tiny::qwen2();
    // metadata arrays too, which the header reader must skip
    t.extra = vec![
        (
            "test.strings",
            Value::Array(vec![Value::String("a".into()), Value::String("bc".into())]),
        ),
        (
            "test.floats",
            Value::Array(vec![Value::F32(1.0), Value::F32(2.0), Value::F32(3.0)]),
        ),
    ];
    write_model(&t, &path);
    let mut bytes = std::fs::read(&path).unwrap();
    let name = b"blk.1.ffn_up.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in the header")
        + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let ty = at + 4 + 8 * n_dims; // GGUF v2+: u64 dimensions, then the u32 type
    assert_eq!(u32::from_le_bytes(bytes[ty..ty + 4].try_into().unwrap()), 8); // Q8_0
    bytes[ty..ty + 4].copy_from_slice(&id.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn unsupported_tensor_type_names_the_type_and_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    load_error(
        &with_tensor_type(dir.path(), 20),
        &["type20.gguf", "blk.1.ffn_up.weight", "IQ4_NL (type 20)"],
    );
    load_error(
        &with_tensor_type(dir.path(), 39),
        &["blk.1.ffn_up.weight", "MXFP4 (type 39)"],
    );
    load_error(
        &with_tensor_type(dir.path(), 77),
        &["blk.1.ffn_up.weight", "unknown type 77"],
    );
}

/// A tensor the forward has no place for is refused, not ignored.
#[test]
fn an_output_bias_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bo.gguf");
    write_model(&Tiny::qwen2(), &path);
    // rewrite the file with one more tensor
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| {
            (
                n.clone(),
                content.tensor(&mut file, n, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    tensors.push((
        "blk.0.attn_output.bias".into(),
        qtensor(vec![0.0; HIDDEN], &[HIDDEN], GgmlDType::F32),
    ));
    let metadata: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(
        &mut std::fs::File::create(&path).unwrap(),
        &metadata,
        &tensors,
    )
    .unwrap();
    load_error(
        &path,
        &["bo.gguf", "blk.0.attn_output.bias", "not supported"],
    );
}

/// SlimInfer over qwen3's wide heads (queries of n_heads * head_dim = 128 against hidden 64):
/// with budgets that cover the prompt the logits are dense's, bit for bit; with a budget of a
/// quarter, layer 1 runs on fewer rows and prefill and decode still give finite logits.
#[test]
fn qwen3_runs_under_slim_pruning() {
    use slimchat::slim::{SlimConfig, StageConfig};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qwen3.gguf");
    let t = Tiny::qwen3();
    write_model(&t, &path);
    let mut file = GgufFile::open(&path).unwrap();
    let model = OpsLlama::from_gguf(backend(LinearMode::Int8), &mut file, 256).unwrap();
    // four blocks of 64 tokens
    let prompt: Vec<u32> = (0..250u32).map(|i| (i * 31 + 7) % VOCAB as u32).collect();
    let slim = |fraction| SlimConfig {
        preset: "custom".into(),
        stages: vec![StageConfig {
            layer: 1,
            fraction,
            floor: 0,
        }],
        keep_ratio: 1.0,
        min_keep_tokens: 0,
        unit_size: 4,
        local_window: 4,
        decode_keep: 1.0,
        decode_min_tokens: 0,
        ..Default::default()
    };
    // logits after the prompt and 3 decode tokens, and the rows layer 1 ran on in prefill
    let run = |fraction: Option<f32>| {
        let cfg = fraction.map(slim);
        if let Some(cfg) = &cfg {
            cfg.check(LAYERS).unwrap();
        }
        let (mut cache, report) = model
            .prefill(&prompt, cfg.as_ref(), 3, &mut NoHooks)
            .unwrap();
        let mut out = vec![report.logits];
        for t in [5u32, 6, 7] {
            out.push(model.decode(&mut cache, t, &mut NoHooks).unwrap());
        }
        (out, report.rows_per_layer[1])
    };
    let (dense, dense_rows) = run(None);
    let (whole, _) = run(Some(1.0));
    assert!(
        whole == dense,
        "budgets covering the prompt changed the logits"
    );
    let (pruned, rows) = run(Some(0.25));
    eprintln!("layer 1 ran on {rows} of {dense_rows} rows");
    assert!(rows < dense_rows, "nothing was pruned: {rows} rows");
    assert!(pruned.iter().flatten().all(|x| x.is_finite()));
}
