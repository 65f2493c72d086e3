//! Several threads hammer one pool with random allocate / fill / verify / free sequences. Each
//! buffer is filled with a pattern unique to its thread and allocation and checked just before it
//! is freed, so any overlap between live buffers (a double hand-out, a bad split or merge) shows
//! up as corruption; at the end the pool must account for every byte as returned.

use std::sync::Arc;

use bitnet_core::{Category, HybridMemoryPool, PoolBuffer, PoolConfig};
use rand::{Rng, SeedableRng};

const THREADS: usize = 4;
const OPS_PER_THREAD: usize = 25_000;
const MAX_LIVE: usize = 24;

fn pattern(thread: usize, serial: usize) -> u8 {
    // Never 0, so that a block nobody wrote (still zero) is caught too.
    ((thread * 61 + serial * 7) % 255 + 1) as u8
}

#[test]
fn concurrent_random_allocations_neither_corrupt_nor_leak() {
    let pool = Arc::new(
        HybridMemoryPool::new(PoolConfig {
            small_threshold: 64 << 10,
            slab_chunk_size: 256 << 10,
            arena_size: 4 << 20,
            max_bytes: 512 << 20,
            min_align: 64,
        })
        .unwrap(),
    );
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let pool = Arc::clone(&pool);
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed + t as u64);
                let mut live: Vec<(PoolBuffer, u8)> = Vec::new();
                for serial in 0..OPS_PER_THREAD {
                    let free =
                        !live.is_empty() && (live.len() >= MAX_LIVE || rng.random_bool(0.45));
                    if free {
                        let (buf, pat) = live.swap_remove(rng.random_range(0..live.len()));
                        assert!(
                            buf.iter().all(|&b| b == pat),
                            "thread {t}: a {}-byte buffer was overwritten",
                            buf.len()
                        );
                        continue;
                    }
                    // Log-uniform sizes from 1 byte to 512 KiB cover every size class and the
                    // buddy orders, including blocks larger than half an arena.
                    let size = 1usize << rng.random_range(0..19);
                    let size = rng.random_range(size / 2..=size).max(1);
                    let align = 1usize << rng.random_range(0..13);
                    let cat = Category::ALL[rng.random_range(0..Category::COUNT)];
                    let mut buf = pool.allocate(size, align, cat).unwrap();
                    assert_eq!(buf.len(), size);
                    assert_eq!(buf.as_ptr() as usize % align.max(64), 0);
                    let pat = pattern(t, serial);
                    buf.as_mut_slice().fill(pat);
                    live.push((buf, pat));
                }
                for (buf, pat) in live {
                    assert!(
                        buf.iter().all(|&b| b == pat),
                        "thread {t}: corrupted at exit"
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let s = pool.stats();
    assert_eq!(s.overall.bytes_in_use, 0, "{s:?}");
    assert_eq!(s.overall.live_allocations, 0, "{s:?}");
    for c in Category::ALL {
        assert_eq!(s.category(c).bytes_in_use, 0, "{c:?}");
    }
    assert!(s.overall.total_allocations > (THREADS * OPS_PER_THREAD / 3) as u64);
    assert!(
        s.overall.hit_rate() > 0.9,
        "pool should mostly reuse: {s:?}"
    );
    // With everything freed, every arena must have merged back into one free block.
    assert_eq!(s.large_free_bytes, s.large_arenas * (4 << 20), "{s:?}");
    assert_eq!(s.large_fragmentation, 0.0, "{s:?}");
}
