//! Chat template: turns a conversation into the prompt text the model was trained on.
//!
//! Models ship a Jinja template (`tokenizer.chat_template` in GGUF, `chat_template` in
//! `tokenizer_config.json`). We render it with minijinja the way Hugging Face's
//! `apply_chat_template` does with jinja2 (transformers' `_compile_jinja_template`):
//! `trim_blocks` and `lstrip_blocks` on; the variables `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`, and `tools` and `documents` as `none`; the functions
//! `raise_exception` and `strftime_now` (UTC here, the local time there); a `tojson` filter that
//! writes what Python's `json.dumps` writes ([`super::pyjinja`]); and Python string/dict methods
//! (`.strip()`, `.split()`, `.startswith()`, `.items()`, ...) from `minijinja-contrib`'s pycompat
//! layer. `tests/chat_templates.rs` checks the Llama 3.x, Qwen2.5 and Qwen3 templates against
//! jinja2's rendering. Models without a template get ChatML.
//!
//! A template is code from a stranger, so rendering is bounded: minijinja's fuel stops it after
//! [`TEMPLATE_FUEL`] instructions, its recursion limit at [`TEMPLATE_RECURSION`] levels, a
//! render that outlasts [`TEMPLATE_DEADLINE`] is given up (one instruction can be slow), there
//! is no loader (`include`, `import` and `extends` find nothing, so no file is read), and the
//! Python helpers cap what their arguments can size. A model's template that does not compile,
//! or does not render a one-message probe conversation into text that holds the message, is
//! replaced at load by its family's known format ([`super::known_templates`]) with a
//! [`ChatTemplate::note`] saying why. Memory is bounded too: the render thread may hold at most
//! [`TEMPLATE_HEAP`] plus 16 bytes per byte of the conversation's JSON, and a template that asks
//! for more (a string doubled in a loop: `ns.s = ns.s ~ ns.s`, 31 doublings ask for 2 GiB) is
//! stopped by the allocator ([`crate::heap_budget`]); that template is never run again.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use candle_core::quantized::gguf_file::{self, Value};
use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use super::known_templates::{self, CHATML};
use super::pyjinja;
use crate::{heap_budget, Error, Result};

/// Instructions one render may run: a 2000-message conversation through each known format
/// renders within it (a test checks), a runaway loop stops within about a second.
pub const TEMPLATE_FUEL: u64 = 4_000_000;
/// Longest a render may take.
pub const TEMPLATE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
/// Heap a render may hold beyond 16 bytes per byte of the conversation's JSON: a 2000-message
/// conversation renders in a few MiB.
pub const TEMPLATE_HEAP: usize = 256 << 20;
/// Nesting of calls, loops and macros one render may reach.
pub const TEMPLATE_RECURSION: usize = 100;
/// The user message of the probe render at load.
const PROBE_TEXT: &str = "slimchat probe 7f3a";

const TEMPLATE_NAME: &str = "chat_template";

/// Who said a message. Serialized as `"system"`, `"user"`, `"assistant"` for the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// A compiled-on-demand Jinja chat template and the BOS/EOS texts it may print.
///
/// Invariant: `source` compiles (checked by [`ChatTemplate::new`]), so `render` fails only on
/// errors the template raises at run time.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    /// The Unix time `strftime_now` reports; `None` reads the clock at each render.
    now: Option<i64>,
    /// Why the model's own template is not the one in use, if it is not.
    note: Option<String>,
    /// Set when a render ran past its heap budget: the template is not run again.
    over_budget: Arc<AtomicBool>,
}

/// Extra template variables (`tools`, `enable_thinking`, `date_string`, ...), as JSON.
pub type TemplateVars = serde_json::Map<String, serde_json::Value>;

