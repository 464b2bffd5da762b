//! A strict reader of a GGUF file's header: magic, version, counts, the metadata key/values and
//! the tensor table (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>), producing
//! candle's [`Content`] so the rest of the loader reads tensors through candle.
//!
//! The bytes come from strangers, so nothing here trusts a number before checking it against
//! what the file can hold: every string length, array length and count is compared with the
//! bytes left before anything is allocated for it (the largest allocation is a string of at most
//! the file's size; an array's values are created one at a time as their bytes are read), array
//! nesting is bounded, keys and tensor names must be unique, `general.alignment` must be a power
//! of two, and every tensor's dimensions, element count, byte size and offset are checked for
//! overflow, block alignment and for lying inside the file. Each failure is one [`HeaderError`]
//! line; llama.cpp's `gguf_init_from_file_impl` makes the same checks.

use std::collections::HashMap;
use std::io::Read;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

use crate::error::shown;

/// Deepest nesting of arrays in a metadata value (llama.cpp allows none; candle 64).
const MAX_ARRAY_DEPTH: usize = 4;
/// Most dimensions of a tensor (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Default `general.alignment`.
const DEFAULT_ALIGNMENT: u64 = 32;

/// Why a header was refused: `BadMagic` and `Truncated` get their own words in the message.
/// Names from the file appear in the messages through [`shown`]: one line, 80 characters.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderError {
    BadMagic(u32),
    /// The file ends inside the header (what was being read).
    Truncated(String),
    /// A tensor of a ggml type candle cannot read (its name, the type id).
    UnsupportedType(String, u32),
    Corrupt(String),
}

/// Little-endian reads that know how many bytes are left.
struct Src<R> {
    r: R,
    pos: u64,
    size: u64,
    /// Version 1 files have 32-bit lengths and counts.
    wide: bool,
}

