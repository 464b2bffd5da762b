//! Random-weight models of named shapes (`--model random:SHAPE[@TYPE]`), for benchmarks of
//! models too large to fetch here: Llama-3.1-8B, Llama-3.2-1B/3B, Qwen2.5-7B and SmolLM2-135M
//! with the real dimensions, weights drawn from a fixed seed.
//!
//! A shape is written once as an ordinary GGUF file into slimchat's cache (`<cache>/random`)
//! and then loaded like any other model, by the same forward, kernels and presets (matched on
//! the shape, as for the real model). Weights are Q4_0 (the default) or Q8_0 blocks of random
//! values scaled by 1/sqrt(fan-in), norms are ones, Llama 3.x carries its `rope_freqs` factors.
//! The tokenizer and chat template are the default model's (a byte-level BPE of 49,152
//! tokens), its vocabulary padded with unused tokens up to the shape's, so that every id the
//! head can choose decodes. The answers are noise; the work per token is the real model's.
//!
//! The file is written streaming (header, then each tensor as it is drawn: an 8B model never
//! sits in memory) to a temporary name, synced and renamed into place; a killed writer's
//! leftover is removed by the next one.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

use crate::model::gguf_write::{self, padded, TensorInfo};
use crate::model::source::DownloadProgress;
use crate::rng::SplitMix64;
use crate::{Error, Result};

/// The dimensions of one named model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub name: &'static str,
    /// GGUF `general.architecture`
    pub arch: &'static str,
    pub n_layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub context: usize,
    /// the head is the embedding (no `output.weight`)
    pub tied: bool,
    /// q/k/v biases (Qwen2)
    pub qkv_bias: bool,
    /// a per-head RMSNorm of queries and keys (Qwen3: `attn_q_norm`, `attn_k_norm`)
    pub qk_norm: bool,
    /// Llama 3's RoPE scaling (factor, low and high frequency factors, original context),
    /// written as the `rope_freqs.weight` tensor as llama.cpp's converter does
    pub llama3_rope: Option<(f32, f32, f32, usize)>,
}

/// Every shape `random:` knows, by name.
pub const SHAPES: [Shape; 5] = [
    Shape {
        name: "llama3.1-8b",
        arch: "llama",
        n_layers: 32,
        hidden: 4096,
        intermediate: 14336,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 128,
        vocab: 128_256,
        rope_theta: 500_000.0,
        rms_eps: 1e-5,
        context: 131_072,
        tied: false,
        qkv_bias: false,
        qk_norm: false,
        llama3_rope: Some((8.0, 1.0, 4.0, 8192)),
    },
    Shape {
        name: "llama3.2-3b",
        arch: "llama",
        n_layers: 28,
        hidden: 3072,
        intermediate: 8192,
        n_heads: 24,
        n_kv_heads: 8,
        head_dim: 128,
        vocab: 128_256,
        rope_theta: 500_000.0,
        rms_eps: 1e-5,
        context: 131_072,
        tied: true,
        qkv_bias: false,
        qk_norm: false,
        llama3_rope: Some((32.0, 1.0, 4.0, 8192)),
    },
    Shape {
        name: "llama3.2-1b",
        arch: "llama",
        n_layers: 16,
        hidden: 2048,
        intermediate: 8192,
        n_heads: 32,
        n_kv_heads: 8,
        head_dim: 64,
        vocab: 128_256,
        rope_theta: 500_000.0,
        rms_eps: 1e-5,
        context: 131_072,
        tied: true,
        qkv_bias: false,
        qk_norm: false,
        llama3_rope: Some((32.0, 1.0, 4.0, 8192)),
    },
    Shape {
        name: "qwen2.5-7b",
        arch: "qwen2",
        n_layers: 28,
        hidden: 3584,
        intermediate: 18944,
        n_heads: 28,
        n_kv_heads: 4,
        head_dim: 128,
        vocab: 152_064,
        rope_theta: 1_000_000.0,
        rms_eps: 1e-6,
        context: 32_768,
        tied: false,
        qkv_bias: true,
        qk_norm: false,
        llama3_rope: None,
    },
    Shape {
        name: "smollm2-135m",
        arch: "llama",
        n_layers: 30,
        hidden: 576,
        intermediate: 1536,
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        vocab: 49_152,
        rope_theta: 100_000.0,
        rms_eps: 1e-5,
        context: 8192,
        tied: true,
        qkv_bias: false,
        qk_norm: false,
        llama3_rope: None,
    },
];

/// The shape of that name.
pub fn shape(name: &str) -> Option<&'static Shape> {
    SHAPES.iter().find(|s| s.name == name)
}

