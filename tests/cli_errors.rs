//! The `slimchat` binary on bad input: every failure exits non-zero with exactly one line on
//! stderr, `slimchat: error: ...`, that names the problem, and never a panic. One good run
//! checks the `--json` report.
//!
//! The broken model files are made in a temporary directory: random bytes, a prefix of the
//! default model, and small GGUFs written with candle's `gguf_file::write`.

mod common;

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// Runs `slimchat` with `args`, feeding `stdin` (or nothing), isolated from any user config.
fn slimchat(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_slimchat"));
    cmd.args(args)
        .env("SLIMCHAT_CONFIG", "/nonexistent/slimchat-test/config.toml")
        .env("RUST_BACKTRACE", "0")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("slimchat starts");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        // The process may exit before reading everything; a broken pipe is fine then.
        let _ = pipe.write_all(bytes);
    }
    child.wait_with_output().expect("slimchat finishes")
}

/// Asserts a failed run with one `slimchat: error:` line on stderr that contains every one of
/// `needles` (case-insensitively); returns that line.
#[track_caller]
fn assert_one_line_error(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got {:?}; stderr: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "slimchat panicked: {stderr}");
    let line = stderr.strip_suffix('\n').unwrap_or(&stderr);
    assert!(!line.contains('\n'), "stderr is not one line: {stderr:?}");
    assert!(
        line.starts_with("slimchat: error: "),
        "stderr does not start with `slimchat: error: `: {stderr:?}"
    );
    let lower = line.to_lowercase();
    for needle in needles {
        assert!(
            lower.contains(&needle.to_lowercase()),
            "error does not mention {needle:?}: {line}"
        );
    }
    line.to_string()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// The default model's header, read with candle's parser.
fn default_model_content() -> (PathBuf, Content, BufReader<File>) {
    let path = common::default_model();
    let mut reader = BufReader::new(File::open(&path).unwrap());
    let content = Content::read(&mut reader).unwrap();
    (path, content, reader)
}

fn write_gguf(path: &Path, metadata: &[(&str, &Value)], tensors: &[(&str, &QTensor)]) {
    let mut f = File::create(path).unwrap();
    gguf_file::write(&mut f, metadata, tensors).unwrap();
}

#[test]
fn missing_model_file() {
    let out = slimchat(
        &["run", "--model", "/nonexistent/x.gguf", "--prompt", "hi"],
        None,
    );
    assert_one_line_error(&out, &["/nonexistent/x.gguf", "not found"]);
}

#[test]
fn not_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("random.gguf");
    // Deterministic noise (an LCG), 64 KiB.
    let mut x: u32 = 12345;
    let bytes: Vec<u8> = (0..65536)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    std::fs::write(&path, bytes).unwrap();
    let out = slimchat(&["run", "--model", path_str(&path), "--prompt", "hi"], None);
    assert_one_line_error(&out, &["random.gguf", "not a GGUF file", "magic"]);
}

#[test]
fn empty_model_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.gguf");
    std::fs::write(&path, b"").unwrap();
    let out = slimchat(&["run", "--model", path_str(&path), "--prompt", "hi"], None);
    assert_one_line_error(&out, &["empty.gguf"]);
}

#[test]
fn truncated_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("truncated.gguf");
    let full = std::fs::read(common::default_model()).unwrap();
    std::fs::write(&path, &full[..5 * 1024 * 1024]).unwrap();
    let out = slimchat(&["run", "--model", path_str(&path), "--prompt", "hi"], None);
    assert_one_line_error(&out, &["truncated.gguf", "truncated"]);
}

#[test]
fn unsupported_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt2.gguf");
    let arch = Value::String("gpt2".into());
    let tensor = QTensor::quantize(
        &Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    write_gguf(
        &path,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &tensor)],
    );
    let out = slimchat(&["run", "--model", path_str(&path), "--prompt", "hi"], None);
    assert_one_line_error(&out, &["gpt2.gguf", "unsupported architecture", "'gpt2'"]);
}

#[test]
fn missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("partial.gguf");
    let (_, content, mut reader) = default_model_content();
    // The real llama metadata (hyper-parameters, tokenizer, chat template), but only two tensors.
    // `general.alignment` is dropped: candle's writer always pads to 32 bytes.
    let mut metadata: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| *k != "general.alignment")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.sort_by_key(|(k, _)| *k);
    let embd = content
        .tensor(&mut reader, "token_embd.weight", &Device::Cpu)
        .unwrap();
    let norm = content
        .tensor(&mut reader, "output_norm.weight", &Device::Cpu)
        .unwrap();
    write_gguf(
        &path,
        &metadata,
        &[("token_embd.weight", &embd), ("output_norm.weight", &norm)],
    );
    let out = slimchat(&["run", "--model", path_str(&path), "--prompt", "hi"], None);
    assert_one_line_error(&out, &["partial.gguf", "missing tensor", "blk.0."]);
}

