//! Per-category accounting: lock-free counters updated on every allocate and drop, and the
//! snapshot types [`PoolStats`] and [`CategoryStats`] that `stats()` returns.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// What an allocation is for. Every buffer carries one, so that memory use can be attributed
/// (e.g. "the packed weights take 40 MB, kernel scratch peaks at 3 MB"). These are the two
/// kinds of memory the library's kernels take from the pool; tensors (latent weights,
/// activations, optimizer state) live in candle's storage, not here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// Quantized, bit-packed weights for inference kernels.
    PackedWeights,
    /// Short-lived kernel workspace.
    Scratch,
}

impl Category {
    /// Number of categories.
    pub const COUNT: usize = 2;

    /// Every category, in the order of [`Category::index`].
    pub const ALL: [Category; Category::COUNT] = [Category::PackedWeights, Category::Scratch];

    /// A dense index in `0..Category::COUNT`, for per-category arrays.
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// A snapshot of one category's (or the whole pool's) counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CategoryStats {
    /// Bytes requested by live buffers (their `len()`, not the rounded block size).
    pub bytes_in_use: usize,
    /// The highest `bytes_in_use` seen so far.
    pub peak_bytes: usize,
    /// Live buffers.
    pub live_allocations: usize,
    /// Successful allocations since the pool was built.
    pub total_allocations: u64,
    /// Allocations served from memory the pool already held (no new chunk or arena).
    pub hits: u64,
    /// Allocations that failed (cap exceeded or the system refused memory).
    pub failed_allocations: u64,
}

impl CategoryStats {
    /// `hits / total_allocations`, or 0 before the first allocation.
    pub fn hit_rate(&self) -> f64 {
        if self.total_allocations == 0 {
            0.0
        } else {
            self.hits as f64 / self.total_allocations as f64
        }
    }
}

/// A snapshot of a pool's accounting, from [`HybridMemoryPool::stats`](super::HybridMemoryPool::stats).
#[derive(Debug, Clone, PartialEq)]
pub struct PoolStats {
    /// Counters per category, indexed by [`Category::index`]; see [`PoolStats::category`].
    pub per_category: [CategoryStats; Category::COUNT],
    /// Counters over all categories. Its `peak_bytes` is the peak of the total, which can be less
    /// than the sum of the per-category peaks.
    pub overall: CategoryStats,
    /// Bytes the pool holds from the system (slab chunks plus buddy arenas).
    pub reserved_bytes: usize,
    /// The configured cap on `reserved_bytes`.
    pub max_bytes: usize,
    /// Buddy arenas currently held.
    pub large_arenas: usize,
    /// Free bytes inside the buddy arenas.
    pub large_free_bytes: usize,
    /// The largest block the buddy pool could hand out without growing.
    pub large_largest_free_block: usize,
    /// External fragmentation of the buddy pool: the share of free bytes that lie outside their
    /// arena's largest free block, `1 - sum(largest free block per arena) / free bytes`; 0 when
    /// nothing is free. 0 means each arena's free space is one block; near 1 means it is
    /// scattered into pieces too small for large requests.
    pub large_fragmentation: f64,
}

impl PoolStats {
    /// The counters of one category.
    pub fn category(&self, c: Category) -> &CategoryStats {
        &self.per_category[c.index()]
    }
}

/// Live counters of one category; atomics so that allocation never takes a global lock.
#[derive(Default)]
struct Counters {
    in_use: AtomicUsize,
    peak: AtomicUsize,
    live: AtomicUsize,
    total: AtomicU64,
    hits: AtomicU64,
    failed: AtomicU64,
}

impl Counters {
    fn on_alloc(&self, bytes: usize, hit: bool) {
        let now = self.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        self.live.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_free(&self, bytes: usize) {
        self.in_use.fetch_sub(bytes, Ordering::Relaxed);
        self.live.fetch_sub(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> CategoryStats {
        CategoryStats {
            bytes_in_use: self.in_use.load(Ordering::Relaxed),
            peak_bytes: self.peak.load(Ordering::Relaxed),
            live_allocations: self.live.load(Ordering::Relaxed),
            total_allocations: self.total.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            failed_allocations: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// The pool's live accounting.
#[derive(Default)]
pub(crate) struct Tracker {
    per_category: [Counters; Category::COUNT],
    overall: Counters,
}

impl Tracker {
    pub(crate) fn on_alloc(&self, c: Category, bytes: usize, hit: bool) {
        self.per_category[c.index()].on_alloc(bytes, hit);
        self.overall.on_alloc(bytes, hit);
    }

    pub(crate) fn on_free(&self, c: Category, bytes: usize) {
        self.per_category[c.index()].on_free(bytes);
        self.overall.on_free(bytes);
    }

    pub(crate) fn on_failure(&self, c: Category) {
        self.per_category[c.index()]
            .failed
            .fetch_add(1, Ordering::Relaxed);
        self.overall.failed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> ([CategoryStats; Category::COUNT], CategoryStats) {
        (
            std::array::from_fn(|i| self.per_category[i].snapshot()),
            self.overall.snapshot(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn category_index_matches_all() {
        for (i, c) in Category::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
    }

    #[test]
    fn tracker_counts_peak_and_hit_rate() {
        let t = Tracker::default();
        t.on_alloc(Category::Scratch, 100, false);
        t.on_alloc(Category::Scratch, 50, true);
        t.on_alloc(Category::PackedWeights, 10, true);
        t.on_free(Category::Scratch, 100);
        t.on_failure(Category::Scratch);
        let (per, all) = t.snapshot();
        let s = per[Category::Scratch.index()];
        assert_eq!(
            (
                s.bytes_in_use,
                s.peak_bytes,
                s.live_allocations,
                s.total_allocations,
                s.hits
            ),
            (50, 150, 1, 2, 1)
        );
        assert_eq!(s.failed_allocations, 1);
        assert!((s.hit_rate() - 0.5).abs() < 1e-12);
        assert_eq!(
            (all.bytes_in_use, all.peak_bytes, all.live_allocations),
            (60, 160, 2)
        );
        let p = per[Category::PackedWeights.index()];
        assert_eq!(
            (p.bytes_in_use, p.peak_bytes, p.total_allocations, p.hits),
            (10, 10, 1, 1)
        );
        assert_eq!(p.failed_allocations, 0);
        assert_eq!(CategoryStats::default().hit_rate(), 0.0);
    }
}
