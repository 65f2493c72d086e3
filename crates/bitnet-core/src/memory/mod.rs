//! The [`HybridMemoryPool`]: recycled, category-tracked memory for kernels and training state.
//!
//! * Requests below [`PoolConfig::small_threshold`] (default 1 MiB) are rounded up to a
//!   power-of-two size class and served from per-class free lists over slab chunks (`slab`), each
//!   class behind its own lock so that threads allocating different sizes do not contend.
//! * Larger requests go to a buddy allocator (`buddy`) over arenas that grow on demand up to
//!   [`PoolConfig::max_bytes`]; freed blocks merge with their buddies and stay in the arena, so a
//!   repeated large scratch buffer reuses pages that are already mapped.
//! * Every [`PoolBuffer`] carries a [`Category`]; [`HybridMemoryPool::stats`] reports bytes in
//!   use, peak, live count and hit rate per category, plus fragmentation of the buddy pool.
//!
//! Memory is obtained from the system zeroed, once, and never returned while the pool lives (a
//! fully free arena may be released to make room under the cap). Buffers are not zeroed on
//! allocation.

mod buddy;
mod budget;
mod buffer;
mod config;
mod pool;
mod region;
mod scoped;
mod slab;
mod stats;

pub use buffer::PoolBuffer;
pub use config::{PoolConfig, MAX_ALIGN, MIN_ALIGN};
pub use pool::{global_pool, HybridMemoryPool, PoolDevice};
pub use scoped::{current_pool, with_pool};
pub use stats::{Category, CategoryStats, PoolStats};

#[cfg(test)]
mod tests;
