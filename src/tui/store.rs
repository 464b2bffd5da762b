//! What the chat screen keeps on disk, all under the data directory (`$SLIMCHAT_DATA_DIR`, else
//! the platform data dir, `~/.local/share/slimchat` on Linux): one JSON file per conversation in
//! `conversations/` (written atomically: temp file, then rename), per-turn metrics appended to
//! `metrics.jsonl`, the log `slimchat.log`, and Markdown export of a conversation.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Environment variable that replaces the platform data directory.
pub const DATA_DIR_ENV: &str = "SLIMCHAT_DATA_DIR";

/// Who wrote a transcript entry. `Note` entries (compare results, notices) are shown and saved
/// but never sent to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
    Note,
}

/// A pasted text or a file read with `/read`, sent in front of the typed text of its message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    /// `pasted` or the file's path.
    pub label: String,
    pub text: String,
}

/// A saved conversation's JSON, checked: its id must be a file name of its own (it names the
/// file the conversation is saved to). Errors are one line naming `origin`.
pub fn parse_conversation(text: &str, origin: &str) -> Result<Conversation> {
    let conv: Conversation = serde_json::from_str(text).map_err(|e| {
        // serde quotes the offending text, which may hold line breaks
        let why = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        Error::Usage(format!("{origin} is not a conversation: {why}"))
    })?;
    let id_ok = !conv.id.is_empty()
        && conv.id.len() <= 64
        && conv
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !id_ok {
        return Err(Error::Usage(format!(
            "{origin} is not a conversation: its id is not a plain file name"
        )));
    }
    Ok(conv)
}

/// Numbers of one answer, as shown under it and appended to `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnMetrics {
    pub ttft_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub kv_bytes: usize,
    pub slim: bool,
    pub keep_ratio: f32,
    pub stop_reason: String,
}

/// Both answers of a `/compare`: dense first, pruned second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub dense: String,
    pub dense_ttft_ms: f64,
    pub slim: String,
    pub slim_ttft_ms: f64,
    pub keep_ratio: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    /// The typed text (for a user) or the answer so far (for the assistant).
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<TurnMetrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Comparison>,
    /// True while the answer is still streaming (or was cut off by a kill).
    #[serde(default)]
    pub partial: bool,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            attachments: Vec::new(),
            metrics: None,
            comparison: None,
            partial: false,
        }
    }

    /// The text the model sees: every attachment, then the typed text.
    pub fn full_text(&self) -> String {
        let mut parts: Vec<&str> = self.attachments.iter().map(|a| a.text.as_str()).collect();
        if !self.content.is_empty() {
            parts.push(&self.content);
        }
        parts.join("\n\n")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    #[serde(default)]
    pub system: String,
    pub messages: Vec<ChatMessage>,
}

impl Conversation {
    /// A new, empty conversation whose id sorts after every earlier one.
    pub fn new(system: String) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            id: format!(
                "{:013}-{:05}",
                now.as_millis(),
                std::process::id() % 100_000
            ),
            created: now.as_secs(),
            system,
            messages: Vec::new(),
        }
    }

    /// The first line of the first user message, for lists.
    pub fn title(&self) -> String {
        let first = self.messages.iter().find(|m| m.role == Role::User);
        let text = first.map_or(String::new(), |m| {
            if m.content.trim().is_empty() {
                m.attachments
                    .first()
                    .map_or(String::new(), |a| a.label.clone())
            } else {
                m.content.clone()
            }
        });
        let line = text.lines().next().unwrap_or("").trim();
        if line.chars().count() > 60 {
            format!("{}…", line.chars().take(59).collect::<String>())
        } else if line.is_empty() {
            "(empty)".into()
        } else {
            line.to_string()
        }
    }

    /// The conversation as Markdown: system prompt, then each message under a heading.
    pub fn to_markdown(&self) -> String {
        let mut out = format!("# {}\n\n", self.title());
        if !self.system.is_empty() {
            out.push_str(&format!("**System:** {}\n\n", self.system));
        }
        for m in &self.messages {
            match m.role {
                Role::User => {
                    out.push_str("## User\n\n");
                    for a in &m.attachments {
                        out.push_str(&format!("<details><summary>{}</summary>\n\n```text\n{}\n```\n\n</details>\n\n", a.label, a.text));
                    }
                    out.push_str(&format!("{}\n\n", m.content));
                }
                Role::Assistant => {
                    out.push_str(&format!("## Assistant\n\n{}\n\n", m.content));
                    if let Some(x) = &m.metrics {
                        out.push_str(&format!(
                            "_TTFT {:.0} ms · prefill {:.1} tok/s · decode {:.1} tok/s · {} prompt tokens · pruning {}_\n\n",
                            x.ttft_ms, x.prefill_tok_s, x.decode_tok_s, x.prompt_tokens,
                            if x.slim { format!("on, keep {:.2}", x.keep_ratio) } else { "off".into() }
                        ));
                    }
                }
                Role::Note => match &m.comparison {
                    Some(c) => out.push_str(&format!(
                        "## Compare\n\n_{}_\n\n### Dense (TTFT {:.0} ms)\n\n{}\n\n### Pruned, keep {:.2} (TTFT {:.0} ms)\n\n{}\n\n",
                        super::agreement::agreement(&c.dense, &c.slim).summary(),
                        c.dense_ttft_ms, c.dense, c.keep_ratio, c.slim_ttft_ms, c.slim
                    )),
                    None => out.push_str(&format!("> {}\n\n", m.content)),
                },
            }
        }
        out
    }
}

