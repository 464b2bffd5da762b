//! Everything about a model: where it comes from, its weights, tokenizer, chat template and forward.
pub mod gguf;
pub mod gguf_read;
pub mod gguf_write;
pub mod known_templates;
pub mod ops_llama;
pub mod pyjinja;
pub mod random;
pub mod source;
pub mod template;
pub mod tokenizer;
