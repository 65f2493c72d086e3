//! The portable kernel: plain loops over the block layout; the reference the others must match.

use crate::packed::layout::{BLOCK_BYTES, BLOCK_BYTES_1BIT};

/// `sum(code * x)` for whole blocks (lengths checked by the caller).
pub(super) fn dot(w: &[u8], x: &[i8]) -> i32 {
    let mut acc = 0i32;
    for (wb, xb) in w
        .chunks_exact(BLOCK_BYTES)
        .zip(x.chunks_exact(4 * BLOCK_BYTES))
    {
        for (b, &byte) in wb.iter().enumerate() {
            for j in 0..4 {
                let code = ((byte >> (2 * j)) & 3) as i32;
                acc += code * xb[j * BLOCK_BYTES + b] as i32;
            }
        }
    }
    acc
}

/// `sum(code * x)` for whole 1-bit blocks, `code = 2 * bit` (the level `2 bit - 1` plus one).
pub(super) fn dot_binary(w: &[u8], x: &[i8]) -> i32 {
    let mut acc = 0i32;
    for (wb, xb) in w
        .chunks_exact(BLOCK_BYTES_1BIT)
        .zip(x.chunks_exact(8 * BLOCK_BYTES_1BIT))
    {
        for (b, &byte) in wb.iter().enumerate() {
            for j in 0..8 {
                let code = 2 * ((byte >> j) & 1) as i32;
                acc += code * xb[j * BLOCK_BYTES_1BIT + b] as i32;
            }
        }
    }
    acc
}

/// `out[r][t] = dot(w[r], x[t])`.
pub(super) fn tile<const R: usize, const T: usize>(w: [&[u8]; R], x: [&[i8]; T]) -> [[i32; T]; R] {
    w.map(|w| x.map(|x| dot(w, x)))
}
