//! The inputs each target's cases are mutated from, and the words its mutator inserts: small
//! valid GGUF files built here in memory (a two-layer LLaMA with a byte-level BPE vocabulary, a
//! SentencePiece vocabulary), the header of the real default model when it is in the cache,
//! chat templates (the known formats, the model's own, and hostile ones), the example config,
//! and a saved conversation.

use std::io::{Cursor, Read};
use std::path::PathBuf;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::model::gguf_read::read_header;
use crate::model::known_templates::{CHATML, LLAMA2, LLAMA3};
use crate::model::source::{cache_dir, DEFAULT_MODEL_FILE, DEFAULT_MODEL_SIZE};
use crate::tui::store::{Attachment, ChatMessage, Comparison, Conversation, Role, TurnMetrics};

/// Shape of the tiny model: hidden 32, 2 heads of 16 sharing 1 KV head, MLP 64, 2 layers.
const HIDDEN: usize = 32;
const INTER: usize = 64;
const LAYERS: usize = 2;

/// GPT-2's byte-to-unicode map: printable bytes stand for themselves, the rest for 256 + n.
pub fn gpt2_byte_chars() -> Vec<String> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).expect("a scalar value").to_string()
        })
        .collect()
}

fn text(s: &str) -> Value {
    Value::String(s.to_string())
}

fn strings(items: &[String]) -> Value {
    Value::Array(items.iter().map(|s| Value::String(s.clone())).collect())
}

/// A GGUF file in memory (candle's writer: version 2, 32-byte alignment).
pub fn write_gguf(metadata: &[(String, Value)], tensors: &[(String, QTensor)]) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut out, &md, &ts).expect("writing to memory");
    out.into_inner()
}

