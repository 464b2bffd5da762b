//! The tokenizer: a real `tokenizers::Tokenizer` built from a GGUF file's `tokenizer.ggml.*`
//! metadata (or read from a `tokenizer.json`), plus the model's special token ids.
//!
//! A GGUF file carries no `tokenizer.json`, only the vocabulary, merges or scores, token types and
//! the name of a pre-tokenizer. llama.cpp (`src/llama-vocab.cpp`) is the reference that defines what
//! those mean, so every choice below copies its behaviour, and `tests/tokenizer.rs` checks the ids
//! against `llama-tokenize` on the default model:
//!
//! * `gpt2` (byte-level BPE): the `tokenizer.ggml.pre` name picks the split regexes exactly as
//!   llama.cpp's `llm_tokenizer_bpe` does (each regex splits every piece further, keeping matches and
//!   the text between them), then GPT-2's byte-to-unicode map, then BPE by merge rank. Unknown `pre`
//!   names are an error, as in llama.cpp: a silent fallback would give subtly wrong ids.
//! * `llama` (SentencePiece, Llama-2 style GGUFs): llama.cpp's `llm_tokenizer_spm` merges the
//!   adjacent pair whose concatenation is the highest-scoring vocabulary entry. That is BPE whose
//!   merge ranks are the scores of the merged pieces, so we derive the merges from the scores.
//!   Spaces become `▁`, a `▁` is prepended to every text fragment that starts the input or follows
//!   a special token (`tokenizer.ggml.add_space_prefix`, default true), and characters outside the
//!   vocabulary fall back to the `<0xXX>` byte tokens.
//!
//! `tests/hf_tokenizers.rs` also checks `llama-bpe` (Llama 3) and `qwen2` (Qwen2.5, Qwen3) on their
//! real vocabularies against Hugging Face `tokenizers` loading the models' own tokenizer.json.
//! Two deliberate differences from llama.cpp make ours agree with those: `qwen2` composes the text
//! to NFC first, as Qwen's tokenizer.json does, and a marker text llama.cpp forces to control
//! (`</s>`, ...) stays ordinary when the file types it as a normal BPE entry (see
//! `GgufVocab::marker_id`).
//!
//! Control (type 3) and unknown (type 2) tokens become *special* added tokens; user-defined
//! (type 4) tokens become plain added tokens. So `encode` splits `<|im_start|>` out as one id, as
//! llama.cpp does with `parse_special = true`; `set_encode_special_tokens(true)` gives llama.cpp's
//! `parse_special = false` (control tokens are then ordinary text, user-defined ones still match).
//! `encode` never adds BOS/EOS: the engine prepends [`SpecialTokens::bos`] when `add_bos` is set.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

