//! Real chat templates rendered by slimchat (minijinja + pycompat + `model::pyjinja`) must equal
//! Python jinja2's rendering set up as transformers' `apply_chat_template`, stored in
//! `fixtures/chat_template_golden.json` by `fixtures/make_chat_template_golden.py`: Llama 3 / 3.1 /
//! 3.2 and Qwen2.5 / Qwen3 with a system prompt, several turns, with and without the generation
//! prompt, tools, tool calls and results, reasoning, `enable_thinking`, `date_string`,
//! `strftime_now` and `raise_exception`, plus short probe templates for each Jinja feature.
//!
//! The Qwen and probe sources are in the fixture. The Llama sources are not (Llama licence): they
//! are read from `~/.cache/slimchat-tok` (the npm package) and from llama.cpp's
//! `models/templates` under `~/.cache/slimchat-bench` where present; otherwise those cases print a
//! note and are skipped.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;
use slimchat::model::template::{ChatTemplate, TemplateVars};

#[derive(Deserialize)]
struct Golden {
    now_utc: String,
    templates: HashMap<String, TemplateInfo>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct TemplateInfo {
    special_tokens: TemplateVars,
    source: Option<String>,
    local_file: Option<String>,
}

#[derive(Deserialize)]
struct Case {
    template: String,
    name: String,
    add_generation_prompt: bool,
    messages: Vec<serde_json::Value>,
    extra: TemplateVars,
    expected: Option<String>,
    error: Option<String>,
}

fn golden() -> Golden {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/chat_template_golden.json"
    );
    let text = std::fs::read_to_string(path).expect("read fixture");
    serde_json::from_str(&text).expect("parse fixture")
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// A Llama template's source from the local npm package or llama.cpp checkout, if present.
fn local_source(file: &str) -> Option<String> {
    if file.ends_with(".json") {
        let cache = std::env::var_os("SLIMCHAT_TOK_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| home().join(".cache/slimchat-tok"));
        let text = std::fs::read_to_string(cache.join(file)).ok()?;
        let cfg: serde_json::Value = serde_json::from_str(&text).ok()?;
        return cfg["chat_template"].as_str().map(str::to_string);
    }
    find_file(&home().join(".cache/slimchat-bench"), file, 8)
        .and_then(|p| std::fs::read_to_string(p).ok())
}

/// `models/templates/<name>` anywhere below `dir`, at most `depth` levels down.
fn find_file(dir: &std::path::Path, name: &str, depth: usize) -> Option<PathBuf> {
    let candidate = dir.join("models/templates").join(name);
    if candidate.is_file() {
        return Some(candidate);
    }
    if depth == 0 {
        return None;
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    entries.sort();
    entries
        .into_iter()
        .find_map(|d| find_file(&d, name, depth - 1))
}

/// 2026-03-05T09:07:03Z as Unix seconds (the fixture's clock for `strftime_now`).
fn fixture_now(now_utc: &str) -> i64 {
    assert_eq!(now_utc, "2026-03-05T09:07:03Z", "update the clock below");
    1_772_701_623
}

/// Render every case of the templates `wanted` accepts; return how many were checked.
fn check(wanted: impl Fn(&str) -> bool) -> usize {
    let golden = golden();
    let now = fixture_now(&golden.now_utc);
    let mut sources: HashMap<&str, Option<String>> = HashMap::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in golden.cases.iter().filter(|c| wanted(&c.template)) {
        let info = &golden.templates[&case.template];
        let source = sources.entry(&case.template).or_insert_with(|| {
            let found = info
                .source
                .clone()
                .or_else(|| info.local_file.as_deref().and_then(local_source));
            if found.is_none() {
                eprintln!(
                    "note: template {} not found locally ({:?}); its cases are skipped",
                    case.template, info.local_file
                );
            }
            found
        });
        let Some(source) = source else { continue };
        let token = |k: &str| info.special_tokens.get(k).and_then(|v| v.as_str());
        let template = ChatTemplate::new(
            source.as_str(),
            token("bos_token").unwrap_or(""),
            token("eos_token").unwrap_or(""),
        )
        .expect("template compiles")
        .with_time(now);
        let mut vars = info.special_tokens.clone();
        vars.extend(case.extra.clone());
        let got = template.render_with(&case.messages, case.add_generation_prompt, &vars);
        let label = format!(
            "{} / {} (add_generation_prompt = {})",
            case.template, case.name, case.add_generation_prompt
        );
        match (&got, &case.expected, &case.error) {
            (Ok(text), Some(expected), _) if text == expected => {}
            (Err(slimchat::Error::Template(msg)), None, Some(error))
                if msg.contains(error.as_str()) && !msg.contains('\n') => {}
            _ => failures.push(format!(
                "{label}\n   ours:   {got:?}\n   jinja2: {:?}",
                case.expected.as_ref().or(case.error.as_ref())
            )),
        }
        checked += 1;
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} renderings differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    checked
}

#[test]
fn qwen_templates_render_as_jinja2_does() {
    assert!(check(|t| t.starts_with("qwen")) >= 30);
}

#[test]
fn llama3_templates_render_as_jinja2_does() {
    check(|t| t.starts_with("llama"));
}

#[test]
fn jinja_feature_probes_render_as_jinja2_does() {
    assert!(check(|t| t.starts_with("probe_")) >= 12);
}

#[test]
fn strftime_now_reads_the_clock_without_a_fixed_time() {
    let template = ChatTemplate::new("{{ strftime_now('%Y') }}", "", "").expect("compile");
    let year: i64 = template
        .render(&[], false)
        .expect("render")
        .parse()
        .expect("a year");
    assert!((2025..3000).contains(&year), "{year}");
}
