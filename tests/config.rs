//! The app config: `config.example.toml` is exactly the defaults, and every bad file is a
//! one-line `Error::Config` that names the problem.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use slimchat::config::AppConfig;
use slimchat::Error;

const EXAMPLE: &str = include_str!("../config.example.toml");

/// Tests that read or set environment variables take this lock, since tests share one process.
static ENV_LOCK: Mutex<()> = Mutex::new(());

/// Sets one environment variable for the life of the guard, then restores it.
struct EnvVar {
    name: &'static str,
    saved: Option<std::ffi::OsString>,
    _lock: MutexGuard<'static, ()>,
}

impl EnvVar {
    fn set(name: &'static str, value: &Path) -> Self {
        let lock = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let saved = std::env::var_os(name);
        std::env::set_var(name, value);
        Self {
            name,
            saved,
            _lock: lock,
        }
    }
}

impl Drop for EnvVar {
    fn drop(&mut self) {
        match self.saved.take() {
            Some(v) => std::env::set_var(self.name, v),
            None => std::env::remove_var(self.name),
        }
    }
}

/// The message of a `Config` error; fails the test on success or on another variant.
fn config_error(text: &str) -> String {
    match AppConfig::parse(text, "test.toml") {
        Err(Error::Config(msg)) => {
            assert!(
                !msg.contains('\n'),
                "config error spans several lines: {msg:?}"
            );
            assert!(
                msg.starts_with("test.toml"),
                "config error does not name the file: {msg:?}"
            );
            msg
        }
        other => panic!("expected a config error for {text:?}, got {other:?}"),
    }
}

#[test]
fn example_file_is_exactly_the_defaults() {
    let cfg = AppConfig::parse(EXAMPLE, "config.example.toml").expect("config.example.toml parses");
    assert_eq!(cfg, AppConfig::default());
}

#[test]
fn example_file_sets_every_key() {
    // Every key of the defaults appears in the example, so nothing is left undocumented
    // (equality alone would pass with a key left out, since every key has a default).
    let defaults = toml::to_string(&AppConfig::default()).unwrap();
    let example: toml::Table = toml::from_str(EXAMPLE).unwrap();
    let defaults: toml::Table = toml::from_str(&defaults).unwrap();
    for (section, keys) in &defaults {
        let keys = keys.as_table().unwrap();
        let ex = example.get(section).and_then(|s| s.as_table());
        let ex = ex.unwrap_or_else(|| panic!("config.example.toml lacks [{section}]"));
        for key in keys.keys() {
            assert!(
                ex.contains_key(key),
                "config.example.toml lacks {section}.{key}"
            );
        }
    }
}

#[test]
fn empty_file_is_the_defaults() {
    assert_eq!(
        AppConfig::parse("", "test.toml").unwrap(),
        AppConfig::default()
    );
}

#[test]
fn partial_file_overrides_only_its_keys() {
    let cfg = AppConfig::parse("[chat]\nmax_tokens = 64\n", "test.toml").unwrap();
    let mut want = AppConfig::default();
    want.chat.max_tokens = 64;
    assert_eq!(cfg, want);
}

#[test]
fn unknown_key_is_named_in_one_line() {
    let msg = config_error("[model]\nbogus = 1\n");
    assert!(
        msg.contains("bogus"),
        "message does not name the key: {msg}"
    );
}

#[test]
fn unknown_section_is_named_in_one_line() {
    let msg = config_error("[modle]\nsource = \"default\"\n");
    assert!(
        msg.contains("modle"),
        "message does not name the section: {msg}"
    );
}

#[test]
fn wrong_type_is_one_line() {
    let msg = config_error("[chat]\nmax_tokens = \"lots\"\n");
    assert!(
        msg.contains("max_tokens") || msg.contains("lots"),
        "message does not point at the value: {msg}"
    );
    assert!(
        msg.contains("line 2"),
        "message does not give the line: {msg}"
    );
}

#[test]
fn unknown_linear_mode_is_one_line() {
    let msg = config_error("[model]\nlinear = \"sparse\"\n");
    assert!(
        msg.contains("sparse"),
        "message does not name the value: {msg}"
    );
}

#[test]
fn out_of_range_top_p_is_rejected() {
    let msg = config_error("[sampling]\ntop_p = 2.0\n");
    assert!(
        msg.contains("top_p"),
        "message does not name the key: {msg}"
    );
}

#[test]
fn negative_temperature_is_rejected() {
    let msg = config_error("[sampling]\ntemperature = -1.0\n");
    assert!(
        msg.contains("temperature"),
        "message does not name the key: {msg}"
    );
}

#[test]
fn broken_toml_is_one_line() {
    let msg = config_error("[model\nsource = \n");
    assert!(
        msg.contains("line 1"),
        "message does not give the line: {msg}"
    );
}

#[test]
fn missing_explicit_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    match AppConfig::load(Some(&path)) {
        Err(Error::Config(msg)) => {
            assert!(
                msg.contains("nope.toml"),
                "message does not name the file: {msg}"
            );
            assert!(!msg.contains('\n'), "{msg:?}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn explicit_file_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[sampling]\nseed = 7\n").unwrap();
    assert_eq!(AppConfig::load(Some(&path)).unwrap().sampling.seed, 7);
}

#[test]
fn missing_default_file_means_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let _env = EnvVar::set("SLIMCHAT_CONFIG", &dir.path().join("absent.toml"));
    assert_eq!(AppConfig::load(None).unwrap(), AppConfig::default());
}

#[test]
fn default_file_comes_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[model]\nthreads = 3\n").unwrap();
    let _env = EnvVar::set("SLIMCHAT_CONFIG", &path);
    assert_eq!(AppConfig::load(None).unwrap().model.threads, 3);
}

#[test]
fn bad_default_file_is_still_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[model]\nbogus = 1\n").unwrap();
    let _env = EnvVar::set("SLIMCHAT_CONFIG", &path);
    match AppConfig::load(None) {
        Err(Error::Config(msg)) => assert!(msg.contains("bogus"), "{msg}"),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn bad_kv_sizes_name_their_key() {
    let msg = config_error("[kv]\nfast_budget = \"lots\"\n");
    assert!(msg.contains("[kv] fast_budget"), "{msg}");
    let msg = config_error("[kv]\nfast_budget = \"0tok\"\n");
    assert!(msg.contains("[kv] fast_budget"), "{msg}");
    let msg = config_error("[kv]\nspill_cap = \"big\"\n");
    assert!(msg.contains("[kv] spill_cap"), "{msg}");
    for ok in [
        "\"auto\"",
        "\"512M\"",
        "\"2G\"",
        "\"1048576\"",
        "\"4096tok\"",
    ] {
        let text = format!("[kv]\nfast_budget = {ok}\n");
        AppConfig::parse(&text, "test.toml").unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn context_window_below_the_smallest_is_one_line() {
    let e = config_error("[model]\ncontext = 64\n");
    assert!(
        e.contains("[model] context must be 0 (the model's own) or at least 128 tokens, got 64"),
        "{e}"
    );
    let cfg = AppConfig::parse("[model]\ncontext = 512\n", "t").unwrap();
    assert_eq!(cfg.model.context, 512);
}
