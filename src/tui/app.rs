//! The chat screen's state and `update`, which turns one [`Msg`] into a new state plus the
//! [`Effect`]s the event loop must carry out (engine commands, saves, file reads). No I/O and no
//! clock here: time arrives as `Msg::Tick`, so every state can be rebuilt in a test.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::AppConfig;
use crate::engine::GenerateRequest;
use crate::model::source::DownloadProgress;
use crate::sampling::SamplingConfig;
use crate::slim::schedule::SlimConfig;

use super::editor::Editor;
use super::store::{Attachment, ChatMessage, Conversation, Role};
use super::tokens::TokenCounter;
use super::turns;
use super::worker::{EngineCmd, WorkerEvent};

mod engine_events;
mod overflow;

pub use overflow::Offer;

/// Slash commands, for the help overlay.
pub const COMMANDS: &[(&str, &str)] = &[
    (
        "/read PATH",
        "attach a UTF-8 text file (sent with the next message)",
    ),
    ("/system TEXT", "set the system prompt (empty: show it)"),
    (
        "/clear",
        "start a new conversation (the old one stays saved)",
    ),
    ("/regen", "answer the last question again"),
    (
        "/compare",
        "re-run the last question dense and pruned, side by side",
    ),
    ("/export [PATH]", "Markdown to PATH, else to exports/"),
    ("/help", "this help"),
    ("/quit", "leave (the conversation is saved)"),
];

/// Step of the keep-ratio knob.
pub const RATIO_STEP: f32 = 0.05;

/// Everything that can change the screen's state.
#[derive(Debug, Clone)]
pub enum Msg {
    /// Time since the screen started (drives the TTFT clock and the ETA).
    Tick(Duration),
    Worker(WorkerEvent),
    Insert(char),
    Paste(String),
    Newline,
    Backspace,
    Delete,
    Left,
    Right,
    Up,
    Down,
    Home,
    End,
    KillLine,
    Submit,
    /// Esc: stop the answer, else cancel the overflow offer, close the help or the message.
    Stop,
    /// The overflow offer's `d`: leave out the oldest turns and send the message.
    DropOldest,
    /// The overflow offer's `n`: a new conversation with the same documents, and send there.
    NewWithDocuments,
    /// Ctrl+C: stop the answer; a second one (or one while idle) quits.
    Interrupt,
    Quit,
    ScrollUp(usize),
    ScrollDown(usize),
    PageUp,
    PageDown,
    ScrollBottom,
    ToggleHelp,
    RatioUp,
    RatioDown,
    TogglePruning,
    Regenerate,
    Compare,
    ToggleChips,
    /// The result of an `Effect::ReadFile`.
    FileRead {
        path: PathBuf,
        result: Result<String, String>,
    },
    /// A save or a write failed.
    IoError(String),
    /// A one-line notice for the status line (a save that works again, a data dir made private).
    Notice(String),
    /// The result of an `Effect::Export`.
    Exported {
        path: PathBuf,
        result: Result<(), String>,
    },
}

/// What the event loop must do after an update.
#[derive(Debug, Clone)]
pub enum Effect {
    Engine(EngineCmd),
    /// Save the conversation now.
    Save,
    /// Append one line to metrics.jsonl.
    Metrics(serde_json::Value),
    ReadFile(PathBuf),
    /// Write the conversation as Markdown to this path (`None`: the data dir's `exports/`).
    Export(Option<PathBuf>),
}

/// Model facts, known once it has loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    /// 0: unknown (a remote engine that does not say).
    pub context_length: usize,
    pub n_layers: usize,
    /// Whether the pruning knob reaches the engine.
    pub pruning: bool,
    /// The server's URL when the engine is remote.
    pub remote: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Chat,
    Compare,
}

/// The request in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct Running {
    pub kind: RequestKind,
    /// Clock value when it was sent.
    pub started: Duration,
    /// Clock value at the first answer text.
    pub first_token: Option<Duration>,
    /// (layers done, layers, prompt tokens, rows in the last layer) of the current prefill.
    pub prefill: Option<(usize, usize, usize, usize)>,
    /// Clock value of the current prefill's first progress report.
    pub prefill_started: Option<Duration>,
    /// Tokens of the whole prompt (conversation so far plus the new message), once known.
    pub prompt_tokens: Option<usize>,
    pub tokens: usize,
    pub stopping: bool,
    /// The engine's latest memory reading during this request.
    pub memory: Option<crate::metrics::MemoryNow>,
    /// Clock value when the answer began bringing back what the prompt's pruning dropped
    /// (`heal_answers`), and how long that took once done.
    pub healing: Option<Duration>,
    pub heal_ms: Option<f64>,
}

