//! The lower layers import no upper layer (README, "Layout"): no file under src/backend or src/kv
//! names `crate::model` or `crate::slim`, no file under src/cuda names `crate::model`, and backend
//! does not name `crate::kv` (the KV storage formats it shares with kv are its own leaf,
//! `backend::kv_format`). Paths are found in code only (comments and string literals are blanked
//! first), in every form: `use crate::model::..`, `use crate::{model, ..}` (nested groups too),
//! a path in an expression, and `super::super::..` reaching the crate root.

use std::path::{Path, PathBuf};

/// A layer (a folder under src/) and the crate-root modules its files may not name.
const RULES: &[(&str, &[&str])] = &[
    ("backend", &["model", "slim", "kv"]),
    ("kv", &["model", "slim"]),
    ("cuda", &["model"]),
];

#[test]
fn lower_layers_do_not_import_upper_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    let mut files = 0;
    for &(layer, forbidden) in RULES {
        for file in rust_files(&src.join(layer)) {
            files += 1;
            let text = std::fs::read_to_string(&file).unwrap();
            let module = module_path(&src, &file);
            for (line, path) in forbidden_paths(&text, &module, forbidden) {
                let rel = file.strip_prefix(src.parent().unwrap()).unwrap();
                found.push(format!("{}:{line}: {path}", rel.display()));
            }
        }
    }
    assert!(
        files > 30,
        "only {files} files found under src/{{backend,kv,cuda}}"
    );
    assert!(
        found.is_empty(),
        "lower layers import upper ones (see README, \"Layout\"):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_scanner_finds_every_form_and_ignores_comments_and_strings() {
    let forbidden = &["model", "slim", "kv"];
    let module = ["backend".to_string(), "attention".to_string()];
    let hits = |code: &str| -> Vec<(usize, String)> { forbidden_paths(code, &module, forbidden) };
    assert_eq!(
        hits("use crate::model::llama::Dense;"),
        [(1, "crate::model".to_string())]
    );
    assert_eq!(hits("use crate :: slim;").len(), 1);
    assert_eq!(hits("let x = crate::kv::KvDtype::F16;").len(), 1);
    assert_eq!(
        hits("use crate::{Error,\n    model::gguf::ModelSpec};"),
        [(2, "crate::{model}".to_string())]
    );
    assert_eq!(hits("use crate::{backend::{isa}, kv};").len(), 1);
    assert_eq!(hits("use crate::{self as c, slim::{score}};").len(), 1);
    assert_eq!(
        hits("use super::super::model::x;"),
        [(1, "super::super::model".to_string())]
    );
    assert!(hits("use super::kv_format::KvDtype;").is_empty());
    assert!(hits("use crate::backend::kv_format::KvDtype;").is_empty());
    assert!(hits("use crate::{Error, Result};").is_empty());
    assert!(hits("use crate::kv_format::X; use crate::models::Y;").is_empty());
    assert!(hits("// use crate::model::llama;\n/* crate::slim */ /// crate::kv").is_empty());
    assert!(hits(r#"let s = "crate::model"; let r = r"crate::slim"; let c = '"';"#).is_empty());
    assert!(hits("fn f<'a>(x: &'a str) -> &'a str { x } // crate::kv").is_empty());
}

/// Every .rs file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The module a file defines, from the crate root: src/backend/score/mod.rs is
/// ["backend", "score"], src/kv/cache.rs ["kv", "cache"].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// (line, path) of every path in `text`'s code that names one of the crate-root modules
/// `forbidden`; `module` is the file's module path (to resolve `super::`).
fn forbidden_paths(text: &str, module: &[String], forbidden: &[&str]) -> Vec<(usize, String)> {
    let code = blank_comments_and_strings(text);
    let tokens = tokenize(&code);
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let (at, tok) = tokens[i];
        // `crate` / `super::super..` followed by `::`
        let root = if tok == "crate" {
            Some((i + 1, "crate".to_string()))
        } else if tok == "super" && (i == 0 || tokens[i - 1].1 != "::") {
            let mut j = i;
            let mut depth = module.len();
            let mut shown = Vec::new();
            while j + 1 < tokens.len() && tokens[j].1 == "super" && tokens[j + 1].1 == "::" {
                depth = depth.saturating_sub(1);
                shown.push("super");
                j += 2;
            }
            // at the crate root after the supers: what follows is a crate-root module
            (depth == 0 && j > i).then(|| (j - 1, shown.join("::")))
        } else {
            None
        };
        if let Some((sep, shown)) = root {
            // tokens[sep] is `::` when it is a path
            if tokens.get(sep).is_some_and(|t| t.1 == "::") {
                match tokens.get(sep + 1).map(|t| t.1) {
                    Some(name) if forbidden.contains(&name) => {
                        out.push((line_of(at), format!("{shown}::{name}")));
                    }
                    Some("{") => {
                        for (item_at, name) in group_heads(&tokens, sep + 1) {
                            if forbidden.contains(&name) {
                                out.push((line_of(item_at), format!("{shown}::{{{name}}}")));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        i += 1;
    }
    out
}

/// The first name of every item of the `use` group opening at `tokens[open]` (`{`): for
/// `{Error, model::llama, self as c}` the names Error, model, self.
fn group_heads<'a>(tokens: &[(usize, &'a str)], open: usize) -> Vec<(usize, &'a str)> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect_head = true;
    for &(at, tok) in &tokens[open..] {
        match tok {
            "{" => {
                depth += 1;
                expect_head = depth == 1;
            }
            "}" => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            "," if depth == 1 => expect_head = true,
            _ if depth == 1 && expect_head => {
                heads.push((at, tok));
                expect_head = false;
            }
            _ => {}
        }
    }
    heads
}

/// Identifiers, `::` and single punctuation characters, with their byte offsets.
fn tokenize(code: &str) -> Vec<(usize, &str)> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphanumeric() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            out.push((start, &code[start..i]));
        } else if c == b':' && bytes.get(i + 1) == Some(&b':') {
            out.push((i, "::"));
            i += 2;
        } else if c.is_ascii_whitespace() || !c.is_ascii() {
            i += 1;
        } else {
            out.push((i, &code[i..i + 1]));
            i += 1;
        }
    }
    out
}

/// `text` with comments, string literals and char literals replaced by spaces (newlines kept,
/// so that offsets keep their lines).
fn blank_comments_and_strings(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for x in &mut out[from..to.min(b.len())] {
            if *x != b'\n' {
                *x = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                let end = text[i..].find('\n').map_or(b.len(), |n| i + n);
                blank(&mut out, i, end);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // block comments nest in Rust
                let (mut depth, mut j) = (0usize, i);
                while j < b.len() {
                    if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                        depth += 1;
                        j += 2;
                    } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                        depth -= 1;
                        j += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        j += 1;
                    }
                }
                blank(&mut out, i, j);
                i = j;
            }
            b'r' if matches!(b.get(i + 1), Some(b'"' | b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                // raw string: r"..", r#".."#
                let hashes = b[i + 1..].iter().take_while(|&&x| x == b'#').count();
                if b.get(i + 1 + hashes) != Some(&b'"') {
                    i += 1;
                    continue;
                }
                let close = format!("\"{}", "#".repeat(hashes));
                let body = i + 2 + hashes;
                let end = text[body..]
                    .find(&close)
                    .map_or(b.len(), |n| body + n + close.len());
                blank(&mut out, i, end);
                i = end;
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                blank(&mut out, i, j + 1);
                i = j + 1;
            }
            b'\'' => {
                // a char literal ('x', '\n', '\u{..}', '"'); otherwise a lifetime
                let end = if b.get(i + 1) == Some(&b'\\') {
                    text[i + 2..].find('\'').map(|n| i + 2 + n + 1)
                } else {
                    let ch = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                    (b.get(i + 1 + ch) == Some(&b'\'')).then_some(i + 2 + ch)
                };
                match end {
                    Some(end) => {
                        blank(&mut out, i, end);
                        i = end;
                    }
                    None => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    String::from_utf8(out).unwrap()
}
