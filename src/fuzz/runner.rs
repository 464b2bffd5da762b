//! Running cases: make case `i` of a campaign from its seed, run it with panics caught, time
//! it and measure its largest allocation, and report each failure with what reproduces it.

use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use super::alloc;
use super::mutate::{Mutator, Rng};
use super::Target;

/// What went wrong with a case.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    Panic(String),
    /// A rule of the target was broken (an error of two lines, a round trip that changed, ...).
    Violation(String),
    Slow(Duration),
    Alloc(usize),
}

impl Failure {
    /// The kind and message with numbers blanked, to tell new failures from repeats.
    pub fn signature(&self) -> String {
        let text = match self {
            Failure::Panic(m) => format!("panic {m}"),
            Failure::Violation(m) => format!("violation {m}"),
            Failure::Slow(_) => "slow".into(),
            Failure::Alloc(_) => "alloc".into(),
        };
        let mut out = String::new();
        for c in text.chars().take(160) {
            if c.is_ascii_digit() {
                if !out.ends_with('#') {
                    out.push('#');
                }
            } else {
                out.push(c);
            }
        }
        out
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Panic(m) => write!(f, "panic: {m}"),
            Failure::Violation(m) => write!(f, "violation: {m}"),
            Failure::Slow(d) => write!(f, "slow: {:.1} s", d.as_secs_f64()),
            Failure::Alloc(n) => write!(f, "allocation of {n} bytes"),
        }
    }
}

thread_local! {
    /// Set while this thread runs a case: its panics are recorded, not printed.
    static IN_CASE: Cell<bool> = const { Cell::new(false) };
}
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);
static HOOK: Once = Once::new();

fn install_hook() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if IN_CASE.with(Cell::get) {
                let msg = match info.payload().downcast_ref::<&str>() {
                    Some(s) => s.to_string(),
                    None => info
                        .payload()
                        .downcast_ref::<String>()
                        .cloned()
                        .unwrap_or_else(|| "non-string panic".into()),
                };
                let at = info
                    .location()
                    .map(|l| format!(" at {l}"))
                    .unwrap_or_default();
                *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{msg}{at}"));
            } else {
                previous(info);
            }
        }));
    });
}

/// Run one input; `None` when it passed.
pub fn run_case(target: Target, input: &[u8]) -> Option<Failure> {
    install_hook();
    alloc::take_largest();
    let start = Instant::now();
    IN_CASE.with(|c| c.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(|| target.check(input)));
    IN_CASE.with(|c| c.set(false));
    let took = start.elapsed();
    let largest = alloc::take_largest();
    match result {
        Err(_) => {
            let msg = LAST_PANIC
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or_else(|| "panic".into());
            return Some(Failure::Panic(msg));
        }
        Ok(Err(why)) => return Some(Failure::Violation(why)),
        Ok(Ok(())) => {}
    }
    if largest > target.alloc_limit(input.len()) {
        return Some(Failure::Alloc(largest));
    }
    (took > target.time_limit()).then_some(Failure::Slow(took))
}

/// The seed of case `index` of a campaign.
pub fn case_seed(campaign: u64, index: u64) -> u64 {
    let mut r = Rng::new(campaign ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    r.next_u64()
}

/// Bytes of case `seed`: a corpus entry, mutated.
pub fn make_case(target: Target, corpus: &[Vec<u8>], seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let base = &corpus[rng.below(corpus.len())];
    let mut input = base.clone();
    let mut m = Mutator {
        rng,
        corpus,
        dictionary: target.dictionary(),
        hot: target.hot_bytes(base),
    };
    m.mutate(&mut input);
    input
}

/// One found failure.
#[derive(Debug, Clone)]
pub struct Found {
    pub target: Target,
    pub case_seed: u64,
    pub input: Vec<u8>,
    pub failure: Failure,
}

/// Run cases `first..` of campaign `campaign` until `until` says stop (given cases run and
/// time spent); `found` sees each failure. Returns the number of cases run.
pub fn campaign(
    target: Target,
    corpus: &[Vec<u8>],
    campaign: u64,
    first: u64,
    until: &mut dyn FnMut(u64, Duration) -> bool,
    found: &mut dyn FnMut(&Found),
) -> u64 {
    let start = Instant::now();
    let mut index = first;
    while !until(index - first, start.elapsed()) {
        let seed = case_seed(campaign, index);
        let input = make_case(target, corpus, seed);
        if let Some(failure) = run_case(target, &input) {
            found(&Found {
                target,
                case_seed: seed,
                input,
                failure,
            });
        }
        index += 1;
    }
    index - first
}