/// Numbers of the last finished request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LastStats {
    pub ttft_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub kv_bytes: usize,
    /// KV bytes in the fast tier and in the host tier (0 when every block is resident).
    pub kv_fast_bytes: usize,
    pub kv_host_bytes: usize,
    pub rss_bytes: u64,
    pub kept_per_layer: Vec<usize>,
    /// The pruned blocks came back after the answer (or in this follow-up, or one before it):
    /// every layer keeps the whole conversation again.
    pub whole_again: bool,
    /// The answer brought them back after its first token, in this long (`heal_answers`).
    pub heal_ms: Option<f64>,
    /// Stopped (Esc) before its first token: no TTFT or rates to show.
    pub stopped_before_answer: bool,
    pub slim: bool,
    /// The preset whose schedule applied (see `GenStats::slim_preset`).
    pub slim_preset: String,
    /// GPU memory, when the model runs on one.
    pub gpu_memory: Option<crate::metrics::GpuMemory>,
}

impl LastStats {
    /// The request's memory at its end, as the live readings give it.
    pub fn memory(&self) -> crate::metrics::MemoryNow {
        let resident = self.kv_host_bytes == 0;
        crate::metrics::MemoryNow {
            kv_fast_bytes: if resident {
                self.kv_bytes
            } else {
                self.kv_fast_bytes
            },
            kv_host_bytes: self.kv_host_bytes,
            rss_bytes: self.rss_bytes,
            gpu: self.gpu_memory,
        }
    }
}

/// A one-line message at the bottom.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub text: String,
    pub error: bool,
}

/// What the last draw learned about the layout (the loop copies it in after each draw).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct View {
    pub max_scroll: usize,
    pub page: usize,
}

#[derive(Debug, Clone)]
pub struct App {
    pub conv: Conversation,
    pub editor: Editor,
    /// Pasted texts and attached files waiting to be sent with the next message.
    pub chips: Vec<Attachment>,
    /// Show the text of chips and attachments instead of one line each.
    pub expanded: bool,
    pub model: Option<ModelInfo>,
    /// Download progress while the model loads.
    pub loading: Option<DownloadProgress>,
    pub load_error: Option<String>,
    pub running: Option<Running>,
    pub last: Option<LastStats>,
    pub status: Option<Status>,
    /// The message did not fit: what leaving out the oldest turns would do (keys d, n, Esc).
    pub offer: Option<Offer>,
    pub help: bool,
    /// Lines scrolled up from the bottom of the transcript (0 = follow the answer).
    pub scroll: usize,
    pub view: View,
    pub clock: Duration,
    pub slim: SlimConfig,
    pub sampling: SamplingConfig,
    pub max_tokens: usize,
    /// Pastes at least this long become a chip.
    pub chip_chars: usize,
    pub quit: bool,
    /// The conversation changed since the last save (set while streaming).
    pub dirty: bool,
    /// Counts the tokens of text not sent yet (exact once the model has loaded).
    pub tokens: TokenCounter,
    ctrl_c_armed: bool,
}

