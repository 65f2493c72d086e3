//! The aarch64 NEON kernel. Per 128-weight block, two 16-byte halves; for each quarter `j`,
//! `(v >> 2j) & 3` gives 16 codes as bytes, `vmull_s8`/`vmlal_high_s8` multiply them with 16
//! activations into i16 (at most 2 * 2 * 128 = 512 in magnitude) and `vpadalq_s16` adds pairs
//! into i32 lanes.
//!
//! Not run by our CI (x86-64 only); it compiles on aarch64 targets.

use crate::packed::layout::BLOCK_BYTES;
use std::arch::aarch64::*;

#[inline(always)]
unsafe fn quarter(acc: int32x4_t, c: uint8x16_t, x: *const i8) -> int32x4_t {
    let c = vreinterpretq_s8_u8(c);
    let xv = vld1q_s8(x);
    let p = vmull_s8(vget_low_s8(c), vget_low_s8(xv));
    let p = vmlal_high_s8(p, c, xv);
    vpadalq_s16(acc, p)
}

/// # Safety
/// `w.len()` a multiple of 32 and `x.len() == 4 * w.len()`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn dot_neon(w: &[u8], x: &[i8]) -> i32 {
    let mask = vdupq_n_u8(3);
    let mut acc = vdupq_n_s32(0);
    for k in 0..w.len() / BLOCK_BYTES {
        for h in 0..2 {
            // SAFETY: bytes 32k+16h..+16 of w and activations 128k+32j+16h..+16 of x are in
            // bounds by the contract.
            let v = vld1q_u8(w.as_ptr().add(k * BLOCK_BYTES + 16 * h));
            let xb = x.as_ptr().add(4 * k * BLOCK_BYTES + 16 * h);
            acc = quarter(acc, vandq_u8(v, mask), xb);
            acc = quarter(acc, vandq_u8(vshrq_n_u8::<2>(v), mask), xb.add(32));
            acc = quarter(acc, vandq_u8(vshrq_n_u8::<4>(v), mask), xb.add(64));
            acc = quarter(acc, vshrq_n_u8::<6>(v), xb.add(96));
        }
    }
    vaddvq_s32(acc)
}