/// The block type of the random weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    /// 32 values a block: an f16 scale and 4-bit values (18 bytes)
    Q4_0,
    /// 32 values a block: an f16 scale and 8-bit values (34 bytes)
    Q8_0,
}

impl WeightType {
    pub fn name(self) -> &'static str {
        match self {
            WeightType::Q4_0 => "q4_0",
            WeightType::Q8_0 => "q8_0",
        }
    }

    /// GGML's type id.
    fn ggml_id(self) -> u32 {
        match self {
            WeightType::Q4_0 => 2,
            WeightType::Q8_0 => 8,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            WeightType::Q4_0 => 18,
            WeightType::Q8_0 => 34,
        }
    }

    /// The standard deviation of a block's values in units of its scale (uniform integers in
    /// -8..=7, or -127..=127).
    fn spread(self) -> f32 {
        match self {
            WeightType::Q4_0 => 4.61,
            WeightType::Q8_0 => 73.9,
        }
    }
}

/// A random model: which shape, in which blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomModel {
    pub shape: Shape,
    pub weights: WeightType,
}

// every float of a shape is a finite constant
impl Eq for RandomModel {}

impl RandomModel {
    /// Parses what follows `random:`: a shape name, optionally `@q4_0` or `@q8_0`.
    pub fn parse(spec: &str) -> Result<Self> {
        let (name, ty) = match spec.split_once('@') {
            Some((name, ty)) => (name, Some(ty)),
            None => (spec, None),
        };
        let shape = shape(&name.trim().to_ascii_lowercase())
            .copied()
            .ok_or_else(|| {
                let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
                Error::Source(format!(
                    "unknown random model shape '{}' (known: {})",
                    crate::error::shown(name),
                    names.join(", ")
                ))
            })?;
        let weights = match ty.map(|t| t.trim().to_ascii_lowercase()).as_deref() {
            None | Some("q4_0") => WeightType::Q4_0,
            Some("q8_0") => WeightType::Q8_0,
            Some(other) => {
                return Err(Error::Source(format!(
                    "random model weights '{}' are not offered (q4_0 or q8_0)",
                    crate::error::shown(other)
                )))
            }
        };
        Ok(Self { shape, weights })
    }

    /// The file's name in the cache; the version changes whenever the drawn weights would.
    pub fn file_name(&self) -> String {
        format!("{}-{}-v1.gguf", self.shape.name, self.weights.name())
    }

