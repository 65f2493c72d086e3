//! Keeping candle's elementwise CPU ops off the cores that rayon's GEMMs and our kernels need.
//!
//! candle 0.11 runs an elementwise op on 64 Ki values or more through its own "barrier pool":
//! `CANDLE_NUM_THREADS - 1` worker threads (by default the rayon thread count minus one) which,
//! after each op, spin up to 25 000 times waiting for the next one before they sleep. In a
//! training step, what comes between two large elementwise ops (candle's gradient accumulation)
//! is mostly GEMMs and our kernels, which run on rayon's threads. With as many threads as cores,
//! the spinning worker holds a core that a rayon worker is waiting for: a perf profile of the
//! 2-thread MNIST step shows the `candle-bp-0` thread in 15 % of the samples.
//!
//! Measured on the 2-core machine (`benches/train_step.rs`, ternary MLP step, three interleaved
//! rounds): 2 threads with the barrier pool 6.6-7.0 ms, 2 threads without it 4.6-5.6 ms, 1 thread
//! 5.2-6.4 ms. Without the pool a second thread helps, as it should: the step's GEMMs alone run
//! 1.4-1.9x faster on two threads than on one.
//!
//! [`elementwise_on_caller`] sets `CANDLE_NUM_THREADS=1`, so the pool has no workers and candle's
//! elementwise ops run on the calling thread; candle's GEMMs keep using every rayon thread. Like
//! [`crate::host_alloc`] it is opt-in (a library should not retune its users' process), and it
//! must come first in `main`: candle reads the variable once, when its first large elementwise
//! op creates the pool.
//!
//! It pays where GEMMs dominate and elementwise ops are few (MLPs, small layers). Where large
//! elementwise ops dominate, the pool's parallelism wins instead: on a transformer it slowed
//! training down (interleaved 20-step runs on the same machine: all-MiniLM-L6-v2 distillation
//! 1.4 -> 1.7 s per step; the char-level LM 3 460 -> 3 270 tokens/s), as long as one graph uses
//! every core. Training in row shards, one per core (`bitnet_training::data_parallel`), reverses
//! that: each shard's elementwise ops then belong on its own thread, and the pool's spinning
//! workers only steal cores from the other shard (char LM, ternary: 2 shards 5 270-5 544
//! tokens/s with this call, 2 808-2 954 without, 3 486-3 585 unsharded with the pool). So the
//! examples call it whenever they train in more than one shard. Measure your own model both ways.
//!
//! Setting an environment variable while another thread reads the environment is undefined
//! behaviour (glibc's `getenv` is not synchronised with `setenv`; Rust 2024 makes `set_var`
//! `unsafe` for this reason). So [`elementwise_on_caller`] only sets the variable when it can
//! see that the calling thread is the process's only one (Linux: `/proc/self/task`), and
//! otherwise returns [`CoreError::EnvironmentBusy`]; elsewhere, or from a program that must start
//! threads first, [`elementwise_on_caller_unchecked`] takes the caller's word for it.
//!
//! ```
//! // First thing in `main`, while no other thread runs.
//! let set = bitnet_core::host_threads::elementwise_on_caller();
//! if cfg!(target_os = "linux") {
//!     // We set it, or the user had chosen a value already, which is left alone.
//!     assert!(set.is_ok() && std::env::var("CANDLE_NUM_THREADS").is_ok());
//! } else {
//!     // No way to check for other threads: refused, nothing changed.
//!     assert!(set.is_err());
//! }
//! ```

use crate::CoreError;

/// The variable candle 0.11 reads for its barrier pool's size.
pub const CANDLE_NUM_THREADS: &str = "CANDLE_NUM_THREADS";

/// Sets `CANDLE_NUM_THREADS=1` unless it is already set (see the module docs); `Ok(true)` when
/// it set the variable, `Ok(false)` when the user's value was kept.
///
/// Call it first in `main`. It refuses with [`CoreError::EnvironmentBusy`], changing nothing,
/// when the process has other threads (a rayon pool already started, say) or the platform
/// cannot tell (anything but Linux), because setting the environment then is not sound.
pub fn elementwise_on_caller() -> Result<bool, CoreError> {
    if std::env::var_os(CANDLE_NUM_THREADS).is_some() {
        return Ok(false);
    }
    match thread_count() {
        Some(1) => {
            // SAFETY: this is the process's only thread, so nothing else can read or write the
            // environment during the call; a new thread can only be started by this one.
            unsafe { set_candle_num_threads() };
            Ok(true)
        }
        Some(n) => Err(CoreError::EnvironmentBusy {
            var: CANDLE_NUM_THREADS,
            reason: format!(
                "the process already runs {n} threads; call elementwise_on_caller first in \
                 main, or set CANDLE_NUM_THREADS=1 in the environment"
            ),
        }),
        None => Err(CoreError::EnvironmentBusy {
            var: CANDLE_NUM_THREADS,
            reason: "this platform gives no way to check that no other thread is running; set \
                     CANDLE_NUM_THREADS=1 in the environment, or use \
                     elementwise_on_caller_unchecked"
                .into(),
        }),
    }
}

/// [`elementwise_on_caller`] without the check that no other thread runs; `true` when it set the
/// variable.
///
/// # Safety
/// No other thread may read or write the process environment during the call (the contract of
/// [`std::env::set_var`]).
pub unsafe fn elementwise_on_caller_unchecked() -> bool {
    if std::env::var_os(CANDLE_NUM_THREADS).is_some() {
        return false;
    }
    // SAFETY: the caller's contract.
    unsafe { set_candle_num_threads() };
    true
}

/// # Safety
/// As [`std::env::set_var`]: no concurrent access to the environment.
unsafe fn set_candle_num_threads() {
    // `set_var` is safe to call in edition 2021 but has this contract all the same.
    #[allow(unused_unsafe)]
    unsafe {
        std::env::set_var(CANDLE_NUM_THREADS, "1")
    };
}

/// The number of threads in this process, where the platform says.
fn thread_count() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        std::fs::read_dir("/proc/self/task").ok().map(|d| d.count())
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test harness runs tests on threads of its own, so the checked call must refuse here
    /// and leave the environment as it was.
    #[test]
    #[cfg(target_os = "linux")]
    fn refuses_while_other_threads_run() {
        let helper =
            std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(200)));
        assert!(thread_count().unwrap() >= 2);
        if std::env::var_os(CANDLE_NUM_THREADS).is_none() {
            let err = elementwise_on_caller().unwrap_err();
            assert!(matches!(err, CoreError::EnvironmentBusy { .. }), "{err}");
            assert!(err.to_string().contains("threads"), "{err}");
            assert!(std::env::var_os(CANDLE_NUM_THREADS).is_none());
        }
        helper.join().unwrap();
    }
}
