//! A mutation fuzzer on the stable toolchain for everything slimchat reads from strangers:
//! GGUF headers and tensor tables, tokenizers built from GGUF metadata, chat templates, the
//! config file, saved conversations, and key/paste/resize sequences into the chat screen.
//!
//! [`mutate`] makes a case from a seed input and a case seed, [`targets`] and [`tui`] run a
//! case and check the rules (no panic, one-line errors, invariants), [`runner`] times cases,
//! catches panics and measures the largest allocation ([`alloc`]). `tests/fuzz.rs` runs a
//! short pass of each target with fixed seeds plus every case found so far;
//! `examples/fuzz.rs` runs long campaigns in a child process it restarts after a crash.

pub mod alloc;
pub mod mutate;
pub mod runner;
pub mod seeds;
pub mod targets;
pub mod tui;

use std::time::Duration;

/// What a campaign fuzzes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Gguf,
    Tokenizer,
    Template,
    Config,
    Conversation,
    Tui,
}

impl Target {
    pub const ALL: [Target; 6] = [
        Target::Gguf,
        Target::Tokenizer,
        Target::Template,
        Target::Config,
        Target::Conversation,
        Target::Tui,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Gguf => "gguf",
            Target::Tokenizer => "tokenizer",
            Target::Template => "template",
            Target::Config => "config",
            Target::Conversation => "conversation",
            Target::Tui => "tui",
        }
    }

    pub fn parse(name: &str) -> Option<Target> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Run one input.
    pub fn check(self, input: &[u8]) -> targets::Check {
        match self {
            Target::Gguf => targets::gguf(input),
            Target::Tokenizer => targets::tokenizer(input),
            Target::Template => targets::template(input),
            Target::Config => targets::config(input),
            Target::Conversation => targets::conversation(input),
            Target::Tui => tui::tui(input),
        }
    }

    /// The seed inputs. `real`: include the default model's header when it is cached (the
    /// cases of a campaign depend on it, so a run records whether it was used).
    pub fn corpus(self, real: bool) -> Vec<Vec<u8>> {
        let real_model = || {
            if real {
                seeds::default_model_seeds()
            } else {
                Vec::new()
            }
        };
        match self {
            Target::Gguf => {
                let mut c = vec![seeds::tiny_model()];
                c.extend(real_model());
                c
            }
            Target::Tokenizer => {
                let mut c = vec![seeds::gpt2_vocab_gguf(None), seeds::spm_vocab()];
                c.extend(real_model().into_iter().skip(1));
                c
            }
            Target::Template => seeds::templates(),
            Target::Config => seeds::configs(),
            Target::Conversation => seeds::conversations(),
            Target::Tui => vec![
                b"\x03\x00\x07\x05\x00\x00\x40\x00\x00\x09\x03\x00\x05\x03\x07hello\x09".to_vec(),
                (0u8..=255).collect(),
                b"\x05\x07\x00\x01\x02\x03\x05\x03\x05hi\x05\x0b\x04\x00\x01\x01\x06\x01".to_vec(),
            ],
        }
    }

    /// Words the mutator inserts.
    pub fn dictionary(self) -> &'static [&'static str] {
        match self {
            Target::Gguf | Target::Tokenizer => seeds::GGUF_WORDS,
            Target::Template => seeds::JINJA_WORDS,
            Target::Config => seeds::TOML_WORDS,
            Target::Conversation => seeds::JSON_WORDS,
            Target::Tui => &[],
        }
    }

    /// Bytes at the start of a seed where most mutations land (a GGUF's header and tables).
    pub fn hot_bytes(self, seed: &[u8]) -> Option<usize> {
        match self {
            Target::Gguf | Target::Tokenizer => {
                let size = seed.len() as u64;
                let content =
                    crate::model::gguf_read::read_header(std::io::Cursor::new(seed), size);
                content.ok().map(|c| c.tensor_data_offset as usize)
            }
            _ => None,
        }
    }

    /// Longest a case may take before it counts as a hang.
    pub fn time_limit(self) -> Duration {
        match self {
            // two renders that each give up after 5 s (TEMPLATE_DEADLINE)
            Target::Template => Duration::from_secs(12),
            _ => Duration::from_secs(10),
        }
    }

    /// Largest single allocation a case of `input_len` bytes may make: a few times the input
    /// (decoded values, tokenizer tables, a screen's worth of text) or a fixed floor.
    pub fn alloc_limit(self, input_len: usize) -> usize {
        let floor = match self {
            // minijinja repeats a string up to 100 MB on request
            Target::Template => 256 << 20,
            _ => 64 << 20,
        };
        floor.max(input_len.saturating_mul(64))
    }
}
