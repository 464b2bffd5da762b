//! A short pass of every fuzz target (fixed campaign seeds, a bounded number of cases), every
//! input the long runner (`examples/fuzz.rs`) found, kept in tests/fixtures/fuzz/, and the
//! GGUF header attacks by name. See src/fuzz/ for the targets and their rules.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use slimchat::fuzz::alloc::{self, Tracking};
use slimchat::fuzz::runner::{campaign, run_case, Found};
use slimchat::fuzz::Target;
use slimchat::model::gguf::GgufFile;

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// The allocator's record of the largest request is process-wide, so a test that reads it must
/// not run beside another that allocates: every test here holds this lock.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `cases` cases of campaign `seed` and fail with every failure found.
fn short_pass(target: Target, seed: u64, cases: u64) {
    let corpus = target.corpus(true);
    // every seed input passes before any mutation
    for (i, input) in corpus.iter().enumerate() {
        if let Some(f) = run_case(target, input) {
            panic!("{} seed input {i} fails: {f}", target.name());
        }
    }
    let mut found: Vec<Found> = Vec::new();
    let ran = campaign(
        target,
        &corpus,
        seed,
        0,
        &mut |done, _| done >= cases,
        &mut |f| found.push(f.clone()),
    );
    assert_eq!(ran, cases);
    let report: Vec<String> = found
        .iter()
        .map(|f| format!("seed 0x{:016x}: {}", f.case_seed, f.failure))
        .collect();
    assert!(report.is_empty(), "{}: {report:#?}", target.name());
}

#[test]
fn gguf_short_pass() {
    let _serial = serial();
    short_pass(Target::Gguf, 0x5eed_0001, 300);
}

#[test]
fn tokenizer_short_pass() {
    let _serial = serial();
    short_pass(Target::Tokenizer, 0x5eed_0002, 60);
}

#[test]
fn template_short_pass() {
    let _serial = serial();
    short_pass(Target::Template, 0x5eed_0003, 300);
}

#[test]
fn config_short_pass() {
    let _serial = serial();
    short_pass(Target::Config, 0x5eed_0004, 800);
}

#[test]
fn conversation_short_pass() {
    let _serial = serial();
    short_pass(Target::Conversation, 0x5eed_0005, 400);
}

#[test]
fn tui_short_pass() {
    let _serial = serial();
    short_pass(Target::Tui, 0x5eed_0006, 150);
}

/// Every input a long run found (tests/fixtures/fuzz/TARGET-SEED.bin) passes now.
#[test]
fn found_inputs_pass() {
    let _serial = serial();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/fixtures/fuzz") {
        let path = entry.expect("entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Some(target) = name.split('-').next().and_then(Target::parse) else {
            continue;
        };
        let input = std::fs::read(&path).unwrap();
        if let Some(f) = run_case(target, &input) {
            panic!("{name}: {f}");
        }
        checked += 1;
    }
    assert!(checked > 0, "no fuzz fixtures found in {}", dir.display());
}

/// The tracking allocator is installed, so the allocation limit is really measured.
#[test]
fn allocations_are_measured() {
    let _serial = serial();
    let v: Vec<u8> = Vec::with_capacity(3 << 20);
    drop(v);
    assert!(alloc::installed());
}

/// A GGUF v3 file written field by field, so each attack can put any number anywhere.
#[derive(Clone)]
struct Raw {
    n_tensors: u64,
    n_kv: u64,
    kvs: Vec<u8>,
    tensors: Vec<u8>,
    data: Vec<u8>,
}

fn string(out: &mut Vec<u8>, len: u64, s: &str) {
    out.extend(len.to_le_bytes());
    out.extend(s.as_bytes());
}

impl Raw {
    /// An F32 tensor `t` of 32 values and `general.architecture = llama`.
    fn new() -> Self {
        let mut r = Raw {
            n_tensors: 0,
            n_kv: 0,
            kvs: Vec::new(),
            tensors: Vec::new(),
            data: vec![0; 128],
        };
        r.kv_str("general.architecture", "llama");
        r.tensor("t", &[32], 0, 0);
        r
    }
    fn kv_str(&mut self, key: &str, value: &str) {
        string(&mut self.kvs, key.len() as u64, key);
        self.kvs.extend(8u32.to_le_bytes());
        string(&mut self.kvs, value.len() as u64, value);
        self.n_kv += 1;
    }
    fn kv_u32(&mut self, key: &str, value: u32) {
        string(&mut self.kvs, key.len() as u64, key);
        self.kvs.extend(4u32.to_le_bytes());
        self.kvs.extend(value.to_le_bytes());
        self.n_kv += 1;
    }
    /// An array of `len` u8 values whose bytes are not all there.
    fn kv_array(&mut self, key: &str, elem: u32, len: u64) {
        string(&mut self.kvs, key.len() as u64, key);
        self.kvs.extend(9u32.to_le_bytes());
        self.kvs.extend(elem.to_le_bytes());
        self.kvs.extend(len.to_le_bytes());
        self.kvs.extend([1, 2, 3, 4]);
        self.n_kv += 1;
    }
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) {
        string(&mut self.tensors, name.len() as u64, name);
        self.tensors.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.tensors.extend(d.to_le_bytes());
        }
        self.tensors.extend(ty.to_le_bytes());
        self.tensors.extend(offset.to_le_bytes());
        self.n_tensors += 1;
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(self.n_tensors.to_le_bytes());
        b.extend(self.n_kv.to_le_bytes());
        b.extend(&self.kvs);
        b.extend(&self.tensors);
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend(&self.data);
        b
    }
}

