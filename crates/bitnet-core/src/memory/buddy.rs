//! The buddy allocator for large requests: power-of-two blocks inside power-of-two arenas, split
//! on allocation and merged with their free buddy on release.
//!
//! Freed blocks stay in their arena rather than going back to the system; reusing already
//! faulted-in pages is where the pool beats the system allocator on large scratch buffers.

use std::collections::BTreeSet;
use std::ptr::NonNull;

use super::budget::Budget;
use super::region::Region;
use crate::CoreError;

/// One arena: a region of `min_block << max_order` bytes and a free set per order.
struct Arena {
    region: Region,
    max_order: u32,
    /// `free[o]` holds the offsets of free blocks of `min_block << o` bytes. Ordered sets give
    /// O(log n) buddy lookups and make allocation deterministic (lowest address first).
    free: Vec<BTreeSet<usize>>,
    free_bytes: usize,
}

impl Arena {
    fn new(region: Region, max_order: u32) -> Self {
        let mut free = vec![BTreeSet::new(); max_order as usize + 1];
        free[max_order as usize].insert(0);
        let free_bytes = region.len();
        Self {
            region,
            max_order,
            free,
            free_bytes,
        }
    }

    fn is_untouched(&self) -> bool {
        self.free[self.max_order as usize].contains(&0)
    }
}

/// A large block handed out by [`Buddy::allocate`]; everything [`Buddy::free`] needs back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BuddyBlock {
    pub(crate) arena: u32,
    pub(crate) offset: usize,
    pub(crate) order: u32,
}

/// The result of a large allocation.
#[derive(Debug)]
pub(crate) struct BuddyAlloc {
    pub(crate) ptr: NonNull<u8>,
    pub(crate) block: BuddyBlock,
    /// True when no new arena had to be obtained from the system.
    pub(crate) hit: bool,
}

/// Free-space summary for the fragmentation statistic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BuddyUsage {
    pub(crate) arenas: usize,
    pub(crate) free_bytes: usize,
    pub(crate) largest_free_block: usize,
    /// Sum over arenas of each arena's largest free block.
    pub(crate) largest_free_per_arena: usize,
}

/// All arenas of one pool. Not synchronised itself: the pool wraps it in one `Mutex`, which is
/// cheap next to the cost of touching a block of a megabyte or more.
pub(crate) struct Buddy {
    /// Slots stay in place once assigned so that a `BuddyBlock::arena` index stays valid;
    /// arenas released under cap pressure leave a `None` that the next arena reuses.
    arenas: Vec<Option<Arena>>,
    min_block: usize,
    arena_size: usize,
}

impl Buddy {
    pub(crate) fn new(min_block: usize, arena_size: usize) -> Self {
        debug_assert!(min_block.is_power_of_two() && arena_size.is_power_of_two());
        debug_assert!(arena_size >= min_block);
        Self {
            arenas: Vec::new(),
            min_block,
            arena_size,
        }
    }

    /// The order of a block of `block` bytes (a power of two `>= min_block`).
    fn order_of(&self, block: usize) -> u32 {
        block.trailing_zeros() - self.min_block.trailing_zeros()
    }

