//! What the chat screen keeps on disk, all under the data directory (`$SLIMCHAT_DATA_DIR`, else
//! the platform data dir, `~/.local/share/slimchat` on Linux): one JSON file per conversation in
//! `conversations/` (written atomically and durably, see [`crate::private_fs::write_atomic`]),
//! per-turn metrics appended to `metrics.jsonl`, the log `slimchat.log`, and Markdown exports
//! (`exports/` unless the person names a path). Every directory is 0700 and every file 0600 from
//! its creation; an existing tree open to others is tightened when the store opens.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::private_fs::{self, create_dir_private, open_append_private, write_atomic};
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
        let why = e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
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
    /// Left out of what is sent to the model to make room for a newer message (the oldest
    /// turns go first; shown dimmed, kept here).
    #[serde(default, skip_serializing_if = "is_false")]
    pub out_of_context: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
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
            out_of_context: false,
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
    /// Why the file does not read as a conversation (truncated, corrupt, unreadable); such a
    /// file is listed, never overwritten or deleted.
    pub damaged: Option<String>,
}

/// The data directory and the files in it.
#[derive(Debug, Clone)]
pub struct Store {
    pub dir: PathBuf,
    /// One line about what opening changed (permissions tightened), for the person to see.
    pub note: Option<String>,
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

    /// Creates the data directory (0700) if needed, takes the group's and others' permissions
    /// off an existing one and everything in it (noted in the log and in [`Store::note`]), and
    /// removes the temp files of saves that were killed.
    pub fn open(dir: &Path) -> Result<Self> {
        create_dir_private(&dir.join("conversations"))
            .map_err(|e| Error::Usage(format!("cannot create data dir {}: {e}", dir.display())))?;
        let mut store = Self {
            dir: dir.to_path_buf(),
            note: None,
        };
        // what slimchat keeps here, and nothing else: a data dir set to a wrong place must not
        // have a whole tree changed
        let mut changed = Vec::new();
        let mut err = None;
        for (path, with_entries) in [
            (dir.to_path_buf(), false),
            (dir.join("conversations"), true),
            (dir.join("exports"), true),
            (store.metrics_path(), false),
            (store.log_path(), false),
        ] {
            let (c, e) = private_fs::tighten(&path, with_entries);
            changed.extend(c);
            err = err.or(e);
        }
        if !changed.is_empty() {
            store.note = Some(format!(
                "made {} path(s) under {} private (0700 directories, 0600 files): they were open to group or others",
                changed.len(),
                dir.display()
            ));
        }
        if let Some(e) = err {
            store.note = Some(format!(
                "cannot make everything under {} private: {e}",
                dir.display()
            ));
        }
        if let Some(note) = &store.note {
            store.log(note);
        }
        let stale = store.remove_stale_temps();
        if stale > 0 {
            store.log(&format!("removed {stale} temp file(s) of killed saves"));
        }
        Ok(store)
    }

    /// Removes the temp files that killed saves left in `conversations/`; returns how many.
    fn remove_stale_temps(&self) -> usize {
        let Ok(rd) = std::fs::read_dir(self.dir.join("conversations")) else {
            return 0;
        };
        rd.filter_map(|e| e.ok())
            .filter(|e| private_fs::stale_temp(&e.file_name().to_string_lossy()))
            .filter(|e| std::fs::remove_file(e.path()).is_ok())
            .count()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("slimchat.log")
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }

    pub fn conversation_path(&self, id: &str) -> PathBuf {
        self.dir.join("conversations").join(format!("{id}.json"))
    }

    /// Where `/export` with no path writes the conversation.
    pub fn default_export_path(&self, id: &str) -> PathBuf {
        self.dir.join("exports").join(format!("{id}.md"))
    }

    /// Writes `conv` as Markdown to `path` (0600), creating `exports/` (0700) when the path is
    /// in it.
    pub fn export(&self, conv: &Conversation, path: &Path) -> Result<()> {
        let exports = self.dir.join("exports");
        if path.parent() == Some(exports.as_path()) {
            create_dir_private(&exports)?;
        }
        export_markdown(conv, path)
    }

    /// Writes the conversation to a temp file, fsyncs it and renames it over the old one, so a
    /// kill at any moment leaves either the old or the new file whole; on an error (a full
    /// disk) the old file stays as it was.
    pub fn save(&self, conv: &Conversation) -> Result<()> {
        let text = serde_json::to_vec_pretty(conv).map_err(|e| Error::Engine(e.to_string()))?;
        write_atomic(&self.conversation_path(&conv.id), &text)?;
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

    /// Every saved conversation, oldest first; a file that does not read as one is listed as
    /// damaged (and left as it is).
    pub fn list(&self) -> Result<Vec<Summary>> {
        Ok(self
            .ids()?
            .into_iter()
            .map(|id| match self.load(&id) {
                Ok(c) => Summary {
                    id,
                    title: c.title(),
                    messages: c.messages.iter().filter(|m| m.role != Role::Note).count(),
                    damaged: None,
                },
                Err(e) => Summary {
                    id,
                    title: String::new(),
                    messages: 0,
                    damaged: Some(match e {
                        Error::Usage(m) => m,
                        e => e.to_string(),
                    }),
                },
            })
            .collect())
    }

    /// Appends one JSON object as a line of `metrics.jsonl`.
    pub fn append_metrics(&self, record: &serde_json::Value) -> Result<()> {
        let mut f = open_append_private(&self.metrics_path())?;
        writeln!(f, "{record}")?;
        Ok(())
    }

    /// Appends one timestamped line to the log file (errors are ignored: the log must never
    /// break the screen).
    pub fn log(&self, line: &str) {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        if let Ok(mut f) = open_append_private(&self.log_path()) {
            let _ = writeln!(f, "{}.{:03} {line}", secs.as_secs(), secs.subsec_millis());
        }
    }
}

/// Writes `conv` as Markdown to `path` (atomically, like a save, and 0600: it holds every
/// pasted document).
pub fn export_markdown(conv: &Conversation, path: &Path) -> Result<()> {
    write_atomic(path, conv.to_markdown().as_bytes())?;
    Ok(())
}
