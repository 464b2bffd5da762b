//! Writing GGUF files (the counterpart of `gguf_read`): the header, metadata and tensor table of
//! a GGUF v3 file, for a writer that streams the tensors' bytes after it (candle's
//! `gguf_file::write` needs every tensor in memory at once).

use candle_core::quantized::gguf_file::Value;

/// One tensor's entry in the table.
pub struct TensorInfo<'a> {
    pub name: &'a str,
    /// GGUF order: columns first
    pub dims: &'a [usize],
    /// GGML's type id
    pub ggml_type: u32,
    /// its data's length (each tensor's data starts at a multiple of 32 bytes)
    pub bytes: u64,
}

/// The bytes before the first tensor's data, padded to the alignment, and the length of the
/// data that follows (each tensor's bytes, [`padded`]).
pub fn header(metadata: &[(String, Value)], tensors: &[TensorInfo]) -> (Vec<u8>, u64) {
    let mut h = b"GGUF".to_vec();
    h.extend(3u32.to_le_bytes());
    h.extend((tensors.len() as u64).to_le_bytes());
    h.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        h.extend(gguf_string(key));
        h.extend(value_type(value).to_le_bytes());
        h.extend(value_bytes(value));
    }
    let mut offset = 0u64;
    for t in tensors {
        h.extend(gguf_string(t.name));
        h.extend((t.dims.len() as u32).to_le_bytes());
        for d in t.dims {
            h.extend((*d as u64).to_le_bytes());
        }
        h.extend(t.ggml_type.to_le_bytes());
        h.extend(offset.to_le_bytes());
        offset += padded(t.bytes);
    }
    h.resize(padded(h.len() as u64) as usize, 0);
    (h, offset)
}

/// Round up to GGUF's default alignment of 32 bytes.
pub fn padded(n: u64) -> u64 {
    n.div_ceil(32) * 32
}

fn gguf_string(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b
}

/// GGUF's value type ids.
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

/// A value's bytes after its type id (an array: its items' type, count, then the items).
fn value_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::U8(x) => x.to_le_bytes().to_vec(),
        Value::I8(x) => x.to_le_bytes().to_vec(),
        Value::U16(x) => x.to_le_bytes().to_vec(),
        Value::I16(x) => x.to_le_bytes().to_vec(),
        Value::U32(x) => x.to_le_bytes().to_vec(),
        Value::I32(x) => x.to_le_bytes().to_vec(),
        Value::U64(x) => x.to_le_bytes().to_vec(),
        Value::I64(x) => x.to_le_bytes().to_vec(),
        Value::F32(x) => x.to_le_bytes().to_vec(),
        Value::F64(x) => x.to_le_bytes().to_vec(),
        Value::Bool(x) => vec![u8::from(*x)],
        Value::String(s) => gguf_string(s),
        Value::Array(items) => {
            // an empty array's item type does not matter to readers; u32 as llama.cpp writes
            let item_type = items.first().map(value_type).unwrap_or(4);
            let mut b = item_type.to_le_bytes().to_vec();
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                b.extend(value_bytes(item));
            }
            b
        }
    }
}
