use super::*;

/// A tensor-less byte-level BPE GGUF over `tokens` (all control), with `extra` metadata.
fn content(tokens: &[&str], extra: &[(&str, u32)]) -> gguf_file::Content {
    content_typed(tokens, &vec![TYPE_CONTROL; tokens.len()], extra)
}

fn content_typed(tokens: &[&str], types: &[i32], extra: &[(&str, u32)]) -> gguf_file::Content {
    let text = |s: &str| Value::String(s.to_string());
    let mut metadata: HashMap<String, Value> = [
        ("tokenizer.ggml.model", text("gpt2")),
        ("tokenizer.ggml.pre", text("llama-bpe")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| text(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        ("tokenizer.ggml.merges", Value::Array(Vec::new())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, id) in extra {
        metadata.insert(k.to_string(), Value::U32(*id));
    }
    gguf_file::Content {
        magic: gguf_file::VersionedMagic::GgufV3,
        metadata,
        tensor_infos: Default::default(),
        tensor_data_offset: 0,
    }
}

fn stop_texts(tokens: &[&str], extra: &[(&str, u32)]) -> Vec<String> {
    let special = SpecialTokens::from_gguf(&content(tokens, extra)).expect("special tokens");
    special
        .stop
        .iter()
        .map(|&id| tokens[id as usize].to_string())
        .collect()
}

#[test]
fn generation_stops_on_every_end_of_generation_token() {
    // Llama 3.1: eos is <|eot_id|>; <|end_of_text|> and <|eom_id|> end generation too.
    let llama = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ];
    let eos = [("tokenizer.ggml.eos_token_id", 4)];
    assert_eq!(
        stop_texts(&llama, &eos),
        ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]
    );
    // Metadata ids come first, in the order eos, eot, eom, even for tokens no list names.
    let ids = [
        ("tokenizer.ggml.eos_token_id", 1),
        ("tokenizer.ggml.eot_token_id", 5),
        ("tokenizer.ggml.eom_token_id", 2),
    ];
    assert_eq!(
        stop_texts(&llama, &ids),
        [
            "<|end_of_text|>",
            "<|python_tag|>",
            "<|start_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>"
        ]
    );
    // Qwen: <|im_end|>, <|endoftext|> and the FIM pad/repo/file markers.
    let qwen = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|fim_prefix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    ];
    let eos = [("tokenizer.ggml.eos_token_id", 2)];
    assert_eq!(
        stop_texts(&qwen, &eos),
        [
            "<|im_end|>",
            "<|endoftext|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>"
        ]
    );
}

#[test]
fn end_is_no_stop_next_to_return_and_call() {
    // gpt-oss: <|end|> closes a message inside a turn; <|return|> and <|call|> end it.
    let tokens = [
        "<|start|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|endoftext|>",
    ];
    let eos = [("tokenizer.ggml.eos_token_id", 2)];
    assert_eq!(
        stop_texts(&tokens, &eos),
        ["<|return|>", "<|call|>", "<|endoftext|>"]
    );
    // Without them <|end|> (Phi-3) stops.
    let tokens = ["<|user|>", "<|end|>", "<|endoftext|>"];
    let eos = [("tokenizer.ggml.eos_token_id", 2)];
    assert_eq!(stop_texts(&tokens, &eos), ["<|endoftext|>", "<|end|>"]);
}

#[test]
fn ordinary_bpe_entries_are_no_markers() {
    // Qwen's vocabulary has `</s>` as a plain BPE entry: no stop, no special token.
    let tokens = ["<|endoftext|>", "<|im_end|>", "</s>", "<", "/", "s", ">"];
    let mut types = vec![TYPE_NORMAL; tokens.len()];
    types[..2].fill(TYPE_CONTROL);
    let c = content_typed(&tokens, &types, &[("tokenizer.ggml.eos_token_id", 1)]);
    let special = SpecialTokens::from_gguf(&c).expect("special tokens");
    assert_eq!(special.stop, [1, 0]);
    let tok = from_gguf(&c).expect("tokenizer");
    let ids = tok.encode("</s><|im_end|>", false).expect("encode");
    assert_eq!(ids.get_ids(), [3, 4, 5, 6, 1]);
    // The same text as a user-defined token is a marker, as in llama.cpp.
    types[2] = TYPE_USER_DEFINED;
    let c = content_typed(&tokens, &types, &[("tokenizer.ggml.eos_token_id", 1)]);
    assert_eq!(
        SpecialTokens::from_gguf(&c).expect("special").stop,
        [1, 0, 2]
    );
}

#[test]
fn out_of_range_stop_id_is_a_one_line_error() {
    let c = content(&["<|endoftext|>"], &[("tokenizer.ggml.eom_token_id", 7)]);
    match SpecialTokens::from_gguf(&c) {
        Err(Error::Tokenizer(msg)) => {
            assert!(
                msg.contains("eom_token_id = 7") && !msg.contains('\n'),
                "{msg}"
            )
        }
        other => panic!("expected a tokenizer error, got {other:?}"),
    }
}
