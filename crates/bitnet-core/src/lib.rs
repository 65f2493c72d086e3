//! Devices and memory for bitnet-candle.
//!
//! * [`device`]: pick CUDA, Metal or CPU (`select(Preference::Auto)`) and describe what was chosen.
//! * [`HybridMemoryPool`]: size-class slabs for small blocks plus a buddy pool for large ones, with
//!   per-[`Category`] accounting; the quantizer kernels take their scratch and packed buffers from
//!   [`global_pool`].
//! * [`host_alloc::keep_freed_memory`]: stop glibc from unmapping and re-faulting tensor memory
//!   on every training step (opt-in, one call in `main`).
//! * [`host_memory::peak_resident_bytes`]: the process's peak resident memory, for reports.
//! * [`host_threads::elementwise_on_caller`]: keep candle's spinning elementwise thread pool off
//!   the cores rayon's GEMMs need (opt-in, one call at the start of `main`).
//!
//! Errors are [`CoreError`]; they convert into `candle_core::Error` at candle boundaries.
//!
//! ```
//! use bitnet_core::device::{self, Preference};
//! use bitnet_core::{global_pool, Category, HybridMemoryPool, PoolConfig};
//!
//! # fn main() -> candle_core::Result<()> {
//! let selection = device::select_with_reason(Preference::Auto)?;
//! println!("training on {} because {}", selection.info.name, selection.reason);
//!
//! // Scratch space for a kernel: 4096 f32 values from the process-wide pool.
//! let mut scratch = global_pool().allocate_slice::<f32>(4096, Category::Scratch)?;
//! scratch.as_mut_slice_of::<f32>().fill(1.5);
//! assert_eq!(scratch.as_slice_of::<f32>().iter().sum::<f32>(), 6144.0);
//! drop(scratch); // back to the pool, ready for the next kernel
//!
//! // A pool of your own, with a cap, shared by cloning the handle.
//! let pool = HybridMemoryPool::new(PoolConfig { max_bytes: 256 << 20, ..Default::default() })?;
//! let weights = pool.allocate(16 << 20, 64, Category::PackedWeights)?;
//! let stats = pool.stats();
//! assert_eq!(stats.category(Category::PackedWeights).bytes_in_use, 16 << 20);
//! drop(weights);
//! assert_eq!(pool.stats().overall.bytes_in_use, 0);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod device;
pub mod error;
pub mod host_alloc;
pub mod host_memory;
pub mod host_threads;
pub mod memory;

pub use error::CoreError;
pub use memory::{
    current_pool, global_pool, with_pool, Category, CategoryStats, HybridMemoryPool, PoolBuffer,
    PoolConfig, PoolDevice, PoolStats,
};
