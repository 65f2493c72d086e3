//! Backing memory obtained from the system: one zeroed, page-aligned region per slab chunk or
//! buddy arena, never returned to the system while the pool lives.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

use super::config::MAX_ALIGN;
use crate::CoreError;

/// A zero-initialised region of host memory whose usable part starts on a [`MAX_ALIGN`] boundary.
///
/// Zeroing once here is what makes every later allocation safe to read without zeroing again:
/// the bytes a buffer sees are always initialised (zeros or whatever a previous owner wrote).
pub(crate) struct Region {
    /// What `alloc_zeroed` returned; needed to free it.
    raw: NonNull<u8>,
    layout: Layout,
    /// First usable byte, aligned to `MAX_ALIGN`.
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Region` exclusively owns its allocation; the raw pointers are only an address and a
// provenance, with no thread affinity. Concurrent access to its bytes is coordinated by the pool
// (each byte belongs to at most one live `PoolBuffer`).
unsafe impl Send for Region {}
// SAFETY: `&Region` only exposes `base()`/`len()`, plain reads of immutable fields.
unsafe impl Sync for Region {}

impl Region {
    /// Obtains `len` usable zeroed bytes aligned to `MAX_ALIGN`.
    pub(crate) fn new_zeroed(len: usize) -> Result<Self, CoreError> {
        // Over-allocate with byte alignment and align by hand: for alignments above 16 the Rust
        // system allocator zeroes with an explicit memset, touching every page, whereas plain
        // `calloc` hands back untouched zero pages for large sizes.
        let total = len
            .checked_add(MAX_ALIGN)
            .ok_or(CoreError::SizeOverflow { size: len })?;
        let layout =
            Layout::from_size_align(total, 1).map_err(|_| CoreError::SizeOverflow { size: len })?;
        // SAFETY: `layout` has a non-zero size (`total >= MAX_ALIGN > 0`).
        let raw = unsafe { alloc_zeroed(layout) };
        let raw = NonNull::new(raw).ok_or(CoreError::OutOfMemory { bytes: total })?;
        let offset = raw.as_ptr().align_offset(MAX_ALIGN);
        debug_assert!(offset < MAX_ALIGN);
        // SAFETY: `offset < MAX_ALIGN`, so `raw + offset` and the `len` bytes after it lie inside
        // the `len + MAX_ALIGN` bytes just allocated.
        let base = unsafe { raw.add(offset) };
        Ok(Self {
            raw,
            layout,
            base,
            len,
        })
    }

    /// The first usable byte; every pointer the pool hands out is derived from it.
    pub(crate) fn base(&self) -> NonNull<u8> {
        self.base
    }

    /// Usable bytes from `base()`.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `alloc_zeroed(self.layout)` and is freed exactly once, here.
        // The pool drops regions only when no `PoolBuffer` is alive (each buffer holds an `Arc`
        // to the pool's state), so no pointer into the region outlives it.
        unsafe { dealloc(self.raw.as_ptr(), self.layout) }
    }
}
