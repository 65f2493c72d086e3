//! The AVX2 kernel. Per 128-weight block: one 32-byte load of codes, `(v >> 2j) & 3` gives the
//! codes of quarter `j` as bytes, `vpmaddubsw` multiplies them with 32 activations and adds
//! pairs into i16 (at most 2 * 2 * 128 = 512 in magnitude), four quarters are added in i16 (at
//! most 2048), and `vpmaddwd` with ones widens to i32 once per block.
//!
//! 1-bit blocks (16 bytes, byte `b` holding weights `b + 16 j` in bit `j`) are broadcast to both
//! 128-bit lanes; quarter `q` is a per-lane variable shift (bit `2q` in the low lane, `2q + 1` in
//! the high lane, i.e. weights `32q..32q+16` and `32q+16..32q+32`), `& 1`, doubled to the codes
//! 0/2, and then the same multiply-add as the 2-bit blocks.

use crate::packed::layout::{BLOCK_BYTES, BLOCK_BYTES_1BIT};
use std::arch::x86_64::*;

// The helpers carry the feature themselves: without it, the intrinsics would not inline into
// them and every `_mm256_*` would become a function call.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn quarters(v: __m256i) -> [__m256i; 4] {
    let mask = _mm256_set1_epi8(3);
    [
        _mm256_and_si256(v, mask),
        _mm256_and_si256(_mm256_srli_epi16::<2>(v), mask),
        _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask),
        _mm256_and_si256(_mm256_srli_epi16::<6>(v), mask),
    ]
}

/// The block's contribution, widened to eight i32 lanes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn block(c: &[__m256i; 4], x: *const i8) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let p0 = _mm256_maddubs_epi16(c[0], _mm256_loadu_si256(x as *const __m256i));
    let p1 = _mm256_maddubs_epi16(c[1], _mm256_loadu_si256(x.add(32) as *const __m256i));
    let p2 = _mm256_maddubs_epi16(c[2], _mm256_loadu_si256(x.add(64) as *const __m256i));
    let p3 = _mm256_maddubs_epi16(c[3], _mm256_loadu_si256(x.add(96) as *const __m256i));
    let s = _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3));
    _mm256_madd_epi16(s, ones)
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn hsum(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// # Safety
/// AVX2 must be available; `w.len()` a multiple of 32 and `x.len() == 4 * w.len()`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dot_avx2(w: &[u8], x: &[i8]) -> i32 {
    let mut acc = _mm256_setzero_si256();
    for k in 0..w.len() / BLOCK_BYTES {
        // SAFETY: block k spans w[32k..32k+32] and x[128k..128k+128], in bounds by the contract.
        let c = quarters(_mm256_loadu_si256(
            w.as_ptr().add(k * BLOCK_BYTES) as *const __m256i
        ));
        acc = _mm256_add_epi32(acc, block(&c, x.as_ptr().add(4 * k * BLOCK_BYTES)));
    }
    hsum(acc)
}

/// The codes (0 or 2) of the four quarters of a 1-bit block.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn quarters_1bit(w: *const u8) -> [__m256i; 4] {
    let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(w as *const __m128i));
    let one = _mm256_set1_epi8(1);
    let q = |lo: i32| {
        let hi = lo + 1;
        let counts = _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi);
        let bits = _mm256_and_si256(_mm256_srlv_epi32(v, counts), one);
        _mm256_add_epi8(bits, bits)
    };
    [q(0), q(2), q(4), q(6)]
}

/// # Safety
/// AVX2 must be available; `w.len()` a multiple of 16 and `x.len() == 8 * w.len()`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dot_binary_avx2(w: &[u8], x: &[i8]) -> i32 {
    let mut acc = _mm256_setzero_si256();
    for k in 0..w.len() / BLOCK_BYTES_1BIT {
        // SAFETY: block k spans w[16k..16k+16] and x[128k..128k+128], in bounds by the contract.
        let c = quarters_1bit(w.as_ptr().add(k * BLOCK_BYTES_1BIT));
        acc = _mm256_add_epi32(acc, block(&c, x.as_ptr().add(8 * k * BLOCK_BYTES_1BIT)));
    }
    hsum(acc)
}

/// # Safety
/// As [`dot_binary_avx2`], for each of the four `xs`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dot4_binary_avx2(w: &[u8], xs: [&[i8]; 4]) -> [i32; 4] {
    let mut acc = [_mm256_setzero_si256(); 4];
    for k in 0..w.len() / BLOCK_BYTES_1BIT {
        // SAFETY: as in `dot_binary_avx2`, for every x.
        let c = quarters_1bit(w.as_ptr().add(k * BLOCK_BYTES_1BIT));
        for (a, x) in acc.iter_mut().zip(xs) {
            *a = _mm256_add_epi32(*a, block(&c, x.as_ptr().add(8 * k * BLOCK_BYTES_1BIT)));
        }
    }
    [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
}

/// `out[r][t] = sum(code(w[r]) * x[t])`: each block's codes unpacked once for all `T` tokens.
///
/// # Safety
/// AVX2 must be available; every `w[r]` the same length, a multiple of 32, and every `x[t]`
/// four times that long.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn tile_avx2<const R: usize, const T: usize>(
    w: [&[u8]; R],
    x: [&[i8]; T],
) -> [[i32; T]; R] {
    let mut acc = [[_mm256_setzero_si256(); T]; R];
    for k in 0..w[0].len() / BLOCK_BYTES {
        for r in 0..R {
            // SAFETY: as in `dot_avx2`, for every row and token.
            let c = quarters(_mm256_loadu_si256(
                w[r].as_ptr().add(k * BLOCK_BYTES) as *const __m256i
            ));
            for t in 0..T {
                let b = block(&c, x[t].as_ptr().add(4 * k * BLOCK_BYTES));
                acc[r][t] = _mm256_add_epi32(acc[r][t], b);
            }
        }
    }
    acc.map(|row| row.map(|a| hsum(a)))
}
