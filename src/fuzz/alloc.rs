//! A global allocator for the fuzz binaries (tests/fuzz.rs, examples/fuzz.rs) that remembers
//! the largest single request since the last [`take_largest`], so a case can be failed for an
//! allocation sized by its bytes rather than by what they can hold, and that refuses any
//! request above [`HARD_CAP`] (the process then aborts, which the runner reports) so that one
//! bad case cannot take the machine's memory.
//!
//! It also enforces [`crate::heap_budget`]'s per-thread budgets, as the binary's allocator does.
//!
//! Install it with `#[global_allocator] static A: slimchat::fuzz::alloc::Tracking =
//! slimchat::fuzz::alloc::Tracking;`; without it `take_largest` always reads 0.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::heap_budget;

/// Largest single allocation a fuzz process makes: 2 GiB.
pub const HARD_CAP: usize = 2 << 30;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

pub struct Tracking;

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        heap_budget::charge(layout.size() as isize);
        if layout.size() > HARD_CAP {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        heap_budget::charge(layout.size() as isize);
        if layout.size() > HARD_CAP {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        heap_budget::charge(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        heap_budget::charge(new_size as isize - layout.size() as isize);
        if new_size > HARD_CAP {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

fn note(size: usize) {
    INSTALLED.store(true, Ordering::Relaxed);
    LARGEST.fetch_max(size, Ordering::Relaxed);
}

/// The largest request since the last call (over every thread), and start counting again.
pub fn take_largest() -> usize {
    LARGEST.swap(0, Ordering::Relaxed)
}

/// Whether [`Tracking`] is the global allocator of this process.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}