    /// Takes a block of exactly `block` bytes (a power of two `>= min_block`), growing the pool by
    /// one arena when no existing arena has room.
    pub(crate) fn allocate(
        &mut self,
        block: usize,
        requested: usize,
        budget: &Budget,
    ) -> Result<BuddyAlloc, CoreError> {
        debug_assert!(block.is_power_of_two() && block >= self.min_block);
        let order = self.order_of(block);
        for (i, slot) in self.arenas.iter_mut().enumerate() {
            if let Some(arena) = slot {
                if let Some(offset) = take(arena, order, self.min_block) {
                    return Ok(alloc_at(arena, i, offset, order, true));
                }
            }
        }
        let size = block.max(self.arena_size);
        if budget.try_reserve(size, requested).is_err() {
            // Untouched arenas are memory we hold for nothing; give them back and retry once
            // before reporting the cap.
            self.release_untouched(budget);
            budget.try_reserve(size, requested)?;
        }
        let region = match Region::new_zeroed(size) {
            Ok(r) => r,
            Err(e) => {
                budget.release(size);
                return Err(e);
            }
        };
        let mut arena = Arena::new(region, self.order_of(size));
        let offset = take(&mut arena, order, self.min_block).expect("a fresh arena fits the block");
        let index = match self.arenas.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.arenas.push(None);
                self.arenas.len() - 1
            }
        };
        let result = alloc_at(&mut arena, index, offset, order, false);
        self.arenas[index] = Some(arena);
        Ok(result)
    }

    /// Returns a block, merging it with its buddy for as long as the buddy is free too.
    pub(crate) fn free(&mut self, block: BuddyBlock) {
        let arena = self.arenas[block.arena as usize]
            .as_mut()
            .expect("a live block's arena is never released");
        let (mut offset, mut order) = (block.offset, block.order);
        arena.free_bytes += self.min_block << order;
        while order < arena.max_order {
            let buddy = offset ^ (self.min_block << order);
            if !arena.free[order as usize].remove(&buddy) {
                break;
            }
            offset = offset.min(buddy);
            order += 1;
        }
        arena.free[order as usize].insert(offset);
    }

    fn release_untouched(&mut self, budget: &Budget) {
        for slot in &mut self.arenas {
            if slot.as_ref().is_some_and(Arena::is_untouched) {
                let arena = slot.take().expect("checked above");
                budget.release(arena.region.len());
            }
        }
    }

    pub(crate) fn usage(&self) -> BuddyUsage {
        let mut u = BuddyUsage::default();
        for arena in self.arenas.iter().flatten() {
            u.arenas += 1;
            u.free_bytes += arena.free_bytes;
            let top = (0..=arena.max_order)
                .rev()
                .find(|&o| !arena.free[o as usize].is_empty());
            if let Some(o) = top {
                u.largest_free_block = u.largest_free_block.max(self.min_block << o);
                u.largest_free_per_arena += self.min_block << o;
            }
        }
        u
    }

    /// Number of free blocks in each arena, for tests that check merging.
    #[cfg(test)]
    fn free_block_counts(&self) -> Vec<usize> {
        self.arenas
            .iter()
            .flatten()
            .map(|a| a.free.iter().map(BTreeSet::len).sum())
            .collect()
    }
}

/// Pops the lowest free block of the smallest order `>= order` and splits it down to `order`,
/// putting each upper half on the free set one order below.
fn take(arena: &mut Arena, order: u32, min_block: usize) -> Option<usize> {
    if order > arena.max_order {
        return None;
    }
    let from = (order..=arena.max_order).find(|&o| !arena.free[o as usize].is_empty())?;
    let offset = arena.free[from as usize].pop_first()?;
    for o in (order..from).rev() {
        arena.free[o as usize].insert(offset + (min_block << o));
    }
    arena.free_bytes -= min_block << order;
    Some(offset)
}

