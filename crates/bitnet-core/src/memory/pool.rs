//! [`HybridMemoryPool`]: routes each request to the slabs or the buddy pool and keeps the books.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::buddy::Buddy;
use super::budget::Budget;
use super::buffer::{PoolBuffer, Source};
use super::config::{PoolConfig, MAX_ALIGN};
use super::slab::Slab;
use super::stats::{Category, PoolStats, Tracker};
use crate::CoreError;

/// The memory a pool hands out. Only host memory today; device pools (CUDA, Metal buffers) will
/// be further variants, so code matching on it must allow for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolDevice {
    /// Host (CPU) memory.
    Cpu,
}

/// The state shared by a pool and all of its live buffers. Buffers hold an `Arc` to it, so the
/// backing memory outlives every buffer even if the pool handle is dropped first.
pub(crate) struct PoolInner {
    config: PoolConfig,
    slab: Slab,
    buddy: Mutex<Buddy>,
    budget: Budget,
    tracker: Tracker,
}

fn lock(m: &Mutex<Buddy>) -> MutexGuard<'_, Buddy> {
    // Every buddy operation completes its set updates before anything that can panic, so a
    // poisoned lock still guards consistent state.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PoolInner {
    /// Gives a buffer's block back; called once, from `PoolBuffer::drop`.
    pub(crate) fn release(&self, buf: &PoolBuffer) {
        match buf.source() {
            Source::Small { class } => self.slab.free(class as usize, buf.raw_ptr()),
            Source::Large(block) => lock(&self.buddy).free(block),
        }
        self.tracker.on_free(buf.category(), buf.len());
    }
}

/// A thread-safe memory pool for one device: size-class slabs for requests below
/// `small_threshold`, a buddy allocator over growable arenas for the rest.
///
/// Cloning is cheap and yields a handle to the same pool (it is an `Arc` inside).
///
/// Buffers are **not zeroed** on allocation: a buffer holds whatever its previous owner left
/// (or zeros, for memory never used before). The bytes are always initialised, so reading them
/// is safe; only their values are unspecified. Zero explicitly when you need zeros. Skipping the
/// zeroing is what lets a reused large scratch buffer cost one pass of writes instead of two.
#[derive(Clone)]
pub struct HybridMemoryPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for HybridMemoryPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridMemoryPool")
            .field("config", &self.inner.config)
            .field("reserved_bytes", &self.inner.budget.reserved())
            .finish()
    }
}

impl HybridMemoryPool {
    /// Builds a host-memory pool after validating `config`. No memory is reserved until the
    /// first allocation.
    pub fn new(config: PoolConfig) -> candle_core::Result<Self> {
        Ok(Self::try_new(config)?)
    }