/// One saved conversation, for `--list`.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub id: String,
    pub title: String,
    pub messages: usize,
}

/// The data directory and the files in it.
#[derive(Debug, Clone)]
pub struct Store {
    pub dir: PathBuf,
}

impl Store {
    /// `$SLIMCHAT_DATA_DIR`, else the platform data directory.
    pub fn open_default() -> Result<Self> {
        let dir = match std::env::var_os(DATA_DIR_ENV).filter(|d| !d.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => directories::ProjectDirs::from("", "", "slimchat")
                .map(|d| d.data_dir().to_path_buf())
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "no home directory for the data dir; set {DATA_DIR_ENV}"
                    ))
                })?,
        };
        Self::open(&dir)
    }

    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("conversations"))
            .map_err(|e| Error::Usage(format!("cannot create data dir {}: {e}", dir.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("slimchat.log")
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }

    fn conversation_path(&self, id: &str) -> PathBuf {
        self.dir.join("conversations").join(format!("{id}.json"))
    }

    /// Writes the conversation to a temp file and renames it over the old one, so a kill at
    /// any moment leaves either the old or the new file whole.
    pub fn save(&self, conv: &Conversation) -> Result<()> {
        let path = self.conversation_path(&conv.id);
        let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        let text = serde_json::to_vec_pretty(conv).map_err(|e| Error::Engine(e.to_string()))?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_data()?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub fn load(&self, id: &str) -> Result<Conversation> {
        let path = self.conversation_path(id);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::Usage(format!(
                "no saved conversation {id} ({}: {e})",
                path.display()
            ))
        })?;
        parse_conversation(&text, &path.display().to_string())
    }

    /// Saved conversation ids, oldest first.
    pub fn ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = std::fs::read_dir(self.dir.join("conversations"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".json").map(str::to_string)
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// The newest conversation, if any.
    pub fn latest(&self) -> Result<Option<Conversation>> {
        match self.ids()?.last() {
            Some(id) => self.load(id).map(Some),
            None => Ok(None),
        }
    }

    /// Every saved conversation, oldest first; unreadable files are skipped.
    pub fn list(&self) -> Result<Vec<Summary>> {
        Ok(self
            .ids()?
            .iter()
            .filter_map(|id| self.load(id).ok())
            .map(|c| Summary {
                id: c.id.clone(),
                title: c.title(),
                messages: c.messages.iter().filter(|m| m.role != Role::Note).count(),
            })
            .collect())
    }

    /// Appends one JSON object as a line of `metrics.jsonl`.
    pub fn append_metrics(&self, record: &serde_json::Value) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.metrics_path())?;
        writeln!(f, "{record}")?;
        Ok(())
    }

    /// Appends one timestamped line to the log file (errors are ignored: the log must never
    /// break the screen).
    pub fn log(&self, line: &str) {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
        {
            let _ = writeln!(f, "{}.{:03} {line}", secs.as_secs(), secs.subsec_millis());
        }
    }
}

/// Writes `conv` as Markdown to `path` (atomically, like a save).
pub fn export_markdown(conv: &Conversation, path: &Path) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map_or("export".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    std::fs::write(&tmp, conv.to_markdown())?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