/// `12345` as `12,345`.
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl App {
    pub fn new(cfg: &AppConfig, conv: Option<Conversation>) -> Self {
        let conv = conv.unwrap_or_else(|| Conversation::new(cfg.chat.system_prompt.clone()));
        Self {
            conv,
            editor: Editor::default(),
            chips: Vec::new(),
            expanded: false,
            model: None,
            loading: None,
            load_error: None,
            running: None,
            last: None,
            status: None,
            offer: None,
            help: false,
            scroll: 0,
            view: View::default(),
            clock: Duration::ZERO,
            slim: cfg.slim.clone(),
            sampling: cfg.sampling.clone(),
            max_tokens: cfg.chat.max_tokens,
            chip_chars: cfg.tui.paste_chip_chars,
            quit: false,
            dirty: false,
            tokens: TokenCounter::default(),
            ctrl_c_armed: false,
        }
    }

    pub fn busy(&self) -> bool {
        self.running.is_some()
    }

    /// Tokens of the context in use: the running request's prompt plus its answer so far, or
    /// the last request's prompt plus answer.
    pub fn context_used(&self) -> usize {
        if let Some(Running {
            prompt_tokens: Some(p),
            tokens,
            ..
        }) = &self.running
        {
            return p + tokens;
        }
        self.last
            .as_ref()
            .map_or(0, |l| l.prompt_tokens + l.generated_tokens)
    }

    /// Tokens the next message adds (typed text and chips, plus about 8 of turn markup).
    pub fn pending_tokens(&self) -> usize {
        let text = self.editor.text();
        if text.is_empty() && self.chips.is_empty() {
            return 0;
        }
        let chips: usize = self
            .chips
            .iter()
            .map(|c| self.tokens.count(&c.text).tokens)
            .sum();
        self.tokens.count(&text).tokens + chips + 8
    }

    /// The one-line label of a chip: `pasted 41,203 chars · 10,301 tokens` (`~10,301` while
    /// the count is an estimate, before the model has loaded).
    pub fn chip_label(&self, a: &Attachment) -> String {
        let count = self.tokens.count(&a.text);
        format!(
            "{} {} chars · {}{} tokens",
            a.label,
            thousands(a.text.chars().count()),
            if count.exact { "" } else { "~" },
            thousands(count.tokens)
        )
    }

    /// `Some((prompt tokens, context))` when the next message will not fit.
    pub fn overflow_warning(&self) -> Option<(usize, usize)> {
        let ctx = self.model.as_ref()?.context_length;
        if ctx == 0 {
            return None;
        }
        let pending = self.pending_tokens();
        let next = self.context_used() + pending;
        (pending > 0 && next >= ctx).then_some((next, ctx))
    }

    fn say(&mut self, text: impl Into<String>) {
        self.status = Some(Status {
            text: text.into(),
            error: false,
        });
    }

    fn fail(&mut self, text: impl Into<String>) {
        self.status = Some(Status {
            text: text.into(),
            error: true,
        });
    }

    /// The conversation as the model sees it: system prompt, then users and answers (the
    /// turns left out of the context excepted).
    fn request(&self) -> GenerateRequest {
        turns::chat_request(&self.conv, self.max_tokens, &self.sampling, false).req
    }

    fn start(&mut self, kind: RequestKind) {
        self.running = Some(Running {
            kind,
            started: self.clock,
            first_token: None,
            prefill: None,
            prefill_started: None,
            prompt_tokens: None,
            tokens: 0,
            stopping: false,
            memory: None,
            healing: None,
            heal_ms: None,
        });
        self.scroll = 0;
        self.ctrl_c_armed = false;
    }

    /// Sends the conversation with an empty answer appended; `drop_oldest`: leave out the
    /// oldest turns without asking if it does not fit.
    fn send_chat(&mut self, drop_oldest: bool) -> Vec<Effect> {
        let req = turns::chat_request(&self.conv, self.max_tokens, &self.sampling, drop_oldest);
        let mut answer = ChatMessage::new(Role::Assistant, "");
        answer.partial = true;
        self.conv.messages.push(answer);
        self.start(RequestKind::Chat);
        vec![Effect::Engine(EngineCmd::Generate(req)), Effect::Save]
    }

    fn ready_to_send(&mut self) -> bool {
        if let Some(e) = &self.load_error {
            let e = e.clone();
            self.fail(e);
            return false;
        }
        if self.model.is_none() {
            self.fail("the model is still loading");
            return false;
        }
        if self.busy() {
            self.fail("an answer is running: wait, or press Esc to stop it");
            return false;
        }
        true
    }

    fn submit(&mut self, drop_oldest: bool) -> Vec<Effect> {
        let text = self.editor.text();
        if let Some(cmd) = text.trim_start().strip_prefix('/') {
            if !cmd.starts_with('/') && !cmd.contains('\n') {
                return self.command(cmd.trim().to_string());
            }
        }
        if text.trim().is_empty() && self.chips.is_empty() {
            return vec![];
        }
        if !self.ready_to_send() {
            return vec![];
        }
        let mut user = ChatMessage::new(Role::User, text.trim_end());
        user.attachments = std::mem::take(&mut self.chips);
        self.conv.messages.push(user);
        self.editor.clear();
        self.status = None;
        self.send_chat(drop_oldest)
    }

    fn command(&mut self, line: String) -> Vec<Effect> {
        let (name, arg) = line
            .split_once(char::is_whitespace)
            .map_or((line.as_str(), ""), |(n, a)| (n, a.trim()));
        let arg = arg.to_string();
        let mut effects = Vec::new();
        match name {
            "read" if !arg.is_empty() => effects.push(Effect::ReadFile(PathBuf::from(arg))),
            "system" if arg.is_empty() => {
                let s = if self.conv.system.is_empty() {
                    "(none: the chat template's default)".to_string()
                } else {
                    self.conv.system.clone()
                };
                self.say(format!("system prompt: {s}"));
            }
            "system" => {
                self.conv.system = arg;
                self.say("system prompt set (from the next message)");
                effects.push(Effect::Save);
            }
            "clear" => {
                if self.busy() {
                    self.fail("stop the answer first (Esc)");
                    return effects;
                }
                self.conv = Conversation::new(self.conv.system.clone());
                self.chips.clear();
                self.last = None;
                self.scroll = 0;
                self.say("new conversation");
                effects.push(Effect::Engine(EngineCmd::Reset));
            }
            "regen" => effects = self.regenerate(),
            "compare" => effects = self.compare(),
            "export" => effects.push(Effect::Export(
                (!arg.is_empty()).then(|| PathBuf::from(arg)),
            )),
            "help" => self.help = true,
            "quit" | "exit" => self.quit = true,
            "read" => {
                self.fail(format!("/{name} needs a path"));
                return effects;
            }
            _ => {
                self.fail(format!("unknown command /{name}; F1 lists them"));
                return effects;
            }
        }
        self.editor.clear();
        effects
    }

    /// Drops the last answer (if it is the last message) and asks again.
    fn regenerate(&mut self) -> Vec<Effect> {
        if !self.ready_to_send() {
            return vec![];
        }
        while let Some(m) = self.conv.messages.last() {
            match m.role {
                Role::Assistant | Role::Note => {
                    self.conv.messages.pop();
                }
                Role::User => break,
            }
        }
        if self.conv.messages.is_empty() {
            self.fail("nothing to regenerate");
            return vec![];
        }
        self.say("regenerating the last answer");
        self.send_chat(false)
    }

    fn compare(&mut self) -> Vec<Effect> {
        if !self.ready_to_send() {
            return vec![];
        }
        let Some(last_user) = self
            .conv
            .messages
            .iter()
            .rposition(|m| m.role == Role::User)
        else {
            self.fail("nothing to compare: ask a question first");
            return vec![];
        };
        let mut req = self.request();
        // Only up to the last question: drop the answers after it.
        let keep = self.conv.messages[..=last_user]
            .iter()
            .filter(|m| {
                !m.out_of_context
                    && (m.role == Role::User
                        || (m.role == Role::Assistant && !m.content.is_empty()))
            })
            .count()
            + usize::from(!self.conv.system.is_empty());
        req.messages.truncate(keep);
        self.start(RequestKind::Compare);
        self.say(format!(
            "comparing: dense, then pruned at keep {:.2} (both from an empty cache)",
            self.slim.keep_ratio
        ));
        vec![Effect::Engine(EngineCmd::Compare(req, self.slim.clone()))]
    }

    /// Whether the pruning knob works; says why not when it does not.
    fn knob_available(&mut self) -> bool {
        match &self.model {
            Some(m) if !m.pruning => {
                let url = m.remote.clone().unwrap_or_default();
                self.fail(format!(
                    "pruning is unavailable: the engine at {url} is not slimchat"
                ));
                false
            }
            _ => true,
        }
    }

    fn set_ratio(&mut self, delta: f32) -> Vec<Effect> {
        if !self.knob_available() {
            return Vec::new();
        }
        let steps = (self.slim.keep_ratio / RATIO_STEP).round() + delta;
        self.slim.keep_ratio = (steps * RATIO_STEP).clamp(RATIO_STEP, 1.0);
        self.slim.keep_ratio = (self.slim.keep_ratio * 100.0).round() / 100.0;
        self.say(format!(
            "keep ratio {:.2}{} (from the next request)",
            self.slim.keep_ratio,
            if self.slim.enabled {
                ""
            } else {
                "; pruning is off (Ctrl+P)"
            }
        ));
        vec![Effect::Engine(EngineCmd::SetPruning(self.slim.clone()))]
    }

    fn scroll_up(&mut self, n: usize) {
        self.scroll = (self.scroll + n).min(self.view.max_scroll);
    }

    fn scroll_down(&mut self, n: usize) {
        self.scroll = self.scroll.saturating_sub(n);
    }
}

