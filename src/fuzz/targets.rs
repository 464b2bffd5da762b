//! What each target does with one input, and what it must never do: every target runs its
//! input through the real code path (no I/O but the bytes given) and returns `Err` with the
//! broken rule when an error is not one clear line or a result breaks an invariant. Panics are
//! caught by the runner; hangs and huge allocations are measured there too.

use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;

use crate::backend::attention_kind::AttentionKind;
use crate::backend::engine_ops::EngineOps;
use crate::backend::kv_format::KvDtype;
use crate::backend::linear::LinearMode;
use crate::backend::paged_kv::NoHooks;
use crate::config::AppConfig;
use crate::model::gguf::GgufFile;
use crate::model::gguf_read::read_header;
use crate::model::ops_llama::OpsLlama;
use crate::model::template::{ChatTemplate, Message};
use crate::model::tokenizer::{self, SpecialTokens};
use crate::sampling::Sampler;
use crate::slim::preset::ModelFit;
use crate::tui::store::parse_conversation;

/// The outcome of one case: `Err` names the rule it broke.
pub type Check = Result<(), String>;

/// An error message must be one non-empty line.
pub fn one_line(what: &str, msg: &str) -> Check {
    if msg.trim().is_empty() {
        return Err(format!("{what}: empty error message"));
    }
    if msg.contains('\n') || msg.contains('\r') {
        return Err(format!("{what}: error of more than one line: {msg:?}"));
    }
    Ok(())
}

/// A result whose error must be one line; `Ok(None)` when it was an error.
fn ok_or_line<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<Option<T>, String> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) => one_line(what, &e.to_string()).map(|()| None),
    }
}

/// Texts every tokenizer encodes: markup, markers, odd Unicode.
const TEXTS: &[&str] = &[
    "Hello, world! The lamp was lit at dusk.",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] x [/INST]</s><unk>",
    "\u{0}\u{1}\t\r\n  \u{feff}\u{202e}\u{1F600}é\u{301}",
    "",
    " ",
];

/// A GGUF file through the whole load: header, spec, tokenizer, special tokens, template,
/// weights, and a three-token forward.
pub fn gguf(input: &[u8]) -> Check {
    let Some(mut file) = ok_or_line(
        "open",
        GgufFile::from_bytes(Path::new("fuzz.gguf"), input.to_vec()),
    )?
    else {
        return Ok(());
    };
    if ok_or_line("spec", file.spec())?.is_none() {
        return Ok(());
    }
    let Some(tok) = ok_or_line("tokenizer", tokenizer::from_gguf(&file.content))? else {
        return Ok(());
    };
    let Some(special) = ok_or_line("special tokens", SpecialTokens::from_gguf(&file.content))?
    else {
        return Ok(());
    };
    template_of(&file.content)?;
    // the engine's backend, with the KV type the engine picks for the file's heads
    static Q8: EngineOps = EngineOps::product();
    static F16: EngineOps = EngineOps::new(LinearMode::Int8, KvDtype::F16, AttentionKind::Int8);
    let head_dim = file.spec().map_or(0, |s| s.head_dim);
    let ops = match KvDtype::Q8.check_head_dim(head_dim) {
        Ok(()) => &Q8,
        Err(_) => &F16,
    };
    let Some(model) = ok_or_line("load", OpsLlama::from_gguf(ops, &mut file, 64))? else {
        return Ok(());
    };
    let vocab = model.shape.vocab as u32;
    let ids: Vec<u32> = tok
        .encode("hi there", false)
        .map(|e| e.get_ids().to_vec())
        .unwrap_or_default();
    let mut tokens: Vec<u32> = special.bos.into_iter().chain(ids).collect();
    tokens.retain(|&t| t < vocab);
    if tokens.is_empty() {
        tokens.push(0);
    }
    tokens.truncate(3);
    let prefill = model.prefill(&tokens, None, 1, &mut NoHooks);
    if let Some((_, report)) = ok_or_line("forward", prefill)? {
        let logits = report.logits;
        if logits.len() != vocab as usize {
            return Err(format!(
                "forward: {} logits for a vocabulary of {vocab}",
                logits.len()
            ));
        }
    }
    Ok(())
}

/// The chat template of a header; it must always give a template that renders a message.
fn template_of(content: &Content) -> Check {
    let Some(t) = ok_or_line("template", ChatTemplate::from_gguf(content))? else {
        return Ok(());
    };
    if let Some(note) = t.note() {
        one_line("template note", note)?;
    }
    let msgs = [Message::system("Be brief."), Message::user("probe text 42")];
    if let Some(text) = ok_or_line("render", t.render(&msgs, true))? {
        if t.note().is_some() && !text.contains("probe text 42") {
            return Err("the fallback template does not print the message".into());
        }
    }
    Ok(())
}