impl ChatTemplate {
    /// A template from Jinja source; fails with a one-line `Template` error if it does not compile.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self> {
        let template = Self {
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            now: None,
            note: None,
            over_budget: Arc::default(),
        };
        guarded(|| template.environment().map(|_| ()))?;
        Ok(template)
    }

    /// The same template with `strftime_now` fixed at `unix_secs` (for reproducible prompts).
    pub fn with_time(mut self, unix_secs: i64) -> Self {
        self.now = Some(unix_secs);
        self
    }

    /// ChatML with no BOS/EOS texts.
    pub fn chatml() -> Self {
        Self {
            source: CHATML.to_string(),
            bos_token: String::new(),
            eos_token: String::new(),
            now: None,
            note: None,
            over_budget: Arc::default(),
        }
    }

    /// Why the model's own template was replaced at load (one line), if it was.
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// Render a one-message conversation: the template must run and print the message.
    fn probe(&self) -> Result<()> {
        let text = self.render(&[Message::user(PROBE_TEXT)], true)?;
        if text.contains(PROBE_TEXT) {
            Ok(())
        } else {
            Err(Error::Template("it does not print the messages".into()))
        }
    }

    /// `tokenizer.chat_template` from GGUF metadata, or ChatML when it is absent or empty. The
    /// BOS/EOS texts are the tokens at `tokenizer.ggml.{bos,eos}_token_id`.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let token_text = |key: &str| -> String {
            let id = content.metadata.get(key).and_then(|v| match v {
                Value::U32(i) => Some(*i as usize),
                Value::I32(i) => usize::try_from(*i).ok(),
                Value::U64(i) => usize::try_from(*i).ok(),
                _ => None,
            });
            let tokens = match content.metadata.get("tokenizer.ggml.tokens") {
                Some(Value::Array(t)) => Some(t),
                _ => None,
            };
            match (id, tokens) {
                (Some(id), Some(tokens)) => match tokens.get(id) {
                    Some(Value::String(s)) => s.clone(),
                    _ => String::new(),
                },
                _ => String::new(),
            }
        };
        let bos = token_text("tokenizer.ggml.bos_token_id");
        let eos = token_text("tokenizer.ggml.eos_token_id");
        let own = match content.metadata.get("tokenizer.chat_template") {
            Some(Value::String(s)) if !s.trim().is_empty() => {
                Self::new(s.clone(), bos.clone(), eos.clone()).and_then(|t| t.probe().map(|()| t))
            }
            Some(Value::String(_)) | None => {
                return Ok(Self {
                    bos_token: bos,
                    eos_token: eos,
                    ..Self::chatml()
                })
            }
            Some(_) => Err(Error::Template("it is not a string".into())),
        };
        let why = match own {
            Ok(t) => return Ok(t),
            Err(e) => e.to_string(),
        };
        let (name, source) = known_templates::for_vocabulary(content);
        let why = why.strip_prefix("chat template: ").unwrap_or(&why);
        let why: String = why.chars().take(200).collect();
        Ok(Self {
            source: source.to_string(),
            bos_token: bos,
            eos_token: eos,
            now: None,
            note: Some(format!(
                "the model's chat template does not work ({why}); using the {name} format instead"
            )),
            over_budget: Arc::default(),
        })
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &TemplateVars::new())
    }

    /// Render any serializable messages (with `tool_calls`, `reasoning_content`, a `tool` role,
    /// ...) and extra variables, which override the defaults (`tools` and `documents` are `none`).
    pub fn render_with<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        vars: &TemplateVars,
    ) -> Result<String> {
        if self.over_budget.load(Ordering::Acquire) {
            return Err(over_budget_error());
        }
        let messages = serde_json::to_value(messages)
            .map_err(|e| Error::Template(format!("messages: {e}")))?;
        let heap = TEMPLATE_HEAP.saturating_add(messages.to_string().len().saturating_mul(16));
        // Fuel bounds the instructions, not the work of one (a `range` of 100,000, a string
        // method on 100 MB): the render runs on its own thread and is given up at the deadline,
        // the thread finishing its fuel in the background. Its heap is bounded by the allocator,
        // which stops the thread and raises `stopped` when it asks for more.
        let (tx, rx) = std::sync::mpsc::channel();
        let stopped = Arc::new(AtomicBool::new(false));
        let this = self.clone();
        let vars = vars.clone();
        let flag = stopped.clone();
        std::thread::Builder::new()
            .name("chat-template".into())
            .stack_size(8 << 20)
            .spawn(move || {
                let budget = heap_budget::limit_current_thread(heap, flag);
                let r = guarded(|| this.render_unguarded(messages, add_generation_prompt, &vars));
                drop(budget);
                let _ = tx.send(r);
            })
            .map_err(|e| Error::Template(format!("cannot start the render: {e}")))?;
        let deadline = Instant::now() + TEMPLATE_DEADLINE;
        loop {
            match rx.recv_timeout(Duration::from_millis(10)) {
                Ok(r) => return r,
                Err(RecvTimeoutError::Timeout) if stopped.load(Ordering::Acquire) => {
                    self.over_budget.store(true, Ordering::Release);
                    return Err(over_budget_error());
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Template(
                        "the render stopped without an answer".into(),
                    ))
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::Template(format!(
                        "rendering took longer than {} s",
                        TEMPLATE_DEADLINE.as_secs()
                    )))
                }
            }
        }
    }

    fn render_unguarded(
        &self,
        messages: serde_json::Value,
        add_generation_prompt: bool,
        vars: &TemplateVars,
    ) -> Result<String> {
        let env = self.environment()?;
        let template = env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        let mut ctx = TemplateVars::new();
        ctx.insert("messages".into(), messages);
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("bos_token".into(), self.bos_token.clone().into());
        ctx.insert("eos_token".into(), self.eos_token.clone().into());
        ctx.insert("tools".into(), serde_json::Value::Null);
        ctx.insert("documents".into(), serde_json::Value::Null);
        ctx.extend(vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        template.render(ctx).map_err(template_error)
    }

    /// A minijinja environment set up like transformers' `apply_chat_template`, holding the source.
    fn environment(&self) -> Result<Environment<'static>> {
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        let now = self.now;
        env.add_function("strftime_now", move |format: String| {
            let now = now.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64)
            });
            pyjinja::strftime_now(now, &format)
        });
        env.add_filter("tojson", pyjinja::tojson);
        env.add_template_owned(TEMPLATE_NAME, self.source.clone())
            .map_err(template_error)?;
        Ok(env)
    }
}

