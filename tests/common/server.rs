//! `slimchat serve` on 127.0.0.1, on a port the system picks, for the server tests: start it,
//! call it, read its RSS; killed when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT/v1`
    pub base: String,
    pub stderr_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts the server on the default model with `config` as its config file and `args`
    /// after `serve`; waits for its "listening" line.
    pub fn start(config: &str, args: &[&str]) -> Server {
        let _ = super::default_model();
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, config).unwrap();
        let stderr_path = dir.path().join("stderr.txt");
        let mut child = Command::new(env!("CARGO_BIN_EXE_slimchat"))
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .env(slimchat::tui::store::DATA_DIR_ENV, dir.path().join("data"))
            .env_remove(slimchat::serve::API_KEY_ENV)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("slimchat serve starts");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).expect("a first line from serve");
        let base = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| {
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                panic!("no address in {line:?}; stderr: {err}")
            })
            .to_string();
        // keep stdout drained
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = out.read_to_end(&mut sink);
        });
        Server {
            child,
            base,
            stderr_path,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The port, for clients that want the host part only.
    pub fn root(&self) -> String {
        self.base.trim_end_matches("/v1").to_string()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Resident set size of the server process, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    /// POSTs JSON; returns the status and the body (any status).
    pub fn post(&self, path: &str, body: &serde_json::Value) -> (u16, String) {
        post(&self.url(path), body, None)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POSTs JSON with an optional bearer key; returns the status and the body (any status).
pub fn post(url: &str, body: &serde_json::Value, key: Option<&str>) -> (u16, String) {
    let mut req = ureq::post(url).timeout(Duration::from_secs(300));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    match req.send_json(body) {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("POST {url}: {e}"),
    }
}

/// A streamed answer as the client saw it.
#[derive(Debug, Default)]
pub struct Streamed {
    pub status: u16,
    /// Every `data:` payload, in order (`[DONE]` included).
    pub events: Vec<String>,
    pub text: String,
    pub ttft: Option<Duration>,
    pub total: Duration,
    pub retry_after: Option<String>,
}

impl Streamed {
    pub fn done(&self) -> bool {
        self.events.last().map(String::as_str) == Some("[DONE]")
    }

    /// The chunk that carries the finish reason.
    pub fn last_chunk(&self) -> Option<serde_json::Value> {
        self.events
            .iter()
            .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
            .find(|v| v["choices"][0]["finish_reason"].is_string())
    }
}

/// POSTs a streaming request and reads the events to the end.
pub fn stream(url: &str, body: &serde_json::Value) -> Streamed {
    let start = Instant::now();
    let resp = match ureq::post(url)
        .timeout(Duration::from_secs(300))
        .send_json(body)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            return Streamed {
                status: code,
                retry_after: r.header("Retry-After").map(str::to_string),
                total: start.elapsed(),
                ..Default::default()
            }
        }
        Err(e) => panic!("POST {url}: {e}"),
    };
    let mut s = Streamed {
        status: resp.status(),
        ..Default::default()
    };
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.expect("the stream reads to its end");
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(data) {
            let piece = v["choices"][0]["delta"]["content"]
                .as_str()
                .or(v["choices"][0]["text"].as_str())
                .unwrap_or("");
            if !piece.is_empty() {
                s.ttft.get_or_insert(start.elapsed());
                s.text.push_str(piece);
            }
        }
        s.events.push(data.to_string());
    }
    s.total = start.elapsed();
    s
}

/// A prompt of about `n_words` words of varied prose, with `tag` so prompts do not share a
/// prefix with an earlier request's.
pub fn document(tag: &str, n_words: usize) -> String {
    let words = [
        "harbour", "ledger", "lantern", "granite", "orchard", "compass", "meadow", "copper",
        "signal", "timber", "quarry", "beacon", "voyage", "saddle", "anchor", "thistle",
    ];
    let mut out = format!("Record {tag}. ");
    for i in 0..n_words {
        out.push_str(words[(i * 7 + i / 5) % words.len()]);
        out.push(if i % 12 == 11 { '.' } else { ' ' });
        if i % 12 == 11 {
            out.push(' ');
        }
    }
    out
}