impl<R: Read> Src<R> {
    fn left(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], HeaderError> {
        let mut b = [0u8; N];
        if self.left() < N as u64 {
            return Err(HeaderError::Truncated(what.to_string()));
        }
        self.r
            .read_exact(&mut b)
            .map_err(|_| HeaderError::Truncated(what.to_string()))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u8(&mut self, what: &str) -> Result<u8, HeaderError> {
        Ok(self.bytes::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, HeaderError> {
        self.bytes(what).map(u16::from_le_bytes)
    }
    fn u32(&mut self, what: &str) -> Result<u32, HeaderError> {
        self.bytes(what).map(u32::from_le_bytes)
    }
    fn u64(&mut self, what: &str) -> Result<u64, HeaderError> {
        self.bytes(what).map(u64::from_le_bytes)
    }

    fn len(&mut self, what: &str) -> Result<u64, HeaderError> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    fn length_size(&self) -> u64 {
        if self.wide {
            8
        } else {
            4
        }
    }

    /// A length-prefixed string; its length is checked against the bytes left before the
    /// buffer is allocated. Trailing NULs are dropped and invalid UTF-8 replaced (as candle).
    fn string(&mut self, what: &str) -> Result<String, HeaderError> {
        let n = self.len(what)?;
        if n > self.left() {
            return Err(HeaderError::Truncated(format!(
                "{what}: a string of {n} bytes but {} bytes left",
                self.left()
            )));
        }
        let mut v = vec![0u8; n as usize];
        self.r
            .read_exact(&mut v)
            .map_err(|_| HeaderError::Truncated(what.to_string()))?;
        self.pos += n;
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(match String::from_utf8(v) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// One metadata value of GGUF value type `ty` for `key`.
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value, HeaderError> {
        Ok(match ty {
            0 => Value::U8(self.u8(key)?),
            1 => Value::I8(self.u8(key)? as i8),
            2 => Value::U16(self.u16(key)?),
            3 => Value::I16(self.u16(key)? as i16),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(self.u32(key)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(key)?)),
            7 => match self.u8(key)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(corrupt(format!("metadata {key}: bool byte {b}"))),
            },
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(corrupt(format!(
                        "metadata {key}: arrays nested more than {MAX_ARRAY_DEPTH} deep"
                    )));
                }
                let elem = self.u32(key)?;
                let n = self.len(key)?;
                let min = self.min_size(elem).ok_or_else(|| {
                    corrupt(format!(
                        "metadata {key}: array of unknown value type {elem}"
                    ))
                })?;
                if n.saturating_mul(min) > self.left() {
                    return Err(HeaderError::Truncated(format!(
                        "metadata {key}: an array of {n} values needs at least {} bytes but {} are left",
                        n.saturating_mul(min),
                        self.left()
                    )));
                }
                let mut values = Vec::new();
                for _ in 0..n {
                    values.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(values)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(self.u64(key)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(key)?)),
            other => {
                return Err(corrupt(format!(
                    "metadata {key}: unknown value type {other}"
                )))
            }
        })
    }

    /// Fewest bytes one value of type `ty` takes; `None` for an unknown type.
    fn min_size(&self, ty: u32) -> Option<u64> {
        Some(match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => self.length_size(),
            9 => 4 + self.length_size(),
            _ => return None,
        })
    }
}

fn corrupt(what: String) -> HeaderError {
    HeaderError::Corrupt(what)
}

/// candle's type for a ggml type id, if candle reads it.
pub fn candle_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Read and check the header of a GGUF file of `size` bytes from `r` (positioned at its start).
pub fn read_header<R: Read>(r: R, size: u64) -> Result<Content, HeaderError> {
    let mut s = Src {
        r,
        pos: 0,
        size,
        wide: true,
    };
    let magic = s.u32("magic")?;
    if magic != u32::from_le_bytes(*b"GGUF") {
        return Err(HeaderError::BadMagic(magic));
    }
    let version = s.u32("version")?;
    let magic = match version {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => return Err(corrupt(format!("unsupported GGUF version {v}"))),
    };
    s.wide = version >= 2;
    let n_tensors = s.len("tensor count")?;
    let n_kv = s.len("metadata count")?;
    // a key/value takes at least a length, a type and one byte; a tensor a name length, a
    // dimension count, a type and an offset
    let need = n_kv
        .saturating_mul(s.length_size() + 5)
        .saturating_add(n_tensors.saturating_mul(s.length_size() + 16));
    if need > s.left() {
        return Err(HeaderError::Truncated(format!(
            "{n_tensors} tensors and {n_kv} metadata entries need at least {need} bytes but {} are left",
            s.left()
        )));
    }
    let mut metadata = HashMap::new();
    for _ in 0..n_kv {
        let key = s.string("metadata key")?;
        let label = shown(&key);
        let ty = s.u32(&label)?;
        let value = s.value(ty, &label, 0)?;
        if metadata.insert(key, value).is_some() {
            return Err(corrupt(format!("metadata key {label} appears twice")));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.to_u64() {
            Ok(a) if a.is_power_of_two() => a,
            _ => {
                return Err(corrupt(format!(
                    "general.alignment {v:?} is not a power of two"
                )))
            }
        },
    };
    let mut table = Vec::new();
    for _ in 0..n_tensors {
        let name = s.string("tensor name")?;
        let label = shown(&name);
        let n_dims = s.u32(&label)?;
        if n_dims > MAX_DIMS {
            return Err(corrupt(format!(
                "tensor {label} has {n_dims} dimensions (at most {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(s.len(&label)?);
        }
        let ty = s.u32(&label)?;
        let offset = s.u64(&label)?;
        table.push((name, dims, ty, offset));
    }
    let data_offset = s
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| corrupt(format!("general.alignment {alignment} overflows")))?;
    let mut tensor_infos = HashMap::new();
    for (name, dims, ty, offset) in table {
        let label = shown(&name);
        let dtype =
            candle_dtype(ty).ok_or_else(|| HeaderError::UnsupportedType(label.clone(), ty))?;
        let info = tensor_info(&label, &dims, dtype, offset, alignment, data_offset, size)?;
        if tensor_infos.insert(name, info).is_some() {
            return Err(corrupt(format!("tensor {label} appears twice")));
        }
    }
    Ok(Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset: data_offset,
    })
}

/// Check one tensor-table entry: dimensions (GGUF order, innermost first) whose product fits,
/// an innermost dimension that is whole blocks, an aligned offset, and bytes inside the file.
fn tensor_info(
    name: &str,
    dims: &[u64],
    dtype: GgmlDType,
    offset: u64,
    alignment: u64,
    data_offset: u64,
    file_size: u64,
) -> Result<TensorInfo, HeaderError> {
    let elems = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| corrupt(format!("tensor {name}: dimensions {dims:?} overflow")))?;
    let block = dtype.block_size() as u64;
    let inner = dims.first().copied().unwrap_or(1);
    if inner % block != 0 {
        return Err(corrupt(format!(
            "tensor {name}: its rows of {inner} values are not whole blocks of {block} ({dtype:?})"
        )));
    }
    if offset % alignment != 0 {
        return Err(corrupt(format!(
            "tensor {name}: offset {offset} is not a multiple of the alignment {alignment}"
        )));
    }
    let bytes = (elems / block).checked_mul(dtype.type_size() as u64);
    let end = bytes
        .and_then(|b| b.checked_add(offset))
        .and_then(|e| e.checked_add(data_offset));
    match end {
        Some(end) if end <= file_size => {}
        Some(end) => {
            return Err(HeaderError::Truncated(format!(
                "tensor {name} ends at byte {end} but the file has {file_size} bytes"
            )))
        }
        None => {
            return Err(corrupt(format!(
                "tensor {name}: its size and offset overflow"
            )))
        }
    }
    let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
    Ok(TensorInfo {
        ggml_dtype: dtype,
        shape: shape.into(),
        offset,
    })
}
