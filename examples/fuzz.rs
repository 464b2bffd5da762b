//! The long-running fuzzer: `cargo run --release --example fuzz -- --target gguf --seconds 600`.
//!
//! A supervisor starts a worker process (this binary with `--worker`, under `ulimit -v`) that
//! runs cases `first..` of the campaign and writes the index of the case it is on to a progress
//! file before each one. Panics, rule violations, slow cases and oversized allocations are
//! caught in the worker; an abort, a signal or a hang ends the worker, and the supervisor
//! rebuilds that case from its seed, records it and starts a new worker after it. Every new
//! failure is printed with its case seed and written to `--out` (default `fuzz-out/`) as
//! `TARGET-SEED.bin`; `--replay FILE` runs one saved input again.
//!
//! Options: `--target NAME|all`, `--seconds N` (per target), `--seed N` (the campaign),
//! `--out DIR`, `--no-real` (leave the default model's header out of the seeds).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use slimchat::fuzz::alloc::Tracking;
use slimchat::fuzz::runner::{campaign, case_seed, make_case, run_case, Failure, Found};
use slimchat::fuzz::Target;

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Address space of a worker: 8 GiB.
const WORKER_VMEM_KB: u64 = 8 << 20;

struct Opts {
    targets: Vec<Target>,
    seconds: u64,
    seed: u64,
    out: PathBuf,
    real: bool,
    worker: bool,
    first: u64,
    replay: Option<PathBuf>,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        targets: Vec::new(),
        seconds: 60,
        seed: 1,
        out: PathBuf::from("fuzz-out"),
        real: true,
        worker: false,
        first: 0,
        replay: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--target" => {
                let v = value()?;
                if v == "all" {
                    o.targets = Target::ALL.to_vec();
                } else {
                    o.targets
                        .push(Target::parse(&v).ok_or(format!("unknown target {v}"))?);
                }
            }
            "--seconds" => o.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--seed" => o.seed = parse_u64(&value()?)?,
            "--first" => o.first = value()?.parse().map_err(|e| format!("--first: {e}"))?,
            "--out" => o.out = PathBuf::from(value()?),
            "--replay" => o.replay = Some(PathBuf::from(value()?)),
            "--no-real" => o.real = false,
            "--worker" => o.worker = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.targets.is_empty() {
        return Err(
            "--target NAME|all is required (gguf, tokenizer, template, config, conversation, tui)"
                .into(),
        );
    }
    Ok(o)
}

fn parse_u64(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s}: {e}"))
}

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fuzz: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(path) = &o.replay {
        return replay(o.targets[0], path);
    }
    if let Err(e) = std::fs::create_dir_all(&o.out) {
        eprintln!("fuzz: cannot create {}: {e}", o.out.display());
        return ExitCode::from(2);
    }
    if o.worker {
        worker(&o, o.targets[0]);
        return ExitCode::SUCCESS;
    }
    let mut failures = 0;
    for &t in &o.targets {
        failures += supervise(&o, t);
    }
    println!("fuzz: {failures} new failing inputs in {}", o.out.display());
    ExitCode::SUCCESS
}

fn replay(target: Target, path: &Path) -> ExitCode {
    let input = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("fuzz: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    match run_case(target, &input) {
        None => {
            println!("{}: passes", path.display());
            ExitCode::SUCCESS
        }
        Some(f) => {
            println!("{}: {f}", path.display());
            ExitCode::FAILURE
        }
    }
}

fn progress_path(o: &Opts, t: Target) -> PathBuf {
    o.out.join(format!(".progress-{}", t.name()))
}

fn sigs_path(o: &Opts, t: Target) -> PathBuf {
    o.out.join(format!(".signatures-{}", t.name()))
}

/// Record a failure unless its signature was seen; true when it was new.
fn record(o: &Opts, f: &Found, seen: &mut HashSet<String>) -> bool {
    let sig = f.failure.signature();
    if !seen.insert(sig.clone()) {
        return false;
    }
    let name = format!("{}-{:016x}.bin", f.target.name(), f.case_seed);
    let _ = std::fs::write(o.out.join(&name), &f.input);
    if let Ok(mut s) = OpenOptions::new()
        .create(true)
        .append(true)
        .open(sigs_path(o, f.target))
    {
        let _ = writeln!(s, "{sig}");
    }
    println!(
        "FOUND {} seed=0x{:016x} ({} bytes) -> {}: {}",
        f.target.name(),
        f.case_seed,
        f.input.len(),
        name,
        first_line(&f.failure.to_string())
    );
    true
}