/// Byte-level BPE metadata: the 256 byte tokens, four merges, three control tokens.
fn gpt2_vocab(template: Option<&str>) -> Vec<(String, Value)> {
    let mut tokens = gpt2_byte_chars();
    let merges = ["Ġ t", "h e", "Ġt he", "i n"];
    tokens.extend(["Ġt", "he", "Ġthe", "in"].map(String::from));
    let first_special = tokens.len();
    tokens.extend(["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i >= first_special { 3 } else { 1 }))
        .collect();
    let mut md = vec![
        ("tokenizer.ggml.model".into(), text("gpt2")),
        ("tokenizer.ggml.pre".into(), text("smollm")),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            strings(&merges.map(String::from)),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(first_special as u32),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(first_special as u32 + 2),
        ),
    ];
    if let Some(t) = template {
        md.push(("tokenizer.chat_template".into(), text(t)));
    }
    md
}

/// SentencePiece (`llama`) metadata: `<unk>`, `<s>`, `</s>`, the 256 `<0xXX>` byte tokens and
/// a few scored pieces.
pub fn spm_vocab() -> Vec<u8> {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut types = vec![2, 3, 3];
    tokens.extend((0..256).map(|b| format!("<0x{b:02X}>")));
    types.extend([6; 256]);
    for piece in ["▁", "▁t", "h", "e", "he", "▁the", "▁[INST]", "[/INST]"] {
        tokens.push(piece.to_string());
        types.push(1);
    }
    let scores: Vec<Value> = (0..tokens.len()).map(|i| Value::F32(-(i as f32))).collect();
    let md = vec![
        ("general.architecture".into(), text("llama")),
        ("tokenizer.ggml.model".into(), text("llama")),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.scores".into(), Value::Array(scores)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(true)),
    ];
    write_gguf(&md, &[])
}

/// Byte-level BPE metadata alone (no tensors), with `template` as its chat template.
pub fn gpt2_vocab_gguf(template: Option<&str>) -> Vec<u8> {
    let mut md = vec![("general.architecture".into(), text("llama"))];
    md.extend(gpt2_vocab(template));
    write_gguf(&md, &[])
}

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn qtensor(dims: &[usize], dtype: GgmlDType, seed: u64, offset: f32) -> QTensor {
    let n = dims.iter().product();
    let data: Vec<f32> = values(n, seed, 0.3)
        .into_iter()
        .map(|v| v + offset)
        .collect();
    let t = Tensor::from_vec(data, dims, &Device::Cpu).expect("shape");
    QTensor::quantize(&t, dtype).expect("quantize")
}

/// A two-layer LLaMA (Q8_0, Q4_0, Q4_1 and F16 weights, F32 norms) with a byte-level BPE
/// vocabulary and a chat template: every step of a load runs on it in about a millisecond.
pub fn tiny_model() -> Vec<u8> {
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), text("llama")),
        ("general.alignment".into(), Value::U32(32)),
        ("llama.block_count".into(), Value::U32(LAYERS as u32)),
        ("llama.context_length".into(), Value::U32(64)),
        ("llama.embedding_length".into(), Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length".into(), Value::U32(INTER as u32)),
        ("llama.attention.head_count".into(), Value::U32(2)),
        ("llama.attention.head_count_kv".into(), Value::U32(1)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
        ("llama.rope.dimension_count".into(), Value::U32(16)),
    ];
    md.extend(gpt2_vocab(Some(CHATML)));
    let vocab = match &md
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .expect("tokens")
        .1
    {
        Value::Array(a) => a.len(),
        _ => unreachable!("tokens are an array"),
    };
    let mut tensors = vec![
        (
            "token_embd.weight".to_string(),
            qtensor(&[vocab, HIDDEN], GgmlDType::Q8_0, 1, 0.0),
        ),
        (
            "output_norm.weight".to_string(),
            qtensor(&[HIDDEN], GgmlDType::F32, 2, 1.0),
        ),
        (
            "output.weight".to_string(),
            qtensor(&[vocab, HIDDEN], GgmlDType::F16, 3, 0.0),
        ),
    ];
    for i in 0..LAYERS {
        let b = |s: &str| format!("blk.{i}.{s}");
        let s = 10 * i as u64;
        tensors.extend([
            (
                b("attn_norm.weight"),
                qtensor(&[HIDDEN], GgmlDType::F32, s + 4, 1.0),
            ),
            (
                b("attn_q.weight"),
                qtensor(&[HIDDEN, HIDDEN], GgmlDType::Q8_0, s + 5, 0.0),
            ),
            (
                b("attn_k.weight"),
                qtensor(&[16, HIDDEN], GgmlDType::Q8_0, s + 6, 0.0),
            ),
            (
                b("attn_v.weight"),
                qtensor(&[16, HIDDEN], GgmlDType::Q8_0, s + 7, 0.0),
            ),
            (
                b("attn_output.weight"),
                qtensor(&[HIDDEN, HIDDEN], GgmlDType::Q4_0, s + 8, 0.0),
            ),
            (
                b("ffn_norm.weight"),
                qtensor(&[HIDDEN], GgmlDType::F32, s + 9, 1.0),
            ),
            (
                b("ffn_gate.weight"),
                qtensor(&[INTER, HIDDEN], GgmlDType::Q4_0, s + 10, 0.0),
            ),
            (
                b("ffn_up.weight"),
                qtensor(&[INTER, HIDDEN], GgmlDType::Q4_1, s + 11, 0.0),
            ),
            (
                b("ffn_down.weight"),
                qtensor(&[HIDDEN, INTER], GgmlDType::Q4_1, s + 12, 0.0),
            ),
        ]);
    }
    write_gguf(&md, &tensors)
}

/// The default model's path, when it is in the cache (never downloaded here).
pub fn cached_default_model() -> Option<PathBuf> {
    let path = cache_dir().ok()?.join("models").join(DEFAULT_MODEL_FILE);
    let len = std::fs::metadata(&path).ok()?.len();
    (len == DEFAULT_MODEL_SIZE).then_some(path)
}

