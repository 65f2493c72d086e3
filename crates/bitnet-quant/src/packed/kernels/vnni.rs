//! The VNNI kernels: `vpdpbusd` multiplies unsigned bytes by signed bytes and adds each group of
//! four products straight into an i32 lane, one instruction where AVX2 needs `vpmaddubsw`,
//! `vpmaddwd` and an add. Our codes 0..=2 are the unsigned operand and the int8 activations
//! the signed one, so the kernels compute `sum(code * x)` with no widening steps.
//!
//! * AVX-512 VNNI, 512-bit: a block's 32 code bytes are broadcast to both halves of a register.
//!   Masking with `0x03` in the low half and `0x0C` in the high half gives the codes of weights
//!   `0..32` and four times the codes of weights `32..64`, in the order of 64 consecutive
//!   activations; masking with `0x30` / `0xC0` gives 16 and 64 times the codes of weights
//!   `64..128` (or, with more tokens, where registers are short, the first mask after a 4-bit
//!   shift gives 1 and 4 times them). Each lane of an accumulator thus holds a known power of
//!   two times its sum, which an exact arithmetic shift per lane undoes at the end: two bitwise
//!   ops unpack 128 weights, where shifting every quarter costs seven.
//! * AVX-VNNI, 256-bit (CPUs with VNNI but no AVX-512): the AVX2 unpacking (a shift and a mask
//!   per quarter) and one `vpdpbusd` per quarter.
//!
//! Both compute a tile: `R` weight rows against `T` activation rows, each block's codes unpacked
//! once and used for all `T` tokens (the batched and prompt-processing paths), and each token's
//! activations loaded once per block for all `R` rows.
//!
//! Overflow: one i32 lane gains at most `4 * 192 * 128` per block (four products, code 3 times
//! 64, activation -128), so the lanes are reduced into the result every [`CHUNK_BLOCKS`]
//! blocks, each lane shifted back to scale 1 before the lanes are added.

use crate::packed::layout::BLOCK_BYTES;
use std::arch::x86_64::*;

/// Blocks accumulated in vector lanes before they are reduced: `4096 * 98304 < 2^29`, inside
/// i32 (the reduced sum itself is bounded by `|sum| <= 3 * 128 * len`, as for every kernel).
const CHUNK_BLOCKS: usize = 4096;

/// A 512-bit vector of `lo` in its low 256 bits and `hi` in its high 256 bits.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn halves(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// Sum of the 16 lanes, each divided (exactly) by `2^shift[lane]` first.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn reduce_512(v: __m512i, shift: __m512i) -> i32 {
    _mm512_reduce_add_epi32(_mm512_srav_epi32(v, shift))
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
    // With one or two tokens, each of the block's two registers of codes goes to its own
    // accumulator (`vpdpbusd` has a latency of several cycles, and R * T chains of two would
    // leave it waiting), and the second needs no shift: masks 0x30 / 0xC0, scales 16 / 64.
    // With more tokens, registers are short: both go to one accumulator, the second shifted
    // down to scales 1 / 4 like the first.
    let split = T <= 2;
    let m01 = halves(_mm256_set1_epi8(0x03), _mm256_set1_epi8(0x0C));
    let m23 = if split {
        halves(_mm256_set1_epi8(0x30), _mm256_set1_epi8(0xC0u8 as i8))
    } else {
        m01
    };
    let s01 = halves(_mm256_set1_epi32(0), _mm256_set1_epi32(2));
    let s23 = if split {
        halves(_mm256_set1_epi32(4), _mm256_set1_epi32(6))
    } else {
        s01
    };
    let second = usize::from(split);
    let blocks = w[0].len() / BLOCK_BYTES;
    let wp = w.map(|w| w.as_ptr());
    let xp = x.map(|x| x.as_ptr());
    let mut out = [[0i32; T]; R];
    let mut start = 0;
    while start < blocks {
        let end = blocks.min(start + CHUNK_BLOCKS);
        // The second accumulator of each pair is only written when `split`; otherwise it stays
        // zero and the compiler drops it.
        let mut acc = [[[_mm512_setzero_si512(); 2]; T]; R];
        for k in start..end {
            // SAFETY: block k spans w[r][32k..32k+32] and x[t][128k..128k+128], in bounds by
            // the contract.
            let mut c = [[_mm512_setzero_si512(); 2]; R];
            for r in 0..R {
                let v = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                    wp[r].add(k * BLOCK_BYTES) as *const __m256i
                ));
                c[r][0] = _mm512_and_si512(v, m01);
                c[r][1] = if split {
                    _mm512_and_si512(v, m23)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16::<4>(v), m23)
                };
            }
            for t in 0..T {
                let x0 = _mm512_loadu_si512(xp[t].add(4 * k * BLOCK_BYTES) as *const _);
                let x1 = _mm512_loadu_si512(xp[t].add(4 * k * BLOCK_BYTES + 64) as *const _);
                for r in 0..R {
                    let a = &mut acc[r][t];
                    a[0] = _mm512_dpbusd_epi32(a[0], c[r][0], x0);
                    a[second] = _mm512_dpbusd_epi32(a[second], c[r][1], x1);
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                let [a0, a1] = acc[r][t];
                out[r][t] += reduce_512(a0, s01);
                if split {
                    out[r][t] += reduce_512(a1, s23);
                }
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
        // One token: each quarter has its own accumulator, four independent `vpdpbusd` chains
        // per row instead of one chain four deep. More tokens give enough chains as they are.
        let mut acc = [[[_mm256_setzero_si256(); 4]; T]; R];
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
                    let a = if T == 1 { q } else { 0 };
                    for r in 0..R {
                        acc[r][t][a] = _mm256_dpbusd_avx_epi32(acc[r][t][a], c[r], xv);
                    }
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                let [a0, a1, a2, a3] = acc[r][t];
                let sum = _mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3));
                out[r][t] += hsum_256(sum);
            }
        }
        start = end;
    }
    out
}
