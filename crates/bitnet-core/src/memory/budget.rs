//! The cap on memory a pool holds from the system, shared by the slabs and the buddy pool.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::CoreError;

/// Counts reserved bytes against a cap. Reserving is a single atomic update so that two threads
/// growing different size classes at once cannot both slip under the cap.
pub(crate) struct Budget {
    reserved: AtomicUsize,
    cap: usize,
}

impl Budget {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            reserved: AtomicUsize::new(0),
            cap,
        }
    }

    /// Claims `bytes` of the cap for a new region serving a request of `requested` bytes.
    pub(crate) fn try_reserve(&self, bytes: usize, requested: usize) -> Result<(), CoreError> {
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                r.checked_add(bytes).filter(|&n| n <= self.cap)
            })
            .map(|_| ())
            .map_err(|reserved| CoreError::CapExceeded {
                requested,
                needed: bytes,
                reserved,
                cap: self.cap,
            })
    }

    /// Gives back bytes whose region was freed (or never obtained).
    pub(crate) fn release(&self, bytes: usize) {
        self.reserved.fetch_sub(bytes, Ordering::AcqRel);
    }

    pub(crate) fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Acquire)
    }

    pub(crate) fn cap(&self) -> usize {
        self.cap
    }
}