    /// The model's file under `dir`, written first if it is not there (reporting the bytes
    /// written after each tensor), with the tokenizer and chat template of `tokenizer_from`
    /// (the default model's metadata).
    pub fn ensure(
        &self,
        dir: &Path,
        tokenizer_from: &Content,
        on_progress: &mut dyn FnMut(&DownloadProgress),
    ) -> Result<PathBuf> {
        let path = dir.join(self.file_name());
        if path.is_file() {
            return Ok(path);
        }
        let fail = |what: String| Error::Source(format!("random:{}: {what}", self.shape.name));
        crate::private_fs::create_dir_private(dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
        // what a killed writer left (gigabytes for the large shapes)
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!(".{}.", self.file_name()))
                && crate::private_fs::stale_temp(&name)
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        // a hidden temp name with this process's id, synced, then renamed into place
        let tmp = crate::private_fs::temp_path(&path);
        let written = crate::private_fs::create_new_private(&tmp)
            .map_err(|e| e.to_string())
            .and_then(|f| {
                let mut w = BufWriter::with_capacity(1 << 20, f);
                self.write(&mut w, tokenizer_from, on_progress)?;
                let f = w.into_inner().map_err(|e| e.to_string())?;
                f.sync_all().map_err(|e| e.to_string())
            });
        if let Err(why) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(format!("cannot write {}: {why}", tmp.display())));
        }
        std::fs::rename(&tmp, &path)
            .map_err(|e| fail(format!("cannot move {} into place: {e}", tmp.display())))?;
        Ok(path)
    }

    /// The whole GGUF file.
    fn write<W: Write>(
        &self,
        mut w: W,
        tokenizer_from: &Content,
        on_progress: &mut dyn FnMut(&DownloadProgress),
    ) -> std::result::Result<(), String> {
        let metadata = self.metadata(tokenizer_from)?;
        let tensors = self.tensors();
        let err = |e: std::io::Error| e.to_string();
        // the header (small: the vocabulary is most of it) in memory, then the tensors streamed
        let infos: Vec<TensorInfo> = tensors
            .iter()
            .map(|t| TensorInfo {
                name: &t.name,
                dims: &t.dims,
                ggml_type: t.kind.ggml_id(),
                bytes: t.bytes() as u64,
            })
            .collect();
        let (h, offset) = gguf_write::header(&metadata, &infos);
        w.write_all(&h).map_err(err)?;
        let mut rng = SplitMix64::new(0x5eed_0000 ^ self.shape.n_layers as u64);
        let mut progress = DownloadProgress {
            what: format!("write random:{} ({})", self.shape.name, self.weights.name()),
            done_bytes: 0,
            total_bytes: Some(offset),
        };
        on_progress(&progress);
        for t in &tensors {
            let bytes = t.bytes();
            t.draw(&mut rng, &mut |chunk| w.write_all(chunk).map_err(err))?;
            w.write_all(&vec![0u8; (padded(bytes as u64) - bytes as u64) as usize])
                .map_err(err)?;
            progress.done_bytes += padded(bytes as u64);
            on_progress(&progress);
        }
        w.flush().map_err(err)
    }

    /// The architecture's hyper-parameters, a name, and the tokenizer padded to the vocabulary.
    fn metadata(&self, from: &Content) -> std::result::Result<Vec<(String, Value)>, String> {
        let s = &self.shape;
        let k = |key: &str| format!("{}.{key}", s.arch);
        let mut md: Vec<(String, Value)> = vec![
            ("general.architecture".into(), Value::String(s.arch.into())),
            (
                "general.name".into(),
                Value::String(format!("random {} ({})", s.name, self.weights.name())),
            ),
            (k("block_count"), Value::U32(s.n_layers as u32)),
            (k("context_length"), Value::U32(s.context as u32)),
            (k("embedding_length"), Value::U32(s.hidden as u32)),
            (k("feed_forward_length"), Value::U32(s.intermediate as u32)),
            (k("attention.head_count"), Value::U32(s.n_heads as u32)),
            (
                k("attention.head_count_kv"),
                Value::U32(s.n_kv_heads as u32),
            ),
            (k("attention.key_length"), Value::U32(s.head_dim as u32)),
            (k("attention.value_length"), Value::U32(s.head_dim as u32)),
            (k("rope.freq_base"), Value::F32(s.rope_theta)),
            (k("attention.layer_norm_rms_epsilon"), Value::F32(s.rms_eps)),
            (k("vocab_size"), Value::U32(s.vocab as u32)),
        ];
        let tokens = match from.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(t)) => t.len(),
            _ => return Err("the tokenizer's source has no tokenizer.ggml.tokens".into()),
        };
        if tokens > s.vocab {
            return Err(format!(
                "the tokenizer has {tokens} tokens, more than the shape's {}",
                s.vocab
            ));
        }
        let extra = s.vocab - tokens;
        let mut keys: Vec<&String> = from
            .metadata
            .keys()
            .filter(|key| key.starts_with("tokenizer."))
            .collect();
        keys.sort();
        for key in keys {
            let mut value = from.metadata[key].clone();
            if let Value::Array(items) = &mut value {
                match key.as_str() {
                    "tokenizer.ggml.tokens" => {
                        items.extend((0..extra).map(|i| Value::String(format!("<|unused_{i}|>"))))
                    }
                    // normal tokens, no score
                    "tokenizer.ggml.token_type" => items.extend((0..extra).map(|_| Value::I32(1))),
                    "tokenizer.ggml.scores" => items.extend((0..extra).map(|_| Value::F32(0.0))),
                    _ => {}
                }
            }
            md.push((key.clone(), value));
        }
        Ok(md)
    }

    /// Every tensor, in llama.cpp's names and order.
    fn tensors(&self) -> Vec<TensorPlan> {
        let s = &self.shape;
        let (q, kv) = (s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
        let w = self.weights;
        let mut t = vec![TensorPlan::matrix(
            "token_embd.weight",
            s.hidden,
            s.vocab,
            w,
        )];
        if let Some(rope) = s.llama3_rope {
            let factors = llama3_rope_factors(s.head_dim, s.rope_theta, rope);
            t.push(TensorPlan::vector(
                "rope_freqs.weight".into(),
                factors.len(),
                Fill::Values(factors),
            ));
        }
        for i in 0..s.n_layers {
            let name = |n: &str| format!("blk.{i}.{n}");
            t.push(TensorPlan::vector(
                name("attn_norm.weight"),
                s.hidden,
                Fill::Ones,
            ));
            t.push(TensorPlan::matrix(name("attn_q.weight"), s.hidden, q, w));
            t.push(TensorPlan::matrix(name("attn_k.weight"), s.hidden, kv, w));
            t.push(TensorPlan::matrix(name("attn_v.weight"), s.hidden, kv, w));
            if s.qkv_bias {
                for (p, n) in [("q", q), ("k", kv), ("v", kv)] {
                    t.push(TensorPlan::vector(
                        name(&format!("attn_{p}.bias")),
                        n,
                        Fill::Bias,
                    ));
                }
            }
            if s.qk_norm {
                for p in ["q", "k"] {
                    t.push(TensorPlan::vector(
                        name(&format!("attn_{p}_norm.weight")),
                        s.head_dim,
                        Fill::Gain,
                    ));
                }
            }
            t.push(TensorPlan::matrix(
                name("attn_output.weight"),
                q,
                s.hidden,
                w,
            ));
            t.push(TensorPlan::vector(
                name("ffn_norm.weight"),
                s.hidden,
                Fill::Ones,
            ));
            t.push(TensorPlan::matrix(
                name("ffn_gate.weight"),
                s.hidden,
                s.intermediate,
                w,
            ));
            t.push(TensorPlan::matrix(
                name("ffn_up.weight"),
                s.hidden,
                s.intermediate,
                w,
            ));
            t.push(TensorPlan::matrix(
                name("ffn_down.weight"),
                s.intermediate,
                s.hidden,
                w,
            ));
        }
        t.push(TensorPlan::vector(
            "output_norm.weight".into(),
            s.hidden,
            Fill::Ones,
        ));
        if !s.tied {
            t.push(TensorPlan::matrix("output.weight", s.hidden, s.vocab, w));
        }
        t
    }
}

