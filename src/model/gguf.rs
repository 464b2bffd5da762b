//! Open a GGUF file, check it before trusting it, and read the LLaMA-family hyper-parameters.
//!
//! [`super::gguf_read`] parses and checks the header (into candle's `Content`, whose tensors
//! candle then reads); this module adds what a user needs when a file is wrong: one line that
//! names the problem (bad magic, truncated tensor data, missing tensor, unsupported architecture
//! or tensor type) instead of a panic or a garbled load.
//!
//! Metadata keys and their defaults follow llama.cpp's loader (`llama-model.cpp`): the head size
//! comes from `{arch}.attention.key_length` (default hidden / heads), the RoPE scaling type
//! defaults to linear with the factor of `rope.scaling.factor` (or the older `rope.scale_linear`),
//! and the RoPE layout is chosen by architecture as llama.cpp's `llama_model_rope_type` does.

use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

use super::gguf_read::{read_header, HeaderError};
use candle_core::quantized::QTensor;
use candle_core::Device;

use crate::{Error, Result};

/// Architectures whose tensors and equations are the LLaMA ones (`blk.N.attn_q` … `ffn_down`),
/// with the variations [`ModelSpec`] records: Qwen2's q/k/v biases (optional in every
/// architecture, as in llama.cpp), Qwen3's per-head q/k RMSNorm, and the NEOX RoPE layout.
const LLAMA_FAMILY: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

/// Anything a GGUF file can be read from: the file itself, or bytes in memory (the fuzzer).
pub trait ReadSeek: Read + Seek + Send {}
impl<T: Read + Seek + Send> ReadSeek for T {}

/// A GGUF file whose header parsed and whose tensor data lies inside the file.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    reader: Box<dyn ReadSeek>,
}