fn first_line(s: &str) -> String {
    s.chars().take(300).collect::<String>().replace('\n', "\\n")
}

fn load_seen(o: &Opts, t: Target) -> HashSet<String> {
    std::fs::read_to_string(sigs_path(o, t))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The worker: run cases from `--first` until `--seconds` pass, writing the current index.
fn worker(o: &Opts, t: Target) {
    let corpus = t.corpus(o.real);
    let progress = File::create(progress_path(o, t)).expect("progress file");
    let mut seen = load_seen(o, t);
    let deadline = Duration::from_secs(o.seconds);
    let mut last_report = Instant::now();
    let mut index = o.first;
    let ran = campaign(
        t,
        &corpus,
        o.seed,
        o.first,
        &mut |done, spent| {
            index = o.first + done;
            let _ = progress.write_all_at(&index.to_le_bytes(), 0);
            if last_report.elapsed() > Duration::from_secs(30) {
                println!(
                    "{}: {done} cases, {:.0}/s",
                    t.name(),
                    done as f64 / spent.as_secs_f64()
                );
                last_report = Instant::now();
            }
            spent >= deadline
        },
        &mut |f| {
            record(o, f, &mut seen);
        },
    );
    println!("{}: worker ran {ran} cases", t.name());
}

/// Run a target for `--seconds`, restarting the worker after each crash; returns new failures.
fn supervise(o: &Opts, t: Target) -> usize {
    let start = Instant::now();
    let total = Duration::from_secs(o.seconds);
    let corpus = t.corpus(o.real);
    println!(
        "fuzz {}: {} seed inputs (default model header: {}), campaign seed {}, {} s",
        t.name(),
        corpus.len(),
        if o.real && slimchat::fuzz::seeds::cached_default_model().is_some() {
            "yes"
        } else {
            "no"
        },
        o.seed,
        o.seconds
    );
    let mut seen = load_seen(o, t);
    let before = seen.len();
    let mut first = o.first;
    let exe = std::env::current_exe().expect("own path");
    while start.elapsed() < total {
        let left = (total - start.elapsed()).as_secs().max(1);
        let _ = std::fs::remove_file(progress_path(o, t));
        let mut args = vec![
            "--worker".to_string(),
            "--target".into(),
            t.name().into(),
            "--seed".into(),
            o.seed.to_string(),
            "--first".into(),
            first.to_string(),
            "--seconds".into(),
            left.to_string(),
            "--out".into(),
            o.out.display().to_string(),
        ];
        if !o.real {
            args.push("--no-real".into());
        }
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -v {WORKER_VMEM_KB}; exec \"$0\" \"$@\""))
            .arg(&exe)
            .args(&args)
            .spawn()
            .expect("worker starts");
        let mut current = (u64::MAX, Instant::now());
        let status = loop {
            std::thread::sleep(Duration::from_millis(100));
            if let Ok(Some(status)) = child.try_wait() {
                break Some(status);
            }
            let index = read_progress(&progress_path(o, t));
            if index != current.0 {
                current = (index, Instant::now());
            } else if current.1.elapsed() > t.time_limit() * 3 {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        };
        if status.is_some_and(|s| s.success()) {
            break;
        }
        let index = read_progress(&progress_path(o, t));
        let seed = case_seed(o.seed, index);
        let failure = match status {
            None => Failure::Slow(current.1.elapsed()),
            Some(s) => Failure::Panic(format!("the worker died: {s}")),
        };
        let found = Found {
            target: t,
            case_seed: seed,
            input: make_case(t, &corpus, seed),
            failure,
        };
        record(o, &found, &mut seen);
        first = index + 1;
    }
    // the workers recorded their own finds in the signatures file
    load_seen(o, t).len() - before
}

fn read_progress(path: &Path) -> u64 {
    let mut b = [0u8; 8];
    match File::open(path).and_then(|f| f.read_exact_at(&mut b, 0)) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => 0,
    }
}