/// Applies one message; returns what the event loop must do.
pub fn update(app: &mut App, msg: Msg) -> Vec<Effect> {
    match msg {
        Msg::Tick(t) => app.clock = t,
        Msg::Worker(ev) => return app.on_worker(ev),
        Msg::Insert(c) => app.editor.insert_char(c),
        Msg::Paste(text) => {
            let text = text.replace("\r\n", "\n").replace('\r', "\n");
            let chars = text.chars().count();
            if chars >= app.chip_chars {
                app.chips.push(Attachment {
                    label: "pasted".into(),
                    text,
                });
                app.say(
                    "paste kept as a chip: Ctrl+E shows it, Backspace on an empty input drops it",
                );
            } else {
                app.editor.insert_str(&text);
            }
        }
        Msg::Newline => app.editor.newline(),
        Msg::Backspace => {
            if app.editor.is_empty() && !app.chips.is_empty() {
                let chip = app.chips.pop().expect("checked");
                app.say(format!("dropped {}", app.chip_label(&chip)));
            } else {
                app.editor.backspace();
            }
        }
        Msg::Delete => app.editor.delete(),
        Msg::Left => app.editor.left(),
        Msg::Right => app.editor.right(),
        Msg::Up => {
            if !app.editor.up() {
                app.scroll_up(1);
            }
        }
        Msg::Down => {
            if !app.editor.down() {
                app.scroll_down(1);
            }
        }
        Msg::Home => app.editor.home(),
        Msg::End => app.editor.end(),
        Msg::KillLine => app.editor.kill_to_start(),
        Msg::Submit => return app.submit(false),
        Msg::DropOldest => return app.drop_oldest(),
        Msg::NewWithDocuments => return app.new_with_documents(),
        Msg::Stop => {
            if app.help {
                app.help = false;
            } else if app.offer.is_some() {
                app.cancel_offer();
            } else if let Some(r) = &mut app.running {
                r.stopping = true;
                app.say("stopping…");
                return vec![Effect::Engine(EngineCmd::Cancel)];
            } else {
                app.status = None;
            }
        }
        Msg::Interrupt => {
            if app.ctrl_c_armed || !app.busy() {
                app.quit = true;
            } else {
                app.ctrl_c_armed = true;
                if let Some(r) = &mut app.running {
                    r.stopping = true;
                }
                app.say("stopping… press Ctrl+C again to quit");
                return vec![Effect::Engine(EngineCmd::Cancel)];
            }
        }
        Msg::Quit => app.quit = true,
        Msg::ScrollUp(n) => app.scroll_up(n),
        Msg::ScrollDown(n) => app.scroll_down(n),
        Msg::PageUp => app.scroll_up(app.view.page.max(1)),
        Msg::PageDown => app.scroll_down(app.view.page.max(1)),
        Msg::ScrollBottom => app.scroll = 0,
        Msg::ToggleHelp => app.help = !app.help,
        Msg::RatioUp => return app.set_ratio(1.0),
        Msg::RatioDown => return app.set_ratio(-1.0),
        Msg::TogglePruning => {
            if !app.knob_available() {
                return Vec::new();
            }
            app.slim.enabled = !app.slim.enabled;
            app.say(format!(
                "pruning {} (from the next request)",
                if app.slim.enabled { "on" } else { "off" }
            ));
            return vec![Effect::Engine(EngineCmd::SetPruning(app.slim.clone()))];
        }
        Msg::Regenerate => return app.regenerate(),
        Msg::Compare => return app.compare(),
        Msg::ToggleChips => app.expanded = !app.expanded,
        Msg::FileRead { path, result } => match result {
            Ok(text) => {
                let chip = Attachment {
                    label: path.display().to_string(),
                    text,
                };
                app.say(format!("attached {}", app.chip_label(&chip)));
                app.chips.push(chip);
            }
            Err(e) => {
                if app.editor.is_empty() {
                    app.editor.set_text(&format!("/read {}", path.display()));
                }
                app.fail(e);
            }
        },
        Msg::IoError(e) => app.fail(e),
        Msg::Notice(text) => app.say(text),
        Msg::Exported { path, result } => match result {
            Ok(()) => app.say(format!("exported to {}", path.display())),
            Err(e) => app.fail(format!("cannot export to {}: {e}", path.display())),
        },
    }
    vec![]
}
