//! The VNNI kernels: `vpdpbusd` multiplies unsigned bytes by signed bytes and adds each group of
//! four products straight into an i32 lane, one instruction where AVX2 needs `vpmaddubsw`,
//! `vpmaddwd` and an add. Our codes 0..=2 are the unsigned operand and the int8 activations
//! the signed one, so the kernels compute `sum(code * x)` with no widening steps.
//!
//! * AVX-512 VNNI, 512-bit: a block's 32 code bytes are broadcast to both halves of a register.
//!   Masking with `0x03` in the low half and `0x0C` in the high half gives the codes of weights
//!   `0..32` and four times the codes of weights `32..64`, in the order of 64 consecutive
//!   activations; the same mask after a 4-bit shift gives weights `64..128`. Lanes 8..16 of an
//!   accumulator therefore hold exactly four times their sum, which one shift undoes at the end:
//!   two bitwise ops and a shift unpack 128 weights, where shifting every quarter costs seven.
//! * AVX-VNNI, 256-bit (CPUs with VNNI but no AVX-512): the AVX2 unpacking (a shift and a mask
//!   per quarter) and one `vpdpbusd` per quarter.
//!
//! Both compute a tile: `R` weight rows against `T` activation rows, each block's codes unpacked
//! once and used for all `T` tokens (the batched and prompt-processing paths), and each token's
//! activations loaded once per block for all `R` rows.
//!
//! Overflow: one i32 lane gains at most `2 * 4 * 12 * 128` per block (two instructions of four
//! products, code 3 times 4, activation -128), so the lanes are summed into the result every
//! [`CHUNK_BLOCKS`] blocks.

use crate::packed::layout::BLOCK_BYTES;
use std::arch::x86_64::*;

/// Blocks accumulated in vector lanes before they are reduced: `8192 * 12288 < 2^27`, far inside
/// i32 (the reduced sum itself is bounded by `|sum| <= 3 * 128 * len`, as for every kernel).
const CHUNK_BLOCKS: usize = 8192;

/// Sum of the 16 lanes with lanes 8..16 divided by four (they hold four times their products).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn reduce_512(v: __m512i) -> i32 {
    let lo = _mm512_castsi512_si256(v);
    let hi = _mm512_extracti64x4_epi64::<1>(v);
    hsum_256(lo) + (hsum_256(hi) >> 2)
}

#[target_feature(enable = "avx2")]
#[inline]
unsafe fn hsum_256(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// `out[r][t] = sum(code(w[r]) * x[t])` with AVX-512 VNNI.
///
/// # Safety
/// AVX-512 F/BW/VNNI must be available; every `w[r]` the same length, a multiple of 32, and
/// every `x[t]` four times that long.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn tile_avx512<const R: usize, const T: usize>(
    w: [&[u8]; R],
    x: [&[i8]; T],
) -> [[i32; T]; R] {
    // Low half: codes of weights 0..32 (bits 0-1 of each byte); high half: 4 x the codes of
    // weights 32..64 (bits 2-3, left in place).
    let mask = _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set1_epi8(0x03)),
        _mm256_set1_epi8(0x0C),
    );
    let blocks = w[0].len() / BLOCK_BYTES;
    let wp = w.map(|w| w.as_ptr());
    let xp = x.map(|x| x.as_ptr());
    let mut out = [[0i32; T]; R];
    let mut start = 0;
    while start < blocks {
        let end = blocks.min(start + CHUNK_BLOCKS);
        // With one or two tokens, the two halves of a block go to two accumulators: `vpdpbusd`
        // has a latency of several cycles, and R * T chains of two would leave it waiting.
        // With more tokens the second set is never written and the compiler drops it.
        let split = usize::from(T <= 2);
        let mut acc = [[[_mm512_setzero_si512(); 2]; T]; R];
        for k in start..end {
            // SAFETY: block k spans w[r][32k..32k+32] and x[t][128k..128k+128], in bounds by
            // the contract.
            let mut c = [[_mm512_setzero_si512(); 2]; R];
            for r in 0..R {
                let v = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                    wp[r].add(k * BLOCK_BYTES) as *const __m256i
                ));
                c[r][0] = _mm512_and_si512(v, mask);
                c[r][1] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
            }
            for t in 0..T {
                let x0 = _mm512_loadu_si512(xp[t].add(4 * k * BLOCK_BYTES) as *const _);
                let x1 = _mm512_loadu_si512(xp[t].add(4 * k * BLOCK_BYTES + 64) as *const _);
                for r in 0..R {
                    let a = &mut acc[r][t];
                    a[0] = _mm512_dpbusd_epi32(a[0], c[r][0], x0);
                    a[split] = _mm512_dpbusd_epi32(a[split], c[r][1], x1);
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                let [a0, a1] = acc[r][t];
                out[r][t] += reduce_512(_mm512_add_epi32(a0, a1));
            }
        }
        start = end;
    }
    out
}

/// `out[r][t] = sum(code(w[r]) * x[t])` with AVX-VNNI (256-bit, VEX-encoded `vpdpbusd`).
///
/// # Safety
/// AVX2 and AVX-VNNI must be available; lengths as for [`tile_avx512`].
#[target_feature(enable = "avx2,avxvnni")]
pub(super) unsafe fn tile_avxvnni<const R: usize, const T: usize>(
    w: [&[u8]; R],
    x: [&[i8]; T],
) -> [[i32; T]; R] {
    let mask = _mm256_set1_epi8(3);
    let blocks = w[0].len() / BLOCK_BYTES;
    let wp = w.map(|w| w.as_ptr());
    let xp = x.map(|x| x.as_ptr());
    let mut out = [[0i32; T]; R];
    let mut start = 0;
    while start < blocks {
        let end = blocks.min(start + CHUNK_BLOCKS);
        let mut acc = [[_mm256_setzero_si256(); T]; R];
        for k in start..end {
            // Quarter by quarter, so that only R code registers are live beside the
            // accumulators (AVX2 has 16 vector registers).
            for q in 0..4 {
                let mut c = [_mm256_setzero_si256(); R];
                for r in 0..R {
                    // SAFETY: as in `tile_avx512`.
                    let v = _mm256_loadu_si256(wp[r].add(k * BLOCK_BYTES) as *const __m256i);
                    let v = match q {
                        0 => v,
                        1 => _mm256_srli_epi16::<2>(v),
                        2 => _mm256_srli_epi16::<4>(v),
                        _ => _mm256_srli_epi16::<6>(v),
                    };
                    c[r] = _mm256_and_si256(v, mask);
                }
                for t in 0..T {
                    let xv = _mm256_loadu_si256(
                        xp[t].add(4 * k * BLOCK_BYTES + 32 * q) as *const __m256i
                    );
                    for r in 0..R {
                        acc[r][t] = _mm256_dpbusd_avx_epi32(acc[r][t], c[r], xv);
                    }
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                out[r][t] += hsum_256(acc[r][t]);
            }
        }
        start = end;
    }
    out
}
