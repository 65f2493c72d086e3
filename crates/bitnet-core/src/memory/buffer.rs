//! [`PoolBuffer`]: the RAII handle to pool memory, with byte and typed views.

use std::ptr::NonNull;
use std::sync::Arc;

use super::buddy::BuddyBlock;
use super::config::MIN_ALIGN;
use super::pool::{HybridMemoryPool, PoolInner};
use super::stats::Category;

/// Which allocator a buffer's block belongs to, so that drop returns it to the right one.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source {
    Small { class: u32 },
    Large(BuddyBlock),
}

/// A block of pool memory, returned to its pool when dropped.
///
/// It behaves like a `Box<[u8]>` that the pool recycles: [`as_slice`](Self::as_slice) and
/// [`as_mut_slice`](Self::as_mut_slice) view the bytes, [`as_slice_of`](Self::as_slice_of) and
/// [`as_mut_slice_of`](Self::as_mut_slice_of) view them as any plain-old-data type (`f32`, `i8`,
/// `u32`, ...). The start is aligned to at least 64 bytes. Contents are unspecified on allocation
/// but always initialised.
pub struct PoolBuffer {
    ptr: NonNull<u8>,
    len: usize,
    source: Source,
    category: Category,
    pool: Arc<PoolInner>,
}

// SAFETY: a `PoolBuffer` exclusively owns `len` bytes at `ptr` (the pool never hands the same
// block to two live buffers), like a `Box<[u8]>`; the pool state it points to is `Send + Sync`.
unsafe impl Send for PoolBuffer {}
// SAFETY: `&PoolBuffer` only allows reading the bytes, so sharing it across threads is as safe as
// sharing `&[u8]`; mutation needs `&mut PoolBuffer`.
unsafe impl Sync for PoolBuffer {}

impl PoolBuffer {
    pub(crate) fn new(
        ptr: NonNull<u8>,
        len: usize,
        source: Source,
        category: Category,
        pool: Arc<PoolInner>,
    ) -> Self {
        Self {
            ptr,
            len,
            source,
            category,
            pool,
        }
    }

    /// Length in bytes, as requested.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The category this buffer is charged to.
    pub fn category(&self) -> Category {
        self.category
    }

    /// The pool this buffer came from (and returns to), e.g. to allocate a copy from the same
    /// pool and under the same cap.
    pub fn pool(&self) -> HybridMemoryPool {
        HybridMemoryPool::from_inner(Arc::clone(&self.pool))
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` lies in a live region the pool keeps alive through `self.pool`,
        // is exclusively owned by this buffer, and is initialised (regions start zeroed and are
        // only ever written with initialised bytes). The borrow of `self` prevents mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; the `&mut self` borrow makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The buffer as `len() / size_of::<T>()` values of `T` (trailing bytes that do not make a
    /// whole `T` are left out). Types aligned to more than 64 bytes are rejected at compile time.
    pub fn as_slice_of<T: bytemuck::Pod>(&self) -> &[T] {
        let bytes = whole_elements::<T>(self.len);
        bytemuck::cast_slice(&self.as_slice()[..bytes])
    }

    /// The buffer as `len() / size_of::<T>()` mutable values of `T`.
    pub fn as_mut_slice_of<T: bytemuck::Pod>(&mut self) -> &mut [T] {
        let bytes = whole_elements::<T>(self.len);
        bytemuck::cast_slice_mut(&mut self.as_mut_slice()[..bytes])
    }

    /// The first byte, for handing to FFI or SIMD code. Valid while the buffer lives.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The first byte, mutably. Valid while the buffer lives and not otherwise borrowed.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn raw_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    pub(crate) fn source(&self) -> Source {
        self.source
    }
}

/// Bytes covering whole `T`s. The compile-time checks make the typed views infallible: the
/// pool aligns every buffer to `MIN_ALIGN`, and zero-sized types would divide by zero.
fn whole_elements<T>(len: usize) -> usize {
    const {
        assert!(
            std::mem::size_of::<T>() > 0,
            "zero-sized types have no byte view"
        );
        assert!(
            std::mem::align_of::<T>() <= MIN_ALIGN,
            "pool buffers are only guaranteed 64-byte alignment"
        );
    }
    len - len % std::mem::size_of::<T>()
}

impl Drop for PoolBuffer {
    fn drop(&mut self) {
        self.pool.release(self);
    }
}

impl std::ops::Deref for PoolBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for PoolBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl AsRef<[u8]> for PoolBuffer {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsMut<[u8]> for PoolBuffer {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for PoolBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuffer")
            .field("len", &self.len)
            .field("category", &self.category)
            .field("ptr", &self.ptr)
            .finish()
    }
}