use crate::{Error, Result};

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp `llama_token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// Texts that end generation whatever their type: llama.cpp's `special_eog_ids` text list
/// (`llama_vocab::impl::load`), which also makes them control tokens ([`FORCED_CONTROL`]).
#[rustfmt::skip]
const EOG_TEXTS: [&str; 22] = [
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>", "[e~[",
];

/// Fill-in-the-middle pad, repository and file-separator markers, which llama.cpp also counts as
/// end of generation: the metadata key, else the first of the texts the vocabulary has.
const EOG_FIM: [(&str, &[&str]); 3] = [
    (
        "tokenizer.ggml.fim_pad_token_id",
        &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    ),
    (
        "tokenizer.ggml.fim_rep_token_id",
        &[
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
        ],
    ),
    ("tokenizer.ggml.fim_sep_token_id", &["<|file_sep|>"]),
];

/// Texts llama.cpp turns into control tokens whatever their GGUF type (its end-of-generation and
/// fill-in-the-middle detection in `llama_vocab::impl::load`), so they split out as one id.
#[rustfmt::skip]
const FORCED_CONTROL: [&str; 47] = [
    // end of generation / turn
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>", "[e~[",
    // fill in the middle
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\u{ff5c}fim\u{2581}begin\u{ff5c}>", "<PRE>",
    "\u{2581}<PRE>", "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
    "<\u{ff5c}fim\u{2581}hole\u{ff5c}>", "<SUF>", "\u{2581}<SUF>", "<|fim_middle|>", "<fim-middle>",
    "<fim_middle>", "<\u{ff5c}fim\u{2581}end\u{ff5c}>", "<MID>", "\u{2581}<MID>", "<|fim_pad|>",
    "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>", "<|file_sep|>",
];

/// GPT-2's split regex as llama.cpp writes it (its hand-written matcher also applies the trailing
/// `\s+` alternative, which HF's `ByteLevel` includes too).
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama-3's split regex, with llama.cpp's case-insensitive contractions spelled out.
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex: Llama-3's with single digits.
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Build the tokenizer described by a GGUF file's metadata. See the module docs for the rules.
pub fn from_gguf(content: &gguf_file::Content) -> Result<Tokenizer> {
    let vocab = GgufVocab::read(content)?;
    let mut tokenizer = match vocab.model.as_str() {
        "gpt2" => byte_level_bpe(content, &vocab)?,
        "llama" => sentencepiece_bpe(content, &vocab)?,
        other => {
            return Err(Error::Tokenizer(format!(
                "GGUF tokenizer model '{}' is not supported (supported: gpt2, llama)",
                crate::error::shown(other)
            )))
        }
    };
    add_special_tokens(&mut tokenizer, &vocab, content)?;
    Ok(tokenizer)
}

/// Read a Hugging Face `tokenizer.json`.
pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
    let path = path.as_ref();
    Tokenizer::from_file(path)
        .map_err(|e| Error::Tokenizer(one_line(&format!("{}: {e}", path.display()))))
}

/// The token ids the engine needs around a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning-of-sequence token, if the model has one.
    pub bos: Option<u32>,
    /// Whether a prompt must start with `bos` (`tokenizer.ggml.add_bos_token`, else llama.cpp's
    /// default for the tokenizer type). Chat templates that print `bos_token` themselves already
    /// put it in the text; the engine must not add it twice.
    pub add_bos: bool,
    /// End-of-sequence token.
    pub eos: u32,
    /// Every token that ends generation, as llama.cpp's `llama_vocab_is_eog` decides: `eos`,
    /// `tokenizer.ggml.eot_token_id` and `tokenizer.ggml.eom_token_id` first, then the
    /// vocabulary's end-of-turn texts ([`EOG_TEXTS`]: `<|eot_id|>`, `<|eom_id|>`, `<|im_end|>`,
    /// `<|endoftext|>`, ...) and fill-in-the-middle pad/repo/file markers, by id. No duplicates.
    pub stop: Vec<u32>,
}

impl SpecialTokens {
    /// Read the special token ids from GGUF metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let vocab = GgufVocab::read(content)?;
        let n = vocab.tokens.len();
        let in_vocab = |key: &str| -> Result<Option<u32>> {
            match meta_u32(content, key)? {
                Some(id) if (id as usize) < n => Ok(Some(id)),
                Some(id) => Err(Error::Tokenizer(format!(
                    "{key} = {id} is outside the vocabulary of {n} tokens"
                ))),
                None => Ok(None),
            }
        };
        let bos = in_vocab("tokenizer.ggml.bos_token_id")?;
        let eos = match in_vocab("tokenizer.ggml.eos_token_id")? {
            Some(id) => id,
            None => ["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"]
                .iter()
                .find_map(|t| vocab.id_of(t))
                .ok_or_else(|| {
                    Error::Tokenizer(
                        "GGUF has no tokenizer.ggml.eos_token_id and no known EOS token".into(),
                    )
                })?,
        };
        let add_bos = match content.metadata.get("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => *b,
            // llama.cpp's defaults: SentencePiece and the Llama-3 family add BOS, other BPEs don't.
            _ => vocab.model == "llama" || pre_type(content)?.is_some_and(|p| is_llama3_family(&p)),
        };
        let eot = in_vocab("tokenizer.ggml.eot_token_id")?;
        let eom = in_vocab("tokenizer.ggml.eom_token_id")?;
        let mut fim = Vec::new();
        for (key, texts) in EOG_FIM {
            let named = || texts.iter().find_map(|t| vocab.marker_id(t));
            fim.extend(in_vocab(key)?.or_else(named));
        }
        let stop = eog_ids(&vocab, [Some(eos), eot, eom], fim);
        Ok(Self {
            bos,
            add_bos,
            eos,
            stop,
        })
    }
}

/// llama.cpp's end-of-generation set: the metadata ids in `first` (in that order), then the FIM
/// markers in `fim` and every [`EOG_TEXTS`] entry of the vocabulary, ascending. Two of llama.cpp's
/// exceptions are kept: `<|end|>` is no end when the vocabulary also has `<|return|>` or `<|flush|>`
/// and `<|call|>`/`<|calls|>` (gpt-oss, solar-open), and `</s>` is none next to `<|tool_response>`
/// or `<|plamo:eos|>` (gemma4, plamo).
fn eog_ids(vocab: &GgufVocab, first: [Option<u32>; 3], fim: Vec<u32>) -> Vec<u32> {
    let named = EOG_TEXTS.iter().filter_map(|t| vocab.marker_id(t));
    let mut rest: Vec<u32> = fim.into_iter().chain(named).collect();
    rest.sort_unstable();
    let mut stop: Vec<u32> = Vec::new();
    for id in first.into_iter().flatten().chain(rest) {
        if !stop.contains(&id) {
            stop.push(id);
        }
    }
    let text = |id: u32| vocab.tokens[id as usize].as_str();
    let has = |names: &[&str]| stop.iter().any(|&id| names.contains(&text(id)));
    let call = has(&["<|call|>", "<|calls|>"]);
    let drop_end = call && (has(&["<|return|>"]) || has(&["<|flush|>"]));
    let drop_s = has(&["<|tool_response>", "<|plamo:eos|>"]);
    stop.retain(|&id| !((drop_end && text(id) == "<|end|>") || (drop_s && text(id) == "</s>")));
    stop
}

/// The vocabulary arrays shared by every tokenizer type.
struct GgufVocab {
    model: String,
    tokens: Vec<String>,
    /// One per token; all `TYPE_NORMAL` when the file has no `token_type` array.
    types: Vec<i32>,
    /// Whether `types` came from the file.
    typed: bool,
    /// Text → id; a repeated text maps to its last id, as in llama.cpp's `token_to_id`.
    ids: HashMap<String, u32>,
}

impl GgufVocab {
    fn read(content: &gguf_file::Content) -> Result<Self> {
        let model = meta_string(content, "tokenizer.ggml.model")?
            .ok_or_else(|| Error::Tokenizer("GGUF has no tokenizer.ggml.model".into()))?;
        let tokens = meta_strings(content, "tokenizer.ggml.tokens")?
            .ok_or_else(|| Error::Tokenizer("GGUF has no tokenizer.ggml.tokens".into()))?;
        let types = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => {
                let types = meta_array(v, "tokenizer.ggml.token_type")?
                    .iter()
                    .map(|t| value_i64(t).map(|t| t as i32))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        Error::Tokenizer("tokenizer.ggml.token_type holds non-integers".into())
                    })?;
                if types.len() != tokens.len() {
                    return Err(Error::Tokenizer(format!(
                        "tokenizer.ggml.token_type has {} entries for {} tokens",
                        types.len(),
                        tokens.len()
                    )));
                }
                types
            }
            None => vec![TYPE_NORMAL; tokens.len()],
        };
        let typed = content.metadata.contains_key("tokenizer.ggml.token_type");
        let ids = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        Ok(Self {
            model,
            tokens,
            types,
            typed,
            ids,
        })
    }

    fn id_of(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// The id of a marker named by text ([`FORCED_CONTROL`], [`EOG_TEXTS`], [`EOG_FIM`]), unless
    /// the file types it as an ordinary BPE entry. llama.cpp takes those too, but an ordinary entry
    /// is no marker: Qwen's `</s>` (id 128247) is a piece its own tokenizer never produces (it
    /// splits "</s>" into `</`, `s`, `>`), and treating it as control changes the ids of any text
    /// with "</s>" in it.
    fn marker_id(&self, text: &str) -> Option<u32> {
        let id = self.id_of(text)?;
        (!self.typed || self.types[id as usize] != TYPE_NORMAL).then_some(id)
    }

    fn bpe_vocab(&self) -> Vocab {
        self.tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect()
    }
}

/// `gpt2` vocabularies: regex splits chosen by `tokenizer.ggml.pre`, byte-level BPE by merge rank.
fn byte_level_bpe(content: &gguf_file::Content, vocab: &GgufVocab) -> Result<Tokenizer> {
    let pre = pre_type(content)?.unwrap_or_else(|| "default".to_string());
    let ignore_merges = is_llama3_family(&pre);
    let pre_tokenizer = gpt2_pre_tokenizer(&pre)?;

    let raw = meta_strings(content, "tokenizer.ggml.merges")?.ok_or_else(|| {
        Error::Tokenizer("GGUF gpt2 tokenizer has no tokenizer.ggml.merges".into())
    })?;
    // llama.cpp splits each merge at the first space after the first byte; a merge whose halves or
    // result are not tokens can never fire there, and HF's BPE rejects it, so drop it.
    let merges = raw
        .iter()
        .filter_map(|m| {
            let cut = m.bytes().skip(1).position(|b| b == b' ')? + 1;
            let (a, b) = (&m[..cut], &m[cut + 1..]);
            let ok = vocab.ids.contains_key(a)
                && vocab.ids.contains_key(b)
                && vocab.ids.contains_key(&format!("{a}{b}"));
            ok.then(|| (a.to_string(), b.to_string()))
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.bpe_vocab(), merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| Error::Tokenizer(one_line(&format!("building BPE: {e}"))))?;

    let mut tokenizer = Tokenizer::new(bpe);
    if is_qwen2_family(&pre) {
        // Qwen's tokenizer.json composes the text (NFC) before splitting; llama.cpp skips that
        // step, so decomposed accents ("e" + U+0301) would get ids the model never saw in training.
        tokenizer
            .with_normalizer(Some(NFC))
            .map_err(|e| Error::Tokenizer(one_line(&format!("normalizer: {e}"))))?;
    }
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// llama.cpp's `llm_tokenizer_bpe` regex list for a `tokenizer.ggml.pre` name, as an HF pre-tokenizer.
fn gpt2_pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    // GPT-2's byte-to-unicode map, applied after the splits.
    let bytes_only = || PreTokenizerWrapper::from(ByteLevel::new(false, true, false));
    let with_gpt2_regex = || PreTokenizerWrapper::from(ByteLevel::new(false, true, true));
    let wrapper = match pre {
        "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion" => with_gpt2_regex(),
        // `\p{N}` isolated first: every digit its own piece.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            PreSequence::new(vec![Digits::new(true).into(), with_gpt2_regex()]).into()
        }
        p if is_llama3_family(p) => regex_splits(&[LLAMA3_REGEX], bytes_only())?,
        p if is_qwen2_family(p) || p == "stablelm2" => regex_splits(&[QWEN2_REGEX], bytes_only())?,
        "falcon" => regex_splits(
            &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_REGEX, "[0-9][0-9][0-9]"],
            bytes_only(),
        )?,
        // llama.cpp's fallback list for BPE models without a known pre-tokenizer.
        "default" => regex_splits(
            &[
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_REGEX,
                r"\p{N}+",
                "[0-9][0-9][0-9]",
            ],
            bytes_only(),
        )?,
        other => {
            let supported = "smollm, starcoder, gpt-2, llama-bpe, qwen2, falcon, default, aliases";
            return Err(Error::Tokenizer(format!(
                "GGUF pre-tokenizer '{}' is not supported (supported: {supported})",
                crate::error::shown(other)
            )));
        }
    };
    Ok(wrapper)
}

/// Each regex splits every piece again, keeping both the matches and the text between them
/// (llama.cpp's `unicode_regex_split`, HF's `Split` with `Isolated`), then `last` runs.
fn regex_splits(regexes: &[&str], last: PreTokenizerWrapper) -> Result<PreTokenizerWrapper> {
    let mut steps = regexes
        .iter()
        .map(|r| {
            Split::new(
                SplitPattern::Regex((*r).to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map(PreTokenizerWrapper::from)
            .map_err(|e| Error::Tokenizer(one_line(&format!("split regex {r}: {e}"))))
        })
        .collect::<Result<Vec<_>>>()?;
    steps.push(last);
    Ok(PreSequence::new(steps).into())
}

fn is_llama3_family(pre: &str) -> bool {
    matches!(
        pre,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
    )
}

/// Pre-tokenizer names of the Qwen2/2.5/3 vocabulary (whose tokenizer.json normalizes to NFC).
fn is_qwen2_family(pre: &str) -> bool {
    matches!(pre, "qwen2" | "deepseek-r1-qwen")
}

/// `llama` (SentencePiece) vocabularies: BPE whose merge ranks come from the merged piece's score.
fn sentencepiece_bpe(content: &gguf_file::Content, vocab: &GgufVocab) -> Result<Tokenizer> {
    let scores = match content.metadata.get("tokenizer.ggml.scores") {
        Some(v) => meta_array(v, "tokenizer.ggml.scores")?
            .iter()
            .map(|s| match s {
                Value::F32(f) => Some(*f),
                other => value_i64(other).map(|i| i as f32),
            })
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| Error::Tokenizer("tokenizer.ggml.scores holds non-numbers".into()))?,
        None => vec![0.0; vocab.tokens.len()],
    };
    if scores.len() != vocab.tokens.len() {
        return Err(Error::Tokenizer(format!(
            "tokenizer.ggml.scores has {} entries for {} tokens",
            scores.len(),
            vocab.tokens.len()
        )));
    }
    let add_space_prefix = match content.metadata.get("tokenizer.ggml.add_space_prefix") {
        Some(Value::Bool(b)) => *b,
        _ => true,
    };

    let merges = spm_merges(vocab, &scores);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.bpe_vocab(), merges)
        .byte_fallback(true)
        .build()
        .map_err(|e| Error::Tokenizer(one_line(&format!("building BPE: {e}"))))?;

    let replace = |from: &str, to: &str| {
        Replace::new(from, to)
            .map_err(|e| Error::Tokenizer(one_line(&format!("replace {from:?}: {e}"))))
    };
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        // HF normalizes each fragment between added tokens separately, which gives llama.cpp's
        // "prefix a space at the start and after every special token".
        normalizers.push(Prepend::new("▁".to_string()).into());
    }
    normalizers.push(replace(" ", "▁")?.into());
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace("▁", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| Error::Tokenizer(one_line(&format!("normalizer: {e}"))))?;
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// Every split `a + b = t` of a token `t` whose halves are tokens, ordered by `t`'s score, highest
/// first (ties: lower id first; llama.cpp prefers the leftmost pair there). Control, unknown and
/// byte tokens are no merge targets: llama.cpp would merge literal text such as `"<s>"` or
/// `"<0x0A>"` into them, a quirk not copied.
fn spm_merges(vocab: &GgufVocab, scores: &[f32]) -> Vec<(String, String)> {
    let mut targets: Vec<usize> = (0..vocab.tokens.len())
        .filter(|&i| !matches!(vocab.types[i], TYPE_CONTROL | TYPE_UNKNOWN | TYPE_BYTE))
        .filter(|&i| vocab.ids.get(&vocab.tokens[i]) == Some(&(i as u32)))
        .collect();
    targets.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut merges = Vec::new();
    for i in targets {
        let text = &vocab.tokens[i];
        for (cut, _) in text.char_indices().skip(1) {
            let (a, b) = text.split_at(cut);
            if vocab.ids.contains_key(a) && vocab.ids.contains_key(b) {
                merges.push((a.to_string(), b.to_string()));
            }
        }
    }
    merges
}

/// Control, unknown and [`FORCED_CONTROL`] tokens become special added tokens; user-defined
/// tokens become plain added tokens (always matched, kept when decoding with `skip_special_tokens`).
///
/// llama.cpp also swallows the whitespace after every added token of a Phi-3 model (named by
/// `general.name`) except `<unk>`, `<s>` and `<|endoftext|>`; `rstrip` does the same here.
fn add_special_tokens(
    tokenizer: &mut Tokenizer,
    vocab: &GgufVocab,
    content: &gguf_file::Content,
) -> Result<()> {
    let name = meta_string(content, "general.name")?
        .unwrap_or_default()
        .to_lowercase();
    let phi3 = name.contains("phi-3") || name.contains("phi3");
    let mut special = Vec::new();
    let mut plain = Vec::new();
    for (text, ty) in vocab.tokens.iter().zip(&vocab.types) {
        let forced =
            || FORCED_CONTROL.contains(&text.as_str()) && (!vocab.typed || *ty != TYPE_NORMAL);
        match *ty {
            TYPE_CONTROL | TYPE_UNKNOWN => special.push(text),
            _ if forced() => special.push(text),
            TYPE_USER_DEFINED => plain.push(text),
            _ => {}
        }
    }
    let added = |texts: Vec<&String>, is_special: bool| -> Vec<AddedToken> {
        texts
            .into_iter()
            .filter(|t| !t.is_empty())
            .map(|t| {
                let rstrip = phi3 && !matches!(t.as_str(), "<unk>" | "<s>" | "<|endoftext|>");
                AddedToken::from(t.clone(), is_special)
                    .normalized(false)
                    .rstrip(rstrip)
            })
            .collect()
    };
    tokenizer
        .add_special_tokens(added(special, true))
        .map_err(|e| Error::Tokenizer(one_line(&format!("adding special tokens: {e}"))))?;
    tokenizer
        .add_tokens(added(plain, false))
        .map_err(|e| Error::Tokenizer(one_line(&format!("adding user-defined tokens: {e}"))))?;
    Ok(())
}

fn pre_type(content: &gguf_file::Content) -> Result<Option<String>> {
    Ok(meta_string(content, "tokenizer.ggml.pre")?.filter(|p| !p.is_empty()))
}

fn meta_string(content: &gguf_file::Content, key: &str) -> Result<Option<String>> {
    match content.metadata.get(key) {
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Error::Tokenizer(format!("{key} is not a string"))),
        None => Ok(None),
    }
}

fn meta_strings(content: &gguf_file::Content, key: &str) -> Result<Option<Vec<String>>> {
    let Some(v) = content.metadata.get(key) else {
        return Ok(None);
    };
    meta_array(v, key)?
        .iter()
        .map(|s| match s {
            Value::String(s) => Ok(s.clone()),
            _ => Err(Error::Tokenizer(format!("{key} holds a non-string"))),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn meta_array<'a>(v: &'a Value, key: &str) -> Result<&'a Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        _ => Err(Error::Tokenizer(format!("{key} is not an array"))),
    }
}

/// A GGUF integer of any width as a token id.
fn meta_u32(content: &gguf_file::Content, key: &str) -> Result<Option<u32>> {
    match content.metadata.get(key) {
        None => Ok(None),
        Some(v) => value_i64(v)
            .and_then(|i| u32::try_from(i).ok())
            .map(Some)
            .ok_or_else(|| Error::Tokenizer(format!("{key} is not a token id"))),
    }
}

fn value_i64(v: &Value) -> Option<i64> {
    match v {
        Value::U8(x) => Some(i64::from(*x)),
        Value::I8(x) => Some(i64::from(*x)),
        Value::U16(x) => Some(i64::from(*x)),
        Value::I16(x) => Some(i64::from(*x)),
        Value::U32(x) => Some(i64::from(*x)),
        Value::I32(x) => Some(i64::from(*x)),
        Value::U64(x) => i64::try_from(*x).ok(),
        Value::I64(x) => Some(*x),
        _ => None,
    }
}

/// Error text from dependencies can span lines; ours is always one.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests;
