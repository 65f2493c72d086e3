//! Choosing which pool bitnet's kernels draw from: [`with_pool`] and [`current_pool`].
//!
//! Candle's custom ops take no extra arguments, so a pool cannot be passed to a kernel directly.
//! Instead the caller names a pool for a stretch of code on its thread, and every kernel that
//! needs scratch or packed memory asks [`current_pool`]. Kernels allocate on the thread that
//! called the op (before any rayon fan-out), so the choice reaches them.
//!
//! ```
//! use bitnet_core::{current_pool, with_pool, Category, HybridMemoryPool, PoolConfig};
//!
//! let mine = HybridMemoryPool::new(PoolConfig::default())?;
//! with_pool(&mine, || -> candle_core::Result<()> {
//!     let _scratch = current_pool().allocate(4096, 64, Category::Scratch)?;
//!     Ok(())
//! })?;
//! assert_eq!(mine.stats().category(Category::Scratch).total_allocations, 1);
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::cell::RefCell;

use super::pool::{global_pool, HybridMemoryPool};

thread_local! {
    /// The pools named by the active `with_pool` calls on this thread, innermost last.
    static STACK: RefCell<Vec<HybridMemoryPool>> = const { RefCell::new(Vec::new()) };
}

/// Pops this thread's innermost pool when dropped, so that a panic inside [`with_pool`] (caught
/// further up, e.g. by a test harness) does not leave the pool in charge of later code.
struct Pop;

impl Drop for Pop {
    fn drop(&mut self) {
        STACK.with(|s| s.borrow_mut().pop());
    }
}

/// Runs `f` with `pool` as the pool that bitnet kernels on this thread take their scratch and
/// packed-weight buffers from, then restores the previous choice (also when `f` panics). Calls
/// nest; the innermost wins.
///
/// Use it for a separate cap (a kernel then fails with the pool's cap error instead of growing
/// the process) or separate accounting (the pool's `stats()` show only what `f` used). Buffers
/// allocated inside (packed weights, say) keep their pool alive and return to it when dropped,
/// after `with_pool` has returned. Only the calling thread is affected: threads that `f` spawns
/// itself start with the global pool.
pub fn with_pool<R>(pool: &HybridMemoryPool, f: impl FnOnce() -> R) -> R {
    STACK.with(|s| s.borrow_mut().push(pool.clone()));
    let _pop = Pop;
    f()
}

/// The pool bitnet kernels on this thread allocate from: the innermost [`with_pool`]'s, else
/// [`global_pool`]. A cheap handle (an `Arc` clone).
pub fn current_pool() -> HybridMemoryPool {
    STACK
        .with(|s| s.borrow().last().cloned())
        .unwrap_or_else(|| global_pool().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Category, PoolConfig};

    fn pool() -> HybridMemoryPool {
        HybridMemoryPool::try_new(PoolConfig::default()).unwrap()
    }

    fn allocations(p: &HybridMemoryPool) -> u64 {
        p.stats().category(Category::Scratch).total_allocations
    }

    fn allocate_one() {
        current_pool()
            .allocate(100, 64, Category::Scratch)
            .expect("allocation");
    }

    #[test]
    fn the_innermost_pool_serves_and_the_outer_one_comes_back() {
        let (outer, inner) = (pool(), pool());
        with_pool(&outer, || {
            allocate_one();
            with_pool(&inner, allocate_one);
            allocate_one();
        });
        assert_eq!(allocations(&outer), 2);
        assert_eq!(allocations(&inner), 1);
        with_pool(&outer, || assert_eq!(allocations(&current_pool()), 2));
    }

    #[test]
    fn a_panic_inside_does_not_leave_the_pool_in_charge() {
        let mine = pool();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            with_pool(&mine, || panic!("inside"));
        }));
        assert!(caught.is_err());
        allocate_one();
        assert_eq!(allocations(&mine), 0, "the global pool serves again");
        STACK.with(|s| assert!(s.borrow().is_empty()));
    }

    #[test]
    fn other_threads_keep_the_global_pool() {
        let mine = pool();
        with_pool(&mine, || {
            std::thread::scope(|s| s.spawn(allocate_one).join().unwrap())
        });
        assert_eq!(allocations(&mine), 0);
    }

    #[test]
    fn the_cap_of_the_chosen_pool_applies() {
        let small = HybridMemoryPool::try_new(PoolConfig {
            max_bytes: 64 << 20,
            ..PoolConfig::default()
        })
        .unwrap();
        let err = with_pool(&small, || {
            current_pool().allocate(128 << 20, 64, Category::Scratch)
        })
        .unwrap_err();
        assert!(err.to_string().contains("cap exceeded"), "{err}");
    }
}
