//! Open a GGUF file, check it before trusting it, and read the LLaMA-family hyper-parameters.
//!
//! candle's `gguf_file::Content::read` parses the header; this module adds what a user needs
//! when a file is wrong: one line that names the problem (bad magic, truncated tensor data,
//! missing tensor, unsupported architecture) instead of a panic or a garbled load.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

use crate::{Error, Result};

/// Architectures whose tensors and equations are the LLaMA ones (`blk.N.attn_q` … `ffn_down`).
const LLAMA_FAMILY: &[&str] = &["llama", "mistral"];

/// A GGUF file whose header parsed and whose tensor data lies inside the file.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    /// Open and validate: magic, header, a LLaMA-family architecture, and that every tensor's
    /// bytes are inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)
            .map_err(|e| Error::ModelLoad(format!("cannot open {}: {e}", path.display())))?;
        let file_size = file.metadata()?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            let msg = e.to_string();
            let what = if msg.contains("magic") {
                "not a GGUF file (bad magic)"
            } else {
                "corrupt GGUF header"
            };
            Error::ModelLoad(format!("{}: {what}: {}", path.display(), first_line(&msg)))
        })?;
        for (name, info) in content.tensor_infos.iter() {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            let bytes = (elems / block) as u64 * info.ggml_dtype.type_size() as u64;
            let end = content.tensor_data_offset + info.offset + bytes;
            if end > file_size {
                return Err(Error::ModelLoad(format!(
                    "{}: truncated file: tensor {name} ends at byte {end} but the file has {file_size} bytes",
                    path.display()
                )));
            }
        }
        let file = Self {
            path: path.to_path_buf(),
            content,
            reader,
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
                .to_u32()
                .or_else(|_| v.to_u64().map(|x| x as u32))
                .map(Some)
                .map_err(|_| {
                    Error::ModelLoad(format!(
                        "{}: metadata {key} is not an integer",
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
                "{}: unsupported architecture '{arch}' (slimchat runs LLaMA-family models: {})",
                self.path.display(),
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
        if n_heads == 0
            || !hidden.is_multiple_of(n_heads)
            || n_kv_heads == 0
            || !n_heads.is_multiple_of(n_kv_heads)
        {
            return Err(Error::ModelLoad(format!(
                "{}: inconsistent heads: hidden {hidden}, {n_heads} query heads, {n_kv_heads} KV heads",
                self.path.display()
            )));
        }
        let head_dim = hidden / n_heads;
        let rope_dim = self
            .meta_u32(&k("rope.dimension_count"))?
            .map(|v| v as usize)
            .unwrap_or(head_dim);
        if rope_dim == 0 || rope_dim % 2 != 0 || rope_dim > head_dim {
            return Err(Error::ModelLoad(format!(
                "{}: RoPE dimension {rope_dim} must be even and at most the head dimension {head_dim}",
                self.path.display()
            )));
        }
        let rope_scaling = match self
            .metadata(&k("rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
        {
            Some(t) if t == "linear" => {
                RopeScaling::Linear(self.meta_f32(&k("rope.scaling.factor"))?.unwrap_or(1.0))
            }
            Some(t) if t == "none" => RopeScaling::None,
            None => RopeScaling::None,
            Some(t) => {
                return Err(Error::ModelLoad(format!(
                    "{}: unsupported RoPE scaling '{t}'",
                    self.path.display()
                )))
            }
        };
        let n_layers = self.require_u32(&k("block_count"))? as usize;
        let vocab_size = match self.meta_u32(&k("vocab_size"))? {
            Some(v) => v as usize,
            None => match self.metadata("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len(),
                _ => {
                    return Err(Error::ModelLoad(format!(
                        "{}: cannot tell the vocabulary size",
                        self.path.display()
                    )))
                }
            },
        };
        Ok(ModelSpec {
            arch: arch.clone(),
            n_layers,
            hidden,
            intermediate: self.require_u32(&k("feed_forward_length"))? as usize,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dim,
            rope_theta: self.meta_f32(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            rms_eps: self
                .meta_f32(&k("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            context_length: self.meta_u32(&k("context_length"))?.unwrap_or(4096) as usize,
            vocab_size,
        })
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

/// Resolved hyper-parameters of a LLaMA-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub arch: String,
    pub n_layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Leading dimensions of each head that RoPE rotates (usually all of them).
    pub rope_dim: usize,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub rms_eps: f32,
    /// The trained context: the longest prompt plus answer the model accepts.
    pub context_length: usize,
    pub vocab_size: usize,
}

impl ModelSpec {
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}