/// From the default model: its header, metadata and tensor table (every byte before the tensor
/// data), and the same metadata with no tensors (so that cases reach the tokenizer and the
/// template). Empty when the model is not cached.
pub fn default_model_seeds() -> Vec<Vec<u8>> {
    let Some(path) = cached_default_model() else {
        return Vec::new();
    };
    let Ok(file) = std::fs::File::open(&path) else {
        return Vec::new();
    };
    let size = DEFAULT_MODEL_SIZE;
    let Ok(content) = read_header(std::io::BufReader::new(file), size) else {
        return Vec::new();
    };
    let mut head = Vec::new();
    let read = std::fs::File::open(&path)
        .map(|f| f.take(content.tensor_data_offset).read_to_end(&mut head));
    if !matches!(read, Ok(Ok(_))) {
        return Vec::new();
    }
    let mut metadata: Vec<(String, Value)> = content.metadata.into_iter().collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    vec![head, write_gguf(&metadata, &[])]
}

/// Chat templates that try to run forever, recurse, read files or build huge values.
pub const HOSTILE_TEMPLATES: &[&str] = &[
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% include '/etc/passwd' %}{{ messages[0].content }}",
    "{% extends 'base.html' %}",
    "{% import 'macros.j2' as m %}{{ m.x() }}",
    "{{ messages | tojson(indent=1000000000) }}",
    "{% set ns = namespace(x=[]) %}{% for i in range(3000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x | tojson }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(20) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}{{ messages[0].content }}",
    "{{ messages[0].content * 1000 }}",
    "{% for m in messages %}{{ m.content[::-1] }}{% endfor %}",
    "{{ raise_exception('no') }}",
    "{% for m in messages %}{{ m.content | tojson(indent=' ', sort_keys=true, ensure_ascii=true) }}{% endfor %}",
    "{{ strftime_now('%Y-%m-%d %H:%M:%S %A %B %j %%') }}{{ messages[0]['content'] }}",
    "{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}",
    "{{ (messages[0].content.split(' ') | join('\\n')).upper().strip() }}",
];

/// Words of Jinja the template mutator inserts.
pub const JINJA_WORDS: &[&str] = &[
    "{{",
    "}}",
    "{%",
    "%}",
    "{#",
    "#}",
    "for",
    "endfor",
    "if",
    "endif",
    "else",
    "elif",
    "set",
    "macro",
    "endmacro",
    "call",
    "include",
    "import",
    "extends",
    "block",
    "endblock",
    "raw",
    "endraw",
    "namespace(",
    "range(",
    "loop.index",
    "loop(",
    "recursive",
    "messages",
    "message['content']",
    "add_generation_prompt",
    "bos_token",
    "|tojson",
    "|length",
    "|join",
    "|trim",
    "~",
    "+",
    "*",
    "**",
    "//",
    "%",
    "(",
    ")",
    "[",
    "]",
    ".",
    ",",
    "'",
    "\"",
    "99999999999999999999",
    "-1",
    "1e308",
    "none",
    "true",
    "raise_exception(",
    "strftime_now(",
    ".split(",
    ".strip()",
    ".items()",
    "[::-1]",
    "is defined",
    "not",
    "in",
    "and",
    "or",
    "{% for x in range(100000) %}",
    "{% endfor %}",
    "\\",
    "\u{0}",
    "\u{202e}",
];

/// Chat templates to mutate, including the default model's own when it is cached.
pub fn templates() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = [CHATML, LLAMA3, LLAMA2]
        .iter()
        .chain(HOSTILE_TEMPLATES)
        .map(|t| t.as_bytes().to_vec())
        .collect();
    if let Some(own) = default_model_template() {
        out.push(own.into_bytes());
    }
    out
}