impl GgufFile {
    /// Open and validate: magic, header, a LLaMA-family architecture, and that every tensor's
    /// bytes are inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .map_err(|e| Error::ModelLoad(format!("cannot open {}: {e}", path.display())))?;
        let file_size = file.metadata()?.len();
        Self::from_reader(path, BufReader::new(file), file_size)
    }

    /// The same checks over a GGUF file held in memory; `label` names it in errors.
    pub fn from_bytes(label: &Path, bytes: Vec<u8>) -> Result<Self> {
        let size = bytes.len() as u64;
        Self::from_reader(label, Cursor::new(bytes), size)
    }

    fn from_reader(path: &Path, mut reader: impl ReadSeek + 'static, size: u64) -> Result<Self> {
        let content = read_header(&mut reader, size).map_err(|e| {
            let what = match e {
                HeaderError::BadMagic(m) => format!("not a GGUF file (bad magic 0x{m:08x})"),
                HeaderError::Truncated(what) => format!("truncated file: {}", first_line(&what)),
                HeaderError::UnsupportedType(name, ty) => format!(
                    "tensor {} has {}, which slimchat cannot read (it reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q2_K..Q6_K)",
                    first_line(&name),
                    ggml_type_label(ty)
                ),
                HeaderError::Corrupt(what) => format!("corrupt GGUF header: {}", first_line(&what)),
            };
            Error::ModelLoad(format!("{}: {what}", path.display()))
        })?;
        let file = Self {
            path: path.to_path_buf(),
            content,
            reader: Box::new(reader),
        };
        // Before the tokenizer or tensors are read, so a foreign model fails with this reason.
        file.architecture()?;
        Ok(file)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Read one tensor; a missing name is a clear error naming it.
    pub fn tensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(Error::ModelLoad(format!(
                "{}: missing tensor {name}",
                self.path.display()
            )));
        }
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| {
                Error::ModelLoad(format!(
                    "{}: tensor {name}: {}",
                    self.path.display(),
                    first_line(&e.to_string())
                ))
            })
    }

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => v
                .to_u64()
                .ok()
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| {
                    Error::ModelLoad(format!(
                        "{}: metadata {key} is not an integer of 32 bits",
                        self.path.display()
                    ))
                }),
        }
    }

    fn meta_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => v
                .to_f32()
                .or_else(|_| v.to_f64().map(|x| x as f32))
                .map(Some)
                .map_err(|_| {
                    Error::ModelLoad(format!(
                        "{}: metadata {key} is not a number",
                        self.path.display()
                    ))
                }),
        }
    }

    fn require_u32(&self, key: &str) -> Result<u32> {
        self.meta_u32(key)?.ok_or_else(|| {
            Error::ModelLoad(format!("{}: missing metadata {key}", self.path.display()))
        })
    }

    /// `general.architecture`, which must be one of the LLaMA family.
    pub fn architecture(&self) -> Result<String> {
        let arch = match self.metadata("general.architecture") {
            Some(v) => v.to_string().map_err(|_| {
                Error::ModelLoad(format!(
                    "{}: metadata general.architecture is not a string",
                    self.path.display()
                ))
            })?,
            None => {
                return Err(Error::ModelLoad(format!(
                    "{}: missing metadata general.architecture",
                    self.path.display()
                )))
            }
        };
        if !LLAMA_FAMILY.contains(&arch.as_str()) {
            return Err(Error::ModelLoad(format!(
                "{}: unsupported architecture '{}' (slimchat runs these GGUF architectures: {})",
                self.path.display(),
                crate::error::shown(arch),
                LLAMA_FAMILY.join(", ")
            )));
        }
        Ok(arch.clone())
    }

    /// The LLaMA hyper-parameters, all resolved (no `Option`s left).
    pub fn spec(&self) -> Result<ModelSpec> {
        let arch = self.architecture()?;
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.require_u32(&k("embedding_length"))? as usize;
        let n_heads = self.require_u32(&k("attention.head_count"))? as usize;
        let n_kv_heads = self
            .meta_u32(&k("attention.head_count_kv"))?
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(self.load_error(format!(
                "inconsistent heads: {n_heads} query heads, {n_kv_heads} KV heads"
            )));
        }
        let head_dim = self.head_dim(&arch, hidden, n_heads)?;
        let rope_dim = self
            .meta_u32(&k("rope.dimension_count"))?
            .map(|v| v as usize)
            .unwrap_or(head_dim);
        if rope_dim == 0 || rope_dim % 2 != 0 || rope_dim > head_dim {
            return Err(self.load_error(format!(
                "RoPE dimension {rope_dim} must be even and at most the head dimension {head_dim}"
            )));
        }
        if let Some(n) = self.meta_u32(&k("expert_count"))?.filter(|&n| n > 0) {
            return Err(self.load_error(format!(
                "mixture-of-experts {arch} models ({n} experts) are not supported"
            )));
        }
        let n_layers = self.require_u32(&k("block_count"))? as usize;
        let vocab_size = match self.meta_u32(&k("vocab_size"))? {
            Some(v) => v as usize,
            None => match self.metadata("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len(),
                _ => return Err(self.load_error("cannot tell the vocabulary size".into())),
            },
        };
        let rope_theta = self.meta_f32(&k("rope.freq_base"))?.unwrap_or(10_000.0);
        let rms_eps = self
            .meta_f32(&k("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5);
        if !(rope_theta.is_finite() && rope_theta > 1.0) {
            return Err(self.load_error(format!("rope.freq_base {rope_theta} must be above 1")));
        }
        if !(rms_eps.is_finite() && rms_eps > 0.0 && rms_eps < 1.0) {
            return Err(self.load_error(format!(
                "attention.layer_norm_rms_epsilon {rms_eps} must be between 0 and 1"
            )));
        }
        let context_length = self.meta_u32(&k("context_length"))?.unwrap_or(4096) as usize;
        if context_length == 0 {
            return Err(self.load_error("context_length is 0".into()));
        }
        Ok(ModelSpec {
            n_layers,
            hidden,
            intermediate: self.require_u32(&k("feed_forward_length"))? as usize,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dim,
            rope_theta,
            rope_scaling: self.rope_scaling(&arch)?,
            rope_style: RopeStyle::of(&arch),
            qk_norm: arch == "qwen3",
            rms_eps,
            context_length,
            vocab_size,
            arch,
        })
    }

    /// Width of one attention head: `{arch}.attention.key_length`, which must equal
    /// `value_length` when both are given; hidden / heads when neither is.
    fn head_dim(&self, arch: &str, hidden: usize, n_heads: usize) -> Result<usize> {
        let key = self.meta_u32(&format!("{arch}.attention.key_length"))?;
        let value = self.meta_u32(&format!("{arch}.attention.value_length"))?;
        match (key.or(value), value.or(key)) {
            (Some(k), Some(v)) if k != v => Err(self.load_error(format!(
                "key heads of {k} and value heads of {v} differ (slimchat needs them equal)"
            ))),
            (Some(0), _) => Err(self.load_error("attention.key_length is 0".into())),
            (Some(k), _) => Ok(k as usize),
            _ if hidden.is_multiple_of(n_heads) => Ok(hidden / n_heads),
            _ => Err(self.load_error(format!(
                "hidden {hidden} is not a multiple of {n_heads} heads and attention.key_length is missing"
            ))),
        }
    }

    /// `{arch}.rope.scaling.type` (llama.cpp's default: linear) with `rope.scaling.factor` (or the
    /// older `rope.scale_linear`); a factor of 0 or 1, or none, means no scaling. Llama 3.1's
    /// scaling has no type here: it is the `rope_freqs.weight` tensor.
    fn rope_scaling(&self, arch: &str) -> Result<RopeScaling> {
        let k = |s: &str| format!("{arch}.{s}");
        let factor = match self.meta_f32(&k("rope.scaling.factor"))? {
            Some(f) => Some(f),
            None => self.meta_f32(&k("rope.scale_linear"))?,
        };
        let factor = factor.filter(|&f| f != 0.0 && f != 1.0);
        let kind = match self.metadata(&k("rope.scaling.type")) {
            Some(v) => v.to_string().map(String::as_str).map_err(|_| {
                self.load_error(format!("metadata {arch}.rope.scaling.type is not a string"))
            })?,
            None => "linear",
        };
        match (kind, factor) {
            ("none", _) | (_, None) => Ok(RopeScaling::None),
            ("linear", Some(f)) if f > 0.0 => Ok(RopeScaling::Linear(f)),
            (kind, Some(f)) => Err(self.load_error(format!(
                "RoPE scaling '{kind}' with factor {f} is not supported (slimchat supports none and linear)"
            ))),
        }
    }

    fn load_error(&self, what: String) -> Error {
        Error::ModelLoad(format!("{}: {what}", self.path.display()))
    }
}