/// GGUF metadata (any tensors ignored) into a tokenizer: construction, special ids, encode and
/// decode of odd texts, decode of every id.
pub fn tokenizer(input: &[u8]) -> Check {
    let Some(content) = ok_or_line(
        "header",
        read_header(Cursor::new(input), input.len() as u64).map_err(|e| format!("{e:?}")),
    )?
    else {
        return Ok(());
    };
    let special = ok_or_line("special tokens", SpecialTokens::from_gguf(&content))?;
    template_of(&content)?;
    let Some(tok) = ok_or_line("tokenizer", tokenizer::from_gguf(&content))? else {
        return Ok(());
    };
    // ids index the file's token list (a repeated text leaves a hole in the tokenizer's map)
    let listed = match content.metadata.get("tokenizer.ggml.tokens") {
        Some(candle_core::quantized::gguf_file::Value::Array(a)) => a.len() as u32,
        _ => 0,
    };
    if let Some(s) = &special {
        for id in s.bos.iter().chain([&s.eos]).chain(&s.stop) {
            if *id >= listed {
                return Err(format!(
                    "special token {id} outside the {listed} listed tokens"
                ));
            }
        }
    }
    let n = tok.get_vocab_size(true).max(listed as usize) as u32;
    for text in TEXTS {
        let Some(enc) = ok_or_line("encode", tok.encode(*text, false))? else {
            continue;
        };
        if let Some(&bad) = enc.get_ids().iter().find(|&&id| id >= n) {
            return Err(format!(
                "encode gave id {bad} outside the vocabulary of {n}"
            ));
        }
        ok_or_line("decode", tok.decode(enc.get_ids(), false))?;
    }
    let all: Vec<u32> = (0..n.min(4096)).collect();
    ok_or_line("decode all", tok.decode(&all, true))?;
    ok_or_line("decode out of range", tok.decode(&[n, u32::MAX], false))?;
    Ok(())
}

/// A chat template's source (as the model's `tokenizer.chat_template`): loading always gives a
/// template (the model's, or the known one with a note), and rendering is one line of error
/// or text.
pub fn template(input: &[u8]) -> Check {
    let source = String::from_utf8_lossy(input);
    let bytes = super::seeds::gpt2_vocab_gguf(Some(&source));
    let content = read_header(Cursor::new(&bytes), bytes.len() as u64)
        .map_err(|e| format!("the seed vocabulary does not parse: {e:?}"))?;
    let replaced = match ChatTemplate::from_gguf(&content) {
        Ok(t) => t.note().is_some(),
        Err(e) => return Err(format!("a string template must load (or fall back): {e}")),
    };
    template_of(&content)?;
    if replaced {
        // it failed its probe: rendering it again would only fail (or time out) again
        return Ok(());
    }
    // the same source straight, with a longer conversation
    if let Some(t) = ok_or_line("compile", ChatTemplate::new(source.as_ref(), "<s>", "</s>"))? {
        let msgs = [
            Message::system("sys"),
            Message::user("u1 \u{0} {{ x }} {% raw %}"),
            Message::assistant("a1"),
            Message::user("u2"),
        ];
        ok_or_line("render", t.render(&msgs, false))?;
        ok_or_line("render", t.render(&[], true))?;
    }
    Ok(())
}

/// A config file: parse, then everything the engine derives from it at load.
pub fn config(input: &[u8]) -> Check {
    let Some(text) = ok_or_line("utf-8", std::str::from_utf8(input))? else {
        return Ok(());
    };
    let Some(cfg) = ok_or_line("parse", AppConfig::parse(text, "fuzz.toml"))? else {
        return Ok(());
    };
    // what was accepted is written back by `--print-config`-style round trips
    let again =
        toml::to_string(&cfg).map_err(|e| format!("a parsed config does not serialize: {e}"))?;
    match AppConfig::parse(&again, "again") {
        Ok(c) if c == cfg => {}
        Ok(_) => return Err("a parsed config changes through TOML".into()),
        Err(e) => return Err(format!("a parsed config does not parse again: {e}")),
    }
    for (preset, layers, context) in [("smollm2", 30, 8192), ("generic", 2, 64), ("generic", 1, 1)]
    {
        let fit = ModelFit { preset, context };
        let slim = cfg.slim.clone().for_model(fit);
        if ok_or_line("slim check", slim.check(layers))?.is_some() {
            for prompt in [0, 1, 100, 5000, 1 << 20] {
                let _ = slim.resolve(layers, prompt);
            }
        }
    }
    ok_or_line("kv budget", cfg.kv.budget())?;
    ok_or_line("kv cap", cfg.kv.cap())?;
    let mut sampler = Sampler::new(cfg.sampling.clone());
    let mut logits: Vec<f32> = (0..50).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
    let id = sampler.sample(&mut logits, &[1, 2, 3]);
    if id >= 50 {
        return Err(format!("sampled id {id} of 50 logits"));
    }
    Ok(())
}

/// A saved conversation: parse, then everything the chat screen and export do with it, and a
/// save/load round trip that gives it back unchanged.
pub fn conversation(input: &[u8]) -> Check {
    let Some(text) = ok_or_line("utf-8", std::str::from_utf8(input))? else {
        return Ok(());
    };
    let Some(conv) = ok_or_line("parse", parse_conversation(text, "fuzz.json"))? else {
        return Ok(());
    };
    let title = conv.title();
    if title.contains('\n') {
        return Err(format!("a title of more than one line: {title:?}"));
    }
    let _ = conv.to_markdown();
    let saved = serde_json::to_string_pretty(&conv).map_err(|e| format!("does not save: {e}"))?;
    match parse_conversation(&saved, "again") {
        Ok(c) if c == conv => {}
        Ok(_) => return Err("a saved conversation loads back different".into()),
        Err(e) => return Err(format!("a saved conversation does not load: {e}")),
    }
    super::tui::show_conversation(conv)
}