fn default_model_template() -> Option<String> {
    let path = cached_default_model()?;
    let file = std::fs::File::open(path).ok()?;
    let content = read_header(std::io::BufReader::new(file), DEFAULT_MODEL_SIZE).ok()?;
    match content.metadata.get("tokenizer.chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    }
}

/// Words of GGUF headers: key names and their pieces.
pub const GGUF_WORDS: &[&str] = &[
    "general.architecture",
    "general.alignment",
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "llama.block_count",
    "llama.context_length",
    "llama.embedding_length",
    "llama.attention.head_count",
    "llama.attention.key_length",
    "llama.rope.dimension_count",
    "llama.rope.scaling.type",
    "linear",
    "yarn",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.pre",
    "tokenizer.chat_template",
    "token_embd.weight",
    "output.weight",
    "blk.0.attn_q.weight",
    "GGUF",
    "<|im_start|>",
];

/// The example config and a few small ones.
pub fn configs() -> Vec<Vec<u8>> {
    [
        include_str!("../../config.example.toml"),
        "[model]\nsource = \"default\"\nlinear = \"dense\"\n",
        "[slim]\nkeep_ratio = 0.5\n[sampling]\ntemperature = 0.7\ntop_k = 0\ntop_p = 1.0\n",
        "[kv]\nresident = true\n[tui]\ntick_ms = 10\npaste_chip_chars = 0\n",
        "[chat]\nmax_tokens = 1\nsystem_prompt = \"\"\"\nmulti\nline\"\"\"\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Words of TOML and of the config's keys and values.
pub const TOML_WORDS: &[&str] = &[
    "[model]",
    "[slim]",
    "[kv]",
    "[tui]",
    "[chat]",
    "[sampling]",
    "[[",
    "]]",
    "=",
    "\"",
    "'''",
    "\"\"\"",
    "nan",
    "inf",
    "-inf",
    "1e400",
    "-0",
    "0x7fffffffffffffff",
    "18446744073709551615",
    "-9223372036854775808",
    "true",
    "{}",
    "[]",
    "keep_ratio",
    "stages",
    "decode_keep",
    "block_size",
    "unit_size",
    "local_window",
    "gamma",
    "preset",
    "fast_bytes",
    "cap",
    "max_tokens",
    "tick_ms",
    "top_k",
    "top_p",
    "temperature",
    "repeat_penalty",
    "seed",
    "kv_dtype",
    "threads",
    "linear",
    "\n",
    "#",
    "\\u0000",
    "\u{feff}",
];

/// A saved conversation with every kind of entry.
pub fn conversations() -> Vec<Vec<u8>> {
    let mut user = ChatMessage::new(Role::User, "What does the log say?\nSecond line");
    user.attachments.push(Attachment {
        label: "pasted".into(),
        text: "The lamp was lit at dusk. ".repeat(20),
    });
    let mut answer = ChatMessage::new(Role::Assistant, "It was lit at dusk.");
    answer.metrics = Some(TurnMetrics {
        ttft_ms: 812.5,
        prefill_tok_s: 1822.7,
        decode_tok_s: 41.3,
        prompt_tokens: 1480,
        generated_tokens: 9,
        kv_bytes: 11_206_656,
        slim: true,
        keep_ratio: 0.6,
        stop_reason: "end_of_turn".into(),
    });
    let mut note = ChatMessage::new(Role::Note, "compare");
    note.comparison = Some(Comparison {
        dense: "dense answer".into(),
        dense_ttft_ms: 10.0,
        slim: "slim answer".into(),
        slim_ttft_ms: 5.0,
        keep_ratio: 0.6,
    });
    let mut partial = ChatMessage::new(Role::Assistant, "cut o");
    partial.partial = true;
    let conv = Conversation {
        id: "1700000000000-00042".into(),
        created: 1_700_000_000,
        system: "Be brief.".into(),
        messages: vec![
            user,
            answer,
            note,
            ChatMessage::new(Role::User, "again"),
            partial,
        ],
    };
    let pretty = serde_json::to_vec_pretty(&conv).expect("serializes");
    let compact = serde_json::to_vec(&conv).expect("serializes");
    vec![pretty, compact]
}

/// Words of JSON and of the conversation's fields.
pub const JSON_WORDS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\u0000",
    "\\ud800",
    "\\n",
    "null",
    "true",
    "1e400",
    "-1",
    "18446744073709551616",
    "\"role\"",
    "\"user\"",
    "\"assistant\"",
    "\"note\"",
    "\"content\"",
    "\"attachments\"",
    "\"metrics\"",
    "\"comparison\"",
    "\"partial\"",
    "\"id\"",
    "\"../../x\"",
    "\"created\"",
    "\"system\"",
    "\"messages\"",
];