/// Open `bytes`; the error must be one line holding every piece of `want`, and no allocation
/// on the way may exceed 1 MiB (the file is a few hundred bytes).
#[track_caller]
fn refused(bytes: Vec<u8>, want: &[&str]) {
    alloc::take_largest();
    let err = match GgufFile::from_bytes(Path::new("attack.gguf"), bytes) {
        Ok(_) => panic!("the file was accepted; wanted {want:?}"),
        Err(e) => e.to_string(),
    };
    let largest = alloc::take_largest();
    assert!(largest < 1 << 20, "{largest} bytes allocated for: {err}");
    assert!(!err.contains('\n'), "{err:?}");
    for w in want {
        assert!(err.contains(w), "{err:?} lacks {w:?}");
    }
}

#[test]
fn the_raw_writer_makes_a_file_that_opens() {
    let _serial = serial();
    let f = GgufFile::from_bytes(Path::new("ok.gguf"), Raw::new().bytes()).expect("opens");
    assert_eq!(f.content.tensor_infos["t"].shape.dims(), [32]);
}

#[test]
fn huge_counts_and_lengths_are_refused_before_allocating() {
    let _serial = serial();
    let mut r = Raw::new();
    r.n_kv = 1 << 60;
    refused(r.bytes(), &["attack.gguf", "truncated"]);
    let mut r = Raw::new();
    r.n_tensors = u64::MAX;
    refused(r.bytes(), &["truncated"]);
    let mut r = Raw::new();
    r.kv_array("tokenizer.ggml.tokens", 8, 1 << 60);
    refused(
        r.bytes(),
        &["tokenizer.ggml.tokens", "array of 1152921504606846976"],
    );
    let mut r = Raw::new();
    r.kv_array("x", 0, u64::MAX);
    refused(r.bytes(), &["truncated", "x"]);
    let mut r = Raw::new();
    string(&mut r.kvs, u64::MAX, "");
    r.n_kv += 1;
    refused(
        r.bytes(),
        &["truncated", "string of 18446744073709551615 bytes"],
    );
    let mut r = Raw::new();
    r.kv_array("nested", 9, 1);
    refused(r.bytes(), &["nested", "unknown value type"]);
}

#[test]
fn alignment_must_be_a_power_of_two() {
    let _serial = serial();
    // candle's reader divides by it: 0 was a panic
    for a in [0, 3, 48] {
        let mut r = Raw::new();
        r.kv_u32("general.alignment", a);
        refused(r.bytes(), &["general.alignment", "power of two"]);
    }
}

#[test]
fn tensor_tables_that_lie_are_refused() {
    let _serial = serial();
    let with = |dims: &[u64], ty: u32, offset: u64| {
        let mut r = Raw::new();
        r.tensor("bad", dims, ty, offset);
        r.bytes()
    };
    // element counts that overflow 64 bits (wrapped to a small size in release builds)
    refused(with(&[1 << 32, 1 << 32], 0, 0), &["bad", "overflow"]);
    refused(with(&[32, u64::MAX], 0, 0), &["bad", "overflow"]);
    // bytes past the end of the file, offsets that overflow, misaligned offsets
    refused(
        with(&[32, 1 << 20], 0, 0),
        &["truncated", "bad", "ends at byte"],
    );
    refused(with(&[32], 0, u64::MAX - 31), &["bad", "overflow"]);
    refused(with(&[32], 0, 1 << 40), &["truncated", "bad"]);
    refused(with(&[32], 0, 7), &["bad", "alignment"]);
    // rows that are not whole blocks, too many dimensions, unknown and unreadable types
    refused(with(&[33], 2, 0), &["bad", "whole blocks"]);
    refused(with(&[1, 1, 1, 1, 1], 0, 0), &["bad", "5 dimensions"]);
    refused(with(&[32], 20, 0), &["bad", "IQ4_NL (type 20)"]);
    refused(with(&[32], 1000, 0), &["bad", "unknown type 1000"]);
    // a name twice
    let mut r = Raw::new();
    r.tensor("t", &[32], 0, 0);
    refused(r.bytes(), &["tensor t appears twice"]);
}

#[test]
fn names_from_the_file_are_shown_on_one_line() {
    let _serial = serial();
    let mut r = Raw::new();
    let name = format!("evil\n\u{1b}[2J{}", "x".repeat(500));
    r.tensor(&name, &[32], 77, 0);
    refused(r.bytes(), &["evil", "\\u{1b}", "..."]);
}