fn over_budget_error() -> Error {
    Error::Template(format!(
        "the template asked for more than {} MiB of memory and was stopped",
        TEMPLATE_HEAP >> 20
    ))
}

thread_local! {
    /// Set while this thread compiles or renders a template.
    static IN_TEMPLATE: Cell<bool> = const { Cell::new(false) };
}

/// Run minijinja, turning a panic inside it (it has had some on odd templates: an `import`
/// alias that is a number, a reversed slice of an empty list) into a one-line error. The
/// panic hook is wrapped once so that such a panic prints nothing; any other panic goes to the
/// hook that was there before.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !IN_TEMPLATE.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was = IN_TEMPLATE.with(|t| t.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    IN_TEMPLATE.with(|t| t.set(was));
    match result {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::Template(format!(
                "the template engine failed on this template ({})",
                what.chars().take(100).collect::<String>()
            )))
        }
    }
}

fn template_error(e: minijinja::Error) -> Error {
    Error::Template(
        e.to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_compiles_and_renders() {
        let text = ChatTemplate::chatml().render(&[Message::user("hi")], true);
        assert_eq!(
            text.ok().as_deref(),
            Some("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
        );
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", "", "");
        let err = t.and_then(|t| t.render(&[], false));
        assert!(matches!(err, Err(Error::Template(m)) if m.contains("no system role")));
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new("{{ messages[0].content.strip() }}", "", "");
        let text = t.and_then(|t| t.render(&[Message::user("  x  ")], false));
        assert_eq!(text.ok().as_deref(), Some("x"));
    }

    /// A long conversation renders within the fuel through every known format; a loop that
    /// never ends runs out of it, and unbounded recursion stops at the limit: one-line errors.
    #[test]
    fn fuel_and_recursion_bound_a_render() {
        let mut msgs = vec![Message::system("sys")];
        for i in 0..1000 {
            msgs.push(Message::user(format!("question {i}")));
            msgs.push(Message::assistant(format!("answer {i}")));
        }
        for source in [CHATML, known_templates::LLAMA3, known_templates::LLAMA2] {
            let t = ChatTemplate::new(source, "<s>", "</s>").expect("compiles");
            let text = t.render(&msgs, true).expect("renders within the fuel");
            assert!(text.contains("answer 999"));
        }
        let endless = "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}";
        let deep = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
        for (source, want) in [(endless, "fuel"), (deep, "recursion")] {
            let t = ChatTemplate::new(source, "", "").expect("compiles");
            match t.render(&msgs[..1], true) {
                Err(Error::Template(m)) => {
                    assert!(m.contains(want) && !m.contains('\n'), "{m}")
                }
                other => panic!("expected a {want} error, got {other:?}"),
            }
        }
    }

    /// A template that doubles a string without end is stopped at its heap budget, in one line,
    /// is not run again, and from a model file falls back to the family's format.
    #[test]
    fn a_template_that_doubles_a_string_is_stopped_at_its_memory_budget() {
        let doubling = "{% set ns = namespace(s='ab') %}{% for i in range(60) %}\
                        {% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}";
        let t = ChatTemplate::new(doubling, "", "").unwrap();
        let start = std::time::Instant::now();
        match t.render(&[Message::user("hi")], true) {
            Err(Error::Template(m)) => assert!(m.contains("memory") && !m.contains('\n'), "{m}"),
            other => panic!("expected a memory error, got {other:?}"),
        }
        assert!(
            start.elapsed() < TEMPLATE_DEADLINE,
            "stopped by the budget, not the deadline"
        );
        let again = std::time::Instant::now();
        assert!(t.render(&[Message::user("hi")], true).is_err());
        assert!(
            again.elapsed() < std::time::Duration::from_millis(100),
            "not run again"
        );

        let chatml = ["<|im_end|>", "<|im_start|>"];
        let t = ChatTemplate::from_gguf(&content_with(Some(doubling), &chatml)).unwrap();
        assert!(t.note().unwrap().contains("memory"), "{:?}", t.note());
        let text = t.render(&[Message::user("hello")], true).unwrap();
        assert!(text.contains("<|im_start|>user\nhello"), "{text:?}");
    }

    fn content_with(template: Option<&str>, tokens: &[&str]) -> gguf_file::Content {
        let mut metadata = std::collections::HashMap::new();
        metadata.insert(
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(
                tokens
                    .iter()
                    .map(|t| Value::String(t.to_string()))
                    .collect(),
            ),
        );
        metadata.insert("tokenizer.ggml.eos_token_id".to_string(), Value::U32(0));
        if let Some(t) = template {
            metadata.insert(
                "tokenizer.chat_template".to_string(),
                Value::String(t.into()),
            );
        }
        gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata,
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        }
    }

    /// A model template that does not compile, runs out of fuel, reads a file or prints no
    /// message is replaced by the family's format, with a one-line note naming why.
    #[test]
    fn a_failing_template_falls_back_to_the_familys_format_with_a_note() {
        let llama3 = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"];
        let chatml = ["<|im_end|>", "<|im_start|>"];
        let cases: [(&str, &[&str], &str, &str); 4] = [
            (
                "{% for %}",
                &llama3,
                "Llama 3",
                "<|start_header_id|>user<|end_header_id|>",
            ),
            (
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                &chatml,
                "ChatML",
                "<|im_start|>user\n",
            ),
            (
                "{% include '/etc/passwd' %}",
                &chatml,
                "ChatML",
                "<|im_start|>user\n",
            ),
            ("nothing here", &chatml, "ChatML", "<|im_start|>user\n"),
        ];
        for (source, tokens, name, marker) in cases {
            let t =
                ChatTemplate::from_gguf(&content_with(Some(source), tokens)).expect("falls back");
            let note = t.note().expect("a note");
            assert!(note.contains(name) && !note.contains('\n'), "{note}");
            let text = t.render(&[Message::user("hello")], true).unwrap();
            assert!(text.contains(marker) && text.contains("hello"), "{text:?}");
        }
        // a working template is kept, without a note
        let t = ChatTemplate::from_gguf(&content_with(Some(CHATML), &chatml)).unwrap();
        assert!(t.note().is_none());
        assert_eq!(t.source(), CHATML);
    }

    /// Templates on which minijinja 2.24 panics (found by the fuzzer): a one-line error, and
    /// from a model file the known format with a note.
    #[test]
    fn a_panic_inside_the_template_engine_is_an_error() {
        let compile = ChatTemplate::new("{% import 'macros.j2' as 0 %}{{notx() }}", "", "");
        assert!(
            matches!(&compile, Err(Error::Template(m)) if m.contains("template engine failed")),
            "{compile:?}"
        );
        let t = ChatTemplate::new("{{ messages[::-1][0].content * 1000 }}", "", "").unwrap();
        let render = t.render(&[], true);
        assert!(
            matches!(&render, Err(Error::Template(m)) if !m.contains('\n')),
            "{render:?}"
        );
        let from_file = ChatTemplate::from_gguf(&content_with(
            Some("{% import 'macros.j2' as 0 %}{{notx() }}"),
            &["<|im_start|>"],
        ))
        .unwrap();
        assert!(from_file.note().unwrap().contains("template engine failed"));
    }
}
