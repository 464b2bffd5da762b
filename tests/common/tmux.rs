//! The real `slimchat` binary in a private tmux server: start it on a config and data dir,
//! send keys and pastes, read the screen.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A private tmux server, killed when dropped.
pub struct Tmux {
    pub socket: String,
}

impl Tmux {
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux runs")
    }

    pub fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "e2e"]).stdout).into_owned()
    }

    pub fn alive(&self) -> bool {
        self.run(&["has-session", "-t", "e2e"]).status.success()
    }

    /// Polls the screen until `pred` holds; panics with the screen after `secs`.
    pub fn wait(&self, what: &str, secs: u64, pred: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < until && self.alive(),
                "timed out waiting for {what}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn start(&self, dir: &Path, extra: &str) {
        self.start_script(&format!(
            "exec {} {extra} 2>>'{}'",
            slimchat_command(dir),
            dir.join("stderr.txt").display()
        ));
    }

    /// Runs `script` with sh in a new 160x50 session.
    pub fn start_script(&self, cmd: &str) {
        let out = self.run(&[
            "new-session",
            "-d",
            "-x",
            "160",
            "-y",
            "50",
            "-s",
            "e2e",
            "sh",
            "-c",
            cmd,
        ]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
    }

    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "e2e"];
        args.extend(keys);
        assert!(self.run(&args).status.success());
    }

    /// Enter, after the pause a person leaves after typing: text and Enter arriving in the same
    /// instant read as a paste (see `slimchat::tui::paste_burst`).
    pub fn enter(&self) {
        std::thread::sleep(Duration::from_millis(200));
        self.keys(&["Enter"]);
    }

    pub fn type_text(&self, text: &str) {
        assert!(self
            .run(&["send-keys", "-t", "e2e", "-l", text])
            .status
            .success());
    }
}

/// The command line that runs slimchat on `dir`'s config.toml with its data in `dir`/data.
pub fn slimchat_command(dir: &Path) -> String {
    format!(
        "env SLIMCHAT_DATA_DIR='{}' SLIMCHAT_CONFIG=/nonexistent '{}' --config '{}'",
        dir.join("data").display(),
        env!("CARGO_BIN_EXE_slimchat"),
        dir.join("config.toml").display(),
    )
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// Every `TTFT <n> ms · prefill` footer on the screen, in order.
pub fn ttfts(screen: &str) -> Vec<u64> {
    screen
        .split("TTFT ")
        .skip(1)
        .filter_map(|rest| {
            let (n, tail) = rest.split_once(" ms")?;
            tail.starts_with(" · prefill")
                .then(|| n.trim().parse().ok())?
        })
        .collect()
}

pub fn has_tmux(test: &str) -> bool {
    let ok = Command::new("tmux").arg("-V").output().is_ok();
    if !ok {
        eprintln!("SKIPPED {test}: tmux is not installed");
    }
    ok
}

pub fn wait_exit(tmux: &Tmux) {
    let until = Instant::now() + Duration::from_secs(15);
    while tmux.alive() {
        assert!(Instant::now() < until, "slimchat did not quit");
        std::thread::sleep(Duration::from_millis(100));
    }
}
