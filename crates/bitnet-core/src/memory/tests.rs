//! Pool-level unit tests. Configs are tiny so that they also run quickly under Miri.

use super::*;
use crate::CoreError;

const KIB: usize = 1024;

fn tiny() -> PoolConfig {
    PoolConfig {
        small_threshold: 4 * KIB,
        slab_chunk_size: 16 * KIB,
        arena_size: 64 * KIB,
        max_bytes: 4096 * KIB,
        min_align: 64,
    }
}

fn pool(cfg: PoolConfig) -> HybridMemoryPool {
    HybridMemoryPool::try_new(cfg).unwrap()
}

#[test]
fn pool_and_buffer_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<HybridMemoryPool>();
    check::<PoolBuffer>();
}

#[test]
fn invalid_config_is_rejected_at_construction_naming_the_field() {
    let err = HybridMemoryPool::new(PoolConfig {
        min_align: 48,
        ..tiny()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("min_align") && err.contains("64..=4096"),
        "{err}"
    );
}

#[test]
fn size_classes_round_up_to_powers_of_two_and_reuse_their_slots() {
    // (size, align, expected slot size); the slot size shows in which class a freed slot reappears
    // and in how far apart consecutive fresh slots are carved.
    let cases = [
        (0, 1, 64),
        (1, 1, 64),
        (64, 8, 64),
        (65, 8, 128),
        (100, 256, 256),
        (1000, 4, 1024),
        (1025, 4, 2048),
        (4095, 16, 4096),
    ];
    for (size, align, slot) in cases {
        let p = pool(tiny());
        let a = p.try_allocate(size, align, Category::Scratch).unwrap();
        let b = p.try_allocate(size, align, Category::Scratch).unwrap();
        assert_eq!(a.len(), size);
        // Fresh slots of one class are carved back to back from one chunk.
        assert_eq!(
            b.as_ptr() as usize - a.as_ptr() as usize,
            slot,
            "size {size}"
        );
        let pa = a.as_ptr();
        drop(a);
        let c = p.try_allocate(size, align, Category::Scratch).unwrap();
        assert_eq!(c.as_ptr(), pa, "freed slot not reused for size {size}");
        // A different class never gets that slot.
        let other = p
            .try_allocate(slot * 2 % (4 * KIB) + 1, 1, Category::Scratch)
            .unwrap();
        assert_ne!(other.as_ptr(), pa);
        assert_eq!(
            p.stats().reserved_bytes,
            2 * 16 * KIB,
            "one chunk per class used"
        );
    }
}

#[test]
fn threshold_routes_small_and_large_requests() {
    let p = pool(tiny());
    let small = p.try_allocate(4 * KIB - 1, 1, Category::Scratch).unwrap();
    assert_eq!(p.stats().large_arenas, 0);
    assert_eq!(p.stats().reserved_bytes, 16 * KIB);
    let large = p.try_allocate(4 * KIB, 1, Category::Scratch).unwrap();
    let s = p.stats();
    assert_eq!(s.large_arenas, 1);
    assert_eq!(s.reserved_bytes, 16 * KIB + 64 * KIB);
    assert_eq!(s.large_free_bytes, 60 * KIB);
    drop((small, large));
}

#[test]
fn alignment_is_honoured_for_small_and_large_requests() {
    let p = pool(tiny());
    let mut keep = Vec::new();
    for align in [1, 2, 8, 16, 64, 128, 512, 1024, 4096] {
        for size in [1, 63, 200, 3000, 4096, 10_000, 40_000] {
            let b = p.try_allocate(size, align, Category::Scratch).unwrap();
            let want = align.max(64);
            assert_eq!(b.as_ptr() as usize % want, 0, "size {size} align {align}");
            keep.push(b);
        }
    }
    let p = pool(PoolConfig {
        min_align: 256,
        ..tiny()
    });
    let b = p.try_allocate(1, 1, Category::Scratch).unwrap();
    assert_eq!(b.as_ptr() as usize % 256, 0, "min_align not honoured");
}

#[test]
fn invalid_alignment_is_an_error() {
    let p = pool(tiny());
    for align in [0, 3, 48, 8192] {
        let err = p.try_allocate(10, align, Category::Scratch).unwrap_err();
        assert!(
            matches!(err, CoreError::InvalidAlignment { align: a, max: 4096 } if a == align),
            "{err:?}"
        );
    }
    assert_eq!(p.stats().category(Category::Scratch).failed_allocations, 4);
}

#[test]
fn exceeding_the_cap_is_an_error_not_an_abort() {
    let p = pool(PoolConfig {
        max_bytes: 128 * KIB,
        ..tiny()
    });
    let a = p
        .try_allocate(64 * KIB, 64, Category::PackedWeights)
        .unwrap();
    let b = p
        .try_allocate(64 * KIB, 64, Category::PackedWeights)
        .unwrap();
    let err = p
        .try_allocate(64 * KIB, 64, Category::PackedWeights)
        .unwrap_err();
    assert!(
        matches!(err, CoreError::CapExceeded { requested, cap, .. } if requested == 64 * KIB && cap == 128 * KIB),
        "{err:?}"
    );
    // Small requests need a chunk too, and the cap is reached.
    let err = p
        .allocate(10, 1, Category::Scratch)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cap exceeded"), "{err}");
    // A request larger than the cap fails without touching the system allocator.
    assert!(p.try_allocate(1 << 40, 64, Category::Scratch).is_err());
    assert!(p.try_allocate(usize::MAX, 64, Category::Scratch).is_err());
    let s = p.stats();
    assert_eq!(s.reserved_bytes, 128 * KIB);
    assert_eq!(s.overall.failed_allocations, 4);
    drop(a);
    // Freed memory is reused, so the same request now succeeds within the cap.
    let c = p
        .try_allocate(64 * KIB, 64, Category::PackedWeights)
        .unwrap();
    assert_eq!(p.stats().reserved_bytes, 128 * KIB);
    drop((b, c));
}

#[test]
fn stats_track_categories_and_return_to_zero() {
    let p = pool(tiny());
    let sizes = [
        (Category::PackedWeights, 10_000usize),
        (Category::PackedWeights, 100),
        (Category::PackedWeights, 2_500),
        (Category::Scratch, 70_000),
        (Category::Scratch, 1),
        (Category::PackedWeights, 20_000),
    ];
    for _round in 0..2 {
        let bufs: Vec<PoolBuffer> = sizes
            .iter()
            .map(|&(c, n)| p.try_allocate(n, 64, c).unwrap())
            .collect();
        let s = p.stats();
        for c in Category::ALL {
            let want: usize = sizes.iter().filter(|(k, _)| *k == c).map(|(_, n)| n).sum();
            let live = sizes.iter().filter(|(k, _)| *k == c).count();
            assert_eq!(s.category(c).bytes_in_use, want, "{c:?}");
            assert_eq!(s.category(c).live_allocations, live, "{c:?}");
        }
        let total: usize = sizes.iter().map(|(_, n)| n).sum();
        assert_eq!(s.overall.bytes_in_use, total);
        assert_eq!(s.overall.peak_bytes, total);
        drop(bufs);
    }
    let s = p.stats();
    for c in Category::ALL {
        assert_eq!(s.category(c).bytes_in_use, 0, "{c:?}");
        assert_eq!(s.category(c).live_allocations, 0, "{c:?}");
    }
    assert_eq!(s.overall.bytes_in_use, 0);
    assert_eq!(s.overall.live_allocations, 0);
    assert_eq!(s.overall.total_allocations, 12);
    assert_eq!(s.category(Category::Scratch).peak_bytes, 70_001);
    assert_eq!(s.category(Category::PackedWeights).peak_bytes, 32_600);
    // Round one grew the pool for all but the 20 000-byte block (which fit in the arena the
    // 10 000-byte block opened); round two was served entirely from freed memory.
    assert_eq!(s.overall.hits, 1 + 6, "{:?}", s.overall);
    // Scratch: both blocks missed in round one and hit in round two.
    assert!((s.category(Category::Scratch).hit_rate() - 0.5).abs() < 1e-12);
    // One 64 KiB arena and one of its own for the 70 000-byte block, both whole again.
    assert_eq!((s.large_arenas, s.large_free_bytes), (2, 192 * KIB));
    assert_eq!(s.large_largest_free_block, 128 * KIB);
    assert_eq!(s.large_fragmentation, 0.0);
}

#[test]
fn fragmentation_of_the_large_pool() {
    let p = pool(tiny());
    // Sixteen 4 KiB blocks fill one 64 KiB arena.
    let mut blocks: Vec<Option<PoolBuffer>> = (0..16)
        .map(|_| Some(p.try_allocate(4 * KIB, 64, Category::Scratch).unwrap()))
        .collect();
    assert_eq!(p.stats().large_arenas, 1);
    assert_eq!(p.stats().large_fragmentation, 0.0);
    // Free every other block: 32 KiB free, none of it mergeable.
    for b in blocks.iter_mut().step_by(2) {
        *b = None;
    }
    let s = p.stats();
    assert_eq!(
        (s.large_free_bytes, s.large_largest_free_block),
        (32 * KIB, 4 * KIB)
    );
    assert!((s.large_fragmentation - 0.875).abs() < 1e-12);
    drop(blocks);
    let s = p.stats();
    assert_eq!(
        (s.large_free_bytes, s.large_largest_free_block),
        (64 * KIB, 64 * KIB)
    );
    assert_eq!(s.large_fragmentation, 0.0);
}

#[test]
fn live_buffers_are_disjoint_and_keep_their_contents() {
    let p = pool(tiny());
    let sizes = [
        1usize,
        64,
        65,
        500,
        4095,
        4096,
        5000,
        30_000,
        64 * KIB,
        100_000,
    ];
    let mut bufs: Vec<PoolBuffer> = Vec::new();
    for (i, &n) in sizes.iter().cycle().take(40).enumerate() {
        let mut b = p.try_allocate(n, 1, Category::Scratch).unwrap();
        b.as_mut_slice().fill(i as u8);
        bufs.push(b);
    }
    for (i, b) in bufs.iter().enumerate() {
        assert!(b.iter().all(|&x| x == i as u8), "buffer {i} overwritten");
    }
}

#[test]
fn typed_views_cover_whole_elements() {
    let p = pool(tiny());
    let mut f = p.allocate_slice::<f32>(1000, Category::Scratch).unwrap();
    assert_eq!(f.len(), 4000);
    assert_eq!(f.as_mut_slice_of::<f32>().len(), 1000);
    for (i, x) in f.as_mut_slice_of::<f32>().iter_mut().enumerate() {
        *x = i as f32 * 0.5;
    }
    assert_eq!(f.as_slice_of::<f32>()[999], 499.5);
    assert_eq!(f.as_slice_of::<u32>()[2], 1.0f32.to_bits());
    assert_eq!(f.as_slice_of::<i8>().len(), 4000);
    let mut odd = p.try_allocate(7, 1, Category::PackedWeights).unwrap();
    assert_eq!(odd.as_slice_of::<u32>().len(), 1);
    assert_eq!(odd.as_mut_slice_of::<u16>().len(), 3);
    assert_eq!(odd.as_slice_of::<u64>().len(), 0);
    let big = p
        .allocate_slice::<u64>(2000, Category::PackedWeights)
        .unwrap();
    assert_eq!(big.as_slice_of::<u64>().len(), 2000);
    assert!(p
        .allocate_slice::<f64>(usize::MAX / 4, Category::Scratch)
        .is_err());
}

#[test]
fn empty_allocation_is_valid() {
    let p = pool(tiny());
    let b = p.allocate_slice::<f32>(0, Category::Scratch).unwrap();
    assert!(b.is_empty());
    assert!(b.as_slice_of::<f32>().is_empty());
    drop(b);
    assert_eq!(p.stats().overall.live_allocations, 0);
}

#[test]
fn buffers_outlive_the_pool_handle() {
    let p = pool(tiny());
    let mut b = p.try_allocate(100_000, 64, Category::Scratch).unwrap();
    let clone = p.clone();
    drop(p);
    b.as_mut_slice().fill(7);
    assert_eq!(clone.stats().overall.live_allocations, 1);
    drop(clone);
    assert!(b.iter().all(|&x| x == 7));
}

#[test]
fn global_pool_is_one_instance() {
    let a = global_pool() as *const HybridMemoryPool;
    let b = global_pool() as *const HybridMemoryPool;
    assert_eq!(a, b);
    assert_eq!(global_pool().config(), &PoolConfig::default());
    assert_eq!(global_pool().device(), PoolDevice::Cpu);
}
