//! The portable kernel: plain loops over the block layout; the reference the others must match.

use crate::packed::layout::BLOCK_BYTES;

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
