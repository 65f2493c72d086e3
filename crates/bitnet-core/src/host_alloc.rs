//! Keeping freed tensor memory inside the process between training steps.
//!
//! candle gives every intermediate tensor of a step (activations, gradients, the temporaries of
//! the backward) a fresh `Vec`. glibc serves blocks above its mmap threshold with `mmap` and hands
//! them back with `munmap` on free, and trims the top of the heap back to the kernel; the next step
//! then page-faults and zeroes the same memory again. On the MNIST MLP (batch 128, one thread) that
//! is about a third of the ternary training step: 13.6 ms per step by default, 8.7 ms with
//! [`keep_freed_memory`] (`benches/train_step.rs`, same run).
//!
//! A library must not pick the global allocator for its users, so this is opt-in: call it once at
//! the start of `main`. Programs that already use another allocator (mimalloc, jemalloc) do not
//! need it.
//!
//! ```
//! let applied = bitnet_core::host_alloc::keep_freed_memory();
//! // glibc on Linux is tuned; elsewhere nothing changes and `false` says so.
//! assert_eq!(applied, cfg!(all(target_os = "linux", target_env = "gnu")));
//! ```

/// The mmap threshold set by [`keep_freed_memory`]: glibc's largest allowed value on 64-bit targets
/// (`DEFAULT_MMAP_THRESHOLD_MAX`). Blocks up to this size are served from the heap and reused.
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// The trim threshold set by [`keep_freed_memory`]: free memory at the top of the heap is returned
/// to the kernel only once it exceeds this.
pub const TRIM_THRESHOLD: usize = 256 << 20;

/// Tells the C allocator to keep freed blocks for reuse instead of returning them to the kernel
/// (glibc `mallopt(M_MMAP_THRESHOLD, 32 MiB)` and `mallopt(M_TRIM_THRESHOLD, 256 MiB)`), in one
/// arena shared by every thread (`mallopt(M_ARENA_MAX, 1)`).
///
/// The single arena matters once memory is kept: glibc gives each thread that allocates its own
/// arena, and a block freed in one arena serves only that arena's threads, so training in shards
/// kept a copy of the freed tensors per thread. The char LM's 2-shard step peaked at 639 MB
/// resident with per-thread arenas and 537 MB with one, at the same tokens per second
/// (interleaved runs); candle allocates per tensor, too rarely for the shared lock to show. Only
/// arenas created after the call are affected, so call it first in `main`.
///
/// Returns `true` when the settings were applied, `false` where they do not exist (not Linux with
/// glibc) or glibc refused them. The cost is resident memory: up to [`TRIM_THRESHOLD`] of freed
/// heap stays mapped. Safe to call more than once and from any thread.
pub fn keep_freed_memory() -> bool {
    imp::keep_freed_memory()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use super::{MMAP_THRESHOLD, TRIM_THRESHOLD};

    pub fn keep_freed_memory() -> bool {
        // SAFETY: `mallopt` only changes glibc's allocation parameters; it is thread-safe (it takes
        // the arena locks) and both values are within the ranges glibc documents, so no
        // allocation made before or after the call is affected in validity.
        let mmap_ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as i32) };
        // SAFETY: as above.
        let trim_ok = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as i32) };
        // SAFETY: as above; threads that already have an arena keep it.
        let arena_ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
        mmap_ok == 1 && trim_ok == 1 && arena_ok == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn keep_freed_memory() -> bool {
        false
    }
}
