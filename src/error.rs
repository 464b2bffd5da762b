//! The one error type at the application boundary. Each variant names the stage that failed;
//! the message is a single line meant for the person at the terminal.

/// Errors slimchat reports to the person using it. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config: {0}")]
    Config(String),
    #[error("invalid option: {0}")]
    Usage(String),
    #[error("model source: {0}")]
    Source(String),
    #[error("model load: {0}")]
    ModelLoad(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("prompt: {0}")]
    Prompt(String),
    #[error("engine: {0}")]
    Engine(String),
    #[error("tensor op: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;
