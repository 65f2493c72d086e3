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
//! ```
//! bitnet_core::host_threads::elementwise_on_caller();
//! // Either we set it, or the user had chosen a value already, which is left alone.
//! assert!(std::env::var("CANDLE_NUM_THREADS").is_ok());
//! ```

/// The variable candle 0.11 reads for its barrier pool's size.
pub const CANDLE_NUM_THREADS: &str = "CANDLE_NUM_THREADS";

/// Sets `CANDLE_NUM_THREADS=1` unless it is already set (see the module docs). Returns whether
/// it set the variable. Call it at the start of `main`, before any other thread exists: it
/// changes the process environment.
pub fn elementwise_on_caller() -> bool {
    if std::env::var_os(CANDLE_NUM_THREADS).is_some() {
        return false;
    }
    std::env::set_var(CANDLE_NUM_THREADS, "1");
    true
}
