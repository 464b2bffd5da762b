//! A heap budget for one thread. The chat template is code from a stranger, and minijinja has
//! no hook on string growth: a template that doubles a string in a loop asks for gigabytes in
//! a few dozen instructions, long before its fuel runs out. So the process's allocator counts
//! the bytes a budgeted thread holds, and a thread that asks for more than its budget is stopped
//! where it stands: it raises its flag and sleeps for good, holding what it had (at most the
//! budget). Its caller, which polls the flag, answers with an error. An allocator may not
//! unwind and a failed allocation aborts the process, so sleeping is the one way to stop the
//! thread without stopping the program; [`crate::model::template`] then never runs that
//! template again, so one template can hold at most one budget.
//!
//! Threads without a budget pay one thread-local read per allocation. The binary installs
//! [`BudgetedAlloc`]; another global allocator (the fuzz runner's) calls [`charge`] itself.
//! Without either, budgets are never enforced and renders are unbounded.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The process's allocator: the system's, with the budget check.
pub struct BudgetedAlloc;

#[cfg(test)]
#[global_allocator]
static GLOBAL: BudgetedAlloc = BudgetedAlloc;

thread_local! {
    /// Bytes this thread may still allocate; `None` when it has no budget.
    static LEFT: Cell<Option<isize>> = const { Cell::new(None) };
    /// The flag this thread raises when it runs out.
    static FLAG: Cell<*const AtomicBool> = const { Cell::new(std::ptr::null()) };
}

/// Counts `grow` bytes (negative: freed) against the current thread's budget; past it, stops
/// the thread. A global allocator calls it before each request.
#[inline]
pub fn charge(grow: isize) {
    let Ok(Some(left)) = LEFT.try_with(Cell::get) else {
        return;
    };
    let left = left - grow;
    if left >= 0 || grow <= 0 {
        let _ = LEFT.try_with(|l| l.set(Some(left)));
        return;
    }
    // Out of budget: raise the flag and never return (neither sleeping nor the store allocates).
    let _ = LEFT.try_with(|l| l.set(None));
    if let Ok(flag) = FLAG.try_with(Cell::get) {
        if !flag.is_null() {
            // SAFETY: `limit_current_thread`'s guard keeps the flag alive while the budget is
            // set, and the guard's thread never gets past this point to drop it.
            unsafe { (*flag).store(true, Ordering::Release) };
        }
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

unsafe impl GlobalAlloc for BudgetedAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size() as isize);
        System.alloc(layout)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size() as isize);
        System.alloc_zeroed(layout)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        charge(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        charge(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

/// While the returned guard lives, the current thread may hold at most `bytes` more of heap
/// than it held when this was called; past that, `flag` is raised and the thread sleeps for good.
pub fn limit_current_thread(bytes: usize, flag: Arc<AtomicBool>) -> BudgetGuard {
    FLAG.with(|f| f.set(Arc::as_ptr(&flag)));
    LEFT.with(|l| l.set(Some(bytes.min(isize::MAX as usize) as isize)));
    BudgetGuard { _flag: flag }
}

/// Lifts the budget when dropped.
pub struct BudgetGuard {
    _flag: Arc<AtomicBool>,
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        LEFT.with(|l| l.set(None));
        FLAG.with(|f| f.set(std::ptr::null()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_past_its_budget_stops_and_raises_its_flag() {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        std::thread::spawn(move || {
            let _budget = limit_current_thread(64 << 20, f);
            let mut s = String::from("ab");
            for _ in 0..40 {
                s = format!("{s}{s}");
            }
            unreachable!("a string of {} bytes", s.len());
        });
        let start = std::time::Instant::now();
        while !flag.load(Ordering::Acquire) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the thread was not stopped"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn freed_bytes_return_to_the_budget() {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        std::thread::spawn(move || {
            let _budget = limit_current_thread(16 << 20, f);
            // 1 GiB in all, never more than 8 MiB at once
            for _ in 0..128 {
                let v = vec![1u8; 8 << 20];
                std::hint::black_box(&v);
            }
        })
        .join()
        .unwrap();
        assert!(!flag.load(Ordering::Acquire));
    }
}