    /// [`HybridMemoryPool::new`] with the crate's own error type.
    pub fn try_new(config: PoolConfig) -> Result<Self, CoreError> {
        config.validate()?;
        let inner = PoolInner {
            slab: Slab::new(config.small_threshold, config.slab_chunk_size),
            buddy: Mutex::new(Buddy::new(config.small_threshold, config.arena_size)),
            budget: Budget::new(config.max_bytes),
            tracker: Tracker::default(),
            config,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// A handle to the pool that owns `inner` (how a buffer names its pool).
    pub(crate) fn from_inner(inner: Arc<PoolInner>) -> Self {
        Self { inner }
    }

    /// The configuration this pool was built with.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// The device whose memory this pool manages.
    pub fn device(&self) -> PoolDevice {
        PoolDevice::Cpu
    }

    /// Allocates `size` bytes aligned to at least `max(align, config.min_align)`, charged to
    /// `category`. The contents are unspecified (see the type docs). `align` must be a power of
    /// two no larger than [`MAX_ALIGN`]; a request that would take the pool's reserved memory
    /// above `max_bytes` fails with an error rather than aborting.
    pub fn allocate(
        &self,
        size: usize,
        align: usize,
        category: Category,
    ) -> candle_core::Result<PoolBuffer> {
        Ok(self.try_allocate(size, align, category)?)
    }

    /// [`HybridMemoryPool::allocate`] with the crate's own error type, for callers that react to
    /// [`CoreError::CapExceeded`] (e.g. by falling back to a smaller tile).
    pub fn try_allocate(
        &self,
        size: usize,
        align: usize,
        category: Category,
    ) -> Result<PoolBuffer, CoreError> {
        let result = self.allocate_block(size, align);
        match result {
            Ok((ptr, source, hit)) => {
                self.inner.tracker.on_alloc(category, size, hit);
                Ok(PoolBuffer::new(
                    ptr,
                    size,
                    source,
                    category,
                    Arc::clone(&self.inner),
                ))
            }
            Err(e) => {
                self.inner.tracker.on_failure(category);
                Err(e)
            }
        }
    }

    /// Allocates room for `len` values of `T`, aligned for `T`; view it with
    /// [`PoolBuffer::as_slice_of`] / [`PoolBuffer::as_mut_slice_of`].
    pub fn allocate_slice<T: bytemuck::Pod>(
        &self,
        len: usize,
        category: Category,
    ) -> candle_core::Result<PoolBuffer> {
        let size = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or(CoreError::SizeOverflow { size: usize::MAX })?;
        self.allocate(size, std::mem::align_of::<T>(), category)
    }

    fn allocate_block(
        &self,
        size: usize,
        align: usize,
    ) -> Result<(std::ptr::NonNull<u8>, Source, bool), CoreError> {
        if !align.is_power_of_two() || align > MAX_ALIGN {
            return Err(CoreError::InvalidAlignment {
                align,
                max: MAX_ALIGN,
            });
        }
        let inner = &*self.inner;
        // Blocks are power-of-two sized at offsets that are multiples of their size inside
        // page-aligned regions, so rounding the block up to the alignment honours it.
        let block = size
            .max(align)
            .max(inner.config.min_align)
            .checked_next_power_of_two()
            .ok_or(CoreError::SizeOverflow { size })?;
        if size < inner.config.small_threshold {
            let class = Slab::class_of(block);
            debug_assert_eq!(inner.slab.slot_size(class), block);
            let a = inner.slab.allocate(class, size, &inner.budget)?;
            Ok((
                a.ptr,
                Source::Small {
                    class: class as u32,
                },
                a.hit,
            ))
        } else {
            let a = lock(&inner.buddy).allocate(block, size, &inner.budget)?;
            Ok((a.ptr, Source::Large(a.block), a.hit))
        }
    }

    /// A snapshot of the pool's accounting.
    pub fn stats(&self) -> PoolStats {
        let inner = &*self.inner;
        let (per_category, overall) = inner.tracker.snapshot();
        let usage = lock(&inner.buddy).usage();
        let large_fragmentation = if usage.free_bytes == 0 {
            0.0
        } else {
            1.0 - usage.largest_free_per_arena as f64 / usage.free_bytes as f64
        };
        PoolStats {
            per_category,
            overall,
            reserved_bytes: inner.budget.reserved(),
            max_bytes: inner.budget.cap(),
            large_arenas: usage.arenas,
            large_free_bytes: usage.free_bytes,
            large_largest_free_block: usage.largest_free_block,
            large_fragmentation,
        }
    }
}

/// The process-wide host-memory pool (default [`PoolConfig`]) that bitnet kernels take their
/// scratch and packed buffers from. Build your own pool (and share it with `Clone` or `Arc`)
/// when you need a different cap or separate accounting.
pub fn global_pool() -> &'static HybridMemoryPool {
    static GLOBAL: OnceLock<HybridMemoryPool> = OnceLock::new();
    GLOBAL.get_or_init(|| {
        HybridMemoryPool::try_new(PoolConfig::default()).expect("the default PoolConfig is valid")
    })
}
