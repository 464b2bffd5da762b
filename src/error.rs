//! The one error type at the application boundary. Each variant names the stage that failed;
//! the message is a single line meant for the person at the terminal.

/// Errors slimchat reports to the person using it. Every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config: {}", one_line(.0))]
    Config(String),
    #[error("invalid option: {}", one_line(.0))]
    Usage(String),
    #[error("model source: {}", one_line(.0))]
    Source(String),
    #[error("model load: {}", one_line(.0))]
    ModelLoad(String),
    #[error("tokenizer: {}", one_line(.0))]
    Tokenizer(String),
    #[error("chat template: {}", one_line(.0))]
    Template(String),
    #[error("prompt: {}", one_line(.0))]
    Prompt(String),
    #[error("engine: {}", one_line(.0))]
    Engine(String),
    #[error("tensor op: {}", one_line(&.0.to_string()))]
    Candle(#[from] candle_core::Error),
    #[error("io: {}", one_line(&.0.to_string()))]
    Io(#[from] std::io::Error),
    /// The person stopped a forward between two of its layers (the engine answers with what
    /// it has; nothing is reported as an error).
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T> = std::result::Result<T, Error>;

/// The message of a caught panic.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// A message as one line of plain text: line breaks and tabs become spaces, other control
/// characters (a terminal escape in a model's metadata, say) are written escaped.
pub fn one_line(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for c in msg.chars() {
        match c {
            '\n' | '\r' | '\t' | '\u{85}' | '\u{2028}' | '\u{2029}' => out.push(' '),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    out
}

/// A name read from a file (a metadata key, a tensor name), for an error message: one line,
/// at most 80 characters.
pub fn shown(name: &str) -> String {
    let line = one_line(name);
    if line.chars().count() > 80 {
        format!("{}...", line.chars().take(77).collect::<String>())
    } else {
        line
    }
}