/// Llama 3's frequency divisors (llama.cpp's converter): 1 for wavelengths below
/// context/high, the factor above context/low, a smooth blend between.
fn llama3_rope_factors(
    head_dim: usize,
    theta: f32,
    (factor, low, high, ctx): (f32, f32, f32, usize),
) -> Vec<f32> {
    let (low_wavelen, high_wavelen) = (ctx as f64 / low as f64, ctx as f64 / high as f64);
    (0..head_dim / 2)
        .map(|i| {
            let freq = (theta as f64).powf(-2.0 * i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (ctx as f64 / wavelen - low as f64) / (high as f64 - low as f64);
                (1.0 / ((1.0 - smooth) / factor as f64 + smooth)) as f32
            }
        })
        .collect()
}

/// What one tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TensorKind {
    Blocks(WeightType),
    F32,
}

impl TensorKind {
    fn ggml_id(self) -> u32 {
        match self {
            TensorKind::Blocks(w) => w.ggml_id(),
            TensorKind::F32 => 0,
        }
    }
}

/// One tensor to write: its name, GGUF dims (columns first), type, and how to fill it.
struct TensorPlan {
    name: String,
    dims: Vec<usize>,
    kind: TensorKind,
    fill: Fill,
}

enum Fill {
    /// random blocks, values of standard deviation 1/sqrt(columns)
    Random,
    /// f32 values given
    Values(Vec<f32>),
    /// f32 ones
    Ones,
    /// small random f32 values
    Bias,
    /// f32 values near 1 (a norm's weights)
    Gain,
}

impl TensorPlan {
    /// A (rows, columns) weight of `columns` inputs and `rows` outputs.
    fn matrix(name: impl Into<String>, columns: usize, rows: usize, w: WeightType) -> Self {
        Self {
            name: name.into(),
            dims: vec![columns, rows],
            kind: TensorKind::Blocks(w),
            fill: Fill::Random,
        }
    }

    /// An f32 vector of `n` values.
    fn vector(name: String, n: usize, fill: Fill) -> Self {
        Self {
            name,
            dims: vec![n],
            kind: TensorKind::F32,
            fill,
        }
    }

    fn bytes(&self) -> usize {
        let n: usize = self.dims.iter().product();
        match self.kind {
            TensorKind::Blocks(w) => n / 32 * w.block_bytes(),
            TensorKind::F32 => n * 4,
        }
    }

