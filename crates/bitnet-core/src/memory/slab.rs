//! Size-class slabs for small requests: one power-of-two class per size, each with its own lock
//! and free list, carving slots lazily from chunks that are never given back.

use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

use super::budget::Budget;
use super::region::Region;
use crate::CoreError;

/// The smallest slot; requests are rounded up to at least this (it is also `MIN_ALIGN`).
pub(crate) const MIN_CLASS_SHIFT: u32 = 6;

/// A free slot's address. The pool keeps free lists outside the slots, so user bytes are never
/// overwritten by bookkeeping and a stale write can never corrupt a list.
struct SlotPtr(NonNull<u8>);

// SAFETY: a `SlotPtr` is an address into a `Region` owned by the same `SizeClass`; it is only
// dereferenced by the `PoolBuffer` that the slot is handed to, so moving it between threads
// moves no access rights that another thread also holds.
unsafe impl Send for SlotPtr {}

struct ClassState {
    free: Vec<SlotPtr>,
    chunks: Vec<Region>,
    /// Bytes already carved from the last chunk. Carving lazily keeps a fresh chunk of 64-byte
    /// slots from costing thousands of free-list pushes up front.
    carved: usize,
}

struct SizeClass {
    slot_size: usize,
    state: Mutex<ClassState>,
}

/// All size classes of one pool, from 64 bytes up to the small threshold.
pub(crate) struct Slab {
    classes: Box<[SizeClass]>,
    chunk_size: usize,
}

/// Where a small allocation came from, for the hit-rate statistics.
pub(crate) struct SlabAlloc {
    pub(crate) ptr: NonNull<u8>,
    /// True when no new chunk had to be obtained from the system.
    pub(crate) hit: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a class lock cannot leave its free list half-updated (every update is
    // a single push/pop), so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Slab {
    /// Classes `64, 128, ..., small_threshold`. The top class serves requests just under the
    /// threshold, which round up to it.
    pub(crate) fn new(small_threshold: usize, chunk_size: usize) -> Self {
        let top = small_threshold.trailing_zeros();
        let classes = (MIN_CLASS_SHIFT..=top)
            .map(|shift| SizeClass {
                slot_size: 1 << shift,
                state: Mutex::new(ClassState {
                    free: Vec::new(),
                    chunks: Vec::new(),
                    carved: 0,
                }),
            })
            .collect();
        Self {
            classes,
            chunk_size,
        }
    }

    /// The class index serving blocks of `block` bytes (a power of two up to the threshold).
    pub(crate) fn class_of(block: usize) -> usize {
        debug_assert!(block.is_power_of_two());
        (block.trailing_zeros().saturating_sub(MIN_CLASS_SHIFT)) as usize
    }

    /// Slot size of class `class`.
    pub(crate) fn slot_size(&self, class: usize) -> usize {
        self.classes[class].slot_size
    }

    /// Takes a slot of class `class`, growing the class by one chunk when it has none left.
    pub(crate) fn allocate(
        &self,
        class: usize,
        requested: usize,
        budget: &Budget,
    ) -> Result<SlabAlloc, CoreError> {
        let sc = &self.classes[class];
        let mut st = lock(&sc.state);
        if let Some(SlotPtr(ptr)) = st.free.pop() {
            return Ok(SlabAlloc { ptr, hit: true });
        }
        let mut hit = true;
        if st.chunks.is_empty() || st.carved + sc.slot_size > self.chunk_size {
            budget.try_reserve(self.chunk_size, requested)?;
            match Region::new_zeroed(self.chunk_size) {
                Ok(region) => st.chunks.push(region),
                Err(e) => {
                    budget.release(self.chunk_size);
                    return Err(e);
                }
            }
            st.carved = 0;
            hit = false;
        }
        let offset = st.carved;
        st.carved += sc.slot_size;
        let chunk = st.chunks.last().expect("a chunk was just ensured");
        debug_assert!(offset + sc.slot_size <= chunk.len());
        // SAFETY: `offset + slot_size <= chunk_size = chunk.len()`, so the slot lies inside the
        // chunk; the carve cursor only moves forward, so the slot has never been handed out.
        let ptr = unsafe { chunk.base().add(offset) };
        Ok(SlabAlloc { ptr, hit })
    }

    /// Returns a slot obtained from `allocate(class, ..)`.
    pub(crate) fn free(&self, class: usize, ptr: NonNull<u8>) {
        lock(&self.classes[class].state).free.push(SlotPtr(ptr));
    }
}
