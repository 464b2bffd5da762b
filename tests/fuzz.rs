//! A short pass of every fuzz target (fixed campaign seeds, a bounded number of cases), every
//! input the long runner (`examples/fuzz.rs`) found, kept in tests/fixtures/fuzz/, and the
//! GGUF header attacks by name. See src/fuzz/ for the targets and their rules.

use std::path::Path;

use slimchat::fuzz::alloc::{self, Tracking};
use slimchat::fuzz::runner::{campaign, run_case, Found};
use slimchat::fuzz::{seeds, Target};
use slimchat::model::gguf::GgufFile;

#[global_allocator]
static ALLOC: Tracking = Tracking;

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
    short_pass(Target::Gguf, 0x5eed_0001, 300);
}

#[test]
fn tokenizer_short_pass() {
    short_pass(Target::Tokenizer, 0x5eed_0002, 60);
}

#[test]
fn template_short_pass() {
    short_pass(Target::Template, 0x5eed_0003, 300);
}

#[test]
fn config_short_pass() {
    short_pass(Target::Config, 0x5eed_0004, 800);
}

#[test]
fn conversation_short_pass() {
    short_pass(Target::Conversation, 0x5eed_0005, 400);
}

#[test]
fn tui_short_pass() {
    short_pass(Target::Tui, 0x5eed_0006, 150);
}

/// Every input a long run found (tests/fixtures/fuzz/TARGET-SEED.bin) passes now.
#[test]
fn found_inputs_pass() {
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
    let v: Vec<u8> = Vec::with_capacity(3 << 20);
    drop(v);
    assert!(alloc::installed());
}
