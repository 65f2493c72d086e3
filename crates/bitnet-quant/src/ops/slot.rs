//! Output buffers that the CPU kernels fill, without a memset and without undefined behaviour.
//!
//! A kernel that writes every value of its output does not need `vec![0.0; n]`'s zeroing (on the
//! buffers of a 1-thread MNIST training step that memset was 7 % of the step). Its output starts
//! as `Box<[MaybeUninit<T>]>` ([`Box::new_uninit_slice`]): no `&[T]` or `&mut [T]` ever points
//! at it until every slot is written, after which the caller turns it into a `Vec<T>` with
//! `assume_init`. Setting a `Vec`'s length over uninitialised memory instead breaks
//! `Vec::set_len`'s contract, even if nothing reads it.
//!
//! The same kernels also write into buffers that are already initialised (the tests, and callers
//! that fill part of a buffer they own), so they are generic over [`Slot`], which both `T` and
//! `MaybeUninit<T>` implement: no cast from `&mut [T]` to `&mut [MaybeUninit<T>]`, which would
//! let safe code write uninitialised values into the caller's `T`s.

use std::mem::MaybeUninit;

/// One place a kernel writes a value into: an initialised `T`, or a fresh `MaybeUninit<T>`.
pub(crate) trait Slot<T: Copy>: Sized + Send {
    /// Stores `v` without reading or dropping what was there (it may be uninitialised).
    fn put(&mut self, v: T);

    /// Sets every slot to `v` and hands them back as initialised values, for kernels that
    /// accumulate into their output (`+=`) rather than store each value once.
    fn fill(slots: &mut [Self], v: T) -> &mut [T];

    /// The first slot's address, for kernels that store with SIMD intrinsics or through raw
    /// pointers: `slots.len()` values of `T` may be written from it (each slot has `T`'s layout).
    // Only the x86 kernels store through pointers; elsewhere the portable ones use `put`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn first_ptr(slots: &mut [Self]) -> *mut T;
}

impl<T: Copy + Send> Slot<T> for T {
    #[inline(always)]
    fn put(&mut self, v: T) {
        *self = v;
    }

    #[inline(always)]
    fn fill(slots: &mut [T], v: T) -> &mut [T] {
        slots.fill(v);
        slots
    }

    #[inline(always)]
    fn first_ptr(slots: &mut [T]) -> *mut T {
        slots.as_mut_ptr()
    }
}

impl<T: Copy + Send> Slot<T> for MaybeUninit<T> {
    #[inline(always)]
    fn put(&mut self, v: T) {
        self.write(v);
    }

    #[inline(always)]
    fn fill(slots: &mut [MaybeUninit<T>], v: T) -> &mut [T] {
        for s in slots.iter_mut() {
            s.write(v);
        }
        // SAFETY: every slot was written just above, and `MaybeUninit<T>` has `T`'s layout, so
        // the slice is `slots.len()` initialised `T`s. Only `T`s can be stored through the
        // result, so the slots stay initialised for whoever finishes the buffer.
        unsafe { &mut *(slots as *mut [MaybeUninit<T>] as *mut [T]) }
    }

    #[inline(always)]
    fn first_ptr(slots: &mut [MaybeUninit<T>]) -> *mut T {
        // `MaybeUninit<T>` is `repr(transparent)` over `T`.
        slots.as_mut_ptr().cast::<T>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `0, 1, 2, ...` the three ways a kernel can (`put`, `fill` then accumulate, a raw
    /// pointer): a third of `out` each, the pointer also the remainder.
    fn write_all<S: Slot<f32>>(out: &mut [S]) {
        let third = out.len() / 3;
        let (a, rest) = out.split_at_mut(third);
        let (b, c) = rest.split_at_mut(third);
        for (i, s) in a.iter_mut().enumerate() {
            s.put(i as f32);
        }
        for (i, v) in S::fill(b, 1.0).iter_mut().enumerate() {
            *v += (third + i) as f32 - 1.0;
        }
        let p = S::first_ptr(c);
        for i in 0..c.len() {
            // SAFETY: `i < c.len()`, and `first_ptr` allows writing `c.len()` values.
            unsafe { p.add(i).write((2 * third + i) as f32) };
        }
    }

    /// The same kernel fills fresh slots and an initialised buffer with the same values: under
    /// Miri (`cargo +nightly miri test -p bitnet-quant --lib slot`) reading the fresh ones after
    /// `assume_init` is also checked to read only written memory.
    #[test]
    fn fresh_and_initialised_slots_receive_the_same_values() {
        for len in [0usize, 1, 3, 10, 100] {
            let mut fresh = Box::<[f32]>::new_uninit_slice(len);
            write_all(&mut fresh);
            // SAFETY: `write_all` writes every slot (its three parts cover `out`).
            let fresh = unsafe { fresh.assume_init() }.into_vec();
            let mut old = vec![f32::NAN; len];
            write_all(&mut old);
            let want: Vec<f32> = (0..len).map(|i| i as f32).collect();
            assert_eq!(fresh, want, "fresh slots, len {len}");
            assert_eq!(old, want, "initialised buffer, len {len}");
        }
    }

    /// `fill` overwrites values already there, for either kind of slot.
    #[test]
    fn fill_sets_every_slot() {
        let mut old = vec![7i32; 5];
        assert_eq!(<i32 as Slot<i32>>::fill(&mut old, -2), &[-2; 5]);
        assert_eq!(old, [-2; 5]);
        let mut fresh = Box::<[i32]>::new_uninit_slice(5);
        assert_eq!(Slot::fill(&mut fresh[..], 3), &[3; 5]);
        // SAFETY: `fill` wrote every slot.
        assert_eq!(&*unsafe { fresh.assume_init() }, &[3; 5]);
    }
}