/// How RoPE positions are rescaled. Llama-3's per-frequency scaling arrives as the
/// `rope_freqs.weight` tensor in GGUF files and is applied by the rotary table itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions are divided by the factor.
    Linear(f32),
}

/// Which pairs of a head's values RoPE rotates together (llama.cpp's `LLAMA_ROPE_TYPE_*`).
/// Both rotate pair i by position * theta^(-2i / rope_dim) for i < rope_dim / 2 and leave the
/// values past `rope_dim` alone; they differ in where the two halves of a pair sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// GPT-J / Meta LLaMA layout: pair i is (x[2i], x[2i + 1]). llama.cpp's converter permutes
    /// Hugging Face LLaMA q/k weights into it, so `llama` and `mistral` GGUFs use it.
    Normal,
    /// GPT-NeoX "rotate half" layout: pair i is (x[i], x[i + rope_dim / 2]), the Hugging Face
    /// layout, which Qwen2/Qwen3 GGUFs keep.
    Neox,
}

impl RopeStyle {
    /// The layout llama.cpp uses for an architecture (one that [`GgufFile::architecture`] accepts).
    pub fn of(arch: &str) -> Self {
        match arch {
            "qwen2" | "qwen3" => Self::Neox,
            _ => Self::Normal,
        }
    }
}

/// Resolved hyper-parameters of a LLaMA-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub arch: String,
    pub n_layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Width of one query, key and value head; n_heads * head_dim need not be `hidden` (Qwen3).
    pub head_dim: usize,
    /// Leading dimensions of each head that RoPE rotates (usually all of them).
    pub rope_dim: usize,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub rope_style: RopeStyle,
    /// Queries and keys go through a per-head RMSNorm (`attn_q_norm`, `attn_k_norm`, width
    /// head_dim) before RoPE (Qwen3).
    pub qk_norm: bool,
    pub rms_eps: f32,
    /// The trained context: the longest prompt plus answer the model accepts.
    pub context_length: usize,
    pub vocab_size: usize,
}

impl ModelSpec {
    /// Width of a row of queries, and of the attention output: n_heads * head_dim.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// The ggml type names by id (`enum ggml_type` in ggml.h); ids 4, 5 and 31-33, 36-38 were removed.
const GGML_TYPES: &[(u32, &str)] = &[
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (30, "BF16"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
    (40, "NVFP4"),
    (41, "Q1_0"),
    (42, "Q2_0"),
];

/// "IQ4_NL (type 20)", or "unknown type 99" for an id ggml does not name.
fn ggml_type_label(id: u32) -> String {
    match GGML_TYPES.iter().find(|(i, _)| *i == id) {
        Some((_, name)) => format!("{name} (type {id})"),
        None => format!("unknown type {id}"),
    }
}