#[test]
fn prompt_longer_than_the_context() {
    let long = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/long_text.txt");
    let out = slimchat(
        &["run", "--prompt-file", path_str(&long), "--max-tokens", "4"],
        None,
    );
    let line = assert_one_line_error(&out, &["prompt", "tokens", "8192"]);
    let numbers: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    assert!(
        numbers.iter().any(|&n| n > 20_000),
        "error does not say how many tokens the prompt has: {line}"
    );
}

#[test]
fn empty_prompt() {
    let out = slimchat(&["run", "--prompt", ""], None);
    assert_one_line_error(&out, &["empty prompt"]);
}

#[test]
fn whitespace_only_prompt() {
    let out = slimchat(&["run", "--prompt", "  \n\t  "], None);
    assert_one_line_error(&out, &["empty prompt"]);
}

#[test]
fn empty_stdin() {
    let out = slimchat(&["run"], Some(b""));
    assert_one_line_error(&out, &["empty prompt"]);
}

#[test]
fn missing_prompt_file() {
    let out = slimchat(&["run", "--prompt-file", "/nonexistent/prompt.txt"], None);
    assert_one_line_error(&out, &["/nonexistent/prompt.txt"]);
}

#[test]
fn invalid_utf8_on_stdin() {
    let out = slimchat(&["run"], Some(b"hello \xff\xfe world"));
    assert_one_line_error(&out, &["stdin", "UTF-8", "offset 6"]);
}

#[test]
fn invalid_utf8_prompt_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prompt.txt");
    std::fs::write(&path, b"caf\xe9 au lait").unwrap();
    let out = slimchat(&["run", "--prompt-file", path_str(&path)], None);
    assert_one_line_error(&out, &["prompt.txt", "UTF-8", "offset 3"]);
}

#[test]
fn facts_on_a_text_that_is_not_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, b"r\xe9sum\xe9 of the meeting").unwrap();
    let out = slimchat(&["facts", "--text", path_str(&path)], None);
    assert_one_line_error(&out, &["notes.txt", "UTF-8", "offset 1"]);
}

#[test]
fn facts_on_a_text_shorter_than_its_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.txt");
    std::fs::write(&path, "A short note. ".repeat(50)).unwrap();
    let out = slimchat(
        &["facts", "--text", path_str(&path), "--lengths", "1024"],
        None,
    );
    assert_one_line_error(&out, &["short.txt", "tokens", "1024", "--lengths"]);
}

#[test]
fn facts_on_a_persons_own_text() {
    let text = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/eval/speeches.txt");
    let out = slimchat(
        &[
            "facts",
            "--text",
            path_str(&text),
            "--lengths",
            "1024",
            "--cases",
            "1",
            "--max-tokens",
            "4",
            "--json",
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let case = &report["cases"][0];
    assert_eq!(case["text"], path_str(&text), "{case}");
    assert_eq!(case["planted"], 1, "{case}");
    let tokens = case["prompt_tokens"].as_u64().unwrap();
    assert!(tokens.abs_diff(1024) < 60, "{tokens} prompt tokens");
}

#[test]
fn bad_sampling_flag() {
    let out = slimchat(&["run", "--prompt", "hi", "--top-p", "2"], None);
    assert_one_line_error(&out, &["top_p"]);
}

#[test]
fn config_with_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[model]\nbogus = 1\n").unwrap();
    let out = slimchat(
        &["run", "--config", path_str(&path), "--prompt", "hi"],
        None,
    );
    assert_one_line_error(&out, &["config", "config.toml", "bogus"]);
}

#[test]
fn broken_toml_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[model\nsource = \n").unwrap();
    let out = slimchat(
        &["run", "--config", path_str(&path), "--prompt", "hi"],
        None,
    );
    assert_one_line_error(&out, &["config", "config.toml", "line 1"]);
}

#[test]
fn missing_config_file() {
    let out = slimchat(
        &[
            "run",
            "--config",
            "/nonexistent/slimchat.toml",
            "--prompt",
            "hi",
        ],
        None,
    );
    assert_one_line_error(&out, &["config", "/nonexistent/slimchat.toml"]);
}

#[test]
fn json_report_of_a_good_run() {
    let out = slimchat(
        &[
            "run",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "16",
            "--json",
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "slimchat failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
    let v: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"));
    let text = v["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text in {v}"));
    assert!(
        text.contains("Paris"),
        "answer does not mention Paris: {text:?}"
    );
    for key in [
        "prompt_tokens",
        "generated_tokens",
        "peak_rss_bytes",
        "kv_bytes",
        "kv_fast_bytes_peak",
        "kv_dense_bytes",
    ] {
        let n = v[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} is not a count in {v}"));
        assert!(n > 0, "{key} is 0 in {v}");
    }
    assert!(v["generated_tokens"].as_u64().unwrap() <= 16, "{v}");
    for key in ["kv_host_bytes", "kv_bytes_copied"] {
        assert!(v[key].is_u64(), "{key} is not a count in {v}");
    }
    assert!(
        v["kv_stall_ms"].is_f64(),
        "kv_stall_ms is not a number in {v}"
    );
    for key in ["ttft_ms", "prefill_tok_s", "decode_tok_s"] {
        let x = v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} is not a number in {v}"));
        assert!(x.is_finite() && x > 0.0, "{key} = {x} in {v}");
    }
}
