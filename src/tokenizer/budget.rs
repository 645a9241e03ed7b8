//! Memory budget for rendering a chat template that may be hostile.
//!
//! minijinja's fuel bounds the instructions a template runs, but not what one instruction
//! allocates: `{% set ns.s = ns.s ~ ns.s %}` forty times is a few hundred instructions and a
//! terabyte string, and an allocation that fails aborts the process. A failed allocation
//! cannot be turned into an error inside the library that made it, so the rendering runs on
//! a thread of its own under [`BudgetedAlloc`]: when that thread has allocated more than its
//! budget, the allocator stops it for good (it sleeps; it never returns the memory) and the
//! caller gets an error instead of the rendering. The parked thread keeps at most the
//! budget; the process is about to report the error and end.
//!
//! The budget only holds where the binary installs [`BudgetedAlloc`] as its global
//! allocator (the CLI and the Python package do); elsewhere [`with_budget`] runs the
//! closure on its thread unbounded.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// The system allocator, counting what threads under [`with_budget`] allocate.
pub struct BudgetedAlloc;

thread_local! {
    /// Bytes this thread may still allocate; `usize::MAX` for threads without a budget.
    static LEFT: Cell<usize> = const { Cell::new(usize::MAX) };
    /// Set when this thread runs out of its budget (null for threads without one).
    static SPENT: Cell<*const AtomicBool> = const { Cell::new(std::ptr::null()) };
}

/// Takes `bytes` from this thread's budget, or parks the thread for good when it has none
/// left. Touches only const thread-locals, so it allocates nothing itself.
fn charge(bytes: usize) {
    let left = LEFT.with(Cell::get);
    if left == usize::MAX {
        return;
    }
    if bytes <= left {
        LEFT.with(|c| c.set(left - bytes));
        return;
    }
    let spent = SPENT.with(Cell::get);
    // SAFETY: `with_budget` keeps the flag alive (an Arc the parked thread holds) before it
    // sets the pointer.
    unsafe { (*spent).store(true, Ordering::SeqCst) };
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

// SAFETY: every call is forwarded to `System` unchanged; `charge` only reads and writes this
// thread's counters, and never unwinds.
unsafe impl GlobalAlloc for BudgetedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        charge(new_size.saturating_sub(layout.size()));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// The error of a closure that ran out of its budget.
#[derive(Debug)]
pub struct OverBudget {
    /// The budget it ran out of, in bytes.
    pub bytes: usize,
}

/// Runs `f` on a thread of its own that may allocate `bytes` in all (allocations add up;
/// frees give nothing back) and returns its value, or [`OverBudget`] when it needed more.
pub fn with_budget<T: Send + 'static>(
    bytes: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, OverBudget> {
    let spent = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::sync_channel(1);
    let flag = Arc::clone(&spent);
    let thread = std::thread::spawn(move || {
        SPENT.with(|c| c.set(Arc::as_ptr(&flag)));
        LEFT.with(|c| c.set(bytes));
        let value = f();
        LEFT.with(|c| c.set(usize::MAX));
        let _ = tx.send(value);
    });
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(value) => return Ok(value),
            Err(_) if spent.load(Ordering::SeqCst) => return Err(OverBudget { bytes }),
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => match thread.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(()) => unreachable!("the thread sends its value before it ends"),
            },
        }
    }
}
