//! `--model random:SHAPE`: a random-weight model of a named shape is written once into the
//! cache, read back with the shape's dimensions by the ordinary loader, matched to the
//! shape's slim preset, and run by the binary like any model.

mod common;

use std::path::Path;
use std::process::Command;

use slimchat::model::gguf::GgufFile;
use slimchat::model::random::RandomModel;
use slimchat::model::source::DEFAULT_MODEL_FILE;
use slimchat::slim::preset::{self, ModelFacts};

/// A cache directory holding the default model (linked), so that a random model's
/// tokenizer comes from it without a download.
fn cache_with_default_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("models")).unwrap();
    std::os::unix::fs::symlink(
        common::default_model(),
        dir.path().join("models").join(DEFAULT_MODEL_FILE),
    )
    .unwrap();
    dir
}

fn run(cache: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_slimchat"))
        .args(args)
        .env("SLIMCHAT_CACHE_DIR", cache)
        .env("SLIMCHAT_CONFIG", "/nonexistent/slimchat-test/config.toml")
        .output()
        .expect("slimchat runs")
}

#[test]
fn random_shapes_load_with_their_dimensions_and_presets() {
    let cache = cache_with_default_model();
    let tokenizer = GgufFile::open(&common::default_model()).unwrap();
    // a killed writer's leftover (its process long gone), removed by the next writer
    let random_dir = cache.path().join("random");
    std::fs::create_dir_all(&random_dir).unwrap();
    let stale = random_dir.join(".smollm2-135m-q4_0-v1.gguf.4194303.0.tmp");
    std::fs::write(&stale, b"partial").unwrap();
    for (spec, preset) in [
        ("smollm2-135m", "smollm2"),
        ("smollm2-135m@q8_0", "smollm2"),
        ("llama3.2-1b", "llama3.2-1b"),
    ] {
        let model = RandomModel::parse(spec).unwrap();
        let mut reports = Vec::new();
        let path = model
            .ensure(&cache.path().join("random"), &tokenizer.content, &mut |p| {
                reports.push((p.done_bytes, p.total_bytes))
            })
            .unwrap();
        // progress from 0 to the whole, never backwards
        let total = reports[0].1.unwrap();
        assert_eq!(reports.first().unwrap().0, 0);
        assert_eq!(reports.last().unwrap(), &(total, Some(total)));
        assert!(reports.windows(2).all(|w| w[0].0 <= w[1].0));
        let file = GgufFile::open(&path).unwrap();
        let spec_read = file.spec().unwrap();
        let s = model.shape;
        assert_eq!(
            (
                spec_read.arch.as_str(),
                spec_read.n_layers,
                spec_read.hidden,
                spec_read.intermediate
            ),
            (s.arch, s.n_layers, s.hidden, s.intermediate),
            "{spec}"
        );
        assert_eq!(
            (
                spec_read.n_heads,
                spec_read.n_kv_heads,
                spec_read.head_dim,
                spec_read.vocab_size
            ),
            (s.n_heads, s.n_kv_heads, s.head_dim, s.vocab),
            "{spec}"
        );
        assert_eq!(file.has_tensor("output.weight"), !s.tied, "{spec}");
        assert_eq!(
            file.has_tensor("rope_freqs.weight"),
            s.llama3_rope.is_some()
        );
        let fit = preset::fit(&ModelFacts::from_gguf(
            &file,
            spec_read.n_layers,
            spec_read.hidden,
            spec_read.context_length,
        ));
        assert_eq!(fit.preset, preset, "{spec}");
        // the vocabulary is padded to the shape's, so every id the head picks decodes
        let tokenizer = slimchat::model::tokenizer::from_gguf(&file.content).unwrap();
        assert_eq!(tokenizer.get_vocab_size(true), s.vocab, "{spec}");
    }
    assert!(!stale.exists(), "the stale temp file is still there");
}

#[test]
fn the_binary_writes_a_random_model_once_and_runs_it() {
    let cache = cache_with_default_model();
    let args = [
        "run",
        "--model",
        "random:llama3.2-1b",
        "-p",
        "Tell me about the weather in spring.",
        "--max-tokens",
        "4",
        "--json",
    ];
    let first = run(cache.path(), &args);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let file = cache.path().join("random").join("llama3.2-1b-q4_0-v1.gguf");
    let written = std::fs::metadata(&file).unwrap().modified().unwrap();
    let report = String::from_utf8_lossy(&first.stdout);
    let last = report.lines().last().unwrap();
    let json: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(json["generated_tokens"], 4, "{last}");
    assert_eq!(json["kept_per_layer"].as_array().unwrap().len(), 16);
    // a second run reads the same file (not written again)
    let second = run(cache.path(), &args);
    assert!(second.status.success());
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        written
    );
    // nothing left behind but the model
    let names: Vec<_> = std::fs::read_dir(cache.path().join("random"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // an unknown shape is one line naming the known ones
    let bad = run(
        cache.path(),
        &["run", "--model", "random:llama9", "-p", "x"],
    );
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("llama3.1-8b") && stderr.contains("qwen2.5-7b"),
        "{stderr}"
    );
}