fn alloc_at(arena: &mut Arena, index: usize, offset: usize, order: u32, hit: bool) -> BuddyAlloc {
    debug_assert!(offset < arena.region.len());
    // SAFETY: `take` returned a free block of this arena, so `offset + block size` lies within
    // `region.len()` and no other live allocation overlaps it.
    let ptr = unsafe { arena.region.base().add(offset) };
    BuddyAlloc {
        ptr,
        block: BuddyBlock {
            arena: index as u32,
            offset,
            order,
        },
        hit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::SliceRandom;
    use rand::SeedableRng;

    const MIN: usize = 4096;

    fn buddy(arena_orders: u32) -> (Buddy, Budget) {
        (
            Buddy::new(MIN, MIN << arena_orders),
            Budget::new(usize::MAX),
        )
    }

    #[test]
    fn split_gives_aligned_disjoint_blocks_and_merge_restores_one_block() {
        // Table: the block sizes (in min blocks) to carve one arena of 16 min blocks into.
        let cases: &[&[usize]] = &[
            &[16],
            &[1; 16],
            &[8, 4, 2, 1, 1],
            &[1, 8, 2, 4, 1],
            &[2, 2, 2, 2, 2, 2, 2, 2],
            &[4, 1, 1, 2, 8],
        ];
        for (seed, sizes) in cases.iter().enumerate() {
            let (mut b, budget) = buddy(4);
            let mut blocks: Vec<(BuddyBlock, usize)> = sizes
                .iter()
                .map(|&n| {
                    let a = b.allocate(n * MIN, n * MIN, &budget).unwrap();
                    assert_eq!(a.block.arena, 0, "{sizes:?} must fit one arena");
                    assert_eq!(a.block.offset % (n * MIN), 0, "block not naturally aligned");
                    (a.block, n * MIN)
                })
                .collect();
            let mut spans: Vec<(usize, usize)> = blocks
                .iter()
                .map(|(blk, len)| (blk.offset, blk.offset + len))
                .collect();
            spans.sort();
            for w in spans.windows(2) {
                assert!(w[0].1 <= w[1].0, "overlapping blocks {w:?} for {sizes:?}");
            }
            assert_eq!(b.usage().free_bytes, 0);
            assert_eq!(b.usage().largest_free_block, 0);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed as u64);
            blocks.shuffle(&mut rng);
            for (blk, _) in blocks {
                b.free(blk);
            }
            assert_eq!(
                b.free_block_counts(),
                vec![1],
                "arena not merged for {sizes:?}"
            );
            let u = b.usage();
            assert_eq!((u.free_bytes, u.largest_free_block), (16 * MIN, 16 * MIN));
        }
    }

    #[test]
    fn many_random_orders_merge_back_to_one_block() {
        for seed in 0..20u64 {
            let (mut b, budget) = buddy(6);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut blocks = Vec::new();
            // Fill the arena completely with min blocks, then free in random order.
            while let Ok(a) = b.allocate(MIN, MIN, &budget) {
                if a.block.arena != 0 {
                    b.free(a.block);
                    break;
                }
                blocks.push(a.block);
            }
            assert_eq!(blocks.len(), 64);
            blocks.shuffle(&mut rng);
            for blk in blocks {
                b.free(blk);
            }
            assert_eq!(b.free_block_counts(), vec![1, 1]);
        }
    }

    #[test]
    fn grows_new_arenas_and_oversized_requests_get_their_own() {
        let (mut b, budget) = buddy(2);
        let x = b.allocate(4 * MIN, 4 * MIN, &budget).unwrap();
        let y = b.allocate(MIN, MIN, &budget).unwrap();
        assert!(!x.hit && !y.hit);
        assert_eq!((x.block.arena, y.block.arena), (0, 1));
        let z = b.allocate(MIN, MIN, &budget).unwrap();
        assert!(z.hit);
        assert_eq!(z.block.arena, 1);
        let big = b.allocate(16 * MIN, 16 * MIN, &budget).unwrap();
        assert_eq!(big.block.arena, 2);
        assert_eq!(budget.reserved(), 4 * MIN + 4 * MIN + 16 * MIN);
    }

    #[test]
    fn cap_pressure_releases_untouched_arenas_then_errors() {
        let budget = Budget::new(8 * MIN);
        let mut b = Buddy::new(MIN, 4 * MIN);
        let a = b.allocate(4 * MIN, 4 * MIN, &budget).unwrap();
        b.free(a.block);
        // The free 4-block arena is released to make room for an 8-block one.
        let big = b.allocate(8 * MIN, 8 * MIN, &budget).unwrap();
        assert_eq!(big.block.arena, 0);
        assert_eq!(budget.reserved(), 8 * MIN);
        let err = b.allocate(MIN, 100, &budget).unwrap_err();
        assert!(matches!(
            err,
            CoreError::CapExceeded { requested: 100, needed, reserved, cap }
                if needed == 4 * MIN && reserved == 8 * MIN && cap == 8 * MIN
        ));
    }
}
