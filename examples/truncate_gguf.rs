//! Keep the first N layers of a LLaMA-family GGUF (and its embedding, final norm, head and
//! tokenizer): a smaller file of a real model's weights, for the GPU run, whose copy to the
//! device machine holds 64 MiB with the binary (bench/NOTES.md, "the GPU run").
//!
//!   cargo run --release --example truncate_gguf -- IN.gguf OUT.gguf N

use std::io::{Read, Seek, SeekFrom, Write};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use slimchat::model::gguf_write::{header, padded, TensorInfo};

/// GGML's id of a type.
fn ggml_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// The layer a tensor belongs to (`blk.N.`), if any.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, output, n] = &args[..] else {
        return Err("usage: truncate_gguf IN.gguf OUT.gguf LAYERS".into());
    };
    let keep: usize = n.parse()?;
    let mut file = std::fs::File::open(input)?;
    let content = Content::read(&mut file)?;
    let arch = match content.metadata.get("general.architecture") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err("no general.architecture".into()),
    };
    let mut metadata: Vec<(String, Value)> = content.metadata.clone().into_iter().collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, value) in &mut metadata {
        if *key == format!("{arch}.block_count") {
            *value = Value::U32(keep as u32);
        }
    }
    let mut tensors: Vec<(&String, _)> = (content.tensor_infos.iter())
        .filter(|(name, _)| layer_of(name).is_none_or(|l| l < keep))
        .collect();
    tensors.sort_by_key(|(_, info)| info.offset);
    let bytes_of = |info: &candle_core::quantized::gguf_file::TensorInfo| {
        let t = info.ggml_dtype;
        (info.shape.elem_count() / t.block_size() * t.type_size()) as u64
    };
    // GGUF lists dimensions columns first
    let dims: Vec<Vec<usize>> = (tensors.iter())
        .map(|(_, info)| info.shape.dims().iter().rev().copied().collect())
        .collect();
    let table: Vec<TensorInfo> = (tensors.iter().zip(&dims))
        .map(|((name, info), dims)| TensorInfo {
            name,
            dims,
            ggml_type: ggml_id(info.ggml_dtype),
            bytes: bytes_of(info),
        })
        .collect();
    let (head, _) = header(&metadata, &table);
    let mut out = std::io::BufWriter::new(std::fs::File::create(output)?);
    out.write_all(&head)?;
    for (_, info) in &tensors {
        let n = bytes_of(info);
        let mut data = vec![0u8; n as usize];
        file.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))?;
        file.read_exact(&mut data)?;
        data.resize(padded(n) as usize, 0);
        out.write_all(&data)?;
    }
    out.flush()?;
    eprintln!(
        "{output}: {keep} layers of {arch}, {} tensors",
        tensors.len()
    );
    Ok(())
}