    /// Draws the tensor's bytes, a row at a time, into `out`.
    fn draw(
        &self,
        rng: &mut SplitMix64,
        out: &mut dyn FnMut(&[u8]) -> std::result::Result<(), String>,
    ) -> std::result::Result<(), String> {
        match (&self.fill, self.kind) {
            (Fill::Random, TensorKind::Blocks(w)) => {
                let (columns, rows) = (self.dims[0], self.dims[1]);
                let scale = 1.0 / (w.spread() * (columns as f32).sqrt());
                let d = half::f16::from_f32(scale).to_le_bytes();
                let mut row = Vec::with_capacity(columns / 32 * w.block_bytes());
                for _ in 0..rows {
                    row.clear();
                    for _ in 0..columns / 32 {
                        row.extend_from_slice(&d);
                        match w {
                            // every byte is two values in 0..16, -8 each
                            WeightType::Q4_0 => fill(rng, &mut row, 16, |b| b),
                            // uniform in -127..=127
                            WeightType::Q8_0 => fill(rng, &mut row, 32, |b| match b {
                                0x80 => 0x81,
                                b => b,
                            }),
                        }
                    }
                    out(&row)?;
                }
                Ok(())
            }
            (Fill::Values(v), _) => out(&f32_bytes(v.iter().copied())),
            (Fill::Ones, _) => out(&f32_bytes(std::iter::repeat_n(1.0, self.dims[0]))),
            (Fill::Bias, _) => {
                let v: Vec<f32> = (0..self.dims[0])
                    .map(|_| rng.next_f32() * 0.2 - 0.1)
                    .collect();
                out(&f32_bytes(v.into_iter()))
            }
            (Fill::Gain, _) => {
                let v: Vec<f32> = (0..self.dims[0])
                    .map(|_| 0.8 + rng.next_f32() * 0.4)
                    .collect();
                out(&f32_bytes(v.into_iter()))
            }
            (Fill::Random, TensorKind::F32) => unreachable!("random blocks are block tensors"),
        }
    }
}

fn f32_bytes(v: impl Iterator<Item = f32>) -> Vec<u8> {
    v.flat_map(f32::to_le_bytes).collect()
}

/// Appends `n` random bytes (a multiple of 8), each passed through `map`.
fn fill(rng: &mut SplitMix64, out: &mut Vec<u8>, n: usize, map: impl Fn(u8) -> u8) {
    for _ in 0..n / 8 {
        out.extend(rng.next_u64().to_le_bytes().map(&map));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_with_their_weight_types_and_unknown_ones_list_the_known() {
        let m = RandomModel::parse("llama3.2-1b").unwrap();
        assert_eq!((m.shape.n_layers, m.weights), (16, WeightType::Q4_0));
        let m = RandomModel::parse("Qwen2.5-7B@q8_0").unwrap();
        assert_eq!((m.shape.arch, m.weights), ("qwen2", WeightType::Q8_0));
        assert_eq!(m.file_name(), "qwen2.5-7b-q8_0-v1.gguf");
        let e = RandomModel::parse("llama9").unwrap_err().to_string();
        assert!(
            e.contains("llama3.1-8b") && e.contains("smollm2-135m"),
            "{e}"
        );
        let e = RandomModel::parse("llama3.2-1b@q2_k")
            .unwrap_err()
            .to_string();
        assert!(e.contains("q4_0 or q8_0"), "{e}");
    }

    /// The plans hold the real models' parameters, to the weight (Hugging Face's counts;
    /// `rope_freqs` is not a parameter).
    #[test]
    fn every_shape_has_its_models_parameter_count() {
        let want = [
            ("llama3.1-8b", 8_030_261_248usize),
            ("llama3.2-3b", 3_212_749_824),
            ("llama3.2-1b", 1_235_814_400),
            ("qwen2.5-7b", 7_615_616_512),
            ("smollm2-135m", 134_515_008),
        ];
        for (name, params) in want {
            let m = RandomModel::parse(name).unwrap();
            let plan = m.tensors();
            let count: usize = plan
                .iter()
                .filter(|t| t.name != "rope_freqs.weight")
                .map(|t| t.dims.iter().product::<usize>())
                .sum();
            assert_eq!(count, params, "{name}");
            let bytes: usize = plan.iter().map(|t| t.bytes()).sum();
            println!(
                "{name}: {count} parameters, {:.2} GB in q4_0",
                bytes as f64 / 1e9
            );
        }
    }

    /// The GPU check's ops forward takes its shape from the same list.
    #[test]
    fn the_ops_forwards_8b_is_this_lists_8b() {
        let s = crate::model::ops_llama::LlamaShape::llama31_8b();
        let h = s.heads;
        assert_eq!(
            (s.n_layers, s.hidden, s.intermediate, s.vocab),
            (32, 4096, 14336, 128_256)
        );
        assert_eq!((h.n_heads, h.n_kv_heads, h.head_dim), (32, 8, 128));
        assert_eq!((s.rope.theta, s.rms_eps), (500_000.0, 1e-5));
    }

    #[test]
    fn llama3_rope_factors_run_from_one_to_the_factor() {
        let f = llama3_rope_factors(128, 500_000.0, (8.0, 1.0, 4.0, 8192));
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        assert_eq!(f[63], 8.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]));
        assert!(f.iter().any(|&x| x > 1.0 && x < 8.0));
    }
}
